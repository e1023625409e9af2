"""The durable pieces under the API: idempotency keys and the gap-safe log reader."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from api.sse import LogReader
from service.application import StorylineApplication
from service.idempotency import IdempotencyStore, fingerprint
from service.settings import Database


def test_idempotency_store_lifecycle(app: StorylineApplication) -> None:
    store = IdempotencyStore(app, lease_secs=60)
    fp = fingerprint("POST", "/stories", {"name": "x"})
    assert store.claim("user:a", "k", fp).state == "claimed"
    assert store.claim("user:a", "k", fp).state == "in_progress"
    assert store.claim("user:a", "k", "other").state == "mismatch"
    assert store.claim("user:b", "k", "other").state == "claimed"  # scoped per actor
    store.complete("user:a", "k", 201, {"id": "1"})
    replay = store.claim("user:a", "k", fp)
    assert (replay.state, replay.status_code, replay.body) == ("replay", 201, {"id": "1"})

    store.release("user:b", "k")  # a failed first attempt frees the key
    assert store.claim("user:b", "k", fp).state == "claimed"

    # A claim whose process died is taken over once its lease ran out.
    expired = IdempotencyStore(app, lease_secs=0)
    assert expired.claim("user:b", "k", fp).state == "claimed"
    store.purge(time.time() + 1)
    assert store.claim("user:a", "k", "new").state == "claimed"


@pytest.fixture
def pg_app(pg_database: Database) -> Iterator[StorylineApplication]:
    application = StorylineApplication(pg_database)
    try:
        yield application
    finally:
        application.close()


def _conninfo(db: Database) -> str:
    return db.sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://")


def _insert_copy(conn: psycopg.Connection, story_id: str) -> int:
    """Insert a copy of event 1 as another story's first event; returns its position."""
    row = conn.execute(
        "INSERT INTO storyline_events (originator_id, originator_version, topic, state) "
        "SELECT %s, 1, topic, state FROM storyline_events WHERE notification_id = 1 "
        "RETURNING notification_id",
        (story_id,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _create(app: StorylineApplication, sid: str) -> int:
    return app.create_story(
        story_id=sid, name=sid, description="", acceptance_criteria=["a"], actor="user:t"
    ).position


def test_reader_waits_for_a_transaction_that_took_an_earlier_position(
    pg_app: StorylineApplication, pg_database: Database
) -> None:
    first = _create(pg_app, "a")
    reader = LogReader(pg_app, gap_timeout=60, settle_wait=0.05)
    with psycopg.connect(_conninfo(pg_database)) as slow:
        in_flight = _insert_copy(slow, "slow")  # position taken, not committed yet
        later = _create(pg_app, "b")
        assert in_flight < later
        # Position `later` is visible but `in_flight` may still commit: stop before it.
        assert [e.position for e in reader.read(first, 100)] == []
        assert [e.position for e in reader.read(0, 100)] == [first]
        slow.commit()
    assert [e.position for e in reader.read(first, 100)] == [in_flight, later]


def test_reader_passes_holes_left_by_rollbacks(
    pg_app: StorylineApplication, pg_database: Database
) -> None:
    first = _create(pg_app, "a")
    with psycopg.connect(_conninfo(pg_database)) as aborted:
        hole = _insert_copy(aborted, "gone")
        aborted.rollback()
    later = _create(pg_app, "b")
    assert hole < later
    reader = LogReader(pg_app, gap_timeout=60, settle_wait=5)
    assert [e.position for e in reader.read(first, 100)] == [later]


def test_reader_passes_an_old_hole_without_waiting(
    pg_app: StorylineApplication, pg_database: Database
) -> None:
    first = _create(pg_app, "a")
    with psycopg.connect(_conninfo(pg_database)) as stuck:
        _insert_copy(stuck, "stuck")  # e.g. a session left idle in transaction
        later = _create(pg_app, "b")
        patient = LogReader(pg_app, gap_timeout=60, settle_wait=0.05)
        assert patient.read(first, 100) == []
        hasty = LogReader(pg_app, gap_timeout=0, settle_wait=0.05)
        assert [e.position for e in hasty.read(first, 100)] == [later]
        stuck.rollback()
