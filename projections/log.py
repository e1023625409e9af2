"""Reading the event log in position order, decoded without pydantic.

On PostgreSQL, positions (``notification_id``, a bigserial) are handed out at INSERT time
but become visible at COMMIT, and the library's insert function (DB functions enabled) does
not lock the table, so two writers can commit out of order: a reader may see position 11
while 10 is still in flight. A follower that moved past 10 would never apply it. The reader
therefore never returns an event that follows a hole in the positions unless the hole is
known to be final. It proves that by briefly taking a SHARE lock on the events table, which
waits for every transaction that is inserting (they hold ROW EXCLUSIVE until they end):
after it, every position up to the table's maximum is either committed or gone for good
(rolled back, e.g. a lost optimistic-concurrency race). If the lock cannot be had in time,
the events after the hole wait for the next read; a hole still open after ``gap_timeout``
seconds is accepted as final (logged), so a stuck lock can delay but never stop a follower.

On SQLite, writers are serialised by the database lock and a rowid is ``max(rowid) + 1``
inside the writing transaction, so positions become visible in order and holes cannot
appear in flight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, text

from service.application import events_table, position_column
from service.events_log import LoggedEvent, decode, is_story_originator
from service.settings import Database

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]
"""A stored event as read: ``(position, story_id, version, topic, state)``."""


class Batch:
    """Consecutive log rows, decoded into :class:`LoggedEvent` s only when asked for.

    A projection that works on the stored rows themselves (history on PostgreSQL) never
    pays for decoding; the others share one decoding per batch.
    """

    __slots__ = ("_events", "_story_events", "rows", "skipped")

    def __init__(
        self,
        rows: Sequence[Row],
        events: list[LoggedEvent] | None = None,
        skipped: tuple[int, ...] = (),
    ) -> None:
        self.rows = rows
        self._events = events
        self._story_events: list[LoggedEvent] | None = None
        self.skipped = skipped
        """Positions left out of this batch (skipped events, see ``without``): they are in
        the log between its rows, so a projection reading the log by range excludes them."""

    @property
    def events(self) -> list[LoggedEvent]:
        if self._events is None:
            self._events = [decode(*row) for row in self.rows]
        return self._events

    @property
    def story_events(self) -> list[LoggedEvent]:
        """The decoded events of stories: the batch without epic events.

        Epics share the log; the read models of stories (board, queue, runs, metrics) fold
        only these, the history keeps every event. Epic rows are never decoded for this
        (only :attr:`events` decodes them), so an epic event a reader cannot decode does not
        stop the story projections."""
        found = self._story_events
        if found is None:
            rows = self.rows
            if all(is_story_originator(row[1]) for row in rows):
                found = self.events
            elif self._events is not None:
                found = [e for e in self._events if is_story_originator(e.story_id)]
            else:
                found = [decode(*row) for row in rows if is_story_originator(row[1])]
            self._story_events = found
        return found

    @property
    def last(self) -> int:
        return int(self.rows[-1][0])

    def __len__(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def after(self, position: int) -> Batch:
        """The rows after ``position`` (the whole batch when it starts after it)."""
        if not self.rows or self.rows[0][0] > position:
            return self
        keep = [i for i, row in enumerate(self.rows) if row[0] > position]
        start = keep[0] if keep else len(self.rows)
        events = self._events[start:] if self._events is not None else None
        return Batch(self.rows[start:], events)

    def without(self, positions: frozenset[int]) -> Batch:
        """The batch without the rows at ``positions`` (itself when none of them is here)."""
        if not positions or not self.rows:
            return self
        first, last = self.rows[0][0], self.rows[-1][0]
        inside = tuple(sorted(p for p in positions if first <= p <= last))
        if not inside:
            return self
        keep = [i for i, row in enumerate(self.rows) if row[0] not in positions]
        events = self._events
        return Batch(
            [self.rows[i] for i in keep],
            [events[i] for i in keep] if events is not None else None,
            self.skipped + inside,
        )

    def split(self) -> list[Batch]:
        """One batch per row (to find the row a projection fails on)."""
        events = self._events
        return [
            Batch([row], [events[i]] if events is not None else None)
            for i, row in enumerate(self.rows)
        ]


class EventReader:
    """Reads the event store's table in position order (see the module doc for holes)."""

    def __init__(
        self,
        db: Database,
        engine: Engine,
        *,
        lock_timeout: float = 2.0,
        gap_timeout: float = 30.0,
    ) -> None:
        self.db = db
        self.engine = engine
        self.table = events_table(db)
        self.pos = position_column(db)
        self.postgres = db.kind == "postgres"
        self.lock_timeout = lock_timeout
        self.gap_timeout = gap_timeout
        mark = "%s" if self.postgres else "?"
        columns = f"{self.pos}, originator_id, originator_version, topic, state"
        # The driver's own cursor (binary on PostgreSQL, so bytea arrives as bytes, not hex):
        # SQLAlchemy's result rows would double the cost of reading a million events.
        self._after = (
            f"SELECT {columns} FROM {self.table} WHERE {self.pos} > {mark} "
            f"ORDER BY {self.pos} LIMIT {mark}"
        )
        self._between = (
            f"SELECT {columns} FROM {self.table} WHERE {self.pos} > {mark} "
            f"AND {self.pos} <= {mark} ORDER BY {self.pos} LIMIT {mark}"
        )
        self._max = text(f"SELECT MAX({self.pos}) FROM {self.table}")
        # Every position <= _final is committed or will never be: holes below it are final.
        self._final = 0
        self._hole_seen: dict[int, float] = {}

    # ------------------------------------------------------------------ reads

    def head(self, conn: Connection | None = None) -> int:
        """The highest position in the log (0 when empty)."""
        if conn is not None:
            return int(conn.execute(self._max).scalar() or 0)
        with self.engine.connect() as own:
            return int(own.execute(self._max).scalar() or 0)

    def rows(self, conn: Connection, after: int, limit: int, stop: int | None = None) -> list[Row]:
        """Raw rows ``(position, story_id, version, topic, state)`` after ``after``."""
        raw: Any = conn.connection.driver_connection
        cursor = raw.cursor(binary=True) if self.postgres else raw.cursor()
        try:
            if stop is None:
                cursor.execute(self._after, (after, limit))
            else:
                cursor.execute(self._between, (after, stop, limit))
            return list(cursor.fetchall())
        finally:
            cursor.close()

    def read_batch(
        self,
        after: int,
        limit: int,
        *,
        stop: int | None = None,
        conn: Connection | None = None,
    ) -> Batch:
        """Up to ``limit`` rows after ``after`` (and up to ``stop``), safe to apply in order.

        With ``conn`` the caller's transaction (and snapshot) is used as it is and holes are
        not examined: callers passing one read a fixed snapshot up to a known position.
        """
        if conn is not None:
            return Batch(self.rows(conn, after, limit, stop))
        with self.engine.connect() as own:
            if self.postgres:
                # One statement needs no transaction around it (saves BEGIN and ROLLBACK).
                own.execution_options(isolation_level="AUTOCOMMIT")
            rows = self.rows(own, after, limit, stop)
        if self.postgres and rows:
            rows = self._without_open_holes(after, limit, stop, rows)
        return Batch(rows)

    def read(
        self,
        after: int,
        limit: int,
        *,
        stop: int | None = None,
        conn: Connection | None = None,
    ) -> list[LoggedEvent]:
        """Like :meth:`read_batch`, decoded."""
        return self.read_batch(after, limit, stop=stop, conn=conn).events

    # ------------------------------------------------------------------ holes (PostgreSQL)

    def _first_open_hole(self, after: int, rows: list[Row]) -> int | None:
        """Index of the first row preceded by a hole not known to be final, if any."""
        previous = after
        for index, row in enumerate(rows):
            position = row[0]
            if position != previous + 1 and position - 1 > self._final:
                return index
            previous = position
        return None

    def _without_open_holes(
        self, after: int, limit: int, stop: int | None, rows: list[Row]
    ) -> list[Row]:
        index = self._first_open_hole(after, rows)
        if index is None:
            return rows
        if self._settle():
            # Anything that was in flight has committed or vanished: read again.
            with self.engine.connect() as own:
                rows = self.rows(own, after, limit, stop)
            index = self._first_open_hole(after, rows)
            if index is None:
                return rows
        hole_end = rows[index][0] - 1
        first_seen = self._hole_seen.setdefault(hole_end, time.monotonic())
        if time.monotonic() - first_seen >= self.gap_timeout:
            logger.warning(
                "accepting a hole in the event log before position %s after %.0f s",
                hole_end + 1,
                self.gap_timeout,
            )
            self._final = max(self._final, hole_end)
            self._hole_seen.pop(hole_end, None)
            return self._without_open_holes(after, limit, stop, rows)
        return rows[:index]

    def _settle(self) -> bool:
        """Wait for in-flight inserts and mark every position up to the maximum as final."""
        try:
            with self.engine.connect() as conn, conn.begin():
                timeout_ms = int(self.lock_timeout * 1000)
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{timeout_ms}ms'")
                conn.exec_driver_sql(f'LOCK TABLE "{self.table}" IN SHARE MODE')
                final = int(conn.execute(self._max).scalar() or 0)
        except Exception as exc:  # lock timeout, or no privilege to lock the table
            logger.info("could not settle a hole in the event log: %s", exc)
            return False
        self._final = max(self._final, final)
        self._hole_seen = {k: v for k, v in self._hole_seen.items() if k > self._final}
        return True
