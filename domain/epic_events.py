"""The typed, immutable events of an epic.

Like story events: pydantic models with pinned topics (``storyline.Epic<Name>.v1``), each
``apply`` the only place an epic's state changes. An epic's events live in the same log as
its stories' (originator id ``epic-<n>``), so an epic and the stories it farms out commit in
one transaction and every view of the log orders them together.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from eventsourcing.domain import CanInitAggregate, CanMutateAggregate
from eventsourcing.utils import register_topic
from pydantic import BaseModel, ConfigDict, Field

from domain.events import Actor, Reason
from domain.stages import AgentOutcome

if TYPE_CHECKING:
    from domain.epic import Epic


class EpicStage(StrEnum):
    PLANNING = "planning"
    """Waiting for a usable plan from the planner agent."""
    RUNNING = "running"
    """The epic's stories go through the pipeline into the integration branch."""
    INTEGRATING = "integrating"
    """The union gates judge the integration branch; on a failure, blame probes run."""
    EVALUATING = "evaluating"
    """An evaluator scores the integrated result against the epic's acceptance criteria;
    under the threshold the planner proposes follow-up stories (an evolution)."""
    AWAITING_ANSWERS = "awaiting_answers"
    """The planner asked clarifying questions; planning resumes when a person answers."""
    MERGING = "merging"
    """The integrated result lands on the base branch (merge gates, compare-and-swap)."""
    DONE = "done"
    FAILED = "failed"
    BLOCKED = "blocked"


class RunMode(StrEnum):
    """How the epic's goal was (or is being) delivered; the seed's ``RunMode``."""

    PARALLEL = "parallel"
    SINGLE_SESSION = "single_session"
    REGIONAL_REPLAN = "regional_replan"
    PARALLEL_THEN_SINGLE_SESSION = "parallel_then_single_session"


ACTIVE_EPIC_STAGES = frozenset(
    {
        EpicStage.PLANNING,
        EpicStage.AWAITING_ANSWERS,
        EpicStage.RUNNING,
        EpicStage.INTEGRATING,
        EpicStage.EVALUATING,
        EpicStage.MERGING,
    }
)


class EpicEvent(BaseModel, CanMutateAggregate[str]):
    """Common fields of every epic event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    TOPIC: ClassVar[str]
    originator_id: str
    originator_version: int
    timestamp: datetime
    actor: Actor
    reason: Reason | None = None
    from_stage: EpicStage | None = None
    to_stage: EpicStage | None = None

    def apply(self, aggregate: Any) -> None:
        epic: Epic = aggregate
        if self.to_stage is not None:
            epic.stage = self.to_stage
        epic.last_event = type(self).__name__
        self.apply_to(epic)

    def apply_to(self, epic: Epic) -> None:
        """Event-specific state change; the stage itself is set by :meth:`apply`."""


class EpicCreated(EpicEvent, CanInitAggregate[str]):
    TOPIC: ClassVar[str] = "storyline.EpicCreated.v1"
    originator_topic: str
    name: str
    goal: str
    acceptance_criteria: list[str]
    max_budget_usd: float | None = None
    review: bool | None = None
    """Evaluate the integrated result before landing; None: ``[review] enabled`` decides.
    Added with a default: old events decode unchanged."""

    def apply_to(self, epic: Epic) -> None:
        epic.review = self.review
        epic.name = self.name
        epic.goal = self.goal
        epic.acceptance_criteria = list(self.acceptance_criteria)
        epic.max_budget_usd = self.max_budget_usd
        epic.created_at = self.timestamp


class PlannerSpawnRequested(EpicEvent):
    """A runner is about to start the planner agent: one request = one attempt."""

    TOPIC: ClassVar[str] = "storyline.EpicPlannerSpawnRequested.v1"
    attempt: int
    agent: str
    runtime: str
    model: str | None = None
    argv: list[str] = Field(default_factory=list)
    log_path: str | None = None

    def apply_to(self, epic: Epic) -> None:
        epic.running_planner = {"attempt": self.attempt, "agent": self.agent, "pid": None}
        epic.planner_attempts = max(epic.planner_attempts, self.attempt)
        epic.rejections_this_attempt = 0
        epic.asked_this_attempt = False


class PlannerStarted(EpicEvent):
    TOPIC: ClassVar[str] = "storyline.EpicPlannerStarted.v1"
    attempt: int
    pid: int

    def apply_to(self, epic: Epic) -> None:
        if epic.running_planner is not None:
            epic.running_planner = {**epic.running_planner, "pid": self.pid}


class PlannerExited(EpicEvent):
    TOPIC: ClassVar[str] = "storyline.EpicPlannerExited.v1"
    attempt: int
    outcome: AgentOutcome
    exit_code: int | None = None
    session_id: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    log_path: str | None = None

    def apply_to(self, epic: Epic) -> None:
        epic.running_planner = None
        epic.planner_tokens_in += self.tokens_in
        epic.planner_tokens_out += self.tokens_out
        epic.planner_cost_usd += self.cost_usd
        if epic.asked_this_attempt:
            # Questions instead of a plan are an answer, not a failed attempt.
            return
        if epic.plan is None and epic.rejections_this_attempt == 0:
            # A run that ended without submitting anything used up an attempt too.
            epic.failed_plan_attempts += 1
            epic.last_plan_problems = [
                f"planner attempt {self.attempt} ended ({self.outcome.value}) "
                "without submitting a plan" + (f": {self.reason}" if self.reason else "")
            ]


class PlanRejected(EpicEvent):
    """A submitted plan could not be run as written; the problems go back to the planner."""

    TOPIC: ClassVar[str] = "storyline.EpicPlanRejected.v1"
    problems: list[str]
    plan: Any = None

    def apply_to(self, epic: Epic) -> None:
        epic.failed_plan_attempts += 1
        epic.rejections_this_attempt += 1
        epic.last_plan_problems = list(self.problems)


class PlanAccepted(EpicEvent):
    TOPIC: ClassVar[str] = "storyline.EpicPlanAccepted.v1"
    plan: dict[str, Any]
    single_session_reason: str | None = None
    """Set when the plan is valid but runs as one session (and why)."""

    def apply_to(self, epic: Epic) -> None:
        epic.plan = dict(self.plan)
        epic.single_session_reason = self.single_session_reason
        epic.last_plan_problems = []


class StoriesFarmedOut(EpicEvent):
    """The epic's next round of stories exists (saved in the same transaction as this)."""

    TOPIC: ClassVar[str] = "storyline.EpicStoriesFarmedOut.v1"
    mode: RunMode
    stories: list[str]
    kept: list[str] = Field(default_factory=list)
    """Stories of earlier rounds whose work stays on the integration branch."""
    fork_point: str
    """The commit the integration branch started from (the base tip at the first round)."""
    integration_tip: str
    """The integration branch's commit this round starts from."""

    def apply_to(self, epic: Epic) -> None:
        epic.mode = self.mode
        epic.round += 1
        epic.round_stories = list(self.stories)
        epic.kept_stories = list(self.kept)
        epic.stories = [*epic.stories, *self.stories]
        epic.plan_farmed = True
        if epic.fork_point is None:
            epic.fork_point = self.fork_point
        epic.round_start_tip = self.integration_tip
        epic.union = None
        epic.probes = []
        epic.implicated = None


class IntegrationStarted(EpicEvent):
    """Every story of the round is done: the union gates are about to judge the result."""

    TOPIC: ClassVar[str] = "storyline.EpicIntegrationStarted.v1"
    commit: str

    def apply_to(self, epic: Epic) -> None:
        epic.integration_commit = self.commit


class UnionGatesJudged(EpicEvent):
    """The union gates' verdict on the integration branch at ``commit``."""

    TOPIC: ClassVar[str] = "storyline.EpicUnionGatesJudged.v1"
    commit: str
    tree: str
    passed: bool
    output: str

    def apply_to(self, epic: Epic) -> None:
        epic.union = {
            "commit": self.commit,
            "tree": self.tree,
            "passed": self.passed,
            "output": self.output,
            "round": epic.round,
        }
        epic.union_verdicts = [*epic.union_verdicts, dict(epic.union)]


class BlameProbed(EpicEvent):
    """One blame probe: the round's stories without ``excluded``, judged by the union gates."""

    TOPIC: ClassVar[str] = "storyline.EpicBlameProbed.v1"
    excluded: list[str]
    result: str
    """``passed``, ``failed`` or ``conflict`` (the remaining squashes did not apply)."""
    commit: str | None = None
    tree: str | None = None
    output: str = ""

    def apply_to(self, epic: Epic) -> None:
        epic.probes = [
            *epic.probes,
            {
                "excluded": list(self.excluded),
                "result": self.result,
                "commit": self.commit,
                "tree": self.tree,
                "output": self.output,
            },
        ]


class BlameConcluded(EpicEvent):
    TOPIC: ClassVar[str] = "storyline.EpicBlameConcluded.v1"
    implicated: list[str]
    clean: list[str]

    def apply_to(self, epic: Epic) -> None:
        epic.implicated = list(self.implicated)
        epic.clean_stories = list(self.clean)


class IntegrationRebuilt(EpicEvent):
    """The integration branch now holds only the clean stories' work (before a replan)."""

    TOPIC: ClassVar[str] = "storyline.EpicIntegrationRebuilt.v1"
    old_tip: str
    new_tip: str
    kept: list[str]

    def apply_to(self, epic: Epic) -> None:
        epic.rebuilt_tip = self.new_tip


class EpicLanded(EpicEvent):
    TOPIC: ClassVar[str] = "storyline.EpicLanded.v1"
    merge_commit: str
    base_branch: str

    def apply_to(self, epic: Epic) -> None:
        epic.merge_commit = self.merge_commit


class EpicLandingFailed(EpicEvent):
    """Landing on the base branch failed (conflict or merge gates); the epic waits blocked."""

    TOPIC: ClassVar[str] = "storyline.EpicLandingFailed.v1"
    kind: str
    details: str
    conflicts: list[str] = Field(default_factory=list)

    def apply_to(self, epic: Epic) -> None:
        epic.blocked_from = EpicStage.MERGING
        epic.blocked_reason = self.reason
        epic.landing_failures = [
            *epic.landing_failures,
            {"kind": self.kind, "details": self.details, "conflicts": list(self.conflicts)},
        ]


class EpicFailed(EpicEvent):
    """The epic cannot deliver on its own; the evidence (plan, verdicts, probes) stays."""

    TOPIC: ClassVar[str] = "storyline.EpicFailed.v1"

    def apply_to(self, epic: Epic) -> None:
        epic.failed_reason = self.reason


class EpicBlocked(EpicEvent):
    TOPIC: ClassVar[str] = "storyline.EpicBlocked.v1"

    def apply_to(self, epic: Epic) -> None:
        epic.blocked_from = self.from_stage
        epic.blocked_reason = self.reason


class EpicUnblocked(EpicEvent):
    TOPIC: ClassVar[str] = "storyline.EpicUnblocked.v1"
    max_budget_usd: float | None = None
    """A new budget cap, when the block was the budget's."""

    def apply_to(self, epic: Epic) -> None:
        epic.blocked_from = None
        epic.blocked_reason = None
        # A person's unblock gives the evaluator a fresh run of tries (as a story's does).
        epic.evaluator_failed_runs = 0
        epic.evaluator_aborts = 0
        if self.max_budget_usd is not None:
            epic.max_budget_usd = self.max_budget_usd


class EpicNoteAdded(EpicEvent):
    TOPIC: ClassVar[str] = "storyline.EpicNoteAdded.v1"

    def apply_to(self, epic: Epic) -> None:
        epic.notes += 1


class QuestionsAsked(EpicEvent):
    """The planner answered the goal with clarifying questions instead of a plan."""

    TOPIC: ClassVar[str] = "storyline.EpicQuestionsAsked.v1"
    attempt: int
    questions: list[str]

    def apply_to(self, epic: Epic) -> None:
        epic.asked_this_attempt = True
        epic.questions = list(self.questions)
        epic.interview = [
            *epic.interview,
            {
                "round": len(epic.interview) + 1,
                "attempt": self.attempt,
                "questions": list(self.questions),
                "asked_by": self.actor,
                "asked_at": self.timestamp.isoformat(),
                "answers": None,
                "answered_by": None,
            },
        ]


class QuestionsAnswered(EpicEvent):
    """A person answered the planner's questions: planning resumes with them in the prompt."""

    TOPIC: ClassVar[str] = "storyline.EpicQuestionsAnswered.v1"
    answers: list[str]

    def apply_to(self, epic: Epic) -> None:
        epic.questions = None
        if epic.interview:
            last = {**epic.interview[-1], "answers": list(self.answers)}
            last["answered_by"] = self.actor
            last["answered_at"] = self.timestamp.isoformat()
            epic.interview = [*epic.interview[:-1], last]


class EvaluatorSpawnRequested(EpicEvent):
    """A runner is about to start the epic's evaluator: one request = one attempt."""

    TOPIC: ClassVar[str] = "storyline.EpicEvaluatorSpawnRequested.v1"
    attempt: int
    agent: str
    runtime: str
    model: str | None = None
    argv: list[str] = Field(default_factory=list)
    log_path: str | None = None

    def apply_to(self, epic: Epic) -> None:
        epic.running_evaluator = {"attempt": self.attempt, "agent": self.agent, "pid": None}
        epic.evaluator_attempts = max(epic.evaluator_attempts, self.attempt)


class EvaluatorStarted(EpicEvent):
    TOPIC: ClassVar[str] = "storyline.EpicEvaluatorStarted.v1"
    attempt: int
    pid: int

    def apply_to(self, epic: Epic) -> None:
        if epic.running_evaluator is not None:
            epic.running_evaluator = {**epic.running_evaluator, "pid": self.pid}


_NOT_THE_AGENTS_FAULT = frozenset(
    {AgentOutcome.ABORTED_BEFORE_SESSION, AgentOutcome.LOST, AgentOutcome.PROVIDER_UNAVAILABLE}
)


class EvaluatorExited(EpicEvent):
    TOPIC: ClassVar[str] = "storyline.EpicEvaluatorExited.v1"
    attempt: int
    outcome: AgentOutcome
    exit_code: int | None = None
    session_id: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    log_path: str | None = None

    def apply_to(self, epic: Epic) -> None:
        epic.running_evaluator = None
        epic.evaluator_tokens_in += self.tokens_in
        epic.evaluator_tokens_out += self.tokens_out
        epic.evaluator_cost_usd += self.cost_usd
        if epic.pending_evaluation == self.attempt:
            return
        if self.outcome in _NOT_THE_AGENTS_FAULT:
            epic.evaluator_aborts += 1
        else:
            # It ran and gave no verdict: capped like any agent that fails.
            epic.evaluator_failed_runs += 1


class EvaluationSubmitted(EpicEvent):
    """The evaluator's verdict on the integration branch at ``commit``."""

    TOPIC: ClassVar[str] = "storyline.EpicEvaluationSubmitted.v1"
    attempt: int
    evolution: int
    commit: str
    criteria: list[dict[str, Any]]
    score: float
    summary: str = ""

    def apply_to(self, epic: Epic) -> None:
        epic.pending_evaluation = self.attempt
        epic.evaluations = [
            *epic.evaluations,
            {
                "attempt": self.attempt,
                "evolution": self.evolution,
                "commit": self.commit,
                "score": self.score,
                "all_met": all(c["met"] for c in self.criteria),
                "criteria": [dict(c) for c in self.criteria],
                "summary": self.summary,
                "at": self.timestamp.isoformat(),
            },
        ]


class EvolutionDiscarded(EpicEvent):
    """This evolution scored worse than the best so far: the best integration is kept (the
    runner moves the integration branch back to ``kept_commit``) and this one discarded."""

    TOPIC: ClassVar[str] = "storyline.EpicEvolutionDiscarded.v1"
    evolution: int
    score: float
    discarded_commit: str
    best_evolution: int
    best_score: float
    kept_commit: str

    def apply_to(self, epic: Epic) -> None:
        epic.integration_commit = self.kept_commit
        epic.discarded = [
            *epic.discarded,
            {
                "evolution": self.evolution,
                "score": self.score,
                "commit": self.discarded_commit,
                "kept_evolution": self.best_evolution,
                "kept_commit": self.kept_commit,
            },
        ]


class EvolutionStarted(EpicEvent):
    """The evaluation fell short: the planner proposes follow-up stories for the gaps."""

    TOPIC: ClassVar[str] = "storyline.EpicEvolutionStarted.v1"
    evolution: int
    """The new evolution's number (the first integration is evolution 0)."""
    from_commit: str
    """The best integration so far: the follow-up stories build on it."""
    score: float
    best_score: float
    gaps: list[dict[str, Any]]

    def apply_to(self, epic: Epic) -> None:
        epic.best = _best_of(epic)
        epic.evolution = self.evolution
        epic.pending_evaluation = None
        epic.evaluator_failed_runs = 0
        epic.evaluator_aborts = 0
        epic.plan = None
        epic.plan_farmed = False
        epic.single_session_reason = None
        epic.failed_plan_attempts = 0
        epic.last_plan_problems = []
        epic.evolutions = [
            *epic.evolutions,
            {
                "evolution": self.evolution,
                "from_commit": self.from_commit,
                "after_score": self.score,
                "best_score": self.best_score,
                "gaps": [dict(g) for g in self.gaps],
                "at": self.timestamp.isoformat(),
            },
        ]


class EvaluationConcluded(EpicEvent):
    """The evaluation is final: the best integration lands (``passed`` or not)."""

    TOPIC: ClassVar[str] = "storyline.EpicEvaluationConcluded.v1"
    passed: bool
    score: float
    """The final score: the landing integration's."""
    best_evolution: int
    commit: str
    max_reached: bool
    """No evolution reached the threshold within ``max_evolutions`` (and one was allowed)."""
    evolutions: int

    def apply_to(self, epic: Epic) -> None:
        epic.best = _best_of(epic)
        epic.pending_evaluation = None
        epic.integration_commit = self.commit
        epic.evaluation_final = {
            "passed": self.passed,
            "score": self.score,
            "best_evolution": self.best_evolution,
            "commit": self.commit,
            "max_reached": self.max_reached,
            "evolutions": self.evolutions,
        }


def _best_of(epic: Epic) -> dict[str, Any] | None:
    """The best-scored evaluation so far; a later one wins a tie (it holds more work)."""
    best: dict[str, Any] | None = None
    for evaluation in epic.evaluations:
        if best is None or evaluation["score"] >= best["score"]:
            best = evaluation
    if best is None:
        return None
    return {k: best[k] for k in ("evolution", "score", "commit", "attempt")}


EPIC_EVENT_CLASSES: tuple[type[EpicEvent], ...] = (
    EpicCreated,
    PlannerSpawnRequested,
    PlannerStarted,
    PlannerExited,
    PlanRejected,
    PlanAccepted,
    StoriesFarmedOut,
    IntegrationStarted,
    UnionGatesJudged,
    BlameProbed,
    BlameConcluded,
    IntegrationRebuilt,
    EpicLanded,
    EpicLandingFailed,
    EpicFailed,
    EpicBlocked,
    EpicUnblocked,
    EpicNoteAdded,
    QuestionsAsked,
    QuestionsAnswered,
    EvaluatorSpawnRequested,
    EvaluatorStarted,
    EvaluatorExited,
    EvaluationSubmitted,
    EvolutionDiscarded,
    EvolutionStarted,
    EvaluationConcluded,
)

EPIC_TOPICS = frozenset(cls.TOPIC for cls in EPIC_EVENT_CLASSES)

for _cls in EPIC_EVENT_CLASSES:
    register_topic(_cls.TOPIC, _cls)
