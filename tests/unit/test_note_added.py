"""NoteAdded: legal in every stage, changes nothing but the version, replays, and its
reducer on the board mirrors the aggregate."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from domain.commands import Policy, apply_named
from domain.errors import InvalidCommand
from domain.events import NoteAdded
from domain.stages import Stage
from domain.story import Story
from domain.transitions import legal_events_from
from projections.state import apply_story_event
from service.events_log import LoggedEvent
from tests.unit.story_builders import story_in

AGENT = "agent:coder-s1-1"


def note(story: Story, text: str | None, actor: str = AGENT) -> None:
    apply_named(story, "add_note", actor=actor, reason=text, data={}, policy=Policy())


def _state(story: Story) -> dict[str, Any]:
    skip = {"version", "modified_on"}
    return copy.deepcopy({k: v for k, v in story.snapshot().items() if k not in skip})


@pytest.mark.parametrize("stage", list(Stage), ids=str)
def test_a_note_is_legal_in_every_stage_and_changes_nothing_else(stage: Stage) -> None:
    story = story_in(stage)
    before = _state(story)
    version = story.version
    assert "add_note" in legal_events_from(stage)
    note(story, "tried the flaky test twice;\nit is the clock")
    assert story.version == version + 1
    assert _state(story) == before  # stage, last_event, counters: all unchanged
    event = story.pending_events[-1]
    assert isinstance(event, NoteAdded)
    assert (event.actor, event.reason) == (AGENT, "tried the flaky test twice;\nit is the clock")
    assert event.from_stage is stage and event.to_stage is stage
    assert event.TOPIC == "storyline.NoteAdded.v1"


@pytest.mark.parametrize("text", [None, "", "   \n", "a\x00b", "x" * 10_001])
def test_a_note_without_usable_text_is_refused_and_nothing_changes(text: str | None) -> None:
    story = story_in(Stage.CODING)
    version = story.version
    with pytest.raises(InvalidCommand):
        note(story, text)
    assert story.version == version
    assert not [e for e in story.pending_events if isinstance(e, NoteAdded)]


def test_replay_rebuilds_the_notes_and_the_state() -> None:
    story = story_in(Stage.MERGE_FAILURE)
    note(story, "conflict is in README only")
    note(story, "resolved by keeping both lines", actor="user:alice")
    replayed: Story | None = None
    for event in story.collect_events():
        replayed = event.mutate(replayed)  # type: ignore[arg-type]
    assert replayed is not None
    assert replayed.snapshot() == story.snapshot()
    assert replayed.notes == 2
    assert (replayed.version, replayed.last_event) == (story.version, "MergeFailed")


def test_an_expected_version_stale_only_by_notes_is_accepted() -> None:
    story = story_in(Stage.CODING)
    seen = story.version
    note(story, "one")
    note(story, "two")
    assert story.accepts_expected_version(seen)
    assert story.accepts_expected_version(story.version)
    assert not story.accepts_expected_version(seen - 1)
    assert not story.accepts_expected_version(story.version + 1)


def test_the_board_reducer_mirrors_the_aggregate_for_notes() -> None:
    story = story_in(Stage.GATES)
    note(story, "gates are slow today")
    state = None
    for position, event in enumerate(story.collect_events(), start=1):
        payload = event.model_dump(mode="json")
        common = {k: payload.pop(k) for k in ("actor", "reason", "from_stage", "to_stage")}
        for key in ("originator_id", "originator_version", "timestamp"):
            payload.pop(key)
        logged = LoggedEvent(
            position=position,
            story_id=event.originator_id,
            version=event.originator_version,
            type=type(event).__name__,
            topic=event.TOPIC,
            timestamp=datetime.now(UTC),
            data=payload,
            **common,
        )
        state = apply_story_event(state, logged)
    assert state is not None
    shared = state.shared()
    snapshot = story.snapshot()
    for key in ("version", "stage", "last_event", "retry_count", "commits_ahead"):
        assert shared[key] == snapshot[key], key
    assert state.last_event == "GatesStarted"
    assert state.last_actor == "runner:gates"
