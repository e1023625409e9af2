"""A log written before the review stage existed replays into the states it had then.

``tests/fixtures/pre_review_log/events.json`` was dumped from a real store (the demo plus
operator paths, see ``make_fixture.py`` there) before the model learnt reviews, evaluations
and interviews. Its events are written back as they were stored, on both backends, and each
story, epic and the gate registry must replay into exactly the state recorded with them;
fields the model gained since are allowed, changed ones are not.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import StoredEvent

from projections import ProjectionRunner, ReadModels
from service.application import StorylineApplication
from service.epics import EpicService
from service.gate_registry import GateRegistryService
from service.settings import Database

FIXTURE = Path(__file__).parents[1] / "fixtures" / "pre_review_log" / "events.json"


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return value


def _state(aggregate: Any) -> dict[str, Any]:
    found = {k: _plain(v) for k, v in vars(aggregate).items() if not k.startswith("_")}
    return found | {"id": aggregate.id, "version": aggregate.version}


@pytest.fixture
def old_log(app: StorylineApplication) -> dict[str, Any]:
    fixture = json.loads(FIXTURE.read_text())
    app.recorder.insert_events(
        [
            StoredEvent(
                originator_id=e["originator_id"],
                originator_version=e["originator_version"],
                topic=e["topic"],
                state=e["state"].encode(),
            )
            for e in fixture["events"]
        ]
    )
    return fixture


def _same(kept: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The fields recorded then whose value differs now (a new field is not a difference)."""
    return [
        f"{key}: then {kept[key]!r}, now {now.get(key, '<gone>')!r}"
        for key in kept
        if now.get(key, "<gone>") != json.loads(json.dumps(kept[key], default=str))
    ]


def test_every_aggregate_replays_into_its_old_state(
    app: StorylineApplication, old_log: dict[str, Any]
) -> None:
    aggregates = old_log["aggregates"]
    kinds = {entry["kind"] for entry in aggregates.values()}
    assert kinds == {"story", "epic", "gates"}
    epics = EpicService(app)
    assert sorted(app.story_ids()) == sorted(
        k for k, v in aggregates.items() if v["kind"] == "story"
    )
    assert sorted(epics.ids()) == sorted(k for k, v in aggregates.items() if v["kind"] == "epic")
    for aggregate_id, entry in aggregates.items():
        if entry["kind"] == "story":
            story = app.get_story(aggregate_id)
            now = json.loads(json.dumps(_state(story), default=str))
            assert _same(entry["state"], now) == [], aggregate_id
            snapshot = json.loads(json.dumps(story.snapshot(), default=str))
            assert _same(entry["snapshot"], snapshot) == [], aggregate_id
        elif entry["kind"] == "epic":
            now = json.loads(json.dumps(_state(epics.get(aggregate_id)), default=str))
            assert _same(entry["state"], now) == [], aggregate_id
        else:
            now = json.loads(json.dumps(_state(GateRegistryService(app).get()), default=str))
            assert _same(entry["state"], now) == []
    # The log is varied enough to be evidence: every stage a story could reach then.
    stages = {v["state"]["stage"] for v in aggregates.values() if v["kind"] == "story"}
    assert {"done", "archived", "blocked", "backlog"} <= stages


def test_the_read_models_rebuild_from_the_old_log(
    database: Database, app: StorylineApplication, old_log: dict[str, Any]
) -> None:
    runner = ProjectionRunner(database, app, batch_size=50, rebuild_batch_size=50)
    models = ReadModels(database)
    try:
        replayed = runner.rebuild()
        assert replayed == app.max_position() == len(old_log["events"])
        assert runner.check() == {}
        for story_id, entry in old_log["aggregates"].items():
            if entry["kind"] != "story":
                continue
            row = models.board_row(story_id)
            assert row is not None
            assert row["stage"] == entry["snapshot"]["stage"]
            assert row["retry_count"] == entry["snapshot"]["retry_count"]
    finally:
        models.close()
        runner.close()
