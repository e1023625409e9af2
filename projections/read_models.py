"""Queries over the projection tables, returning plain JSON-able dicts.

``ReadModels`` never writes; the tables are filled by :class:`projections.ProjectionRunner`
(in the API process, in ``python -m projections.worker``, or both). Every query reads one
projection's tables only, so each answer is consistent with that projection's position.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import and_, func, or_, select

from projections import tables as t
from projections.definitions import PROJECTION_NAMES, select_names
from projections.engine import create_projection_engine
from projections.log import EventReader
from projections.runner import PROGRESS
from projections.state import (
    ALL_STAGES,
    REVIEW_BUCKETS,
    REVIEW_RESULTS,
    TERMINAL_STAGES,
    RunState,
    StoryState,
    apply_story_event,
)
from service.events_log import aggregate_of, is_story_originator
from service.settings import Database

MAX_PAGE = 1000
_CURSOR_PREFIX = "b1."
_AS_OF_BATCH = 5000


@dataclass(frozen=True)
class ProjectionStatus:
    """Where a projection stands: ``lag`` events behind ``head``; failed when ``error`` is set."""

    name: str
    position: int
    head: int
    lag: int
    error: str | None
    error_position: int | None
    updated_at: str | None
    skipped: int = 0
    """Events an operator had this projection leave out (``storyline projections skip``)."""

    @property
    def failed(self) -> bool:
        return self.error is not None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "position": self.position,
            "head": self.head,
            "lag": self.lag,
            "state": "failed" if self.failed else "ok",
            "error": self.error,
            "error_position": self.error_position,
            "updated_at": self.updated_at,
            "skipped": self.skipped,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def board_json(state: StoryState, queue_position: int | None) -> dict[str, Any]:
    """A board row as the API shows it (``queue_position`` is the 1-based rank or None)."""
    return {
        "id": state.story_id,
        "name": state.name,
        "stage": state.stage,
        "version": state.version,
        "position": state.position,
        "created_at": _iso(state.created_at),
        "last_change": _iso(state.last_change),
        "last_event": state.last_event,
        "last_actor": state.last_actor,
        "last_reason": state.last_reason,
        "epic": state.epic,
        "priority": state.priority,
        "depends_on": list(state.depends_on),
        "retry_count": state.retry_count,
        "abort_respawns": state.abort_respawns,
        "mergemaster_spawns": state.mergemaster_spawns,
        "leftover_respawns": state.leftover_respawns,
        "fixup_pending": state.fixup_pending,
        "final": state.final,
        "merging": state.merging,
        "resolved_pending": state.resolved_pending,
        "merge_failure_kind": state.merge_failure_kind,
        "blocked_from": state.blocked_from,
        "blocked_reason": state.blocked_reason,
        "tokens_in": state.tokens_in,
        "tokens_out": state.tokens_out,
        "cost_usd": round(state.cost_usd, 6),
        "coder_attempts": state.coder_attempts,
        "mergemaster_attempts": state.mergemaster_attempts,
        "running_agent": dict(state.running_agent) if state.running_agent else None,
        "last_coder_outcome": state.last_coder_outcome,
        "worktree_path": state.worktree_path,
        "feature_branch": state.feature_branch,
        "commits_ahead": state.commits_ahead,
        "merge_commit": state.merge_commit,
        "in_merge_queue": state.queued_position is not None,
        "queue_position": queue_position,
        "queued_at_position": state.queued_position,
        "queued_at": _iso(state.queued_at),
        "evaluator_attempts": state.evaluator_attempts,
        "pending_review": state.pending_review,
        "review_score": state.review_score,
        "review_passed": state.review_passed,
    }


def run_json(run: RunState) -> dict[str, Any]:
    return {
        "story_id": run.story_id,
        "role": run.role,
        "attempt": run.attempt,
        "agent": run.agent,
        "runtime": run.runtime,
        "model": run.model,
        "purpose": run.purpose,
        "resume_session_id": run.resume_session_id,
        "pid": run.pid,
        "requested_at": _iso(run.requested_at),
        "started_at": _iso(run.started_at),
        "ended_at": _iso(run.ended_at),
        "outcome": run.outcome,
        "exit_code": run.exit_code,
        "signal": run.signal,
        "turns": run.turns,
        "tokens_in": run.tokens_in,
        "tokens_out": run.tokens_out,
        "cost_usd": round(run.cost_usd, 6),
        "session_id": run.session_id,
        "log_path": run.log_path,
        "spawn_position": run.spawn_position,
        "position": run.position,
    }


def encode_cursor(priority: int, story_id: str) -> str:
    raw = orjson.dumps([priority, story_id])
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The (priority, story id) a board page ended at; anything else raises ValueError."""
    if not isinstance(cursor, str) or not cursor.startswith(_CURSOR_PREFIX) or len(cursor) > 512:
        raise ValueError("malformed cursor")
    body = cursor[len(_CURSOR_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise ValueError("malformed cursor") from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or type(value[0]) is not int
        or not isinstance(value[1], str)
    ):
        raise ValueError("malformed cursor")
    return value[0], value[1]


def _board_order_key(row: Mapping[str, Any]) -> tuple[int, str]:
    return (-row["priority"], row["id"])


def review_figures(rows: Sequence[Any]) -> dict[str, Any]:
    """Concluded reviews from the ``review_metrics`` rows: counts per result, the pass
    rate (None before any review), and the score histogram (per bucket's upper bound, not
    cumulative; ``review_score_sum`` is exact, from integer ten-thousandths)."""
    results = {result: 0 for result in REVIEW_RESULTS.values()}
    buckets = {f"{k / 10:.1f}": 0 for k in range(1, REVIEW_BUCKETS + 1)}
    score_e4 = 0
    for row in rows:
        results[row.result] = results.get(row.result, 0) + int(row.reviews)
        label = f"{int(row.bucket) / 10:.1f}"
        buckets[label] = buckets.get(label, 0) + int(row.reviews)
        score_e4 += int(row.score_e4_total)
    total = sum(results.values())
    return {
        "reviews_total": results,
        "review_pass_rate": round(results.get("passed", 0) / total, 6) if total else None,
        "review_score_buckets": buckets,
        "review_score_sum": score_e4 / 10_000,
        "review_score_count": total,
    }


class ReadModels:
    """The query side of the projections (see the module doc)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.engine = create_projection_engine(db)
        self.reader = EventReader(db, self.engine)
        self._postgres = db.kind == "postgres"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ReadModels:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _text_key(self, column: Any) -> Any:
        # Code-point order on both dialects, so pages are identical on SQLite and PostgreSQL.
        return column.collate("C") if self._postgres else column

    # ------------------------------------------------------------------ board

    def board(
        self, stage: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the board, ordered by (priority descending, story id ascending).

        Returns the rows and the cursor of the next page (None on the last page). The
        cursor is opaque; a malformed one raises ValueError, as do an unknown stage and a
        limit below 1 (limits above 1000 are capped).
        """
        if stage is not None and stage not in ALL_STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(ALL_STAGES)}")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        limit = min(limit, MAX_PAGE)
        b = t.board
        story_key = self._text_key(b.c.story_id)
        query = select(b)
        if stage is not None:
            query = query.where(b.c.stage == stage)
        if cursor is not None:
            priority, story_id = decode_cursor(cursor)
            # The redundant ``priority <= p`` bound lets the index start at the cursor's
            # priority group instead of the stage's first row.
            query = query.where(
                b.c.priority <= priority,
                or_(b.c.priority < priority, and_(b.c.priority == priority, story_key > story_id)),
            )
        query = query.order_by(b.c.priority.desc(), story_key).limit(limit + 1)
        with self.engine.connect() as conn:
            rows = list(conn.execute(query))
            more = len(rows) > limit
            states = [StoryState.from_row(row) for row in rows[:limit]]
            ranks = self._queue_ranks(conn, states)
        page = [board_json(s, ranks.get(s.story_id)) for s in states]
        next_cursor = encode_cursor(states[-1].priority, states[-1].story_id) if more else None
        return page, next_cursor

    def board_row(self, story_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(t.board).where(t.board.c.story_id == story_id)).first()
            if row is None:
                return None
            state = StoryState.from_row(row)
            ranks = self._queue_ranks(conn, [state])
        return board_json(state, ranks.get(story_id))

    def _queue_ranks(self, conn: Any, states: Sequence[StoryState]) -> dict[str, int]:
        """Merge-queue ranks (1 = next to merge) of the given stories that are queued.

        Only the queue up to the last of them is read, through the queued-position index:
        a page of the board costs at most one index range, however many stories exist.
        """
        queued = sorted(
            (s.queued_position, s.story_id) for s in states if s.queued_position is not None
        )
        if not queued:
            return {}
        b = t.board
        ahead = [
            position
            for (position,) in conn.execute(
                select(b.c.queued_position)
                .where(b.c.queued_position.is_not(None), b.c.queued_position <= queued[-1][0])
                .order_by(b.c.queued_position)
            )
        ]
        return {story_id: bisect_right(ahead, position) for position, story_id in queued}

    def board_as_of(self, position: int) -> list[dict[str, Any]]:
        """The board as it was right after log position ``position``, replayed in memory.

        Same rows and order as :meth:`board` (all of them, no paging).
        """
        if position < 0:
            raise ValueError("position must not be negative")
        states: dict[str, StoryState] = {}
        after = 0
        with self.engine.connect() as conn:
            while after < position:
                events = self.reader.read(after, _AS_OF_BATCH, stop=position, conn=conn)
                if not events:
                    break
                for event in events:
                    if not is_story_originator(event.story_id):
                        continue  # an epic's event: the board shows stories only
                    states[event.story_id] = apply_story_event(states.get(event.story_id), event)
                after = events[-1].position
        queued = sorted(
            (s for s in states.values() if s.queued_position is not None),
            key=lambda s: s.queued_position or 0,
        )
        ranks = {s.story_id: rank for rank, s in enumerate(queued, start=1)}
        rows = [board_json(s, ranks.get(s.story_id)) for s in states.values()]
        rows.sort(key=_board_order_key)
        return rows

    # ------------------------------------------------------------------ history

    def history(
        self, story_id: str | None = None, after: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Events after position ``after``, oldest first; keys as ``LoggedEvent.as_json()``."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        h = t.story_history
        query = select(h).where(h.c.position > after)
        if story_id is not None:
            query = query.where(h.c.story_id == story_id)
        query = query.order_by(h.c.position).limit(min(limit, 10 * MAX_PAGE))
        with self.engine.connect() as conn:
            rows = list(conn.execute(query))
        return [
            {
                "position": r.position,
                "story_id": r.story_id,
                "aggregate": aggregate_of(r.story_id),
                "version": r.version,
                "type": r.type,
                "timestamp": r.timestamp.isoformat(),
                "actor": r.actor,
                "reason": r.reason,
                "from_stage": r.from_stage,
                "to_stage": r.to_stage,
                "data": r.data,
            }
            for r in rows
        ]

    # ------------------------------------------------------------------ merge queue, runs

    def merge_queue(self) -> list[dict[str, Any]]:
        """Stories waiting to merge, next first (ordered by the position that queued them)."""
        q = t.merge_queue
        query = select(q).where(q.c.queued_position.is_not(None)).order_by(q.c.queued_position)
        with self.engine.connect() as conn:
            rows = list(conn.execute(query))
        return [
            {
                "position_in_queue": rank,
                "story_id": r.story_id,
                "name": r.name,
                "queued_at_position": r.queued_position,
                "queued_at": _iso(r.queued_at),
            }
            for rank, r in enumerate(rows, start=1)
        ]

    def agent_runs(self, story_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Agent attempts, most recently requested first."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        r = t.agent_runs
        query = select(r)
        if story_id is not None:
            query = query.where(r.c.story_id == story_id)
        query = query.order_by(r.c.spawn_position.desc()).limit(min(limit, MAX_PAGE))
        with self.engine.connect() as conn:
            rows = list(conn.execute(query))
        return [run_json(RunState.from_row(row)) for row in rows]

    # ------------------------------------------------------------------ metrics

    def metrics(self, now: datetime | None = None) -> dict[str, Any]:
        """Stories and seconds per stage, cost per story, totals, and the log's head.

        Seconds per stage are the closed intervals plus, for stories still in a stage that
        is not final (done, archived), the time from entering it until ``now``.
        """
        now = now or datetime.now(UTC)
        sm, st = t.story_metrics, t.stage_metrics
        with self.engine.connect() as conn:
            counted = select(sm.c.stage, func.count().label("stories")).group_by(sm.c.stage)
            per_stage: dict[str, int] = {r.stage: r.stories for r in conn.execute(counted)}
            closed = {r.stage: r for r in conn.execute(select(st))}
            open_rows = conn.execute(
                select(sm.c.stage, sm.c.entered_at).where(sm.c.stage.not_in(TERMINAL_STAGES))
            )
            open_seconds: dict[str, float] = {}
            for row in open_rows:
                elapsed = max((now - row.entered_at).total_seconds(), 0.0)
                open_seconds[row.stage] = open_seconds.get(row.stage, 0.0) + elapsed
            costs = list(
                conn.execute(
                    select(sm.c.story_id, sm.c.cost_usd, sm.c.tokens_in, sm.c.tokens_out).order_by(
                        self._text_key(sm.c.story_id)
                    )
                )
            )
            reviews = list(conn.execute(select(t.review_metrics)))
            head = self.reader.head(conn)
        stages = list(ALL_STAGES) + sorted((set(per_stage) | set(closed)) - set(ALL_STAGES))
        entries = {s: int(closed[s].entries) if s in closed else 0 for s in stages}
        seconds = {
            s: (closed[s].micros_total / 1e6 if s in closed else 0.0) + open_seconds.get(s, 0.0)
            for s in stages
        }
        return {
            "generated_at": now.isoformat(),
            "events_total": head,
            "stories_total": sum(per_stage.values()),
            "stories_per_stage": {s: int(per_stage.get(s, 0)) for s in stages},
            "stage_entries_total": entries,
            "stage_seconds_total": seconds,
            "story_cost_usd": {r.story_id: round(r.cost_usd, 6) for r in costs},
            "cost_usd_total": round(math.fsum(r.cost_usd for r in costs), 6),
            "tokens_in_total": sum(r.tokens_in for r in costs),
            "tokens_out_total": sum(r.tokens_out for r in costs),
            **review_figures(reviews),
        }

    @staticmethod
    def render_prometheus(metrics: Mapping[str, Any], statuses: Sequence[ProjectionStatus]) -> str:
        return render_prometheus(metrics, statuses)

    # ------------------------------------------------------------------ status, waiting

    def status(self) -> list[ProjectionStatus]:
        """Every projection's position, the log's head, the lag and any recorded error."""
        with self.engine.connect() as conn:
            rows = {r.name: r for r in conn.execute(select(t.projection_positions))}
            head = self.reader.head(conn)
            skips = t.projection_skips
            counted = select(skips.c.name, func.count().label("n")).group_by(skips.c.name)
            skipped = {str(r.name): int(r.n) for r in conn.execute(counted)}
        statuses = []
        for name in PROJECTION_NAMES:
            row = rows.get(name)
            position = int(row.position) if row is not None else 0
            statuses.append(
                ProjectionStatus(
                    name=name,
                    position=position,
                    head=head,
                    lag=max(head - position, 0),
                    error=row.error if row is not None else None,
                    error_position=row.error_position if row is not None else None,
                    updated_at=_iso(row.updated_at) if row is not None else None,
                    skipped=int(skipped.get(name, 0)),
                )
            )
        return statuses

    def positions(self, names: Sequence[str] | None = None) -> dict[str, int]:
        wanted = select_names(names)
        pp = t.projection_positions
        with self.engine.connect() as conn:
            query = select(pp.c.name, pp.c.position).where(pp.c.name.in_(wanted))
            found: dict[str, int] = {row.name: row.position for row in conn.execute(query)}
        return {name: int(found.get(name, 0)) for name in wanted}

    def wait_for(
        self, position: int, names: Sequence[str] | None = None, timeout: float = 5.0
    ) -> bool:
        """Wait until the named projections (all by default) have applied ``position``.

        For read-your-writes: pass the position a command returned. True when reached,
        False after ``timeout`` seconds. A runner in this process wakes the wait at once;
        one in another process is noticed by polling (every 2 ms, backing off to 50 ms).
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        pause = 0.002
        while True:
            if min(self.positions(names).values(), default=position) >= position:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with PROGRESS:
                PROGRESS.wait(min(pause, remaining))
            pause = min(pause * 2, 0.05)


# --------------------------------------------------------------------------- Prometheus


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_prometheus(metrics: Mapping[str, Any], statuses: Sequence[ProjectionStatus]) -> str:
    """The Prometheus text exposition (format 0.0.4) of ``metrics()`` and ``status()``."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    family(
        "storyline_stories",
        "gauge",
        "Stories currently in each stage.",
        [(f'{{stage="{_label(s)}"}}', n) for s, n in metrics["stories_per_stage"].items()],
    )
    family(
        "storyline_stage_seconds_total",
        "counter",
        "Seconds stories have spent in each stage (open stays counted up to now).",
        [(f'{{stage="{_label(s)}"}}', v) for s, v in metrics["stage_seconds_total"].items()],
    )
    family(
        "storyline_story_cost_usd",
        "gauge",
        "Agent cost in US dollars per story, across every attempt.",
        [(f'{{story="{_label(s)}"}}', v) for s, v in metrics["story_cost_usd"].items()],
    )
    family(
        "storyline_projection_position",
        "gauge",
        "Last event position applied by each projection.",
        [(f'{{projection="{_label(s.name)}"}}', s.position) for s in statuses],
    )
    family(
        "storyline_projection_lag",
        "gauge",
        "Events each projection is behind the head of the log.",
        [(f'{{projection="{_label(s.name)}"}}', s.lag) for s in statuses],
    )
    family(
        "storyline_projection_failed",
        "gauge",
        "1 when the projection has recorded an error and is not advancing.",
        [(f'{{projection="{_label(s.name)}"}}', int(s.failed)) for s in statuses],
    )
    family(
        "storyline_projection_skipped_events",
        "gauge",
        "Events an operator had the projection leave out (storyline projections skip).",
        [(f'{{projection="{_label(s.name)}"}}', s.skipped) for s in statuses],
    )
    reviews = metrics.get("reviews_total")
    if reviews is not None:
        family(
            "storyline_reviews_total",
            "counter",
            "Concluded story reviews by result (passed: to the merge queue; failed: back to "
            "coding or blocked).",
            [(f'{{result="{_label(r)}"}}', n) for r, n in reviews.items()],
        )
        name = "storyline_review_score"
        lines.append(f"# HELP {name} Scores of concluded story reviews (0 to 1).")
        lines.append(f"# TYPE {name} histogram")
        cumulative = 0
        for bound, n in metrics["review_score_buckets"].items():
            cumulative += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {metrics["review_score_count"]}')
        lines.append(f"{name}_sum {_number(float(metrics['review_score_sum']))}")
        lines.append(f"{name}_count {metrics['review_score_count']}")
    family(
        "storyline_events_total",
        "counter",
        "Position of the head of the event log (events recorded).",
        [("", metrics["events_total"])],
    )
    return "\n".join(lines) + "\n"
