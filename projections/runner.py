"""Following the event log into the projection tables: exactly once, resumable, rebuildable.

Exactly once: rows are written in a transaction that first locks the projection's row in
``projection_positions`` (``FOR UPDATE``; on SQLite ``BEGIN IMMEDIATE`` locks the file),
checks that its position and generation are still the ones this runner last committed,
writes the rows, and moves the position to the last event they include. Either all of that
commits or none of it does, so a process killed at any instant resumes from the committed
position, and two runners racing on the same projection cannot both apply a batch: the loser
sees a position it did not expect, drops its in-memory state and resumes from the winner's.

Catching up (a rebuild, or a follower that was down) folds batches in memory and writes
every ``FLUSH_EVENTS`` events, ``FLUSH_SECONDS`` seconds or ``FLUSH_PENDING`` changed rows,
and whenever it reaches the head of the log; each projection's position moves only with its
own writes, and batches that write nothing need no transaction. Live following (batches
shorter than the batch size) writes every batch. While catching up, the next batch is read
in the background, and on PostgreSQL the history (derived by the server) is written by a
helper connection up to ``PIPELINE_DEPTH`` batches behind, so the server's work overlaps
decoding and folding here.

Failure isolation: if a batch fails, the runner rewinds every projection of that batch to
its committed position and goes on carefully: each projection in its own SAVEPOINT, writing
every batch. One that raises is rolled back alone; the runner replays that batch event by
event to advance it as far as it goes and records the failing event's position and the
error in its tracking row (status shows it failed). It is retried with a growing back-off;
the others keep running.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, Connection, MetaData, Table, exc, select, update

from projections import tables as t
from projections.definitions import LIVE_TABLES, Projection, build, select_names
from projections.engine import BulkWriter, create_projection_engine, without_nul, write_transaction
from projections.log import Batch, EventReader
from projections.names import PROJECTION_NAMES
from service.application import events_table
from service.db_errors import describe, is_unavailable
from service.settings import Database

if TYPE_CHECKING:
    from service.application import StorylineApplication

logger = logging.getLogger(__name__)

PROGRESS = threading.Condition()
"""Notified after every commit of a runner in this process (wakes ``ReadModels.wait_for``)."""

MAX_REPORTED_DIFFERENCES = 20
MAX_ERROR_TEXT = 2_000
MAX_SKIP_REASON = 2_000
_pp = t.projection_positions
_skips = t.projection_skips


class SkipRefused(ValueError):
    """A skip was asked for an event the projection has not failed on (nothing changed)."""


class ProjectionFailed(RuntimeError):
    """A rebuild finished but some projections recorded an error (see ``status``)."""

    def __init__(self, failures: dict[str, str]) -> None:
        self.failures = failures
        super().__init__(
            "; ".join(f"projection {name!r} failed: {error}" for name, error in failures.items())
        )


FLUSH_EVENTS = 250_000
"""While catching up, write at least every this many events (bounds redone work)."""
FLUSH_SECONDS = 5.0
"""... and at least this often, so status shows progress."""
FLUSH_PENDING = 50_000
"""... and whenever this many rows wait in memory (bounds memory)."""
PIPELINE_DEPTH = 4
"""Batches a pipelined projection may be behind the others (each holds its rows in memory)."""


@dataclass
class _Tracked:
    name: str
    projection: Projection
    position: int = 0
    """Last event folded (in memory)."""
    committed: int = 0
    """Last event whose rows are committed: the position in ``projection_positions``."""
    generation: int = 0
    since_flush: int = 0
    flushed_at: float = 0.0
    retry_at: float = 0.0
    failures: int = 0


@dataclass
class _Applied:
    """What one transaction did: the bookkeeping to apply once it has committed."""

    ready: list[_Tracked]
    stale: list[tuple[_Tracked, tuple[int, int] | None]]
    flushed: list[_Tracked]
    last: int
    events: int


class _Careful(Exception):
    """A batch failed: rewind, then go on one savepoint per projection."""


@contextmanager
def _bulk() -> Iterator[None]:
    """Pause the cyclic garbage collector for a bulk replay.

    Replaying allocates a few objects per event while holding every story's state; each
    allocation-triggered collection then walks that whole state, which made decoding and
    folding 1.5-3x slower. The folded state has no reference cycles to collect, so the
    collector is simply off until the replay ends (and back to how it was after). Only
    explicit bulk operations (rebuild, check) do this, never the live follower: in a server
    process other threads' cyclic garbage waits for the collector meanwhile.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _now() -> datetime:
    return datetime.now(UTC)


def _describe(error: BaseException) -> str:
    # SQLAlchemy's own message repeats the statement and its parameters (event data, maybe
    # large): the driver's message is what an operator needs.
    original = getattr(error, "orig", None)
    text = without_nul(f"{type(original or error).__name__}: {original or error}")
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


class ProjectionRunner:
    """Applies the event log to the named projections (all by default).

    ``run_once()`` catches up and returns; ``start()`` follows the log in a daemon thread
    (LISTEN/NOTIFY plus a poll on PostgreSQL; a poll plus the application's commit listener
    on SQLite); ``rebuild()`` drops and replays; ``check()`` replays into scratch tables and
    diffs them against the live ones.
    """

    def __init__(
        self,
        db: Database,
        app: StorylineApplication | None = None,
        names: Sequence[str] | None = None,
        batch_size: int = 1000,
        *,
        rebuild_batch_size: int = 20000,
        poll_interval: float = 1.0,
        retry_interval: float = 5.0,
        gap_lock_timeout: float = 2.0,
        linger: float = 0.0,
    ) -> None:
        if batch_size < 1 or rebuild_batch_size < 1:
            raise ValueError("batch sizes must be positive")
        if not 0.0 <= linger <= 1.0:
            raise ValueError("linger must be between 0 and 1 second")
        self.db = db
        self.app = app
        self.names = select_names(names)
        self.batch_size = batch_size
        self.rebuild_batch_size = rebuild_batch_size
        self.poll_interval = poll_interval
        self.retry_interval = retry_interval
        self.linger = linger
        """Seconds to wait after a wake-up before reading, so that a burst of commits is
        applied as one batch: per-batch costs (tracking rows, one upsert per touched row)
        are paid once for the burst instead of once per event."""
        self.engine = create_projection_engine(db, writer=True)
        self.writer = BulkWriter(self.engine.dialect.name)
        self.reader = EventReader(db, self.engine, lock_timeout=gap_lock_timeout)
        self._events_table = events_table(db)
        self._tracked = {
            n: _Tracked(n, build(n, self.writer, events_table=self._events_table))
            for n in self.names
        }
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: deque[Future[_Applied]] = deque()
        self._reader_pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future[Batch]] | None = None
        self._synced = False
        # One batch at a time per runner: the thread, rebuild() and run_once() share state.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._listening = False
        self._skipped: dict[str, frozenset[int]] = {}
        """Per projection, the positions an operator decided it leaves out (``skip``)."""

    # ------------------------------------------------------------------ tracking rows

    def _ensure_rows(self) -> None:
        for attempt in range(3):
            try:
                with write_transaction(self.engine) as conn:
                    existing: set[str] = set(conn.scalars(select(_pp.c.name)))
                    missing = [n for n in self.names if n not in existing]
                    if missing:
                        conn.execute(
                            _pp.insert(),
                            [{"name": n, "position": 0, "generation": 0} for n in missing],
                        )
                return
            except exc.IntegrityError:
                # Another process inserted the same rows first: look again.
                if attempt == 2:
                    raise

    def _sync(self) -> None:
        """Load positions from the database; a changed one invalidates the cached state."""
        self._ensure_rows()
        with self.engine.connect() as conn:
            rows = {r.name: r for r in conn.execute(select(_pp))}
            self._skipped = _load_skips(conn)
        for tracked in self._tracked.values():
            row = rows[tracked.name]
            self._adopt(tracked, row.position, row.generation)
        self._synced = True

    def _for(self, item: _Tracked, batch: Batch) -> Batch:
        """The part of ``batch`` that ``item`` applies (all but its skipped events)."""
        skipped = self._skipped.get(item.name)
        return batch.without(skipped) if skipped else batch

    def _resume_moved(self) -> None:
        """Take up at once a projection waiting out a failure back-off that was moved by
        someone else (an operator's skip, a rebuild in another process)."""
        waiting = [i for i in self._tracked.values() if i.retry_at > time.monotonic()]
        if not waiting:
            return
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_pp.c.name, _pp.c.position, _pp.c.generation).where(
                    _pp.c.name.in_([i.name for i in waiting])
                )
            )
            found = {r.name: (r.position, r.generation) for r in rows}
            moved = [i for i in waiting if found.get(i.name) != (i.committed, i.generation)]
            if moved:
                self._skipped = _load_skips(conn)
        for item in moved:
            position, generation = found[item.name]
            self._adopt(item, position, generation)
            item.retry_at = 0.0
            item.failures = 0

    def _adopt(self, tracked: _Tracked, position: int, generation: int) -> None:
        """Take the database's position; in-memory state cannot be trusted after that."""
        tracked.projection.reset(empty=False)
        tracked.position = tracked.committed = position
        tracked.generation = generation
        tracked.since_flush = 0
        tracked.flushed_at = time.monotonic()

    def _rewind(self, items: Sequence[_Tracked]) -> None:
        """Forget what was folded since the last commit (it will be folded again)."""
        for item in items:
            item.projection.reset(empty=False)
            item.position = item.committed
            item.since_flush = 0

    def _lock_rows(self, conn: Connection, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        rows = conn.execute(
            select(_pp.c.name, _pp.c.position, _pp.c.generation)
            .where(_pp.c.name.in_(list(names)))
            .with_for_update()
        )
        return {r.name: (r.position, r.generation) for r in rows}

    def _split_stale(
        self,
        conn: Connection,
        group: Sequence[_Tracked],
        expected: dict[str, tuple[int, int]] | None = None,
    ) -> tuple[list[_Tracked], list[tuple[_Tracked, tuple[int, int] | None]]]:
        """Lock the group's tracking rows; split off those not where this runner expects.

        ``expected`` (position, generation) per name defaults to what is committed.
        """
        current = self._lock_rows(conn, [item.name for item in group])
        ready: list[_Tracked] = []
        stale: list[tuple[_Tracked, tuple[int, int] | None]] = []
        for item in group:
            found = current.get(item.name)
            wanted = (item.committed, item.generation) if expected is None else expected[item.name]
            if found == wanted:
                ready.append(item)
            else:
                stale.append((item, found))
        return ready, stale

    def _handle_stale(self, stale: Sequence[tuple[_Tracked, tuple[int, int] | None]]) -> None:
        if stale:
            # Moved by someone else, maybe past a skipped event: the skips may be new too.
            with self.engine.connect() as conn:
                self._skipped = _load_skips(conn)
        for item, found in stale:
            if found is None:
                self._synced = False
            else:
                self._adopt(item, *found)

    def _advance(self, conn: Connection, positions: dict[str, int]) -> None:
        by_position: dict[int, list[str]] = {}
        for name, position in positions.items():
            by_position.setdefault(position, []).append(name)
        for position, names in by_position.items():
            conn.execute(
                update(_pp)
                .where(_pp.c.name.in_(names))
                .values(position=position, updated_at=_now(), error=None, error_position=None)
            )

    def _committed(self, items: Sequence[_Tracked], position: int | None = None) -> None:
        """Record that ``items`` committed up to ``position`` (default: what they folded)."""
        now = time.monotonic()
        for item in items:
            item.committed = item.position if position is None else position
            item.since_flush = 0
            item.flushed_at = now
            item.failures = 0
            item.retry_at = 0.0
        if items:
            with PROGRESS:
                PROGRESS.notify_all()

    # ------------------------------------------------------------------ applying

    def run_once(self) -> int:
        """Catch every healthy projection up with the log; returns the events applied.

        An event is counted once per batch it was applied in (once, when the projections
        share a position, which is the normal case). Projections waiting out a failure
        back-off are skipped. Everything applied is committed when this returns.
        """
        return self._run(None)

    def _run(self, stop: threading.Event | None) -> int:
        with self._lock:
            if not self._synced:
                self._sync()
            else:
                self._resume_moved()
            return self._catch_up(list(self._tracked.values()), self.batch_size, stop=stop)

    def _catch_up(
        self,
        tracked: list[_Tracked],
        batch_size: int,
        progress: Callable[[int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        applied = 0
        careful = False
        try:
            while stop is None or not stop.is_set():
                if not self._synced:
                    self._settle_in_flight()
                    self._sync()
                now = time.monotonic()
                groups: dict[int, list[_Tracked]] = {}
                for item in tracked:
                    if item.retry_at <= now:
                        groups.setdefault(item.position, []).append(item)
                moved = False
                more = False
                for position in sorted(groups):
                    batch = self._read(position, batch_size, prefetch=len(groups) == 1)
                    if not batch:
                        continue
                    moved = True
                    group = groups[position]
                    if careful:
                        took = self._apply_apart(group, batch)
                    else:
                        try:
                            caught_up = len(batch) < batch_size
                            took = self._apply_together(group, position, batch, caught_up)
                        except _Careful:
                            careful = True
                            more = True
                            continue
                    if took:
                        applied += len(batch)
                    # Read again unless this batch was the end of the log and everyone in the
                    # group took it (a stale, failed or rewound projection starts elsewhere).
                    if len(batch) == batch_size or any(i.position != batch.last for i in group):
                        more = True
                    if progress is not None:
                        progress(min(item.position for item in tracked))
                if not moved or not more:
                    # Caught up (every batch came back short: no need to read again to see
                    # nothing). Write what is folded; if that finds a projection moved by
                    # another runner, it restarts from there, so look at the log again.
                    self._wait_in_flight()
                    if self._flush_pending(tracked):
                        continue
                    break
        finally:
            self._drop_prefetch()
            # Whatever is folded but unwritten is written now (or, if that fails, forgotten
            # and folded again next time).
            try:
                self._wait_in_flight()
            except Exception as error:
                if is_unavailable(error):
                    logger.warning(
                        "a pipelined batch failed (%s); it is applied again", describe(error)
                    )
                else:
                    logger.exception("a pipelined batch failed; it will be applied again")
                self._synced = False
            self._flush_pending(tracked)
        return applied

    def _read(self, after: int, limit: int, *, prefetch: bool) -> Batch:
        """The batch after ``after``; while catching up, the next one is read meanwhile.

        Reading waits on the server about as long as it takes to build the rows; with one
        read always in flight, that wait overlaps decoding and folding the batch before.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == after:
            batch = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # never two reads at once: the reader keeps hole state
            batch = self.reader.read_batch(after, limit)
        if prefetch and len(batch) == limit:
            future = self._read_ahead().submit(self.reader.read_batch, batch.last, limit)
            self._ahead = (batch.last, future)
        return batch

    def _drop_prefetch(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            try:
                ahead[1].result()
            except Exception:
                logger.debug("a read ahead failed", exc_info=True)

    def _read_ahead(self) -> ThreadPoolExecutor:
        if self._reader_pool is None:
            self._reader_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
        return self._reader_pool

    def _due(self, item: _Tracked, now: float) -> bool:
        return (
            item.since_flush >= FLUSH_EVENTS
            or item.projection.pending >= FLUSH_PENDING
            or now - item.flushed_at >= FLUSH_SECONDS
        )

    def _apply_together(
        self, group: list[_Tracked], start: int, batch: Batch, caught_up: bool
    ) -> bool:
        """The common case: no savepoints, server-side projections pipelined.

        A projection whose rows the server derives by itself (history on PostgreSQL) is
        written by a helper thread on its own connection, a few batches behind: the server
        works on earlier batches while this thread reads, decodes and folds the next ones
        (the helper runs no Python per event, so the two do not fight over the GIL). Each
        of its transactions still checks the tracking row against the position that batch
        starts from, captured here when it was queued, and commits rows with their position:
        exactly once as ever. The helper only reports; this thread does all bookkeeping when
        it collects the reports, and leaves out of a batch any projection that is no longer
        where the batch starts (the helper found it stale, say). A failure anywhere rewinds
        the whole group to what is committed.
        """
        # Only while catching up: for a live batch of a few events, another transaction on
        # another thread costs more than it saves.
        pipelining = not caught_up
        try:
            # Batches of a projection must commit in order: before one is applied here, every
            # batch queued for the helper has to be in (and booked).
            self._collect_in_flight(keep=PIPELINE_DEPTH - 1 if pipelining else 0)
            group = [item for item in group if item.position == start]
            if not group:
                return False
            pipelined = [i for i in group if i.projection.pipelined]
            if pipelined and (not pipelining or len(group) == 1):
                self._wait_in_flight()
            aside = pipelined if pipelining and len(group) > 1 else []
            here = [i for i in group if i not in aside]
            if aside:
                expected = {item.name: (start, item.generation) for item in aside}
                for item in aside:
                    item.position = batch.last  # folded, as far as grouping is concerned
                self._in_flight.append(
                    self._helper().submit(self._apply_plain, aside, batch, True, expected)
                )
            self._book(self._apply_plain(here, batch, caught_up))
            if caught_up:
                self._wait_in_flight()
        except Exception as error:
            logger.debug("batch up to %s failed; going on carefully", batch.last, exc_info=True)
            self._settle_in_flight()
            self._rewind(group)
            raise _Careful from error
        return True

    def _collect_in_flight(self, keep: int) -> None:
        """Book the helper's finished reports, waiting until at most ``keep`` are pending."""
        queue = self._in_flight
        while queue and (len(queue) > keep or queue[0].done()):
            self._book(queue.popleft().result())

    def _wait_in_flight(self) -> None:
        self._collect_in_flight(keep=0)

    def _settle_in_flight(self) -> None:
        """Wait for the helper without caring how it ended (the caller rewinds anyway)."""
        while self._in_flight:
            try:
                self._collect_in_flight(keep=0)
            except Exception:
                logger.debug("pipelined batch failed", exc_info=True)

    def _apply_plain(
        self,
        group: list[_Tracked],
        batch: Batch,
        flush_all: bool,
        expected: dict[str, tuple[int, int]] | None = None,
    ) -> _Applied:
        """One transaction for ``group``; touches no bookkeeping (it may run in the helper)."""
        if not flush_all and group and all(item.projection.buffered for item in group):
            return self._fold(group, batch)
        last = batch.last
        with write_transaction(self.engine) as conn:
            ready, stale = self._split_stale(conn, group, expected)
            for item in ready:
                item.projection.apply(conn, self._for(item, batch))
            now = time.monotonic()
            flushed = []
            for item in ready:
                due = item.since_flush + len(batch) >= FLUSH_EVENTS or self._due(item, now)
                if flush_all or not item.projection.buffered or due:
                    item.projection.flush(conn)
                    flushed.append(item)
            self._advance(conn, {item.name: last for item in flushed})
        return _Applied(ready, stale, flushed, last, len(batch))

    def _fold(self, group: list[_Tracked], batch: Batch) -> _Applied:
        """Fold in memory, and write (in a transaction) only the projections now due.

        While catching up most batches write nothing, so they need no transaction at all:
        a plain connection serves reads of uncached state, and the tracking rows are checked
        when the folded state is written (if another runner moved them meanwhile, what was
        folded since the last commit is dropped and folded again from its position).
        """
        with self.engine.connect() as conn:
            for item in group:
                item.projection.apply(conn, self._for(item, batch))
        now = time.monotonic()
        due = [i for i in group if i.since_flush + len(batch) >= FLUSH_EVENTS or self._due(i, now)]
        if not due:
            return _Applied(list(group), [], [], batch.last, len(batch))
        with write_transaction(self.engine) as conn:
            flushed, stale = self._split_stale(conn, due)
            for item in flushed:
                item.projection.flush(conn)
            self._advance(conn, {item.name: batch.last for item in flushed})
        left_out = {id(item) for item, _ in stale}
        ready = [item for item in group if id(item) not in left_out]
        return _Applied(ready, stale, flushed, batch.last, len(batch))

    def _book(self, applied: _Applied) -> None:
        for item in applied.ready:
            # A pipelined projection already counts later queued batches as folded.
            item.position = max(item.position, applied.last)
            item.since_flush += applied.events
        self._committed(applied.flushed, applied.last)
        self._handle_stale(applied.stale)

    def _apply_apart(self, group: list[_Tracked], batch: Batch) -> bool:
        """Each projection in its own savepoint, so a failing one is rolled back alone."""
        last = batch.last
        done: list[_Tracked] = []
        failed: list[_Tracked] = []
        try:
            with write_transaction(self.engine) as conn:
                ready, stale = self._split_stale(conn, group)
                for item in ready:
                    try:
                        with conn.begin_nested():
                            item.projection.apply(conn, self._for(item, batch))
                            item.projection.flush(conn)
                    except Exception:
                        logger.debug("projection %s failed on a batch", item.name, exc_info=True)
                        failed.append(item)
                        continue
                    done.append(item)
                self._advance(conn, {item.name: last for item in done})
        except Exception:
            # The transaction itself failed (connection lost, commit refused).
            self._rewind(group)
            self._synced = False
            raise
        for item in done:
            item.position = last
        self._committed(done)
        self._handle_stale(stale)
        for item in failed:
            self._rewind([item])
            self._isolate(item, batch)
        return bool(done)

    def _flush_pending(self, tracked: Sequence[_Tracked]) -> bool:
        """Write everything folded but not yet written; True if some projection was stale."""
        if not self._synced:
            return False  # positions will be reloaded; nothing folded can be trusted
        waiting = [i for i in tracked if i.position > i.committed]
        if not waiting:
            return False
        try:
            with write_transaction(self.engine) as conn:
                ready, stale = self._split_stale(conn, waiting)
                for item in ready:
                    item.projection.flush(conn)
                self._advance(conn, {item.name: item.position for item in ready})
        except Exception as error:
            if is_unavailable(error):
                logger.warning(
                    "could not write the projections' pending changes: %s", describe(error)
                )
            else:
                logger.exception("could not write the projections' pending changes")
            self._rewind(waiting)
            return False
        self._committed(ready)
        self._handle_stale(stale)
        return bool(stale)

    def _helper(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="projections")
        return self._executor

    def _isolate(self, item: _Tracked, batch: Batch) -> None:
        """Apply the batch one event at a time to find (and record) the failing event."""
        for single in batch.after(item.committed).split():
            position = single.last
            try:
                with write_transaction(self.engine) as conn:
                    found = self._lock_rows(conn, [item.name]).get(item.name)
                    if found != (item.committed, item.generation):
                        self._synced = False
                        return
                    item.projection.apply(conn, self._for(item, single))
                    item.projection.flush(conn)
                    self._advance(conn, {item.name: position})
            except Exception as error:
                self._rewind([item])
                self._record_failure(item, position, error)
                return
            item.position = position
            self._committed([item])

    def _record_failure(self, item: _Tracked, position: int, error: BaseException) -> None:
        item.failures += 1
        delay = min(self.retry_interval * 2 ** min(item.failures - 1, 6), 300.0)
        item.retry_at = time.monotonic() + delay
        logger.error(
            "projection %s failed at position %s (retrying in %.0f s): %s",
            item.name,
            position,
            delay,
            _describe(error),
            exc_info=error,
        )
        try:
            with write_transaction(self.engine) as conn:
                conn.execute(
                    update(_pp)
                    .where(_pp.c.name == item.name)
                    .where(_pp.c.generation == item.generation)
                    .values(error=_describe(error), error_position=position, updated_at=_now())
                )
        except Exception:
            logger.exception("could not record the failure of projection %s", item.name)

    # ------------------------------------------------------------------ rebuild

    def rebuild(
        self,
        name: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Drop the projection(s) and replay the whole log; returns the events replayed.

        ``progress(position, head)`` is called after every batch. Rows are committed with
        their positions as the replay goes (see the module doc), so an interrupted rebuild
        resumes like any follower.
        Raises :class:`ProjectionFailed` if a projection recorded an error on the way (the
        others are rebuilt regardless).
        """
        names = select_names(name)
        outside = [n for n in names if n not in self._tracked]
        if outside:
            raise ValueError(f"this runner does not run {', '.join(outside)}")
        with self._lock:
            if not self._synced:
                self._sync()
            selected = [self._tracked[n] for n in names]
            with write_transaction(self.engine) as conn:
                current = self._lock_rows(conn, names)
                self._skipped = _load_skips(conn)
                tables = [table for item in selected for table in item.projection.all_tables]
                self.writer.truncate(conn, tables)
                for item in selected:
                    generation = current[item.name][1] + 1
                    conn.execute(
                        update(_pp)
                        .where(_pp.c.name == item.name)
                        .values(
                            position=0,
                            generation=generation,
                            updated_at=_now(),
                            error=None,
                            error_position=None,
                        )
                    )
                    item.generation = generation
            for item in selected:
                item.position = item.committed = 0
                item.since_flush = 0
                item.flushed_at = time.monotonic()
                item.failures = 0
                item.retry_at = 0.0
                item.projection.reset(empty=True)
            head = self.reader.head()
            if progress is not None:
                progress(0, head)

            def report(position: int) -> None:
                nonlocal head
                head = max(head, position)
                if progress is not None:
                    progress(position, head)

            with _bulk():
                applied = self._catch_up(selected, self.rebuild_batch_size, report)
            self._analyze(tables)
            failures = self._failures(names)
            if failures:
                raise ProjectionFailed(failures)
            return applied

    def _analyze(self, tables: Sequence[Table]) -> None:
        """Fresh planner statistics after a bulk rewrite.

        Autovacuum would get there eventually; until it does, PostgreSQL plans the board's
        pages from the statistics of the empty tables (a sequential scan and a sort).
        """
        if self.engine.dialect.name != "postgresql":
            return
        with self.engine.begin() as conn:
            for table in dict.fromkeys(tables):
                conn.exec_driver_sql(f'ANALYZE "{table.name}"')

    def _failures(self, names: Sequence[str]) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_pp.c.name, _pp.c.error, _pp.c.error_position).where(
                    _pp.c.name.in_(list(names)), _pp.c.error.is_not(None)
                )
            )
            return {r.name: f"at position {r.error_position}: {r.error}" for r in rows}

    # ------------------------------------------------------------------ skip

    def skip(self, name: str, position: int, *, reason: str, actor: str) -> None:
        """Move projection ``name`` past the event at ``position``, where it failed.

        The decision is recorded in ``projection_skips`` (who, why, the error) in the same
        transaction as the move, and every later replay of ``name`` leaves the event out
        too (a rebuild, a check, another follower), so nothing is lost: the event stays in
        the log and the record says what the read model lacks. Only the event a projection
        recorded as failing can be skipped; anything else raises :class:`SkipRefused`.
        """
        [name] = select_names(name)
        reason = reason.strip()
        if not reason or len(reason) > MAX_SKIP_REASON or "\x00" in reason:
            raise SkipRefused(
                f"a skip needs a reason of at most {MAX_SKIP_REASON} characters, without NUL"
            )
        with self._lock, write_transaction(self.engine) as conn:
            self._ensure_rows_in(conn)
            row = conn.execute(
                select(_pp.c.position, _pp.c.error, _pp.c.error_position)
                .where(_pp.c.name == name)
                .with_for_update()
            ).one()
            if row.error is None or row.error_position != position:
                where = (
                    f"it failed at position {row.error_position}"
                    if row.error is not None
                    else f"it has not failed (position {row.position})"
                )
                raise SkipRefused(
                    f"projection {name!r} cannot skip position {position}: {where}; "
                    "only the event a projection failed on can be skipped"
                )
            now = _now()
            conn.execute(
                _skips.insert().values(
                    name=name,
                    position=position,
                    reason=reason,
                    actor=without_nul(actor),
                    error=row.error,
                    skipped_at=now,
                )
            )
            conn.execute(
                update(_pp)
                .where(_pp.c.name == name)
                .values(position=position, error=None, error_position=None, updated_at=now)
            )
        logger.warning(
            "projection %s skips the event at position %s (by %s): %s",
            name,
            position,
            actor,
            reason,
        )
        self._synced = False

    def _ensure_rows_in(self, conn: Connection) -> None:
        existing: set[str] = set(conn.scalars(select(_pp.c.name)))
        missing = [n for n in PROJECTION_NAMES if n not in existing]
        if missing:
            conn.execute(
                _pp.insert(), [{"name": n, "position": 0, "generation": 0} for n in missing]
            )

    def skips(self, name: str | None = None) -> list[dict[str, Any]]:
        """The recorded skips (of one projection or all), oldest position first."""
        names = select_names(name)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_skips).where(_skips.c.name.in_(names)).order_by(_skips.c.position)
            )
            return [
                {
                    "name": r.name,
                    "position": r.position,
                    "reason": r.reason,
                    "actor": r.actor,
                    "error": r.error,
                    "skipped_at": r.skipped_at.isoformat(),
                }
                for r in rows
            ]

    # ------------------------------------------------------------------ standing

    def problems(self, name: str | None = None, wait: float = 0.0) -> dict[str, str]:
        """The projections that are failed or behind the head of the log, and how.

        The head is read once at the start; a projection behind it is given up to ``wait``
        seconds to reach it (a live follower is normally a few milliseconds behind a fresh
        commit), a failed one is reported at once.
        """
        names = select_names(name)
        head = self.reader.head()
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            with self.engine.connect() as conn:
                rows = {
                    r.name: r
                    for r in conn.execute(
                        select(_pp.c.name, _pp.c.position, _pp.c.error, _pp.c.error_position)
                    )
                }
            found: dict[str, str] = {}
            behind_only = True
            for n in names:
                row = rows.get(n)
                position = row.position if row is not None else 0
                if row is not None and row.error is not None:
                    behind_only = False
                    found[n] = (
                        f"failed at position {row.error_position} (position {position}, "
                        f"head {head}): {row.error}"
                    )
                elif position < head:
                    found[n] = f"behind: position {position}, head {head}"
            if not found or not behind_only or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    # ------------------------------------------------------------------ check

    def check(self, name: str | None = None) -> dict[str, list[str]]:
        """Replay into scratch tables and diff them with the live tables.

        Returns the differences of each projection that has any (empty: all equal). It runs
        in one snapshot (REPEATABLE READ on PostgreSQL, a read transaction on SQLite): the
        live positions, the events replayed up to them and the live rows are all read at the
        same instant, so a runner committing meanwhile cannot cause false differences. The
        scratch tables are TEMPORARY and the transaction is rolled back: nothing is left.
        """
        names = select_names(name)
        with self.engine.connect() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            transaction = conn.begin()
            try:
                with _bulk():
                    return self._check(conn, names)
            finally:
                transaction.rollback()

    def _check(self, conn: Connection, names: list[str]) -> dict[str, list[str]]:
        scratch_md = MetaData()
        scratch: dict[str, Table] = {}
        for live in LIVE_TABLES.values():
            scratch[live.name] = Table(
                f"check_{live.name}",
                scratch_md,
                *(
                    Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                    for c in live.columns
                ),
                prefixes=["TEMPORARY"],
            )
        projections = {n: build(n, self.writer, scratch, self._events_table) for n in names}
        for projection in projections.values():
            projection.reset(empty=True)
            for table in projection.all_tables:
                table.create(conn)
        stops = {r.name: r.position for r in conn.execute(select(_pp.c.name, _pp.c.position))}
        skipped = _load_skips(conn)
        stop_at = {n: stops.get(n, 0) for n in names}
        position = 0
        last_stop = max(stop_at.values(), default=0)
        while position < last_stop:
            batch = self.reader.read_batch(
                position, self.rebuild_batch_size, stop=last_stop, conn=conn
            )
            if not batch:
                break
            for n, projection in projections.items():
                leave_out = skipped.get(n, frozenset())
                if stop_at[n] >= batch.last:
                    projection.apply(conn, batch.without(leave_out))
                elif stop_at[n] > position:
                    rows = [row for row in batch.rows if row[0] <= stop_at[n]]
                    projection.apply(conn, Batch(rows).without(leave_out))
                if projection.pending >= FLUSH_PENDING:
                    projection.flush(conn)
            position = batch.last
        for projection in projections.values():
            projection.flush(conn)
        differences: dict[str, list[str]] = {}
        for n, projection in projections.items():
            found: list[str] = []
            for logical, rebuilt in projection.tables.items():
                found.extend(_diff(conn, LIVE_TABLES[logical], rebuilt))
            if found:
                differences[n] = found
        return differences

    # ------------------------------------------------------------------ following

    def start(self) -> None:
        """Follow the log in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        if self.app is not None and not self._listening:
            self.app.add_commit_listener(self._on_commit)
            self._listening = True
        if self.db.kind == "postgres":
            self._listener = threading.Thread(
                target=self._listen, name="projections-listen", daemon=True
            )
            self._listener.start()
        self._thread = threading.Thread(target=self._follow, name="projections", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._listener):
            if thread is not None:
                thread.join(timeout)
        self._thread = None
        self._listener = None

    def close(self) -> None:
        self.stop()
        for pool in (self._executor, self._reader_pool):
            if pool is not None:
                pool.shutdown()
        self._executor = self._reader_pool = None
        self.engine.dispose()

    def __enter__(self) -> ProjectionRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wake(self) -> None:
        """Look at the log now instead of at the next poll."""
        self._wake.set()

    def _on_commit(self, _position: int) -> None:
        self._wake.set()

    def _follow(self) -> None:
        errors = 0
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._run(self._stop)
                errors = 0
            except Exception as error:
                errors += 1
                if is_unavailable(error):
                    # Expected while the database is away: the cause, not a traceback each try.
                    logger.warning(
                        "projection runner pass failed (attempt %d): database unavailable: %s",
                        errors,
                        describe(error),
                    )
                else:
                    logger.exception("projection runner pass failed (attempt %d)", errors)
                self._stop.wait(min(0.5 * 2**errors, 30.0))
                continue
            if self._wake.wait(self.poll_interval) and self.linger:
                self._stop.wait(self.linger)

    def _listen(self) -> None:
        import psycopg

        channel = events_table(self.db)
        while not self._stop.is_set():
            try:
                with psycopg.connect(**_conninfo(self.db), autocommit=True) as conn:
                    conn.execute(f'LISTEN "{channel}"')
                    # Whatever was committed while nobody listened is picked up now.
                    self._wake.set()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self._wake.set()
            except Exception:
                logger.warning("LISTEN on %s failed; polling until it is back", channel)
                self._stop.wait(self.poll_interval)


def _conninfo(db: Database) -> dict[str, Any]:
    params: dict[str, Any] = {
        "host": db.host,
        "port": db.port,
        "user": db.user,
        "dbname": db.dbname,
        "connect_timeout": 10,
    }
    if db.password:
        params["password"] = db.password
    return params


def _load_skips(conn: Connection) -> dict[str, frozenset[int]]:
    found: dict[str, set[int]] = {}
    for row in conn.execute(select(_skips.c.name, _skips.c.position)):
        found.setdefault(str(row.name), set()).add(int(row.position))
    return {name: frozenset(positions) for name, positions in found.items()}


# --------------------------------------------------------------------------- diff


def _ordered(conn: Connection, table: Table) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    pk = list(table.primary_key.columns)
    postgres = conn.dialect.name == "postgresql"
    # Keys are compared in code-point order by the merge in _diff; PostgreSQL's default
    # collation sorts text differently, "C" does not (SQLite's BINARY already agrees).
    order = [c.collate("C") if postgres and c.type.python_type is str else c for c in pk]
    statement = (
        select(table).order_by(*order).execution_options(stream_results=True, yield_per=2000)
    )
    result = conn.execute(statement)
    indexes = [list(table.columns).index(c) for c in pk]
    for row in result:
        values = tuple(row)
        yield tuple(values[i] for i in indexes), values


def _diff(conn: Connection, live: Table, rebuilt: Table) -> list[str]:
    """Row-by-row differences between two tables with the same columns, merged by key.

    Both sides stream in key order (server-side cursors on PostgreSQL), so a check of a
    million-row history never holds more than a few thousand rows in memory.
    """
    names = [c.name for c in live.columns]
    found: list[str] = []
    count = 0

    def note(key: tuple[Any, ...], message: str) -> None:
        nonlocal count
        count += 1
        if len(found) < MAX_REPORTED_DIFFERENCES:
            shown = key[0] if len(key) == 1 else key
            found.append(f"{live.name} {shown!r}: {message}")

    done = object()
    live_rows = _ordered(conn, live)
    rebuilt_rows = _ordered(conn, rebuilt)
    a: Any = next(live_rows, done)
    b: Any = next(rebuilt_rows, done)
    while a is not done or b is not done:
        if b is done or (a is not done and a[0] < b[0]):
            note(a[0], "in the live table but not in the rebuild")
            a = next(live_rows, done)
        elif a is done or b[0] < a[0]:
            note(b[0], "in the rebuild but not in the live table")
            b = next(rebuilt_rows, done)
        else:
            if a[1] != b[1]:
                columns = [
                    f"{n}: live={x!r} rebuilt={y!r}"
                    for n, x, y in zip(names, a[1], b[1], strict=True)
                    if x != y
                ]
                note(a[0], "; ".join(columns))
            a = next(live_rows, done)
            b = next(rebuilt_rows, done)
    if count > len(found):
        found.append(f"{live.name}: ... and {count - len(found)} more differences")
    return found
