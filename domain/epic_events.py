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
    {EpicStage.PLANNING, EpicStage.RUNNING, EpicStage.INTEGRATING, EpicStage.MERGING}
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

    def apply_to(self, epic: Epic) -> None:
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
        if self.max_budget_usd is not None:
            epic.max_budget_usd = self.max_budget_usd


class EpicNoteAdded(EpicEvent):
    TOPIC: ClassVar[str] = "storyline.EpicNoteAdded.v1"

    def apply_to(self, epic: Epic) -> None:
        epic.notes += 1


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
)

EPIC_TOPICS = frozenset(cls.TOPIC for cls in EPIC_EVENT_CLASSES)

for _cls in EPIC_EVENT_CLASSES:
    register_topic(_cls.TOPIC, _cls)
