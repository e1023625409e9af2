"""Row 1, the physical limit: single-row INSERT commits per second, no library at all.

PostgreSQL: plain psycopg, one autocommit ``INSERT`` per commit (prepared), into a table of
the event store's shape (text id, version, topic, bytea state, ``bigserial`` position, the
same primary key and unique position index). SQLite: the stdlib driver in WAL mode (as the
library opens it), one autocommit ``INSERT`` per commit into the ``stored_events`` shape.
The payload is a real stored event (``StoryBlocked``) so the bytes per row match row 3.

Row ``1n`` (PostgreSQL) is the same INSERT plus a ``NOTIFY`` in its transaction, through a
plpgsql function shaped like the event store's ``es_insert_events_text``: what every
storyline commit does so that other processes wake at once. PostgreSQL serialises the
commits of notifying transactions (a database-wide lock held until the commit record is
flushed), so concurrent clients no longer share fsyncs: this row is the ceiling of any
design that notifies on every commit.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg

from bench.common import Measurement, Settings, run_clients, scratch_database
from service.settings import Database

ROW = "1"
LABEL = "physical limit: single-row INSERT commits (plain driver)"
LABEL_NOTIFY = "single-row INSERT + NOTIFY per commit (plain driver, plpgsql like the store's)"
TABLE = "raw_events"


def sample_state() -> tuple[str, bytes]:
    """Topic and state bytes of a typical transition event, made by the real mapper."""
    from domain.story import Story
    from service.codec import OrjsonTranscoder, PydanticMapper

    story = Story.create(
        story_id="1",
        name="add rate limiting to the upload endpoint",
        description="the upload endpoint needs a per-client rate limit",
        acceptance_criteria=["429 after 10 requests per second"],
        depends_on=[],
        actor="user:bench",
    )
    story.block(actor="user:bench", reason="waiting for the API key")
    event = story.collect_events()[-1]
    stored = PydanticMapper(transcoder=OrjsonTranscoder()).to_stored_event(event)
    return stored.topic, stored.state


def create_table(db: Database) -> None:
    if db.kind == "postgres":
        with psycopg.connect(db.url, autocommit=True) as conn:
            conn.execute(
                f"CREATE TABLE {TABLE} (originator_id text NOT NULL, "
                "originator_version bigint NOT NULL, topic text, state bytea, "
                "notification_id bigserial, PRIMARY KEY (originator_id, originator_version))"
            )
            conn.execute(f"CREATE UNIQUE INDEX {TABLE}_nid ON {TABLE} (notification_id)")
            conn.execute(
                "CREATE FUNCTION raw_insert_notify(i text, v bigint, t text, s bytea) "
                "RETURNS SETOF bigint LANGUAGE plpgsql AS $$ BEGIN "
                "SET LOCAL lock_timeout = '0s'; NOTIFY raw_events; RETURN QUERY "
                f"INSERT INTO {TABLE} (originator_id, originator_version, topic, state) "
                "VALUES (i, v, t, s) RETURNING notification_id; END; $$"
            )
        return
    with sqlite3.connect(str(db.sqlite_path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            f"CREATE TABLE {TABLE} (originator_id TEXT, originator_version INTEGER, "
            "topic TEXT, state BLOB, PRIMARY KEY (originator_id, originator_version))"
        )


def client(
    index: int, url: str, notify: bool = False
) -> tuple[Callable[[], None], Callable[[], None]]:
    """One client: its own connection and originator id; one committed row per call."""
    topic, state = sample_state()
    originator = f"raw-{index}-{uuid.uuid4().hex[:8]}"
    version = 0
    if url.startswith("sqlite"):
        sconn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, timeout=30)
        sconn.execute("PRAGMA journal_mode=WAL")
        sql = (
            f"INSERT INTO {TABLE} (originator_id, originator_version, topic, state) "
            "VALUES (?, ?, ?, ?)"
        )

        def sqlite_op() -> None:
            nonlocal version
            version += 1
            sconn.execute(sql, (originator, version, topic, state))

        return sqlite_op, sconn.close

    conn = psycopg.connect(url, autocommit=True)
    statement = (
        "SELECT * FROM raw_insert_notify(%s, %s, %s, %s)"
        if notify
        else f"INSERT INTO {TABLE} (originator_id, originator_version, topic, state) "
        "VALUES (%s, %s, %s, %s)"
    )

    def pg_op() -> None:
        nonlocal version
        version += 1
        conn.execute(statement, (originator, version, topic, state), prepare=True)

    return pg_op, conn.close


def run(settings: Settings) -> list[Measurement]:
    out: list[Measurement] = []
    variants = [(backend, False) for backend in settings.backends]
    variants.insert(1, ("postgres", True))
    for backend, notify in variants:
        for clients in (1, 4):
            with scratch_database(settings, backend, migrate=False) as db:
                if db.kind == "sqlite":
                    assert db.sqlite_path is not None
                    Path(db.sqlite_path).parent.mkdir(parents=True, exist_ok=True)
                create_table(db)
                result = run_clients(
                    "bench.raw_insert:client", clients, settings, url=db.url, notify=notify
                )
            out.append(
                Measurement(
                    "1n" if notify else ROW,
                    LABEL_NOTIFY if notify else LABEL,
                    backend,
                    clients,
                    result.rate,
                    "commits/s",
                    p50_ms=result.p50_ms,
                    p99_ms=result.p99_ms,
                )
            )
    return out
