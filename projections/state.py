"""Pure reducers: fold :class:`LoggedEvent` s into compact per-story and per-run state.

No I/O and no pydantic here: a rebuild folds millions of events. Each handler mirrors the
``apply_to`` of the matching event in ``domain.events``; ``tests/projections/test_reducers.py``
replays random valid workloads through both and asserts that :meth:`StoryState.shared` equals
the aggregate's ``snapshot()`` for every shared field, so the two cannot drift apart unnoticed.
Unknown event types (written by a newer storyline) only update the common fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Any

from service.events_log import LoggedEvent

MERGE = "merge"
TERMINAL_STAGES = frozenset({"done", "archived"})
ALL_STAGES = (
    "backlog",
    "coding",
    "gates",
    "review",
    "merge",
    "merge_failure",
    "blocked",
    "done",
    "archived",
)
_QUEUE_ENTRIES = frozenset({"GatesPassed", "ReviewPassed", "MergeRequeued", "StoryUnblocked"})
_ONE_MICRO = timedelta(microseconds=1)


def queue_entry(event: LoggedEvent, current: int | None) -> int | None:
    """The merge-queue key of a story after ``event``: the position that queued it, or None.

    A story joins on GatesPassed (without review), ReviewPassed, MergeRequeued or
    StoryUnblocked back to ``merge``, and
    leaves on MergeStarted or whenever it is no longer in ``merge``.
    """
    if event.to_stage != MERGE:
        return None
    if event.type in _QUEUE_ENTRIES:
        return event.position
    if event.type == "MergeStarted":
        return None
    if event.type == "SpeculationRestarted":
        # A dropped speculative build: back in the queue at the position that first queued it.
        kept = event.data.get("queued_position")
        return kept if isinstance(kept, int) else event.position
    return current


# --------------------------------------------------------------------------- board


@dataclass(slots=True)
class StoryState:
    """A story as the board shows it. Field order is the ``board`` table's column order."""

    story_id: str
    name: str = ""
    stage: str = "backlog"
    version: int = 0
    position: int = 0
    created_at: datetime | None = None
    last_change: datetime | None = None
    last_event: str = ""
    last_actor: str = ""
    last_reason: str | None = None
    epic: str | None = None
    priority: int = 0
    depends_on: list[str] = field(default_factory=list)
    retry_count: int = 0
    abort_respawns: int = 0
    mergemaster_spawns: int = 0
    leftover_respawns: int = 0
    fixup_pending: bool = False
    final: bool = False
    merging: bool = False
    resolved_pending: bool = False
    merge_failure_kind: str | None = None
    blocked_from: str | None = None
    blocked_reason: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    coder_attempts: int = 0
    mergemaster_attempts: int = 0
    running_agent: dict[str, Any] | None = None
    last_coder_outcome: str | None = None
    worktree_path: str | None = None
    feature_branch: str | None = None
    commits_ahead: int = 0
    merge_commit: str | None = None
    queued_position: int | None = None
    queued_at: datetime | None = None
    # Review (migration 0009 added these columns at the end, so COPY keeps its order).
    evaluator_attempts: int = 0
    pending_review: int | None = None
    """The evaluator attempt whose verdict is recorded but not concluded yet."""
    review_score: float | None = None
    """The score of the latest verdict (submitted or concluded); None before any."""
    review_passed: bool | None = None
    """Whether the latest verdict passed; None before any and while it awaits its conclusion."""

    def as_row(self) -> tuple[Any, ...]:
        return _story_row(self)

    @classmethod
    def from_row(cls, row: Any) -> StoryState:
        mapping = row._mapping if hasattr(row, "_mapping") else row
        state = cls(**{name: mapping[name] for name in STORY_FIELDS})
        state.depends_on = list(state.depends_on or [])
        state.running_agent = dict(state.running_agent) if state.running_agent else None
        return state

    def shared(self) -> dict[str, Any]:
        """The fields that ``Story.snapshot()`` also reports, under the snapshot's keys."""
        return {
            "id": self.story_id,
            "version": self.version,
            "stage": self.stage,
            "name": self.name,
            "depends_on": list(self.depends_on),
            "epic": self.epic,
            "priority": self.priority,
            "retry_count": self.retry_count,
            "abort_respawns": self.abort_respawns,
            "mergemaster_spawns": self.mergemaster_spawns,
            "fixup_pending": self.fixup_pending,
            "final": self.final,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost_usd": round(self.cost_usd, 6),
            "coder_attempts": self.coder_attempts,
            "mergemaster_attempts": self.mergemaster_attempts,
            "evaluator_attempts": self.evaluator_attempts,
            "pending_review": self.pending_review,
            "running_agent": dict(self.running_agent) if self.running_agent else None,
            "last_coder_outcome": self.last_coder_outcome,
            "worktree_path": self.worktree_path,
            "feature_branch": self.feature_branch,
            "commits_ahead": self.commits_ahead,
            "merging": self.merging,
            "in_merge_queue": self.queued_position is not None,
            "resolved_pending": self.resolved_pending,
            "merge_commit": self.merge_commit,
            "merge_failure_kind": self.merge_failure_kind,
            "blocked_from": self.blocked_from,
            "blocked_reason": self.blocked_reason,
            "last_event": self.last_event,
            "created_on": self.created_at.isoformat() if self.created_at else None,
            "modified_on": self.last_change.isoformat() if self.last_change else None,
        }


STORY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(StoryState))
_story_row = attrgetter(*STORY_FIELDS)
SHARED_SNAPSHOT_KEYS: tuple[str, ...] = tuple(StoryState("x").shared())


def _created(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.name = d.get("name", "")
    s.epic = d.get("epic")
    s.priority = d.get("priority", 0)
    s.depends_on = list(d.get("depends_on") or [])
    s.created_at = e.timestamp


def _worktree_ready(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.worktree_path = d["path"]
    s.feature_branch = d["branch"]


def _spawn_requested(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    role = d["role"]
    attempt = d["attempt"]
    s.running_agent = {
        "role": role,
        "attempt": attempt,
        "agent": d["agent"],
        "started": False,
        "pid": None,
    }
    if role == "coder":
        s.coder_attempts = max(s.coder_attempts, attempt)
    elif role == "evaluator":
        s.evaluator_attempts = max(s.evaluator_attempts, attempt)
    else:
        s.mergemaster_attempts = max(s.mergemaster_attempts, attempt)


def _agent_started(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    if s.running_agent is not None:
        s.running_agent = {**s.running_agent, "started": True, "pid": d["pid"]}


def _agent_exited(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.running_agent = None
    s.tokens_in += d.get("tokens_in", 0)
    s.tokens_out += d.get("tokens_out", 0)
    s.cost_usd += d.get("cost_usd", 0.0)
    role = d["role"]
    outcome = d["outcome"]
    if role == "coder":
        s.last_coder_outcome = outcome
    # As in the domain: a provider outage (or a runner lost under the agent) is capped like
    # a crash before a session.
    if outcome in ("aborted_before_session", "lost", "provider_unavailable"):
        s.abort_respawns += 1
    else:
        s.abort_respawns = 0
    if role == "mergemaster" and s.stage == "merge_failure" and not s.final:
        s.mergemaster_spawns += 1


def _uncommitted(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.leftover_respawns += 1


def _gates_passed(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.feature_branch = d["feature_branch"]
    s.commits_ahead = d["commits_ahead"]
    s.fixup_pending = False
    s.merging = False
    s.merge_failure_kind = None
    s.pending_review = None


def _gates_failed(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.retry_count = d["retry_count"]
    if d.get("exhausted"):
        s.blocked_from = "coding"
        s.blocked_reason = e.reason


def _review_submitted(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.pending_review = d["attempt"]
    s.review_score = d["score"]
    s.review_passed = None


def _review_passed(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.pending_review = None
    s.review_score = d["score"]
    s.review_passed = True


def _review_failed(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.pending_review = None
    s.review_score = d["score"]
    s.review_passed = False
    s.retry_count = d["retry_count"]
    if d.get("exhausted"):
        s.blocked_from = "coding"
        s.blocked_reason = e.reason


def _merge_started(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.merging = True


def _merge_succeeded(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.merging = False
    s.merge_commit = d["merge_commit"]
    s.mergemaster_spawns = 0
    s.merge_failure_kind = None
    s.final = False


def _merge_failed(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.merging = False
    s.merge_failure_kind = d["kind"]
    s.final = False
    s.mergemaster_spawns = 0


def _fixup_requested(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.fixup_pending = True
    s.retry_count = 0
    s.merge_failure_kind = None


def _merge_requeued(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.resolved_pending = bool(d.get("resolved", False))
    s.final = False


def _speculation_restarted(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.merging = False  # back in the queue (the speculative merge queue dropped its build)


def _mergemaster_attempted(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.final = True


def _blocked(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.blocked_from = d["blocked_from"]
    s.blocked_reason = e.reason
    s.merging = False


def _unblocked(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.blocked_from = None
    s.blocked_reason = None
    s.retry_count = 0
    s.abort_respawns = 0
    s.mergemaster_spawns = 0
    s.final = False


def _demoted(s: StoryState, e: LoggedEvent, d: dict[str, Any]) -> None:
    s.blocked_from = None
    s.blocked_reason = None
    s.merging = False
    s.fixup_pending = False
    s.pending_review = None


_STORY_HANDLERS: dict[str, Callable[[StoryState, LoggedEvent, dict[str, Any]], None]] = {
    "StoryCreated": _created,
    "WorktreeReady": _worktree_ready,
    "AgentSpawnRequested": _spawn_requested,
    "AgentStarted": _agent_started,
    "AgentExited": _agent_exited,
    "UncommittedChangesFound": _uncommitted,
    "GatesPassed": _gates_passed,
    "GatesFailed": _gates_failed,
    "ReviewSubmitted": _review_submitted,
    "ReviewPassed": _review_passed,
    "ReviewFailed": _review_failed,
    "MergeStarted": _merge_started,
    "MergeSucceeded": _merge_succeeded,
    "MergeFailed": _merge_failed,
    "FixupRequested": _fixup_requested,
    "MergeRequeued": _merge_requeued,
    "MergemasterAttempted": _mergemaster_attempted,
    "SpeculationRestarted": _speculation_restarted,
    "StoryBlocked": _blocked,
    "StoryUnblocked": _unblocked,
    "StoryDemoted": _demoted,
}
"""Event-specific changes; CodingStarted, GatesStarted and StoryArchived only move the stage
(and every type not listed here, such as one added by a newer storyline, only the common
fields)."""


_NOT_STEPS = frozenset(
    {
        "NoteAdded",
        "ProviderBreakerOpened",
        "ProviderBreakerClosed",
        "DroppedHunkDeclared",
        "GateVerdictRecorded",
        "GateFlakyDetected",
        "SpeculationUpdated",
        "WorkerClaimed",
    }
)


def apply_story_event(state: StoryState | None, event: LoggedEvent) -> StoryState:
    """Fold one event into a story's state (mutated in place and returned)."""
    if state is None:
        state = StoryState(event.story_id, created_at=event.timestamp)
    # As in StoryEvent.apply: the stage moves first, then the event-specific change, which
    # may look at the new stage (AgentExited counts a transient mergemaster exit that way).
    if event.type in _NOT_STEPS:
        # As NoteAdded.apply: a note (or a provider breaker's record) is not a step, so the
        # board keeps the last step's event, actor and reason (the note is in the history).
        state.version = event.version
        state.position = event.position
        state.last_change = event.timestamp
        return state
    if event.to_stage is not None:
        state.stage = event.to_stage
    state.last_event = event.type
    state.version = event.version
    state.position = event.position
    state.last_change = event.timestamp
    state.last_actor = event.actor
    state.last_reason = event.reason
    handler = _STORY_HANDLERS.get(event.type)
    if handler is not None:
        handler(state, event, event.data)
    if state.queued_position is not None or event.to_stage == MERGE:
        queued = queue_entry(event, state.queued_position)
        if queued != state.queued_position:
            state.queued_position = queued
            state.queued_at = event.timestamp if queued is not None else None
    return state


# --------------------------------------------------------------------------- merge queue


@dataclass(slots=True)
class QueueState:
    """A story as the merge queue sees it. Field order is the ``merge_queue`` columns."""

    story_id: str
    name: str = ""
    queued_position: int | None = None
    queued_at: datetime | None = None

    def as_row(self) -> tuple[Any, ...]:
        return (self.story_id, self.name, self.queued_position, self.queued_at)

    @classmethod
    def from_row(cls, row: Any) -> QueueState:
        return cls(row.story_id, row.name, row.queued_position, row.queued_at)


def apply_queue_event(state: QueueState | None, event: LoggedEvent) -> QueueState:
    if state is None:
        state = QueueState(event.story_id)
    if event.type == "StoryCreated":
        state.name = event.data.get("name", "")
    queued = queue_entry(event, state.queued_position)
    if queued != state.queued_position:
        state.queued_position = queued
        state.queued_at = event.timestamp if queued is not None else None
    return state


# --------------------------------------------------------------------------- agent runs

AGENT_EVENTS = frozenset({"AgentSpawnRequested", "AgentStarted", "AgentExited"})
RunKey = tuple[str, str, int]


@dataclass(slots=True)
class RunState:
    """One agent attempt. Field order is the ``agent_runs`` table's column order."""

    story_id: str
    role: str
    attempt: int
    agent: str = ""
    runtime: str = ""
    model: str | None = None
    purpose: str = "code"
    resume_session_id: str | None = None
    pid: int | None = None
    requested_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    outcome: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    turns: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    session_id: str | None = None
    log_path: str | None = None
    spawn_position: int = 0
    position: int = 0

    def as_row(self) -> tuple[Any, ...]:
        return _run_row(self)

    @classmethod
    def from_row(cls, row: Any) -> RunState:
        mapping = row._mapping if hasattr(row, "_mapping") else row
        return cls(**{name: mapping[name] for name in RUN_FIELDS})


RUN_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RunState))
_run_row = attrgetter(*RUN_FIELDS)


def run_key(event: LoggedEvent) -> RunKey | None:
    if event.type not in AGENT_EVENTS:
        return None
    data = event.data
    return (event.story_id, data["role"], int(data["attempt"]))


def apply_run_event(state: RunState | None, event: LoggedEvent) -> RunState:
    data = event.data
    if state is None:
        # Only a spawn request opens a run; a start or exit without one (never produced by
        # the domain's guards) still gets a row rather than being dropped.
        state = RunState(
            event.story_id,
            data["role"],
            int(data["attempt"]),
            requested_at=event.timestamp,
            spawn_position=event.position,
        )
    state.position = event.position
    if event.type == "AgentSpawnRequested":
        state.agent = data.get("agent", "")
        state.runtime = data.get("runtime", "")
        state.model = data.get("model")
        state.purpose = data.get("purpose", "code")
        state.resume_session_id = data.get("resume_session_id")
        state.log_path = data.get("log_path")
        state.requested_at = event.timestamp
        state.spawn_position = event.position
    elif event.type == "AgentStarted":
        state.pid = data.get("pid")
        state.started_at = event.timestamp
    elif event.type == "AgentExited":
        state.ended_at = event.timestamp
        state.outcome = data.get("outcome")
        state.exit_code = data.get("exit_code")
        state.signal = data.get("signal")
        state.session_id = data.get("session_id")
        state.turns = data.get("turns", 0)
        state.tokens_in = data.get("tokens_in", 0)
        state.tokens_out = data.get("tokens_out", 0)
        state.cost_usd = data.get("cost_usd", 0.0)
        # The model the agent reported using beats the configured alias of the request.
        if data.get("model"):
            state.model = data["model"]
        if data.get("log_path"):
            state.log_path = data["log_path"]
    return state


# --------------------------------------------------------------------------- metrics


@dataclass(slots=True)
class StoryMetric:
    """Field order is the ``story_metrics`` table's column order."""

    story_id: str
    stage: str
    entered_at: datetime
    cost_usd: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0

    def as_row(self) -> tuple[Any, ...]:
        return (
            self.story_id,
            self.stage,
            self.entered_at,
            self.cost_usd,
            self.tokens_in,
            self.tokens_out,
        )

    @classmethod
    def from_row(cls, row: Any) -> StoryMetric:
        return cls(
            row.story_id, row.stage, row.entered_at, row.cost_usd, row.tokens_in, row.tokens_out
        )


@dataclass(slots=True)
class StageMetric:
    """Field order is the ``stage_metrics`` table's column order."""

    stage: str
    micros_total: int = 0
    entries: int = 0

    def as_row(self) -> tuple[Any, ...]:
        return (self.stage, self.micros_total, self.entries)

    @classmethod
    def from_row(cls, row: Any) -> StageMetric:
        return cls(row.stage, row.micros_total, row.entries)


def apply_metric_event(
    story: StoryMetric | None,
    event: LoggedEvent,
    stages: dict[str, StageMetric],
    changed: set[str],
) -> StoryMetric:
    """Fold one event into a story's metric and the stage totals; adds changed stages."""
    to_stage = event.to_stage
    if story is None:
        story = StoryMetric(event.story_id, to_stage or "backlog", event.timestamp)
        changed.add(story.stage)
        _stage(stages, story.stage).entries += 1
    elif to_stage is not None and to_stage != story.stage:
        left = _stage(stages, story.stage)
        left.micros_total += (event.timestamp - story.entered_at) // _ONE_MICRO
        changed.add(story.stage)
        story.stage = to_stage
        story.entered_at = event.timestamp
        _stage(stages, to_stage).entries += 1
        changed.add(to_stage)
    if event.type == "AgentExited":
        data = event.data
        story.cost_usd += data.get("cost_usd", 0.0)
        story.tokens_in += data.get("tokens_in", 0)
        story.tokens_out += data.get("tokens_out", 0)
    return story


def _stage(stages: dict[str, StageMetric], name: str) -> StageMetric:
    metric = stages.get(name)
    if metric is None:
        metric = stages[name] = StageMetric(name)
    return metric


# --------------------------------------------------------------------------- review metrics

REVIEW_RESULTS = {"ReviewPassed": "passed", "ReviewFailed": "failed"}
"""The events that conclude a review, by the result they count under."""
REVIEW_BUCKETS = 10
"""Score buckets of a tenth each: bucket k holds scores in ((k-1)/10, k/10], 0 in bucket 1."""
ReviewKey = tuple[str, int]


@dataclass(slots=True)
class ReviewMetric:
    """Concluded reviews of one result in one score bucket. Field order is the
    ``review_metrics`` table's column order."""

    result: str
    bucket: int
    reviews: int = 0
    score_e4_total: int = 0
    """The scores' sum in ten-thousandths (a verdict's score has four decimals), an integer
    so the sum is exact and the same whatever order a replay adds it in."""

    def as_row(self) -> tuple[Any, ...]:
        return (self.result, self.bucket, self.reviews, self.score_e4_total)

    @classmethod
    def from_row(cls, row: Any) -> ReviewMetric:
        return cls(row.result, row.bucket, row.reviews, row.score_e4_total)


def review_bucket(score_e4: int) -> int:
    """The bucket (1 to 10) of a score given in ten-thousandths."""
    return min(max(-(-score_e4 // 1000), 1), REVIEW_BUCKETS)


def apply_review_metric(
    event: LoggedEvent, reviews: dict[ReviewKey, ReviewMetric], changed: set[ReviewKey]
) -> None:
    """Count a concluded review (ReviewPassed or ReviewFailed); other events change nothing."""
    result = REVIEW_RESULTS.get(event.type)
    if result is None:
        return
    score_e4 = round(float(event.data["score"]) * 10_000)
    key = (result, review_bucket(score_e4))
    metric = reviews.get(key)
    if metric is None:
        metric = reviews[key] = ReviewMetric(*key)
    metric.reviews += 1
    metric.score_e4_total += score_e4
    changed.add(key)
