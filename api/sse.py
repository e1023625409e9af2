"""Server-sent events of the global log, and a gap-safe reader of that log.

Why a gap-safe reader: on PostgreSQL a position (``notification_id``) is taken from a
sequence when a row is inserted, but transactions may commit in another order, and the
store's DB function (enabled for speed) does not lock the table. A reader that has seen
position 11 committed may not yet see 10; jumping to "after 11" would lose 10 for good.
Rolled-back inserts (a lost version race) also leave permanent holes. So a hole is only
passed once every transaction that was running when it was seen has finished (a
``pg_current_snapshot()`` check), or once the row after it is older than ``gap_timeout``.
SQLite serialises writers and assigns rowids under the write lock: it has no such holes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from starlette.concurrency import run_in_threadpool

from service.application import StorylineApplication
from service.events_log import LoggedEvent
from service.sqlstore import SqlStore


class CommitNotifier:
    """Fans the application's commit callbacks (any thread) out to asyncio waiters.

    The application has no way to remove a listener, so one notifier is registered per
    API app and streams subscribe to it; a closed stream leaves nothing behind.
    """

    def __init__(self, app: StorylineApplication) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.closed = False
        app.add_commit_listener(self._on_commit)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._waiters)

    def close(self) -> None:
        """End every open stream (the server is shutting down).

        A stream is a request that never finishes by itself: without this, the server
        would wait out its graceful-shutdown timeout for each connected client. Called from
        a signal handler, so it takes no lock: the handler runs on the event loop's thread,
        which may be holding ``_lock`` at that instant (a deadlock, seen once in CI). The
        flag alone ends each stream within its poll interval; the waiters are also woken
        at once, from the event loop rather than from the handler."""
        self.closed = True
        with contextlib.suppress(RuntimeError):  # no loop running in this thread
            asyncio.get_running_loop().call_soon_threadsafe(self._on_commit, 0)

    def _on_commit(self, position: int) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # the loop closed under us
                loop.call_soon_threadsafe(event.set)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Event]:
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                self._waiters.discard(entry)


@dataclass
class _Gap:
    xmax: int
    seen_below: int
    """Holes below this position were visible when ``xmax`` was taken."""


@dataclass
class LogReader:
    """Reads the log after a position without ever stepping over a hole that may fill."""

    app: StorylineApplication
    gap_timeout: float = 5.0
    settle_wait: float = 0.25
    _sql: SqlStore | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.app.db.kind == "postgres":
            self._sql = SqlStore(self.app)

    def read(self, after: int, limit: int) -> list[LoggedEvent]:
        """Events after ``after`` (exclusive), oldest first, stopping before an open hole."""
        events = self.app.events_after(after, limit)
        if self._sql is None or not events:
            return events
        first_gap = _first_gap(after, events)
        if first_gap is None:
            return events
        if self._old_enough(events[first_gap]):
            return events[: first_gap + 1] + self._rest(events, first_gap)
        # Wait (briefly) for every transaction running now to finish: a hole that is still
        # there afterwards belonged to a transaction that rolled back.
        seen_below = events[-1].position
        xmax = self._snapshot_xmax()
        deadline = time.monotonic() + self.settle_wait
        while self._snapshot_xmin() < xmax:
            if time.monotonic() >= deadline:
                return events[:first_gap]
            time.sleep(0.005)
        settled = self.app.events_after(after, limit)
        cut = next((i for i, e in enumerate(settled) if e.position > seen_below), len(settled))
        head, tail = settled[:cut], settled[cut:]
        if not tail:
            return head
        last = head[-1].position if head else after
        gap = _first_gap(last, tail)
        return head + (tail if gap is None else tail[:gap])

    def _rest(self, events: list[LoggedEvent], index: int) -> list[LoggedEvent]:
        # After accepting an old hole, keep going while the rest is contiguous or also old.
        out: list[LoggedEvent] = []
        previous = events[index].position
        for event in events[index + 1 :]:
            if event.position != previous + 1 and not self._old_enough(event):
                break
            out.append(event)
            previous = event.position
        return out

    def _old_enough(self, event: LoggedEvent) -> bool:
        stamp = event.timestamp
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return (datetime.now(UTC) - stamp).total_seconds() >= self.gap_timeout

    def _snapshot_xmax(self) -> int:
        assert self._sql is not None
        row = self._sql.query("SELECT pg_snapshot_xmax(pg_current_snapshot())::text AS x")[0]
        return int(row["x"])

    def _snapshot_xmin(self) -> int:
        assert self._sql is not None
        row = self._sql.query("SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS x")[0]
        return int(row["x"])


def _first_gap(after: int, events: list[LoggedEvent]) -> int | None:
    """Index of the first event that does not directly follow its predecessor."""
    previous = after
    for index, event in enumerate(events):
        if event.position != previous + 1:
            return index
        previous = event.position
    return None


def format_event(event: LoggedEvent) -> bytes:
    data = orjson.dumps(event.as_json())
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.position, event.type.encode(), data)


@dataclass
class StreamSettings:
    poll_interval: float = 1.0
    """How often to look for commits made by other processes (in-process ones wake at once)."""
    heartbeat_interval: float = 15.0
    batch: int = 500
    retry_ms: int = 2000


async def event_stream(
    reader: LogReader,
    notifier: CommitNotifier,
    after: int,
    settings: StreamSettings,
) -> AsyncIterator[bytes]:
    """The SSE body: every event after ``after`` once, in order, then live ones.

    Starlette cancels this generator when the client disconnects; the subscription is
    dropped in ``finally`` and a database read in flight finishes on its own thread.
    """
    position = after
    with notifier.subscribe() as wake:
        yield b"retry: %d\n\n" % settings.retry_ms
        last_sent = time.monotonic()
        while not notifier.closed:
            wake.clear()
            events = await run_in_threadpool(reader.read, position, settings.batch)
            if events:
                for event in events:
                    yield format_event(event)
                    position = event.position
                last_sent = time.monotonic()
                continue
            until_heartbeat = settings.heartbeat_interval - (time.monotonic() - last_sent)
            if until_heartbeat <= 0:
                yield b": keepalive\n\n"
                last_sent = time.monotonic()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    wake.wait(), timeout=min(settings.poll_interval, until_heartbeat)
                )
