"""PostgreSQL hands out positions at INSERT and shows them at COMMIT: followers must not skip.

A transaction that inserted position N but has not committed yet leaves a hole below later
positions that other writers already committed. The runner must wait for it (not skip N),
and must not wait for a hole that a rollback left for good.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from domain.story import Story
from projections import ProjectionRunner, ReadModels
from service.application import StorylineApplication
from service.settings import Database

ACTOR = "user:test"


@pytest.fixture
def pg_app(pg_database: Database) -> Iterator[StorylineApplication]:
    application = StorylineApplication(pg_database)
    try:
        yield application
    finally:
        application.close()


def insert_uncommitted(
    db: Database, app: StorylineApplication, story_id: str
) -> psycopg.Connection:
    """Insert a StoryCreated for ``story_id`` in a transaction left open; returns it."""
    story = Story.create(
        story_id=story_id,
        name=f"late {story_id}",
        description="d",
        acceptance_criteria=["ok"],
        depends_on=[],
        actor=ACTOR,
    )
    (event,) = story.collect_events()
    stored = app.mapper.to_stored_event(event)
    conn = psycopg.connect(host=db.host, port=db.port, user=db.user, dbname=db.dbname)
    conn.execute(
        "INSERT INTO storyline_events (originator_id, originator_version, topic, state) "
        "VALUES (%s, %s, %s, %s)",
        (stored.originator_id, stored.originator_version, stored.topic, stored.state),
    )
    return conn


def history_positions(read_models: ReadModels) -> list[int]:
    return [int(e["position"]) for e in read_models.history(limit=1000)]


@pytest.mark.postgres
def test_a_late_commit_below_the_head_is_waited_for_and_a_rollback_is_not(
    pg_database: Database, pg_app: StorylineApplication
) -> None:
    read_models = ReadModels(pg_database)
    runner = ProjectionRunner(pg_database, gap_lock_timeout=0.2)
    try:
        first = pg_app.create_story(
            name="first", description="d", acceptance_criteria=["ok"], actor=ACTOR
        )
        late = insert_uncommitted(pg_database, pg_app, "late")  # takes position 2
        third = pg_app.transition(first.story.id, "start_coding", actor=ACTOR)
        assert (first.position, third.position) == (1, 3)

        runner.run_once()
        # Position 3 is visible but 2 might still commit: nobody moves past the hole.
        assert set(read_models.positions().values()) == {1}
        assert history_positions(read_models) == [1]

        late.commit()
        late.close()
        runner.run_once()
        assert history_positions(read_models) == [1, 2, 3]
        row = read_models.board_row("late")
        assert row is not None and row["name"] == "late late"

        gone = insert_uncommitted(pg_database, pg_app, "gone")  # takes position 4
        gone.rollback()
        gone.close()
        fifth = pg_app.transition(first.story.id, "block", actor=ACTOR, reason="hold")
        assert fifth.position == 5
        runner.run_once()
        # The rolled-back position can never appear: it is passed at once, not after a timeout.
        assert set(read_models.positions().values()) == {5}
        assert history_positions(read_models) == [1, 2, 3, 5]
        assert read_models.board_row("gone") is None
        assert runner.check() == {}
    finally:
        runner.close()
        read_models.close()
