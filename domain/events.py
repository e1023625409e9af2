"""The typed, immutable events of a story.

Each event is a pydantic model with a pinned ``TOPIC`` (``storyline.<Name>.v<N>``) so stored
events never depend on module paths. Each event's ``apply`` is the only place where a
story's state changes; the guards that decide whether an event may happen live in
``domain.story``. Changing an event's shape means a new ``class_version`` and an
``upcast_vN_vN+1`` static method (the library calls them when reading old events).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from eventsourcing.domain import CanInitAggregate, CanMutateAggregate
from eventsourcing.utils import register_topic
from pydantic import BaseModel, ConfigDict, Field

from domain.stages import AgentOutcome, AgentRole, MergeFailureKind, Stage

if TYPE_CHECKING:
    from domain.story import Story

Actor = Annotated[str, Field(min_length=1, max_length=200)]
Reason = Annotated[str, Field(max_length=10_000)]


class StoryEvent(BaseModel, CanMutateAggregate[str]):
    """Common fields of every story event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    TOPIC: ClassVar[str]
    originator_id: str
    originator_version: int
    timestamp: datetime
    actor: Actor
    reason: Reason | None = None
    from_stage: Stage | None = None
    to_stage: Stage | None = None

    def apply(self, aggregate: Any) -> None:
        story: Story = aggregate
        if self.to_stage is not None:
            story.stage = self.to_stage
        story.last_event = type(self).__name__
        story.state_version = self.originator_version
        self.apply_to(story)

    def apply_to(self, story: Story) -> None:
        """Event-specific state change; the stage itself is set by :meth:`apply`."""


class StoryCreated(StoryEvent, CanInitAggregate[str]):
    TOPIC: ClassVar[str] = "storyline.StoryCreated.v1"
    originator_topic: str
    name: str
    description: str
    acceptance_criteria: list[str]
    depends_on: list[str]
    epic: str | None = None
    priority: int = 0
    target_branch: str | None = None
    """Where the story merges; None is the project's base branch (an epic's stories merge
    into the epic's integration branch). Added later with a default: old events decode."""
    review: bool | None = None
    """Whether an evaluator reviews the story before it merges; None: the project's
    ``[review] enabled`` decides. Added with a default: old events decode unchanged."""

    def apply_to(self, story: Story) -> None:
        story.name = self.name
        story.description = self.description
        story.acceptance_criteria = list(self.acceptance_criteria)
        story.depends_on = list(self.depends_on)
        story.epic = self.epic
        story.priority = self.priority
        story.target_branch = self.target_branch
        story.review = self.review


class CodingStarted(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.CodingStarted.v1"


class WorktreeReady(StoryEvent):
    """The runner created (or verified) the story's worktree and feature branch."""

    TOPIC: ClassVar[str] = "storyline.WorktreeReady.v1"
    path: str
    branch: str

    def apply_to(self, story: Story) -> None:
        story.worktree_path = self.path
        story.feature_branch = self.branch


class AgentSpawnRequested(StoryEvent):
    """A runner is about to start an agent process: one request = one attempt."""

    TOPIC: ClassVar[str] = "storyline.AgentSpawnRequested.v1"
    role: AgentRole
    attempt: int
    agent: str
    runtime: str
    model: str | None = None
    purpose: str = "code"
    """``code``, ``retry``, ``fixup``, ``commit_leftovers``, ``abort_respawn``, ``mergemaster``."""
    resume_session_id: str | None = None
    argv: list[str] = Field(default_factory=list)
    log_path: str | None = None

    def apply_to(self, story: Story) -> None:
        story.running_agent = {
            "role": self.role.value,
            "attempt": self.attempt,
            "agent": self.agent,
            "started": False,
            "pid": None,
        }
        if self.role is AgentRole.CODER:
            story.coder_attempts = max(story.coder_attempts, self.attempt)
        elif self.role is AgentRole.EVALUATOR:
            story.evaluator_attempts = max(story.evaluator_attempts, self.attempt)
        else:
            story.mergemaster_attempts = max(story.mergemaster_attempts, self.attempt)


class AgentStarted(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.AgentStarted.v1"
    role: AgentRole
    attempt: int
    pid: int

    def apply_to(self, story: Story) -> None:
        if story.running_agent is not None:
            story.running_agent = {**story.running_agent, "started": True, "pid": self.pid}


class AgentExited(StoryEvent):
    """An attempt ended. Version 2 adds what the agent CLI itself reported (all optional)."""

    TOPIC: ClassVar[str] = "storyline.AgentExited.v1"
    class_version: ClassVar[int] = 2
    role: AgentRole
    attempt: int
    outcome: AgentOutcome
    exit_code: int | None = None
    signal: int | None = None
    session_id: str | None = None
    turns: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    log_path: str | None = None
    model: str | None = None
    """The model the CLI reported in its ``system/init`` line (not the configured alias)."""
    result_subtype: str | None = None
    """The CLI's result subtype: ``success``, ``error_max_turns``, ``error_max_budget_usd``..."""
    is_error: bool | None = None
    result_text: str | None = None
    """The CLI's final ``result`` text, truncated."""
    stop_reason: str | None = None
    duration_ms: int | None = None
    permission_denials: list[str] = Field(default_factory=list)
    """Tool calls the CLI refused, as ``Tool: input`` lines, truncated."""
    model_usage: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Per model: ``tokens_in``, ``tokens_out``, ``cost_usd`` as the CLI reported them."""
    api_error_status: int | None = None
    api_retries: int = 0
    """``system/api_retry`` lines the CLI printed (the provider failed and it retried)."""

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        # Version 1 recorded none of the CLI's own report: the fields start empty.
        state.update(
            model=None,
            result_subtype=None,
            is_error=None,
            result_text=None,
            stop_reason=None,
            duration_ms=None,
            permission_denials=[],
            model_usage={},
            api_error_status=None,
            api_retries=0,
        )

    def apply_to(self, story: Story) -> None:
        story.running_agent = None
        story.tokens_in += self.tokens_in
        story.tokens_out += self.tokens_out
        story.cost_usd += self.cost_usd
        if self.role is AgentRole.CODER:
            story.last_coder_outcome = self.outcome
        story.last_agent_error = None if self.outcome is AgentOutcome.COMPLETED else self.reason
        story.last_agent_exit_at = self.timestamp
        if self.outcome is AgentOutcome.ABORTED_BEFORE_SESSION:
            story.abort_respawns += 1
            # A crash before any session: stored sessions are pruned so the respawn is cold.
            story.sessions.pop(self.role.value, None)
        elif self.outcome in (AgentOutcome.LOST, AgentOutcome.PROVIDER_UNAVAILABLE):
            # The runner died under the agent, or the model provider failed: not the agent's
            # fault, so no retry is consumed, but the session (if any) is sound. Consecutive
            # ones are capped like crashes so an outage cannot respawn forever.
            story.abort_respawns += 1
            if self.session_id:
                story.sessions[self.role.value] = self.session_id
        elif self.outcome in _FRESH_SESSION:
            # Resuming would put the agent back into the same cap with the same history:
            # the next attempt starts a new session (the worktree keeps its files).
            story.abort_respawns = 0
            story.sessions.pop(self.role.value, None)
        else:
            story.abort_respawns = 0
            if self.session_id:
                story.sessions[self.role.value] = self.session_id
        if self.role is AgentRole.CODER:
            if self.outcome in _FAILED_RUN:
                story.failed_runs += 1
            elif self.outcome in (AgentOutcome.COMPLETED, AgentOutcome.PERMISSION_DENIED):
                story.failed_runs = 0
        elif self.role is AgentRole.EVALUATOR and self.outcome in _FAILED_RUN:
            # An evaluator that ran but judged nothing (a crash in session, a cap, or no
            # verdict: the runner records that as ``failed``) is capped like a coder.
            story.evaluator_failed_runs += 1
        if (
            self.role is AgentRole.MERGEMASTER
            and story.stage is Stage.MERGE_FAILURE
            and not story.final
        ):
            # Still in merge_failure after the mergemaster left: it neither resolved nor
            # gave up, so this exit was transient.
            story.mergemaster_spawns += 1


_FAILED_RUN = frozenset(
    {
        AgentOutcome.FAILED,
        AgentOutcome.INACTIVE,
        AgentOutcome.TIMED_OUT,
        AgentOutcome.MAX_TURNS,
        AgentOutcome.MAX_BUDGET,
    }
)
_FRESH_SESSION = frozenset({AgentOutcome.MAX_TURNS, AgentOutcome.MAX_BUDGET})


class UncommittedChangesFound(StoryEvent):
    """The coder exited leaving uncommitted changes; it is respawned once to commit them."""

    TOPIC: ClassVar[str] = "storyline.UncommittedChangesFound.v1"
    paths: list[str]

    def apply_to(self, story: Story) -> None:
        story.leftover_respawns += 1


class GatesStarted(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.GatesStarted.v1"
    commits_ahead: int = 0

    def apply_to(self, story: Story) -> None:
        story.leftover_respawns = 0


class GatesPassed(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.GatesPassed.v1"
    feature_branch: str
    commits_ahead: Annotated[int, Field(ge=1)]
    output: str = ""
    commit: str | None = None
    """The feature branch's commit the gates passed on (pushed to the remote, when the
    runners share one); None in logs from before workers, and on one machine."""

    def apply_to(self, story: Story) -> None:
        story.feature_branch = self.feature_branch
        story.commits_ahead = self.commits_ahead
        story.gated_commit = self.commit
        story.fixup_pending = False
        story.merging = False
        # Straight into the merge queue, or first to review (``to_stage`` says which).
        story.queued_at = self.timestamp if self.to_stage is not Stage.REVIEW else None
        story.merge_failure_kind = None
        story.merge_failure_details = None
        story.pending_review = None


class GatesFailed(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.GatesFailed.v1"
    output: str
    retry_count: int
    """The story's retry count after this failure."""
    exhausted: bool = False

    def apply_to(self, story: Story) -> None:
        story.retry_count = self.retry_count
        story.last_gate_output = self.output
        if self.exhausted:
            story.blocked_from = Stage.CODING
            story.blocked_reason = self.reason


class MergeStarted(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.MergeStarted.v1"
    base_sha: str | None = None
    resolved: bool = False
    ahead: list[str] = Field(default_factory=list)
    """Speculative merge queue: the stories stacked below this one (not landed when it
    started), in landing order. Empty for a merge on the base branch itself."""
    speculative_base: str | None = None
    """Speculative merge queue: the commit this story is squashed onto (the speculative
    commit of the last story in ``ahead``, or ``base_sha``). None outside the stack."""

    def apply_to(self, story: Story) -> None:
        story.merging = True
        story.queued_at = None
        story.speculation = (
            {
                "state": "building",
                "base_sha": self.base_sha,
                "ahead": list(self.ahead),
                "parent": self.speculative_base,
                "commit": None,
            }
            if self.speculative_base is not None
            else None
        )


class MergeSucceeded(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.MergeSucceeded.v1"
    merge_commit: str
    base_branch: str

    def apply_to(self, story: Story) -> None:
        story.merging = False
        story.speculation = None
        story.merge_commit = self.merge_commit
        story.mergemaster_spawns = 0
        story.merge_failure_kind = None
        story.merge_failure_details = None
        story.final = False


class MergeFailed(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.MergeFailed.v1"
    kind: MergeFailureKind
    details: str = ""
    conflicts: list[str] = Field(default_factory=list)
    lost_hunks: list[dict[str, Any]] = Field(default_factory=list)
    """``hunks_lost``: each ``{file, side, hunk, lines}`` a resolution dropped (added with a
    default, so older events decode unchanged)."""

    def apply_to(self, story: Story) -> None:
        story.merging = False
        story.speculation = None
        story.merge_failure_kind = self.kind
        story.merge_failure_details = self.details
        story.conflicts = list(self.conflicts)
        story.lost_hunks = [dict(h) for h in self.lost_hunks]
        story.final = False
        story.mergemaster_spawns = 0


class FixupRequested(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.FixupRequested.v1"

    def apply_to(self, story: Story) -> None:
        story.fixup_pending = True
        story.retry_count = 0
        story.last_gate_output = story.merge_failure_details
        story.merge_failure_kind = None


class MergeRequeued(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.MergeRequeued.v1"
    resolved: bool = False
    """True when a mergemaster resolved the conflict: the resolved workspace is merged next."""

    def apply_to(self, story: Story) -> None:
        story.resolved_pending = self.resolved
        story.queued_at = self.timestamp
        story.final = False


class _NotAStep(StoryEvent):
    """An event recorded on a story that is not a step of its state machine (as
    ``NoteAdded``): ``last_event`` and ``state_version`` stay, so the runners' next step
    and a command's expected version are unaffected."""

    def apply(self, aggregate: Any) -> None:
        self.apply_to(aggregate)


class SpeculationRestarted(StoryEvent):
    """Speculative merge queue: the story's speculative build is dropped (a story ahead of
    it was ejected, the base moved under the stack, a batch is split, or the runner
    restarted mid-build). It stays in ``merge``, back in the queue at its old position
    (``queued_position``, the log position that first queued it); the reason says why."""

    TOPIC: ClassVar[str] = "storyline.SpeculationRestarted.v1"
    queued_position: int | None = None
    ahead: list[str] = Field(default_factory=list)
    """The stack below the dropped build (as it was when the build started)."""
    alone: bool = False
    """True when the story must next be gated on its own (a failed batch being split)."""

    def apply_to(self, story: Story) -> None:
        story.merging = False
        story.speculation = None
        story.queued_at = self.timestamp


class SpeculationUpdated(_NotAStep):
    """Speculative merge queue: a stacked build's progress (``gating`` once its squash
    commit exists, ``passed`` while it waits for the stories ahead to land, ``landing``
    when the base is being moved onto it, ``waiting`` when its squash depends on the
    stories ahead). Not a step: a guard reads nothing of it."""

    TOPIC: ClassVar[str] = "storyline.SpeculationUpdated.v1"
    state: str
    commit: str | None = None
    parent: str | None = None

    def apply_to(self, story: Story) -> None:
        spec = dict(story.speculation or {})
        spec["state"] = self.state
        if self.commit is not None:
            spec["commit"] = self.commit
        if self.parent is not None:
            spec["parent"] = self.parent
        story.speculation = spec


class MergemasterAttempted(StoryEvent):
    """A mergemaster gave up genuinely; the story now needs a person."""

    TOPIC: ClassVar[str] = "storyline.MergemasterAttempted.v1"

    def apply_to(self, story: Story) -> None:
        story.final = True


class StoryBlocked(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.StoryBlocked.v1"
    blocked_from: Stage

    def apply_to(self, story: Story) -> None:
        story.blocked_from = self.blocked_from
        story.blocked_reason = self.reason
        story.merging = False
        story.queued_at = None
        story.speculation = None


class StoryUnblocked(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.StoryUnblocked.v1"

    def apply_to(self, story: Story) -> None:
        story.blocked_from = None
        story.blocked_reason = None
        story.retry_count = 0
        story.abort_respawns = 0
        story.failed_runs = 0
        story.mergemaster_spawns = 0
        story.evaluator_failed_runs = 0
        story.final = False
        if self.to_stage is Stage.MERGE:
            story.queued_at = self.timestamp


class StoryDemoted(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.StoryDemoted.v1"

    def apply_to(self, story: Story) -> None:
        story.blocked_from = None
        story.blocked_reason = None
        story.merging = False
        story.queued_at = None
        story.fixup_pending = False
        story.speculation = None
        story.pending_review = None


class StoryArchived(StoryEvent):
    TOPIC: ClassVar[str] = "storyline.StoryArchived.v1"
    abandoned: bool = False


class NoteAdded(StoryEvent):
    """A remark on the story by a person or an agent, legal in every stage.

    The text is the event's ``reason`` (the free text every event carries), so every view
    that shows reasons shows notes. A note is not a step of the state machine: it leaves
    ``last_event`` (the runners decide their next step from it) and ``state_version`` alone,
    so a command whose expected version is stale only by notes still applies.
    """

    TOPIC: ClassVar[str] = "storyline.NoteAdded.v1"

    def apply(self, aggregate: Any) -> None:
        story: Story = aggregate
        story.notes += 1


class ProviderBreakerOpened(_NotAStep):
    """A model provider failed ``consecutive_failures`` runs in a row: no agent of this
    provider is spawned before ``open_until``. Recorded on the story whose exit opened it;
    ``opened_times`` counts openings without a close in between (it sets the back-off)."""

    TOPIC: ClassVar[str] = "storyline.ProviderBreakerOpened.v1"
    provider: str
    consecutive_failures: int
    open_until: datetime
    opened_times: int


class WorkerClaimed(_NotAStep):
    """Scale-out: worker runner ``worker`` took the story (coding, gates, review) under
    lease generation ``generation`` of the lease table. From now on only that worker
    records the story's steps (fencing): a worker whose lease expired and was taken finds
    itself refused, however late it comes back. Not a step: the next step is unchanged."""

    TOPIC: ClassVar[str] = "storyline.WorkerClaimed.v1"
    worker: str
    generation: int
    previous: str | None = None
    """The worker that held the story before, if any (its lease expired or was released)."""
    drop_sessions: bool = False
    """The coder's session stays on the previous worker's machine (no shared session
    directory): the next attempt starts cold instead of resuming a session it lacks."""

    def apply_to(self, story: Story) -> None:
        story.holder = self.worker
        story.holder_generation = self.generation
        if self.drop_sessions:
            story.sessions.pop("coder", None)


class ProviderBreakerClosed(_NotAStep):
    """The half-open probe run reached the provider: spawns resume. Recorded on the
    probe's story."""

    TOPIC: ClassVar[str] = "storyline.ProviderBreakerClosed.v1"
    provider: str


class DroppedHunkDeclared(_NotAStep):
    """A mergemaster says it dropped one side's hunk on purpose (and why): the loss check
    lets that hunk go. ``side`` is ``story`` or ``base``; ``hunk`` is the header the check
    reports (``@@ -12,0 +13,4 @@``)."""

    TOPIC: ClassVar[str] = "storyline.DroppedHunkDeclared.v1"
    file: str
    side: str
    hunk: str

    def apply_to(self, story: Story) -> None:
        story.declared_drops = [
            *story.declared_drops,
            {"file": self.file, "side": self.side, "hunk": self.hunk, "reason": self.reason},
        ]


class GateVerdictRecorded(_NotAStep):
    """One gate command's verdict on one tree: the evidence flakiness is judged from.

    ``fingerprint`` covers the command and its environment, so the same key on the same
    tree must give the same verdict from a deterministic gate. ``ignored``: the gate is
    quarantined, so this failure did not block (the verdict itself is kept as it was)."""

    TOPIC: ClassVar[str] = "storyline.GateVerdictRecorded.v1"
    phase: str
    gate: str
    tree: str
    fingerprint: str
    passed: bool
    output: str = ""
    rerun: int = 0
    ignored: bool = False
    reused_from: int | None = None
    """The log position of the earlier passing verdict on the same key that this one
    reuses (the command did not run again); None when the command ran."""

    def apply_to(self, story: Story) -> None:
        story.gate_runs += 1


class GateFlakyDetected(_NotAStep):
    """The same gate gave different verdicts on the same tree (both runs' output kept)."""

    TOPIC: ClassVar[str] = "storyline.GateFlakyDetected.v1"
    phase: str
    gate: str
    tree: str
    fingerprint: str
    outputs: list[str]
    verdicts: list[bool]
    action: str
    """``retried`` (a rerun passed: counted as passed), ``quarantined``, or ``recorded``."""

    def apply_to(self, story: Story) -> None:
        if self.gate not in story.flaky_gates:
            story.flaky_gates = [*story.flaky_gates, self.gate]


class ReviewSubmitted(StoryEvent):
    """An evaluator's verdict on the story's branch: each criterion judged with evidence.

    Not a move: the runner concludes the review once the evaluator's exit is recorded. One
    verdict per evaluator attempt, so a runner that restarts finds the verdict it has and
    concludes from it instead of asking again."""

    TOPIC: ClassVar[str] = "storyline.ReviewSubmitted.v1"
    attempt: int
    criteria: list[dict[str, Any]]
    """``{criterion, text, met, score, evidence}`` per acceptance criterion, in order."""
    score: float
    summary: str = ""
    commit: str | None = None
    """The feature branch's head the evaluator was shown."""

    def apply_to(self, story: Story) -> None:
        story.pending_review = self.attempt
        story.reviews = [
            *story.reviews,
            {
                "attempt": self.attempt,
                "score": self.score,
                "all_met": all(c["met"] for c in self.criteria),
                "criteria": [dict(c) for c in self.criteria],
                "summary": self.summary,
                "commit": self.commit,
                "at": self.timestamp.isoformat(),
                "passed": None,
            },
        ]


def _concluded(story: Story, attempt: int, passed: bool, min_score: float) -> None:
    story.pending_review = None
    story.evaluator_failed_runs = 0
    story.reviews = [
        {**r, "passed": passed, "min_score": min_score} if r["attempt"] == attempt else r
        for r in story.reviews
    ]


class ReviewPassed(StoryEvent):
    """Every criterion met and the score at or above ``min_score``: into the merge queue."""

    TOPIC: ClassVar[str] = "storyline.ReviewPassed.v1"
    attempt: int
    score: float
    min_score: float

    def apply_to(self, story: Story) -> None:
        _concluded(story, self.attempt, True, self.min_score)
        story.queued_at = self.timestamp
        story.last_review_failure = None


class ReviewFailed(StoryEvent):
    """The verdict fell short: back to coding with the gaps (a retry), or blocked."""

    TOPIC: ClassVar[str] = "storyline.ReviewFailed.v1"
    attempt: int
    score: float
    min_score: float
    gaps: list[dict[str, Any]]
    """The unmet criteria with the evaluator's evidence (or, when every criterion was met
    but the score fell short, the criteria scored lowest)."""
    summary: str = ""
    retry_count: int
    exhausted: bool = False

    def apply_to(self, story: Story) -> None:
        _concluded(story, self.attempt, False, self.min_score)
        story.retry_count = self.retry_count
        story.last_review_failure = {
            "attempt": self.attempt,
            "score": self.score,
            "min_score": self.min_score,
            "gaps": [dict(g) for g in self.gaps],
            "summary": self.summary,
        }
        if self.exhausted:
            story.blocked_from = Stage.CODING
            story.blocked_reason = self.reason


EVENT_CLASSES: tuple[type[StoryEvent], ...] = (
    StoryCreated,
    CodingStarted,
    WorktreeReady,
    AgentSpawnRequested,
    AgentStarted,
    AgentExited,
    UncommittedChangesFound,
    GatesStarted,
    GatesPassed,
    GatesFailed,
    MergeStarted,
    MergeSucceeded,
    MergeFailed,
    FixupRequested,
    MergeRequeued,
    MergemasterAttempted,
    SpeculationRestarted,
    SpeculationUpdated,
    StoryBlocked,
    StoryUnblocked,
    StoryDemoted,
    StoryArchived,
    NoteAdded,
    ProviderBreakerOpened,
    ProviderBreakerClosed,
    WorkerClaimed,
    DroppedHunkDeclared,
    GateVerdictRecorded,
    GateFlakyDetected,
    ReviewSubmitted,
    ReviewPassed,
    ReviewFailed,
)

EVENTS_BY_NAME: dict[str, type[StoryEvent]] = {cls.__name__: cls for cls in EVENT_CLASSES}

for _cls in EVENT_CLASSES:
    register_topic(_cls.TOPIC, _cls)
