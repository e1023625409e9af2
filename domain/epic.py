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
    EvaluationConcluded,
    EvaluationSubmitted,
    EvaluatorExited,
    EvaluatorSpawnRequested,
    EvaluatorStarted,
    EvolutionDiscarded,
    EvolutionStarted,
    IntegrationRebuilt,
    IntegrationStarted,
    PlanAccepted,
    PlannerExited,
    PlannerSpawnRequested,
    PlannerStarted,
    PlanRejected,
    QuestionsAnswered,
    QuestionsAsked,
    RunMode,
    StoriesFarmedOut,
    UnionGatesJudged,
)
from domain.epic_transitions import legal_epic_events_from
from domain.errors import EpicIllegalTransition, InvalidCommand
from domain.ids import validate_epic_id
from domain.plan import Plan, plan_problems, single_session_reason
from domain.review import judge, unmet, verdict_passes
from domain.stages import AgentOutcome
from domain.story import MAX_NAME, MAX_TEXT, _clean_text, check_reason, clean_criteria

MAX_QUESTIONS = 10
MAX_QUESTION = 2_000
MAX_ANSWER = 10_000
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
        self.review: bool | None = None
        """Evaluate before landing: as asked, or None for the project's ``[review]``."""
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
        # The interview: questions instead of a plan, answered by a person.
        self.asked_this_attempt = False
        self.questions: list[str] | None = None
        """The questions waiting for answers (``awaiting_answers``)."""
        self.interview: list[dict[str, Any]] = []
        # Evaluation and evolution.
        self.plan_farmed = False
        """The accepted plan (of this evolution) has been farmed out."""
        self.evolution = 0
        self.running_evaluator: dict[str, Any] | None = None
        self.evaluator_attempts = 0
        self.evaluator_failed_runs = 0
        self.evaluator_aborts = 0
        self.evaluator_tokens_in = 0
        self.evaluator_tokens_out = 0
        self.evaluator_cost_usd = 0.0
        self.pending_evaluation: int | None = None
        self.evaluations: list[dict[str, Any]] = []
        self.evolutions: list[dict[str, Any]] = []
        self.discarded: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.evaluation_final: dict[str, Any] | None = None
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
        review: bool | None = None,
    ) -> Epic:
        validate_epic_id(epic_id)
        if review is not None and not isinstance(review, bool):
            raise InvalidCommand("review is true, false or null (the project decides)")
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
            review=review,
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
        self._require_attempt(event, "planner", self.running_planner, attempt)

    def _require_attempt(
        self, event: str, role: str, running: dict[str, Any] | None, attempt: int
    ) -> None:
        if running is None or running["attempt"] != attempt:
            raise self._refuse(event, f"{role} attempt {attempt} is not running")

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
        self._require_stage(
            event,
            EpicStage.PLANNING,
            EpicStage.AWAITING_ANSWERS,
            EpicStage.BLOCKED,
            EpicStage.FAILED,
        )
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
        if self.stage is EpicStage.PLANNING and self.plan_farmed:
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

    def judge_union(
        self,
        *,
        actor: str,
        commit: str,
        tree: str,
        passed: bool,
        output: str,
        evaluate: bool = False,
    ) -> None:
        """A passed union goes to landing, or first to evaluation when ``evaluate``."""
        event = "judge_union"
        self._require_stage(event, EpicStage.INTEGRATING)
        if self.union is not None:
            raise self._refuse(event, "this round's union is already judged")
        after = EpicStage.EVALUATING if evaluate else EpicStage.MERGING
        self._move(
            UnionGatesJudged,
            actor=actor,
            to_stage=after if passed else EpicStage.INTEGRATING,
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

    # ------------------------------------------------------------------ interview

    def ask_questions(
        self, *, actor: str, attempt: int, questions: list[str], max_rounds: int
    ) -> None:
        """The planner asks instead of planning; the epic waits for a person's answers."""
        event = "ask_questions"
        self._require_stage(event, EpicStage.PLANNING)
        self._require_planner(event, attempt)
        if self.plan is not None:
            raise self._refuse(event, "a plan is already accepted")
        if len(self.interview) >= max_rounds:
            raise self._refuse(
                event, f"{max_rounds} rounds of questions are used up: submit a plan"
            )
        if not isinstance(questions, list) or not 1 <= len(questions) <= MAX_QUESTIONS:
            raise InvalidCommand(f"ask between 1 and {MAX_QUESTIONS} questions")
        cleaned = [
            _clean_text(q, f"questions[{i}]", max_len=MAX_QUESTION, allow_newlines=True).strip()
            for i, q in enumerate(questions)
        ]
        if any(not q for q in cleaned):
            raise InvalidCommand("a question must not be blank")
        self._move(
            QuestionsAsked,
            actor=actor,
            to_stage=EpicStage.AWAITING_ANSWERS,
            reason=f"the planner asks {len(cleaned)} question(s) before planning",
            attempt=attempt,
            questions=cleaned,
        )

    def answer_questions(self, *, actor: str, answers: list[str], reason: str | None) -> None:
        event = "answer_questions"
        self._require_stage(event, EpicStage.AWAITING_ANSWERS)
        asked = self.questions or []
        if not isinstance(answers, list) or len(answers) != len(asked):
            raise InvalidCommand(
                f"answer each of the {len(asked)} question(s), in order "
                f"(got {len(answers) if isinstance(answers, list) else 0})"
            )
        cleaned = [
            _clean_text(a, f"answers[{i}]", max_len=MAX_ANSWER, allow_newlines=True).strip()
            for i, a in enumerate(answers)
        ]
        if any(not a for a in cleaned):
            raise InvalidCommand("an answer must not be blank")
        self._move(
            QuestionsAnswered,
            actor=actor,
            to_stage=EpicStage.PLANNING,
            reason=reason or "answered: planning resumes",
            answers=cleaned,
        )

    # ------------------------------------------------------------------ evaluation

    def request_evaluator_spawn(
        self,
        *,
        actor: str,
        agent: str,
        runtime: str,
        model: str | None = None,
        argv: list[str] | None = None,
        log_path: str | None = None,
        reason: str | None = None,
    ) -> int:
        event = "spawn_evaluator"
        self._require_stage(event, EpicStage.EVALUATING)
        if self.running_evaluator is not None:
            raise self._refuse(event, f"evaluator attempt {self.running_evaluator['attempt']} runs")
        if self.pending_evaluation is not None:
            raise self._refuse(event, "a verdict awaits its conclusion")
        attempt = self.evaluator_attempts + 1
        self._move(
            EvaluatorSpawnRequested,
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

    def _require_evaluator(self, event: str, attempt: int) -> None:
        self._require_attempt(event, "evaluator", self.running_evaluator, attempt)

    def evaluator_started(
        self, *, actor: str, attempt: int, pid: int, reason: str | None = None
    ) -> None:
        self._require_stage("evaluator_started", EpicStage.EVALUATING)
        self._require_evaluator("evaluator_started", attempt)
        self._move(EvaluatorStarted, actor=actor, reason=reason, attempt=attempt, pid=pid)

    def evaluator_exited(
        self,
        *,
        actor: str,
        attempt: int,
        outcome: AgentOutcome,
        reason: str | None = None,
        **usage: Any,
    ) -> None:
        event = "evaluator_exited"
        self._require_stage(event, EpicStage.EVALUATING, EpicStage.BLOCKED, EpicStage.FAILED)
        self._require_evaluator(event, attempt)
        self._move(
            EvaluatorExited, actor=actor, reason=reason, attempt=attempt, outcome=outcome, **usage
        )

    def submit_evaluation(self, *, actor: str, attempt: int, verdict: Any) -> None:
        """The evaluator's verdict on the integration branch; one per attempt."""
        event = "submit_evaluation"
        self._require_stage(event, EpicStage.EVALUATING)
        self._require_evaluator(event, attempt)
        if self.pending_evaluation == attempt:
            raise self._refuse(event, f"evaluator attempt {attempt} already gave its verdict")
        if self.integration_commit is None:
            raise self._refuse(event, "there is no integration to evaluate")
        judged = judge(verdict, self.acceptance_criteria)
        self._move(
            EvaluationSubmitted,
            actor=actor,
            reason=f"evolution {self.evolution}: {judged.tally()}",
            attempt=attempt,
            evolution=self.evolution,
            commit=self.integration_commit,
            criteria=judged.criteria,
            score=judged.score,
            summary=judged.summary,
        )

    def conclude_evaluation(self, *, actor: str, min_score: float, max_evolutions: int) -> str:
        """Land, evolve, or land the best after ``max_evolutions``; a worse evolution is
        discarded first. Returns ``landing`` or ``evolving``."""
        event = "conclude_evaluation"
        self._require_stage(event, EpicStage.EVALUATING)
        if self.running_evaluator is not None:
            raise self._refuse(event, "the evaluator is still running")
        if self.pending_evaluation is None:
            raise self._refuse(event, "no verdict awaits a conclusion")
        current = next(
            e for e in reversed(self.evaluations) if e["attempt"] == self.pending_evaluation
        )
        earlier = [e for e in self.evaluations if e["evolution"] < current["evolution"]]
        best = max(earlier, key=lambda e: e["score"], default=None)
        # A later evolution wins a tie: it holds the earlier work and more.
        if best is None or current["score"] >= best["score"]:
            best = current
        else:
            self._move(
                EvolutionDiscarded,
                actor=actor,
                reason=(
                    f"evolution {current['evolution']} scored {current['score']:.2f}, worse "
                    f"than evolution {best['evolution']}'s {best['score']:.2f}: keeping that"
                ),
                evolution=current["evolution"],
                score=current["score"],
                discarded_commit=current["commit"],
                best_evolution=best["evolution"],
                best_score=best["score"],
                kept_commit=best["commit"],
            )
        if verdict_passes(current["criteria"], current["score"], min_score):
            self._conclude(actor, True, current, max_reached=False, why="evaluation passed")
            return "landing"
        if self.evolution >= max_evolutions:
            self._conclude(
                actor,
                False,
                best,
                max_reached=max_evolutions > 0,
                why=(
                    f"max_evolutions ({max_evolutions}) reached"
                    if max_evolutions > 0
                    else "evaluate only (max_evolutions is 0)"
                ),
            )
            return "landing"
        gaps = (
            unmet(current["criteria"]) or sorted(current["criteria"], key=lambda j: j["score"])[:3]
        )
        self._move(
            EvolutionStarted,
            actor=actor,
            to_stage=EpicStage.PLANNING,
            reason=(
                f"score {current['score']:.2f} under min_score {min_score:.2f}: evolution "
                f"{self.evolution + 1} plans follow-up stories for {len(gaps)} gap(s)"
            ),
            evolution=self.evolution + 1,
            from_commit=best["commit"],
            score=current["score"],
            best_score=best["score"],
            gaps=gaps,
        )
        return "evolving"

    def _conclude(
        self, actor: str, passed: bool, chosen: dict[str, Any], *, max_reached: bool, why: str
    ) -> None:
        self._move(
            EvaluationConcluded,
            actor=actor,
            to_stage=EpicStage.MERGING,
            reason=(
                f"{why}: landing evolution {chosen['evolution']} (score {chosen['score']:.2f})"
            ),
            passed=passed,
            score=chosen["score"],
            best_evolution=chosen["evolution"],
            commit=chosen["commit"],
            max_reached=max_reached,
            evolutions=self.evolution,
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
