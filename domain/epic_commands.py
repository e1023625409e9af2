"""Named epic transitions: validate a wire event's ``data``, call the Epic's command method.

The one dispatch for the API, the MCP server and the runners (as ``domain.commands`` is for
stories). ``farm_out`` is not here: it creates stories too, so only the service runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, ValidationError

from domain.commands import Clean, Count, Label, PathText, _Data
from domain.epic import Epic
from domain.epic_transitions import EPIC_EVENT_NAMES
from domain.errors import InvalidCommand, UnknownEvent
from domain.stages import AgentOutcome
from domain.story import check_reason

Sha = Annotated[str, Field(min_length=4, max_length=64, pattern=r"^[0-9a-f]+$")]
StoryRef = Annotated[str, Field(min_length=1, max_length=64), Clean]
Output = Annotated[str, Field(max_length=2_000_000)]


@dataclass(frozen=True)
class EpicPolicy:
    """The configuration values the epic's guards need (``[epic]`` in storyline.toml)."""

    max_plan_attempts: int = 3
    max_interviews: int = 2
    """``[epic] max_interviews``: rounds of questions a planner may ask before planning."""
    min_score: float = 0.8
    """``[review] min_score``."""
    max_evolutions: int = 2
    """``[review] max_evolutions`` (0: evaluate only)."""


class NoData(_Data):
    pass


class SpawnPlannerData(_Data):
    agent: Label
    runtime: Label
    model: Annotated[str, Field(max_length=200), Clean] | None = None
    argv: Annotated[
        list[Annotated[str, Field(max_length=200_000), Clean]], Field(max_length=500)
    ] = []
    log_path: PathText | None = None


class PlannerStartedData(_Data):
    attempt: Annotated[int, Field(ge=1, le=2**31)]
    pid: Annotated[int, Field(ge=1, le=2**31)]


class PlannerExitedData(_Data):
    attempt: Annotated[int, Field(ge=1, le=2**31)]
    outcome: AgentOutcome
    exit_code: Annotated[int, Field(ge=-(2**31), le=2**31)] | None = None
    session_id: Annotated[str, Field(max_length=200)] | None = None
    tokens_in: Count = 0
    tokens_out: Count = 0
    cost_usd: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)] = 0.0
    log_path: PathText | None = None


class SubmitPlanData(_Data):
    plan: Any
    """Validated by the epic (``domain.plan``): a bad plan is a recorded rejection, not a 422."""


class AskQuestionsData(_Data):
    attempt: Annotated[int, Field(ge=1, le=2**31)]
    questions: Annotated[list[Annotated[str, Field(max_length=2_000)]], Field(max_length=10)]


class AnswerQuestionsData(_Data):
    answers: Annotated[list[Annotated[str, Field(max_length=10_000)]], Field(max_length=10)]


class SubmitEvaluationData(_Data):
    attempt: Annotated[int, Field(ge=1, le=2**31)]
    criteria: Annotated[list[Any], Field(max_length=100)]
    """``{criterion, met, score, evidence}`` each; checked by ``domain.review``."""
    summary: Annotated[str, Field(max_length=4000)] = ""


class StartIntegrationData(_Data):
    commit: Sha


class JudgeUnionData(_Data):
    commit: Sha
    tree: Sha
    passed: bool
    output: Output = ""


class ProbeData(_Data):
    excluded: Annotated[list[StoryRef], Field(min_length=1, max_length=50)]
    result: Annotated[str, Field(pattern=r"^(passed|failed|conflict)$")]
    commit: Sha | None = None
    tree: Sha | None = None
    output: Output = ""


class ConcludeBlameData(_Data):
    implicated: Annotated[list[StoryRef], Field(min_length=1, max_length=50)]


class RebuildData(_Data):
    old_tip: Sha
    new_tip: Sha
    kept: Annotated[list[StoryRef], Field(max_length=50)] = []


class LandData(_Data):
    merge_commit: Sha
    base_branch: PathText


class LandingFailedData(_Data):
    kind: Annotated[str, Field(pattern=r"^(conflict|gates_failed|other)$")]
    details: Output = ""
    conflicts: Annotated[list[PathText], Field(max_length=10_000)] = []


class JudgeUnionEvaluateData(JudgeUnionData):
    evaluate: bool = False
    """Evaluate the integration before landing (the epic's flag or ``[review]``)."""


class UnblockData(_Data):
    max_budget_usd: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)] | None = None


Handler = Callable[[Epic, str, str | None, Any, EpicPolicy], object]

EPIC_COMMANDS: dict[str, tuple[type[_Data], Handler]] = {
    "spawn_planner": (
        SpawnPlannerData,
        lambda e, a, r, d, p: e.request_planner_spawn(
            actor=a, reason=r, max_attempts=p.max_plan_attempts, **d.model_dump()
        ),
    ),
    "planner_started": (
        PlannerStartedData,
        lambda e, a, r, d, p: e.planner_started(actor=a, reason=r, attempt=d.attempt, pid=d.pid),
    ),
    "planner_exited": (
        PlannerExitedData,
        lambda e, a, r, d, p: e.planner_exited(actor=a, reason=r, **d.model_dump()),
    ),
    "submit_plan": (
        SubmitPlanData,
        lambda e, a, r, d, p: e.submit_plan(actor=a, plan=d.plan, max_attempts=p.max_plan_attempts),
    ),
    "start_integration": (
        StartIntegrationData,
        lambda e, a, r, d, p: e.start_integration(actor=a, reason=r, commit=d.commit),
    ),
    "ask_questions": (
        AskQuestionsData,
        lambda e, a, r, d, p: e.ask_questions(
            actor=a, attempt=d.attempt, questions=d.questions, max_rounds=p.max_interviews
        ),
    ),
    "answer_questions": (
        AnswerQuestionsData,
        lambda e, a, r, d, p: e.answer_questions(actor=a, answers=d.answers, reason=r),
    ),
    "spawn_evaluator": (
        SpawnPlannerData,
        lambda e, a, r, d, p: e.request_evaluator_spawn(actor=a, reason=r, **d.model_dump()),
    ),
    "evaluator_started": (
        PlannerStartedData,
        lambda e, a, r, d, p: e.evaluator_started(actor=a, reason=r, attempt=d.attempt, pid=d.pid),
    ),
    "evaluator_exited": (
        PlannerExitedData,
        lambda e, a, r, d, p: e.evaluator_exited(actor=a, reason=r, **d.model_dump()),
    ),
    "submit_evaluation": (
        SubmitEvaluationData,
        lambda e, a, r, d, p: e.submit_evaluation(
            actor=a,
            attempt=d.attempt,
            verdict={"criteria": d.criteria, "summary": d.summary},
        ),
    ),
    "conclude_evaluation": (
        NoData,
        lambda e, a, r, d, p: e.conclude_evaluation(
            actor=a, min_score=p.min_score, max_evolutions=p.max_evolutions
        ),
    ),
    "judge_union": (
        JudgeUnionEvaluateData,
        lambda e, a, r, d, p: e.judge_union(actor=a, **d.model_dump()),
    ),
    "record_probe": (
        ProbeData,
        lambda e, a, r, d, p: e.record_probe(actor=a, **d.model_dump()),
    ),
    "conclude_blame": (
        ConcludeBlameData,
        lambda e, a, r, d, p: e.conclude_blame(
            actor=a, implicated=d.implicated, reason=r or "blame concluded"
        ),
    ),
    "rebuild_integration": (
        RebuildData,
        lambda e, a, r, d, p: e.rebuild_integration(
            actor=a, reason=r or "integration branch rebuilt", **d.model_dump()
        ),
    ),
    "land": (LandData, lambda e, a, r, d, p: e.land(actor=a, **d.model_dump())),
    "landing_failed": (
        LandingFailedData,
        lambda e, a, r, d, p: e.landing_failed(
            actor=a, reason=r or "landing failed", **d.model_dump()
        ),
    ),
    "fail": (NoData, lambda e, a, r, d, p: e.fail(actor=a, reason=r)),
    "block": (NoData, lambda e, a, r, d, p: e.block(actor=a, reason=r)),
    "unblock": (
        UnblockData,
        lambda e, a, r, d, p: e.unblock(actor=a, reason=r, max_budget_usd=d.max_budget_usd),
    ),
    "add_note": (NoData, lambda e, a, r, d, p: e.add_note(actor=a, text=r)),
}

assert set(EPIC_COMMANDS) | {"farm_out"} == set(EPIC_EVENT_NAMES), (
    "every epic event needs a handler"
)


def parse_epic_data(event: str, data: Mapping[str, Any] | None) -> _Data:
    if event not in EPIC_COMMANDS:
        raise UnknownEvent(event, tuple(n for n in EPIC_EVENT_NAMES if n != "farm_out"))
    model, _ = EPIC_COMMANDS[event]
    try:
        return model.model_validate(dict(data or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'data'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidCommand(f"invalid data for event {event!r}: {problems}") from None


def apply_epic_named(
    epic: Epic,
    event: str,
    *,
    actor: str,
    reason: str | None,
    data: Mapping[str, Any] | None,
    policy: EpicPolicy,
) -> object:
    """Run the named transition on ``epic``; returns what the command returned."""
    parsed = parse_epic_data(event, data)
    check_reason(reason)
    _, handler = EPIC_COMMANDS[event]
    return handler(epic, actor, reason, parsed, policy)
