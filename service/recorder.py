"""The PostgreSQL recorder storyline uses: the library's, with cheaper hot statements.

Selected through the library's own ``APPLICATION_RECORDER_TOPIC`` setting (see
``service.application.persistence_env``). Same tables, same DB function, same transaction
and NOTIFY, same errors; only how the two statements of a command reach the server differs:

* saving one event (what every command does) calls the same ``es_insert_events_text``
  function, but builds its one-element array server-side from four plain parameters. The
  library sends an array of composites, which psycopg renders as text in Python (the
  event's bytes hex-escaped, then quoted for the composite, then for the array) and the
  server parses back: measured 164 us of client CPU per save against 74 us this way.
* reading a story's events (every load and fast-forward) uses statements rendered once,
  where the library composes and renders its SQL on every call.

It also marks idempotency keys: a save that carries an :class:`IdempotencyMark` writes the
story and the event's log position onto the key's row in the insert's own transaction
(see ``service.idempotency``). The SQLite recorder below does the same.

And it resolves ambiguous commits. Inserts are retried when the connection fails, but a
connection can fail after PostgreSQL committed and before its answer reached us (a restart,
a failover, a proxy): the retry then violates the (story, version) key with our own event.
Treating that as a lost race ran the command twice (a second story for an automatic id) or
answered a conflict for the command's own event. So after a failed attempt, a key
violation reads the rows back: identical topic and state bytes (the state holds the
event's microsecond timestamp, actor and reason) mean the first attempt committed, and its
log positions are the insert's result; anything else is a genuine race, raised as before.
Only the failure path pays for this; SQLite has no reply to lose.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from functools import partial, wraps
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteCursor
from psycopg import Connection, Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Composable, Identifier

from service.idempotency import (
    MARK_KWARG,
    MARK_SQL,
    IdempotencyMark,
    check_marked,
    mark_params,
)

SelectKey = tuple[bool, bool, bool, bool]
_T = TypeVar("_T")
_PG_MARK_SQL = MARK_SQL.replace("?", "%s")

INSERT_ATTEMPTS = 10
"""Attempts per insert when the connection fails (the library's own retry budget)."""
INSERT_RETRY_WAIT = 0.2
RETRY_BUDGET_SECS = 5.0
"""No new attempt starts this long after the first one began.

The library retries ten times, and with the database away each attempt waits the pool's
timeout for a connection: a request took 100 s to be answered 503. A restart (a second or
two) is still bridged without the client noticing; an outage is answered within about a
pool timeout plus this."""


def _give_up(failures: int, started: float) -> bool:
    return failures >= INSERT_ATTEMPTS or time.monotonic() - started >= RETRY_BUDGET_SECS


def _pause() -> None:
    time.sleep(INSERT_RETRY_WAIT * (1 + 0.1 * (random.random() - 0.5)))


def _retrying(function: Callable[..., _T]) -> Callable[..., _T]:
    """Retry ``function`` on a failed connection, within the attempts and the time budget."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> _T:
        started = time.monotonic()
        failures = 0
        while True:
            try:
                return function(*args, **kwargs)
            except _RETRYABLE:
                failures += 1
                if _give_up(failures, started):
                    raise
                _pause()

    return wrapper


_RETRYABLE = (InterfaceError, OperationalError)

# The library's insert without its retry decorator: one attempt, for our own retry loop.
_library_insert_once: Callable[..., Sequence[int] | None] = (
    PostgresApplicationRecorder.insert_events.__wrapped__  # type: ignore[attr-defined]
)


class StorylinePostgresRecorder(PostgresApplicationRecorder):
    def __init__(
        self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        self._insert_one_query = SQL(
            "SELECT * FROM {schema}.{function}(ARRAY[ROW(%s, %s, %s, %s)::{schema}.{type}])"
        ).format(
            schema=Identifier(self.datastore.schema),
            function=Identifier(self.pg_function_name_insert_events),
            type=Identifier(self.stored_event_type_name),
        )
        self._read_back_query = SQL(
            "SELECT t.originator_id, t.originator_version, t.topic, t.state, t.notification_id"
            " FROM {schema}.{table} AS t"
            " JOIN unnest(%s::{id_type}[], %s::bigint[]) AS k(originator_id, originator_version)"
            " ON t.originator_id = k.originator_id"
            " AND t.originator_version = k.originator_version"
        ).format(
            schema=Identifier(self.datastore.schema),
            table=Identifier(self.events_table_name),
            id_type=Identifier(self.datastore.originator_id_type),
        )
        self._rendered: dict[object, str] = {}

    def _render(self, key: object, query: Callable[[], Composable], conn: Connection[Any]) -> str:
        # Rendering needs a connection (identifier quoting); the text never changes after.
        text = self._rendered.get(key)
        if text is None:
            text = self._rendered[key] = query().as_string(conn)
        return text

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        if not stored_events:
            return super().insert_events(stored_events, **kwargs)
        mark: IdempotencyMark | None = kwargs.get(MARK_KWARG)
        attempt: Callable[[], Sequence[int] | None]
        if not self.datastore.enable_db_functions:
            # The library inserts in its own transaction and hands the ids to
            # _fetch_ids_after_insert_events below, which marks the key there.
            attempt = partial(_library_insert_once, self, stored_events, **kwargs)
        elif mark is not None:
            attempt = partial(self._insert_marked, stored_events, mark)
        elif len(stored_events) == 1:
            attempt = partial(self._insert_one, stored_events[0])
        else:
            attempt = partial(self._insert_many, stored_events)
        return self._insert_resolving(stored_events, attempt)

    def _insert_resolving(
        self,
        stored_events: Sequence[StoredEvent],
        attempt: Callable[[], Sequence[int] | None],
    ) -> Sequence[int] | None:
        """Run ``attempt`` until it succeeds, retrying a failed connection; a key violation
        after a failed attempt is resolved by reading the rows back (see the module doc)."""
        failures = 0
        started = time.monotonic()
        ambiguous = False
        while True:
            try:
                try:
                    return attempt()
                except IntegrityError:
                    if not ambiguous:
                        raise
                    ids = self._ids_if_ours(stored_events)
                    if ids is None:
                        raise
                    return ids
            except _RETRYABLE as exc:
                # Whether the statement reached the server is unknown: from now on a key
                # violation may be our own commit.
                ambiguous = True
                failures += 1
                if _give_up(failures, started):
                    # Unknown whether it committed: an OperationalError is what the API
                    # answers as 503, and a resend with the same key resolves it.
                    if isinstance(exc, OperationalError):
                        raise
                    raise OperationalError(str(exc)) from exc
                _pause()

    def _ids_if_ours(self, stored_events: Sequence[StoredEvent]) -> list[int] | None:
        """The log positions of ``stored_events`` if the store holds exactly these events
        (same topic and state bytes at each key), else None."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(
                self._render("read_back", lambda: self._read_back_query, conn),
                (
                    [str(e.originator_id) for e in stored_events],
                    [e.originator_version for e in stored_events],
                ),
            )
            rows = {
                (str(row["originator_id"]), int(row["originator_version"])): row
                for row in curs.fetchall()
            }
        ids: list[int] = []
        for event in stored_events:
            row = rows.get((str(event.originator_id), event.originator_version))
            if row is None or row["topic"] != event.topic or bytes(row["state"]) != event.state:
                return None
            ids.append(int(row["notification_id"]))
        return ids

    def _insert_marked(
        self, stored_events: Sequence[StoredEvent], mark: IdempotencyMark
    ) -> Sequence[int]:
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            if len(stored_events) == 1:
                event = stored_events[0]
                curs.execute(
                    self._render("insert_one", lambda: self._insert_one_query, conn),
                    (event.originator_id, event.originator_version, event.topic, event.state),
                    prepare=True,
                )
            else:
                curs.execute(
                    self.sql_invoke_pg_function_insert_events, (self._composites(stored_events),)
                )
            ids = [row[self.pg_function_name_insert_events] for row in curs.fetchall()]
            self._mark(curs, mark, stored_events, ids)
        return ids

    def _fetch_ids_after_insert_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids = super()._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
        mark: IdempotencyMark | None = kwargs.get(MARK_KWARG)
        if mark is not None and ids:
            self._mark(curs, mark, stored_events, ids)
        return ids

    @staticmethod
    def _mark(
        curs: Cursor[DictRow],
        mark: IdempotencyMark,
        stored_events: Sequence[StoredEvent],
        ids: Sequence[int],
    ) -> None:
        params = mark_params(mark, str(stored_events[-1].originator_id), max(ids))
        curs.execute(_PG_MARK_SQL, params)
        check_marked(mark, curs.rowcount)

    def _insert_one(self, event: StoredEvent) -> Sequence[int]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(
                self._render("insert_one", lambda: self._insert_one_query, conn),
                (event.originator_id, event.originator_version, event.topic, event.state),
                prepare=True,
            )
            return [row[self.pg_function_name_insert_events] for row in curs.fetchall()]

    def _insert_many(self, stored_events: Sequence[StoredEvent]) -> Sequence[int]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(
                self.sql_invoke_pg_function_insert_events,
                (self._composites(stored_events),),
                prepare=True,
            )
            return [row[self.pg_function_name_insert_events] for row in curs.fetchall()]

    def _composites(self, stored_events: Sequence[StoredEvent]) -> list[Any]:
        return [
            self.construct_pg_stored_event(
                originator_id=e.originator_id,
                originator_version=e.originator_version,
                topic=e.topic,
                state=e.state,
            )
            for e in stored_events
        ]

    def _select_query(self, key: SelectKey) -> Composable:
        has_gt, has_lte, desc, has_limit = key
        statement = self.select_events_statement
        if has_gt:
            statement += SQL(" AND originator_version > %s")
        if has_lte:
            statement += SQL(" AND originator_version <= %s")
        order = " ORDER BY originator_version DESC" if desc else " ORDER BY originator_version ASC"
        statement += SQL(order)
        if has_limit:
            statement += SQL(" LIMIT %s")
        return statement

    @_retrying
    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        key: SelectKey = (gt is not None, lte is not None, desc, limit is not None)
        params: list[Any] = [originator_id]
        params += [value for value in (gt, lte, limit) if value is not None]
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            statement = self._render(key, lambda: self._select_query(key), conn)
            curs.execute(statement, params, prepare=True)
            return [
                StoredEvent(
                    originator_id=row["originator_id"],
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=bytes(row["state"]),
                )
                for row in curs.fetchall()
            ]


class StorylineSQLiteRecorder(SQLiteApplicationRecorder):
    """The library's SQLite recorder, marking idempotency keys in the insert's transaction."""

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids = super()._insert_events(c, stored_events, **kwargs)
        mark: IdempotencyMark | None = kwargs.get(MARK_KWARG)
        if mark is not None and ids:
            c.execute(MARK_SQL, mark_params(mark, str(stored_events[-1].originator_id), max(ids)))
            check_marked(mark, c.sqlite_cursor.rowcount)
        return ids
