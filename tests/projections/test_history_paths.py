"""History rows are the same whichever way they are made, and unknown events pass through.

On PostgreSQL the history is derived in SQL from the stored events; it must equal rows built
from ``service.events_log.decode`` for the same log. An event type this code does not know
(written by a newer storyline) must be recorded, not crash or stall any projection.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from projections import ProjectionRunner, ReadModels
from projections.workload import drive_app
from service.application import StorylineApplication, events_table
from service.settings import Database
from tests.projections.conftest import dump_projection_tables


@pytest.mark.postgres
def test_sql_derived_history_equals_decoded_history(pg_database: Database) -> None:
    app = StorylineApplication(pg_database)
    read_models = ReadModels(pg_database)
    runner = ProjectionRunner(pg_database, rebuild_batch_size=97)
    try:
        drive_app(app, random.Random(12), stories=12, steps=300)
        history = runner._tracked["history"].projection
        assert history.pipelined
        runner.rebuild("history")
        in_sql = dump_projection_tables(read_models)["story_history"]
        history.events_table = None  # no event table to read: rows come from decode()
        assert not history.pipelined
        runner.rebuild("history")
        decoded = dump_projection_tables(read_models)["story_history"]
        assert len(in_sql) == app.max_position()
        assert in_sql == decoded
    finally:
        runner.close()
        read_models.close()
        app.close()


def test_an_unknown_event_type_is_recorded_and_nothing_stalls(
    database: Database, app: StorylineApplication, read_models: ReadModels
) -> None:
    story = app.create_story(name="s", description="d", acceptance_criteria=["a"], actor="u:x")
    payload = {
        "timestamp": "2030-01-01T00:00:00.000001Z",
        "actor": "system",
        "reason": "from the future",
        "from_stage": "backlog",
        "to_stage": "backlog",
        "novelty": [1, 2],
    }
    insert_raw(database, app, story.story.id, 2, "storyline.FromTheFuture.v1", payload)
    # The application cannot replay that story any more (it does not know the type); the
    # projections must still take it and everything after it.
    other = app.create_story(name="o", description="d", acceptance_criteria=["a"], actor="u:x")
    app.transition(other.story.id, "start_coding", actor="u:x")
    runner = ProjectionRunner(database)
    try:
        runner.run_once()
        assert all(not s.failed and s.lag == 0 for s in read_models.status())
        future = read_models.history(story.story.id)[1]
        assert (future["type"], future["actor"], future["reason"]) == (
            "FromTheFuture",
            "system",
            "from the future",
        )
        assert future["data"] == {"novelty": [1, 2]}
        row = read_models.board_row(story.story.id)
        assert row is not None
        assert (row["version"], row["stage"], row["last_event"]) == (2, "backlog", "FromTheFuture")
        later = read_models.board_row(other.story.id)
        assert later is not None and later["stage"] == "coding"
        assert runner.check() == {}
    finally:
        runner.close()


def insert_raw(
    db: Database,
    app: StorylineApplication,
    story_id: str,
    version: int,
    topic: str,
    payload: dict[str, Any],
) -> None:
    table = events_table(db)
    statement = text(
        f"INSERT INTO {table} (originator_id, originator_version, topic, state) "
        "VALUES (:story, :version, :topic, :state)"
    )
    params = {"story": story_id, "version": version, "topic": topic}
    with ReadModels(db).engine.begin() as conn:
        conn.execute(statement, {**params, "state": orjson.dumps(payload)})
