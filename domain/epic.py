"""The Epic aggregate: a goal planned into stories, integrated, verified as a whole, landed.

Same discipline as :mod:`domain.story`: a command method checks its guard and triggers one
event; the event's ``apply`` (``domain.epic_events``) is the state change, so a replay never
re-runs a guard. The stories an epic farms out are separate aggregates, created by the
service in the same transaction as the epic's ``StoriesFarmedOut`` event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from eventsourcing.domain import BaseAggregate

from domain.epic_events import (
    ACTIVE_EPIC_STAGES,
    BlameConcluded,
    BlameProbed,
    EpicBlocked,
    EpicCreated,
    EpicEvent,
    EpicFailed,
    EpicLanded,
    EpicLandingFailed,
    EpicNoteAdded,
    EpicStage,
    EpicUnblocked,
    IntegrationRebuilt,
    IntegrationStarted,
    PlanAccepted,
    PlannerExited,
    PlannerSpawnRequested,
    PlannerStarted,
    PlanRejected,
    RunMode,
    StoriesFarmedOut,
    UnionGatesJudged,
)
from domain.epic_transitions import legal_epic_events_from
from domain.errors import EpicIllegalTransition, InvalidCommand
from domain.ids import validate_epic_id
from domain.plan import Plan, plan_problems, single_session_reason
from domain.stages import AgentOutcome
from domain.story import MAX_NAME, MAX_TEXT, _clean_text, check_reason, clean_criteria

MAX_BUDGET_USD = 1_000_000.0
MAX_OUTPUT = 20_000
"""Gate output kept per verdict or probe (its tail: where the decisive line is)."""


def _tail(text: str) -> str:
    return text if len(text) <= MAX_OUTPUT else text[-MAX_OUTPUT:]


def _budget(value: float | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or not 0 < value <= MAX_BUDGET_USD:
        raise InvalidCommand(
            f"max_budget_usd must be a number above 0 and at most {MAX_BUDGET_USD:g}"
        )
    return float(value)


class Epic(BaseAggregate[str]):
    """A goal delivered as verified, integrated work."""

    TOPIC: ClassVar[str] = "storyline.Epic.v1"

    def __init__(self) -> None:
        self.stage = EpicStage.PLANNING
        self.name = ""
        self.goal = ""
        self.acceptance_criteria: list[str] = []
        self.max_budget_usd: float | None = None
        self.created_at: datetime | None = None
        self.last_event = ""
        # Planning.
        self.running_planner: dict[str, Any] | None = None
        self.planner_attempts = 0
        self.failed_plan_attempts = 0
        """Rejected plans plus planner runs that ended without submitting one."""
        self.rejections_this_attempt = 0
        self.last_plan_problems: list[str] = []
        self.plan: dict[str, Any] | None = None
        self.single_session_reason: str | None = None
        self.planner_tokens_in = 0
        self.planner_tokens_out = 0
        self.planner_cost_usd = 0.0
        # Rounds of stories.
        self.mode: RunMode | None = None
        self.round = 0
        self.stories: list[str] = []
        self.round_stories: list[str] = []
        self.kept_stories: list[str] = []
        self.fork_point: str | None = None
        self.round_start_tip: str | None = None
        # Integration.
        self.integration_commit: str | None = None
        self.union: dict[str, Any] | None = None
        self.union_verdicts: list[dict[str, Any]] = []
        self.probes: list[dict[str, Any]] = []
        self.implicated: list[str] | None = None
        self.clean_stories: list[str] = []
        self.rebuilt_tip: str | None = None
        # Landing and the end.
        self.merge_commit: str | None = None
        self.landing_failures: list[dict[str, Any]] = []
        self.failed_reason: str | None = None
        self.blocked_from: EpicStage | None = None
        self.blocked_reason: str | None = None
        self.notes = 0

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls,
        *,
        epic_id: str,
        name: str,
        goal: str,
        acceptance_criteria: list[str],
        actor: str,
        max_budget_usd: float | None = None,
        reason: str | None = None,
    ) -> Epic:
        validate_epic_id(epic_id)
        name = _clean_text(name, "name", max_len=MAX_NAME, allow_newlines=False)
        if not name.strip():
            raise InvalidCommand("name must not be empty")
        goal = _clean_text(goal, "goal", max_len=MAX_TEXT, allow_newlines=True)
        if not goal.strip():
            raise InvalidCommand("goal must not be empty")
        criteria = clean_criteria(acceptance_criteria, "an epic")
        return cls._create(
            EpicCreated,
            id=epic_id,
            actor=actor,
            reason=check_reason(reason),
            to_stage=EpicStage.PLANNING,
            name=name,
            goal=goal,
            acceptance_criteria=criteria,
            max_budget_usd=_budget(max_budget_usd),
        )

    # ------------------------------------------------------------------ helpers

    @property
    def legal_events(self) -> list[str]:
        return legal_epic_events_from(self.stage)

    @property
    def active(self) -> bool:
        return self.stage in ACTIVE_EPIC_STAGES

    def _refuse(self, event: str, why: str = "") -> EpicIllegalTransition:
        return EpicIllegalTransition(self.id, self.stage.value, event, self.legal_events, why)

    def _require_stage(self, event: str, *stages: EpicStage) -> None:
        if self.stage not in stages:
            raise self._refuse(event)

    def _move(
        self,
        event_cls: type[EpicEvent],
        *,
        actor: str,
        to_stage: EpicStage | None = None,
        reason: str | None = None,
        **fields: Any,
    ) -> None:
        self.trigger_event(
            event_cls,
            actor=actor,
            reason=check_reason(reason),
            from_stage=self.stage,
            to_stage=to_stage if to_stage is not None else self.stage,
            **fields,
        )

    def plan_model(self) -> Plan | None:
        return Plan.model_validate(self.plan) if self.plan is not None else None

    # ------------------------------------------------------------------ planning

    def request_planner_spawn(
        self,
        *,
        actor: str,
        agent: str,
        runtime: str,
        max_attempts: int,
        model: str | None = None,
        argv: list[str] | None = None,
        log_path: str | None = None,
        reason: str | None = None,
    ) -> int:
        event = "spawn_planner"
        self._require_stage(event, EpicStage.PLANNING)
        if self.running_planner is not None:
            raise self._refuse(event, f"planner attempt {self.running_planner['attempt']} runs")
        if self.plan is not None:
            raise self._refuse(event, "a plan is already accepted")
        if self.failed_plan_attempts >= max_attempts:
            raise self._refuse(event, f"{max_attempts} plan attempts are used up")
        attempt = self.planner_attempts + 1
        self._move(
            PlannerSpawnRequested,
            actor=actor,
            reason=reason,
            attempt=attempt,
            agent=agent,
            runtime=runtime,
            model=model,
            argv=list(argv or []),
            log_path=log_path,
        )
        return attempt

    def planner_started(
        self, *, actor: str, attempt: int, pid: int, reason: str | None = None
    ) -> None:
        # The table's stages, not only the running attempt: a planner spawned just before a
        # block (or a failure) is not recorded as started while the epic waits.
        self._require_stage("planner_started", EpicStage.PLANNING)
        self._require_planner("planner_started", attempt)
        self._move(PlannerStarted, actor=actor, reason=reason, attempt=attempt, pid=pid)

    def _require_planner(self, event: str, attempt: int) -> None:
        running = self.running_planner
        if running is None or running["attempt"] != attempt:
            raise self._refuse(event, f"planner attempt {attempt} is not running")

    def planner_exited(
        self,
        *,
        actor: str,
        attempt: int,
        outcome: AgentOutcome,
        reason: str | None = None,
        **usage: Any,
    ) -> None:
        event = "planner_exited"
        self._require_stage(event, EpicStage.PLANNING, EpicStage.BLOCKED, EpicStage.FAILED)
        self._require_planner(event, attempt)
        self._move(
            PlannerExited, actor=actor, reason=reason, attempt=attempt, outcome=outcome, **usage
        )

    def submit_plan(self, *, actor: str, plan: Any, max_attempts: int) -> list[str]:
        """Accept or reject a planner's plan; returns the problems (empty when accepted).

        A rejection is an event too: it counts toward ``max_attempts`` and its problems go
        into the next planner prompt."""
        event = "submit_plan"
        self._require_stage(event, EpicStage.PLANNING)
        if self.plan is not None:
            raise self._refuse(event, "a plan is already accepted")
        if self.failed_plan_attempts >= max_attempts:
            raise self._refuse(event, f"{max_attempts} plan attempts are used up")
        from domain.plan import parse_plan

        parsed, problems = parse_plan(plan)
        if parsed is None or problems:
            shown = plan if isinstance(plan, dict) and len(str(plan)) <= MAX_OUTPUT else None
            self._move(
                PlanRejected,
                actor=actor,
                reason=f"the plan cannot be run as written ({len(problems)} problems)",
                problems=problems,
                plan=shown,
            )
            return problems
        why = single_session_reason(parsed)
        self._move(
            PlanAccepted,
            actor=actor,
            reason=why or f"{len(parsed.subtasks)} subtasks to farm out",
            plan=parsed.model_dump(mode="json"),
            single_session_reason=why,
        )
        return []

    # ------------------------------------------------------------------ rounds

    def farm_out(
        self,
        *,
        actor: str,
        mode: RunMode,
        stories: list[str],
        fork_point: str,
        integration_tip: str,
        kept: list[str] | None = None,
        reason: str | None = None,
    ) -> None:
        event = "farm_out"
        self._require_stage(event, EpicStage.PLANNING, EpicStage.INTEGRATING)
        if not stories:
            raise self._refuse(event, "a round needs at least one story")
        if self.stage is EpicStage.PLANNING and self.round > 0:
            raise self._refuse(event, "the epic was already farmed out")
        if self.running_planner is not None:
            # Its exit is refused outside planning, blocked and failed: it would never be
            # recorded (nor its cost counted) once the epic runs.
            raise self._refuse(event, f"planner attempt {self.running_planner['attempt']} runs")
        if self.stage is EpicStage.INTEGRATING and (self.union is None or self.union["passed"]):
            raise self._refuse(event, "only a failed union starts another round")
        again = sorted(set(stories) & set(self.stories))
        if again:
            raise self._refuse(event, f"stories {', '.join(again)} were farmed out before")
        self._move(
            StoriesFarmedOut,
            actor=actor,
            to_stage=EpicStage.RUNNING,
            reason=reason,
            mode=mode,
            stories=list(stories),
            kept=list(kept or []),
            fork_point=fork_point,
            integration_tip=integration_tip,
        )

    def start_integration(self, *, actor: str, commit: str, reason: str | None = None) -> None:
        self._require_stage("start_integration", EpicStage.RUNNING)
        self._move(
            IntegrationStarted,
            actor=actor,
            to_stage=EpicStage.INTEGRATING,
            reason=reason,
            commit=commit,
        )

    def judge_union(self, *, actor: str, commit: str, tree: str, passed: bool, output: str) -> None:
        event = "judge_union"
        self._require_stage(event, EpicStage.INTEGRATING)
        if self.union is not None:
            raise self._refuse(event, "this round's union is already judged")
        self._move(
            UnionGatesJudged,
            actor=actor,
            to_stage=EpicStage.MERGING if passed else EpicStage.INTEGRATING,
            reason="the union gates passed" if passed else "the union gates failed",
            commit=commit,
            tree=tree,
            passed=passed,
            output=_tail(output),
        )

    def record_probe(
        self,
        *,
        actor: str,
        excluded: list[str],
        result: str,
        commit: str | None = None,
        tree: str | None = None,
        output: str = "",
    ) -> None:
        event = "record_probe"
        self._require_stage(event, EpicStage.INTEGRATING)
        if self.union is None or self.union["passed"] or self.implicated is not None:
            raise self._refuse(event, "blame runs after a failed union and before its verdict")
        if result not in ("passed", "failed", "conflict"):
            raise InvalidCommand("a probe's result is passed, failed or conflict")
        unknown = sorted(set(excluded) - set(self.round_stories))
        if not excluded or unknown:
            raise InvalidCommand("a probe leaves out one or more stories of the current round")
        if any(sorted(p["excluded"]) == sorted(excluded) for p in self.probes):
            raise self._refuse(event, f"the probe without {', '.join(excluded)} is recorded")
        shown = ", ".join(excluded)
        self._move(
            BlameProbed,
            actor=actor,
            reason=f"union without {shown}: {result}",
            excluded=list(excluded),
            result=result,
            commit=commit,
            tree=tree,
            output=_tail(output),
        )

    def conclude_blame(self, *, actor: str, implicated: list[str], reason: str) -> None:
        event = "conclude_blame"
        self._require_stage(event, EpicStage.INTEGRATING)
        if self.union is None or self.union["passed"] or self.implicated is not None:
            raise self._refuse(event, "blame concludes once, after a failed union")
        if set(implicated) - set(self.round_stories) or not implicated:
            raise InvalidCommand("the implicated stories are a non-empty part of the round")
        clean = [s for s in self.round_stories if s not in implicated]
        self._move(
            BlameConcluded,
            actor=actor,
            reason=reason,
            implicated=list(implicated),
            clean=clean,
        )

    def rebuild_integration(
        self, *, actor: str, old_tip: str, new_tip: str, kept: list[str], reason: str
    ) -> None:
        event = "rebuild_integration"
        self._require_stage(event, EpicStage.INTEGRATING)
        if self.implicated is None:
            raise self._refuse(event, "the integration branch is rebuilt after blame")
        self._move(
            IntegrationRebuilt,
            actor=actor,
            reason=reason,
            old_tip=old_tip,
            new_tip=new_tip,
            kept=list(kept),
        )

    # ------------------------------------------------------------------ the end

    def land(self, *, actor: str, merge_commit: str, base_branch: str) -> None:
        self._require_stage("land", EpicStage.MERGING)
        self._move(
            EpicLanded,
            actor=actor,
            to_stage=EpicStage.DONE,
            reason=f"landed on {base_branch} as {merge_commit[:12]}",
            merge_commit=merge_commit,
            base_branch=base_branch,
        )

    def landing_failed(
        self, *, actor: str, kind: str, details: str, conflicts: list[str], reason: str
    ) -> None:
        self._require_stage("landing_failed", EpicStage.MERGING)
        self._move(
            EpicLandingFailed,
            actor=actor,
            to_stage=EpicStage.BLOCKED,
            reason=reason,
            kind=kind,
            details=_tail(details),
            conflicts=list(conflicts),
        )

    def fail(self, *, actor: str, reason: str | None) -> None:
        event = "fail"
        if self.stage not in (*ACTIVE_EPIC_STAGES, EpicStage.BLOCKED):
            raise self._refuse(event)
        if not reason or not reason.strip():
            raise InvalidCommand("failing an epic needs a reason")
        self._move(EpicFailed, actor=actor, to_stage=EpicStage.FAILED, reason=reason)

    def block(self, *, actor: str, reason: str | None) -> None:
        event = "block"
        if not self.active:
            raise self._refuse(event)
        if not reason or not reason.strip():
            raise InvalidCommand("blocking an epic needs a reason")
        self._move(EpicBlocked, actor=actor, to_stage=EpicStage.BLOCKED, reason=reason)

    def unblock(
        self, *, actor: str, reason: str | None, max_budget_usd: float | None = None
    ) -> None:
        event = "unblock"
        self._require_stage(event, EpicStage.BLOCKED)
        back = self.blocked_from or EpicStage.PLANNING
        self._move(
            EpicUnblocked,
            actor=actor,
            to_stage=back,
            reason=reason,
            max_budget_usd=_budget(max_budget_usd),
        )

    def add_note(self, *, actor: str, text: str | None) -> None:
        if not text or not text.strip():
            raise InvalidCommand("a note needs text (send it as the reason)")
        self._move(EpicNoteAdded, actor=actor, reason=text)

    # ------------------------------------------------------------------ views

    def plan_problems(self) -> list[str]:
        plan = self.plan_model()
        return plan_problems(plan) if plan is not None else list(self.last_plan_problems)
