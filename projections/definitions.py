"""The projections: board, history, agent runs, merge queue and metrics.

A projection folds batches of events (:meth:`Projection.apply`) and writes the rows that
changed (:meth:`Projection.flush`) inside the caller's transaction; the runner moves the
tracking position in the same transaction as a flush, never otherwise, so the tables and
the position always agree. Between flushes the folded state lives in memory only: while
catching up (a rebuild) the runner flushes every few hundred thousand events, so a story
touched in many batches is written once instead of once per batch; when it is caught up it
flushes every batch. A crash loses only unflushed work, which is simply folded again.

The in-memory state doubles as a cache, so consecutive batches need no reads. It is only
trusted while the runner can prove nobody else wrote the tables (tracking position and
generation unchanged) and is dropped after any failure. After a rebuild has emptied the
tables the cache is *complete*: a key it does not hold has no row, so nothing is read back.

Epics share the event log with stories. The history keeps every event (epic events too,
it is the audit trail); every other projection folds only story events
(:attr:`projections.log.Batch.story_events`), so a log with epic events gives the same
story tables as one without them.

Changed rows are written by :class:`BulkWriter` (replace by key: a pipelined upsert for
small batches, delete + binary COPY for large ones on PostgreSQL). The history writes its
rows as it applies a batch (it keeps no state), so its position moves with every batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from eventsourcing.utils import resolve_topic
from sqlalchemy import Connection, Table, select, tuple_

from projections import tables as t
from projections.engine import BulkWriter
from projections.log import Batch
from projections.names import PROJECTION_NAMES
from projections.state import (
    ALL_STAGES,
    QueueState,
    ReviewKey,
    ReviewMetric,
    RunState,
    StageMetric,
    StoryMetric,
    StoryState,
    apply_metric_event,
    apply_queue_event,
    apply_review_metric,
    apply_run_event,
    apply_story_event,
    run_key,
)
from service.events_log import LoggedEvent

MAX_CACHED = 250_000
"""Past this many cached keys the cache is dropped (and rebuilt from reads) to bound memory."""

_LOAD_CHUNK = 500

S = TypeVar("S")
K = TypeVar("K", bound=Hashable)


class Projection(ABC):
    """A read model fed by the event log; ``tables`` maps logical names to real tables."""

    name: ClassVar[str]
    table_names: ClassVar[tuple[str, ...]]

    buffered = False
    """True when :meth:`apply` only folds in memory and :meth:`flush` writes; False when
    :meth:`apply` writes rows itself, so its position must move in every transaction."""
    pipelined = False
    """True when the projection keeps no state between batches and needs no Python per
    event, so the runner may write a batch of it on another connection while it folds the
    next batch for the others."""
    events_table: str | None = None
    """The event store's table, for projections that read it in SQL (set by :func:`build`)."""

    def __init__(self, tables: Mapping[str, Table], writer: BulkWriter) -> None:
        self.tables = {name: tables[name] for name in self.table_names}
        self.writer = writer

    @property
    def all_tables(self) -> list[Table]:
        return list(self.tables.values())

    @abstractmethod
    def reset(self, *, empty: bool) -> None:
        """Forget cached state; ``empty`` says the tables are known to hold no rows."""

    @abstractmethod
    def apply(self, conn: Connection, batch: Batch) -> None:
        """Fold the batch (in position order); ``conn`` serves reads of uncached state."""

    def flush(self, conn: Connection) -> None:
        """Write every change folded since the last flush."""
        return None

    @property
    def pending(self) -> int:
        """How many rows the next flush would write (0: nothing waits in memory)."""
        return 0


class KeyedProjection(Projection, Generic[K, S]):
    """State per key in one table; the key is the table's primary key.

    A subclass names plain functions, not methods: a rebuild calls them millions of times.
    ``key_function(event)`` gives the key an event affects (None: it affects none; no
    function at all means the story id), ``fold_function(state, event)`` the new state.
    """

    key_function: ClassVar[Callable[[LoggedEvent], Any] | None] = None
    buffered = True

    def __init__(self, tables: Mapping[str, Table], writer: BulkWriter) -> None:
        super().__init__(tables, writer)
        self.table = self.tables[self.table_names[0]]
        self._cache: dict[K, S] = {}
        self._stored: set[K] = set()
        self._dirty: dict[K, None] = {}
        self._complete = False

    # -- what a subclass defines

    @abstractmethod
    def fold_function(self) -> Callable[[S | None, LoggedEvent], S]: ...

    @abstractmethod
    def to_row(self, state: S) -> tuple[Any, ...]: ...

    @abstractmethod
    def from_row(self, row: Any) -> S: ...

    # -- shared machinery

    def reset(self, *, empty: bool) -> None:
        self._cache = {}
        self._stored = set()
        self._dirty = {}
        self._complete = empty

    @property
    def pending(self) -> int:
        return len(self._dirty)

    def _load(self, conn: Connection, keys: Iterable[K]) -> None:
        missing = [k for k in keys if k not in self._cache]
        if not missing:
            return
        pk = list(self.table.primary_key.columns)
        target: Any = pk[0] if len(pk) == 1 else tuple_(*pk)
        for start in range(0, len(missing), _LOAD_CHUNK):
            chunk = missing[start : start + _LOAD_CHUNK]
            for row in conn.execute(select(self.table).where(target.in_(chunk))):
                state = self.from_row(row)
                key = self._key_of_row(row)
                self._cache[key] = state
                self._stored.add(key)

    def _key_of_row(self, row: Any) -> K:
        values = tuple(getattr(row, c.name) for c in self.table.primary_key.columns)
        return values[0] if len(values) == 1 else values  # type: ignore[return-value]

    def apply(self, conn: Connection, batch: Batch) -> None:
        # Every keyed projection is a read model of stories: epic events (same log) are
        # left out here, before any key is taken, so no row is ever made for an epic.
        events = batch.story_events
        key_of = type(self).key_function
        if len(self._cache) > MAX_CACHED and not self._dirty:
            # Bound memory; only between flushes, as unflushed state lives nowhere else.
            self.reset(empty=False)
        if not self._complete:
            if key_of is None:
                keys: set[Any] = {e.story_id for e in events}
            else:
                keys = {k for e in events if (k := key_of(e)) is not None}
            self._load(conn, keys)
        cache = self._cache
        dirty = self._dirty
        fold = self.fold_function()
        get = cache.get
        if key_of is None:
            for event in events:
                story: Any = event.story_id  # K is the story id when there is no key function
                cache[story] = fold(get(story), event)
                dirty[story] = None
            return
        for event in events:
            key = key_of(event)
            if key is not None:
                cache[key] = fold(get(key), event)
                dirty[key] = None

    def flush(self, conn: Connection) -> None:
        if not self._dirty:
            return
        cache = self._cache
        stored = self._stored
        to_row = self.to_row
        rows = [to_row(cache[k]) for k in self._dirty]
        self.writer.upsert(conn, self.table, rows, [k for k in self._dirty if k in stored])
        stored.update(self._dirty)
        self._dirty = {}


class BoardProjection(KeyedProjection[str, StoryState]):
    """One row per story: stage, sub-state, counters, totals, last change."""

    name = "board"
    table_names = ("board",)

    def fold_function(self) -> Callable[[StoryState | None, LoggedEvent], StoryState]:
        return apply_story_event

    def to_row(self, state: StoryState) -> tuple[Any, ...]:
        return state.as_row()

    def from_row(self, row: Any) -> StoryState:
        return StoryState.from_row(row)


def _queue_key(event: LoggedEvent) -> str | None:
    # Only creations (for the name) and moves into, within or out of merge matter.
    if event.to_stage == "merge" or event.from_stage == "merge" or event.type == "StoryCreated":
        return event.story_id
    return None


class MergeQueueProjection(KeyedProjection[str, QueueState]):
    """One row per story; queued stories carry the position of the event that queued them."""

    name = "merge_queue"
    table_names = ("merge_queue",)
    key_function = _queue_key

    def fold_function(self) -> Callable[[QueueState | None, LoggedEvent], QueueState]:
        return apply_queue_event

    def to_row(self, state: QueueState) -> tuple[Any, ...]:
        return state.as_row()

    def from_row(self, row: Any) -> QueueState:
        return QueueState.from_row(row)


class AgentRunsProjection(KeyedProjection[tuple[str, str, int], RunState]):
    """One row per agent attempt (story, role, attempt)."""

    name = "agent_runs"
    table_names = ("agent_runs",)
    key_function = run_key

    def fold_function(self) -> Callable[[RunState | None, LoggedEvent], RunState]:
        return apply_run_event

    def to_row(self, state: RunState) -> tuple[Any, ...]:
        return state.as_row()

    def from_row(self, row: Any) -> RunState:
        return RunState.from_row(row)


class HistoryProjection(Projection):
    """The audit trail: one row per event, append-only, epic events included.

    On PostgreSQL the rows are derived by the server from the stored events, in one
    ``INSERT ... SELECT`` over the batch's range of positions (checked against the number
    of events read): nothing crosses the wire and no Python runs per event, so the runner
    lets the server do it on another connection while it decodes and folds the next batches
    for the other projections (``pipelined``). The SQL
    extracts the same fields as ``service.events_log.decode``; events whose class has moved
    past version 1 (they may need upcasting) and unknown topics go through ``decode``
    instead, and a test compares both paths on the same log. Elsewhere (SQLite, or without
    ``events_table``) rows are built from the decoded events.
    """

    name = "history"
    table_names = ("story_history",)

    def __init__(self, tables: Mapping[str, Table], writer: BulkWriter) -> None:
        super().__init__(tables, writer)
        self._plain_topics: dict[str, bool] = {}

    @property
    def server_side(self) -> bool:
        return self.writer.postgres and self.events_table is not None

    @property
    def pipelined(self) -> bool:  # type: ignore[override]
        return self.server_side

    def reset(self, *, empty: bool) -> None:
        return None

    def apply(self, conn: Connection, batch: Batch) -> None:
        table = self.tables["story_history"]
        if not self.server_side:
            self.writer.insert(conn, table, [history_row(e) for e in batch.events])
            return
        positions: list[int] = []
        topics: set[str] = set()
        in_python: list[Any] = []
        for row in batch.rows:
            if self._in_sql(row[3]):
                positions.append(row[0])
                topics.add(row[3])
            else:
                in_python.append(row)
        if positions:
            raw: Any = conn.connection.driver_connection
            params: tuple[Any, ...] = (positions[0], positions[-1], list(topics))
            statement = self._statement(table)
            if batch.skipped:
                statement += " AND NOT (e.notification_id = ANY(%s::bigint[]))"
                params += (list(batch.skipped),)
            statement += " OFFSET 0) j"
            with raw.cursor() as cursor:
                cursor.execute(statement, params)
                # The range holds exactly the rows read (holes in it are final, see
                # projections.log); anything else is refused rather than half-applied.
                if cursor.rowcount != len(positions):
                    raise RuntimeError(
                        f"history: {cursor.rowcount} events in the log between positions "
                        f"{positions[0]} and {positions[-1]}, {len(positions)} read"
                    )
        if in_python:
            rows = [history_row(e) for e in Batch(in_python).events]
            self.writer.insert(conn, table, rows)

    def _in_sql(self, topic: str) -> bool:
        """Whether SQL derives the same row as decode() for events of ``topic``.

        It must need no upcasting (class version 1), and decode()'s type name (the class
        name) must be what SQL reads off the pinned topic ``storyline.<Name>.v<N>``.
        """
        known = self._plain_topics.get(topic)
        if known is None:
            try:
                cls = resolve_topic(topic)
            except Exception:
                cls = None
            parts = topic.split(".")
            known = (
                cls is not None
                and getattr(cls, "class_version", 1) == 1
                and len(parts) >= 2
                and parts[1] == cls.__name__
            )
            self._plain_topics[topic] = known
        return known

    def _statement(self, table: Table) -> str:
        removed = ",".join((*COMMON_KEYS, "class_version"))
        # The derived table with OFFSET 0 is evaluated once per event, so the JSON is parsed
        # once (inlined, it would be parsed once per field taken from it).
        return (
            f'INSERT INTO "{table.name}" (position, story_id, version, type, actor, reason, '
            "from_stage, to_stage, timestamp, data) "
            "SELECT j.notification_id, j.originator_id, j.originator_version, "
            "split_part(j.topic, '.', 2), coalesce(j.v->>'actor', ''), j.v->>'reason', "
            "j.v->>'from_stage', j.v->>'to_stage', (j.v->>'timestamp')::timestamptz, "
            f"j.v - '{{{removed}}}'::text[] "
            "FROM (SELECT e.notification_id, e.originator_id, e.originator_version, e.topic, "
            f"{_STATE_AS_JSONB} AS v "
            f'FROM "{self.events_table}" e '
            "WHERE e.notification_id >= %s AND e.notification_id <= %s "
            "AND e.topic = ANY(%s::text[])"
        )


# jsonb cannot hold U+0000: an event whose JSON has the escape \u0000 (a NUL from a gate's
# output, or a log from before NUL was refused) is read with U+FFFD in its place, as
# projections.engine does for the rows written from Python. A \u0000 preceded by an odd
# number of backslashes is the text "\u0000", not a NUL, and stays. Only events holding the
# six bytes pay for the regular expression.
_STATE_AS_JSONB = (
    "CASE WHEN position('\\\\u0000'::bytea IN e.state) > 0 "
    "THEN regexp_replace(convert_from(e.state, 'UTF8'), "
    "'(?<!\\\\)((?:\\\\\\\\)*)\\\\u0000', '\\1' || chr(65533), 'g')::jsonb "
    "ELSE convert_from(e.state, 'UTF8')::jsonb END"
)

COMMON_KEYS = ("timestamp", "actor", "reason", "from_stage", "to_stage", "originator_topic")
"""The payload keys ``service.events_log.decode`` lifts out of ``data``
(``tests/projections/test_history_paths.py`` compares the two paths event by event)."""


def history_row(e: LoggedEvent) -> tuple[Any, ...]:
    return (
        e.position,
        e.story_id,
        e.version,
        e.type,
        e.actor,
        e.reason,
        e.from_stage,
        e.to_stage,
        e.timestamp,
        e.data,
    )


def _metrics_key(event: LoggedEvent) -> str | None:
    # An event that leaves the stage as it was (from == to) changes nothing but cost.
    if event.from_stage != event.to_stage or event.type == "AgentExited":
        return event.story_id
    return None


class _StoryMetrics(KeyedProjection[str, StoryMetric]):
    """The per-story half of :class:`MetricsProjection`, which owns the stage totals."""

    name = "metrics"
    table_names = ("story_metrics",)
    key_function = _metrics_key

    def __init__(self, tables: Mapping[str, Table], writer: BulkWriter) -> None:
        super().__init__(tables, writer)
        self.stages: dict[str, StageMetric] = {}
        self.changed: set[str] = set()

    def fold_function(self) -> Callable[[StoryMetric | None, LoggedEvent], StoryMetric]:
        stages, changed = self.stages, self.changed

        def fold(state: StoryMetric | None, event: LoggedEvent) -> StoryMetric:
            return apply_metric_event(state, event, stages, changed)

        return fold

    def to_row(self, state: StoryMetric) -> tuple[Any, ...]:
        return state.as_row()

    def from_row(self, row: Any) -> StoryMetric:
        return StoryMetric.from_row(row)


class MetricsProjection(Projection):
    """Per story: current stage, since when, cost; per stage: closed time and entries; per
    review result and score bucket: concluded reviews and their scores' sum."""

    name = "metrics"
    table_names = ("story_metrics", "stage_metrics", "review_metrics")
    buffered = True

    def __init__(self, tables: Mapping[str, Table], writer: BulkWriter) -> None:
        super().__init__(tables, writer)
        self.stories = _StoryMetrics(self.tables, writer)
        self._stages_loaded = False
        self._stages_stored: set[str] = set()
        self.reviews: dict[ReviewKey, ReviewMetric] = {}
        self._reviews_changed: set[ReviewKey] = set()
        self._reviews_stored: set[ReviewKey] = set()

    def reset(self, *, empty: bool) -> None:
        self.stories.reset(empty=empty)
        self.stories.stages = {}
        self.stories.changed = set()
        self._stages_loaded = empty
        self._stages_stored = set()
        self.reviews = {}
        self._reviews_changed = set()
        self._reviews_stored = set()

    @property
    def pending(self) -> int:
        return self.stories.pending + len(self.stories.changed) + len(self._reviews_changed)

    def apply(self, conn: Connection, batch: Batch) -> None:
        if not self._stages_loaded:
            rows = conn.execute(select(self.tables["stage_metrics"]))
            self.stories.stages = {row.stage: StageMetric.from_row(row) for row in rows}
            self._stages_stored = set(self.stories.stages)
            # A few rows at most (results times buckets): loaded with the stage totals.
            found = conn.execute(select(self.tables["review_metrics"]))
            self.reviews = {(r.result, r.bucket): ReviewMetric.from_row(r) for r in found}
            self._reviews_stored = set(self.reviews)
            self._stages_loaded = True
        self.stories.apply(conn, batch)
        reviews, changed = self.reviews, self._reviews_changed
        for event in batch.story_events:
            apply_review_metric(event, reviews, changed)

    def flush(self, conn: Connection) -> None:
        self.stories.flush(conn)
        changed = self.stories.changed
        if changed:
            stages = self.stories.stages
            ordered = [s for s in ALL_STAGES if s in changed] + sorted(changed - set(ALL_STAGES))
            rows = [stages[s].as_row() for s in ordered]
            stored = [s for s in ordered if s in self._stages_stored]
            self.writer.upsert(conn, self.tables["stage_metrics"], rows, stored)
            self._stages_stored.update(ordered)
            self.stories.changed = set()
        if self._reviews_changed:
            keys = sorted(self._reviews_changed)
            rows = [self.reviews[k].as_row() for k in keys]
            stored_keys = [k for k in keys if k in self._reviews_stored]
            self.writer.upsert(conn, self.tables["review_metrics"], rows, stored_keys)
            self._reviews_stored.update(keys)
            self._reviews_changed = set()


PROJECTIONS: dict[str, type[Projection]] = {
    cls.name: cls
    for cls in (
        BoardProjection,
        HistoryProjection,
        AgentRunsProjection,
        MergeQueueProjection,
        MetricsProjection,
    )
}
"""Every projection by name, in the order status lists them."""

if tuple(PROJECTIONS) != PROJECTION_NAMES:  # pragma: no cover - a programming error
    raise RuntimeError(f"projections.names is out of date: {tuple(PROJECTIONS)}")

LIVE_TABLES: dict[str, Table] = {table.name: table for table in t.PROJECTION_TABLES}


def select_names(names: Sequence[str] | str | None) -> list[str]:
    """Validate projection names (None means all); unknown names raise ValueError."""
    if names is None:
        return list(PROJECTION_NAMES)
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown:
        raise ValueError(
            f"unknown projection {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(PROJECTION_NAMES)}"
        )
    return [n for n in PROJECTION_NAMES if n in names]


def build(
    name: str,
    writer: BulkWriter,
    tables: Mapping[str, Table] | None = None,
    events_table: str | None = None,
) -> Projection:
    """A projection writing ``tables`` (default: the live ones).

    ``events_table`` names the event store's table for projections that can derive their
    rows in SQL on PostgreSQL; without it every projection works from decoded events.
    """
    projection = PROJECTIONS[name](tables if tables is not None else LIVE_TABLES, writer)
    projection.events_table = events_table
    return projection
