"""Epics over the wire: request and response models, and the one view of an epic.

The view is built here, without the web framework, so the HTTP API, the CLI's local store
and the MCP server all show an epic the same way (``epic_view``, ``epic_summary``). Like a
story's snapshot it is the aggregate's whole state, plus what an epic's reader needs next
to it: its stories with their stages and its cost ledger, computed when it is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from api.schemas import (
    CRITERION_PATTERN,
    NAME_PATTERN,
    BoardOut,
    JudgementOut,
    LoggedEventOut,
    _documented,
)
from domain.epic import MAX_ANSWER, MAX_BUDGET_USD, MAX_QUESTIONS, Epic
from domain.epic_events import EpicStage, RunMode
from domain.errors import StoryNotFound
from domain.ids import integration_branch, is_epic_id
from domain.stages import Stage
from domain.story import MAX_CRITERIA, MAX_NAME, MAX_REASON, MAX_TEXT, Story
from service.epics import EpicService, Ledger

VIEW_OUTPUT = 4_000
"""Characters of each union verdict's and probe's output in a view (its tail); the whole
recorded output is in the epic's history."""

REASON_PATTERN = "^[^\\x00]*$"
"""A reason may hold anything but NUL (``domain.story.check_reason``)."""


class CreateEpicRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[
        str,
        Field(min_length=1, max_length=MAX_NAME, json_schema_extra=_documented(NAME_PATTERN)),
    ]
    goal: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_TEXT,
            description="What the epic delivers, as the planner and every story will read it.",
            json_schema_extra=_documented(CRITERION_PATTERN),
        ),
    ]
    acceptance_criteria: Annotated[
        list[
            Annotated[
                str, Field(max_length=MAX_TEXT, json_schema_extra=_documented(CRITERION_PATTERN))
            ]
        ],
        Field(min_length=1, max_length=MAX_CRITERIA),
    ]
    max_budget_usd: Annotated[float, Field(gt=0, le=MAX_BUDGET_USD, allow_inf_nan=False)] | None = (
        Field(
            default=None,
            description="Dollar cap for the whole epic (planner runs and stories): reaching it "
            "stops new spawns and blocks the epic.",
        )
    )
    reason: (
        Annotated[str, Field(max_length=MAX_REASON, json_schema_extra=_documented(REASON_PATTERN))]
        | None
    ) = None
    # Strict: "yes" or 1 is a 422, not a silent True.
    review: StrictBool | None = Field(
        default=None,
        description="Evaluate the integrated result against the criteria before landing (and "
        "evolve on gaps): true, false, or null for the project's ``[review] enabled``.",
    )


def check_answer(value: str) -> str:
    """An answer as ``Epic.answer_questions`` takes it, checked before the epic is read so
    that bad text is a 422 whatever stage the epic is in (and nothing is written)."""
    for ch in value:
        if ch in "\n\t":
            continue
        if ord(ch) < 32 or ord(ch) == 127:
            raise ValueError(f"an answer contains a control character ({ord(ch):#04x})")
    if not value.strip():
        raise ValueError("an answer must not be blank")
    return value


class AnswersRequest(BaseModel):
    """A person's answers to the questions the planner asked, one per question, in order."""

    model_config = ConfigDict(extra="forbid")

    answers: Annotated[
        list[
            Annotated[
                str, Field(max_length=MAX_ANSWER, json_schema_extra=_documented(CRITERION_PATTERN))
            ]
        ],
        Field(min_length=1, max_length=MAX_QUESTIONS),
    ]
    reason: (
        Annotated[str, Field(max_length=MAX_REASON, json_schema_extra=_documented(REASON_PATTERN))]
        | None
    ) = None
    expected_version: Annotated[int, Field(ge=0, le=2**53)] | None = Field(
        default=None,
        description="The epic version the caller last saw; a different current version "
        "is a 409 version_conflict and nothing changes.",
    )

    @field_validator("answers")
    @classmethod
    def _answers(cls, value: list[str]) -> list[str]:
        return [check_answer(answer) for answer in value]


class EpicStoryOut(BaseModel):
    id: str
    name: str | None
    stage: Stage | None = Field(description="None when the story did not exist at that point.")
    current_round: bool
    kept: bool
    implicated: bool
    clean: bool
    merge_commit: str | None
    tokens_in: int
    tokens_out: int
    cost_usd: float


class UnionVerdictOut(BaseModel):
    round: int
    commit: str
    tree: str
    passed: bool
    output: str = Field(description=f"The last {VIEW_OUTPUT} characters the union gates printed.")


class ProbeOut(BaseModel):
    excluded: list[str]
    result: str = Field(description="passed, failed or conflict")
    commit: str | None
    tree: str | None
    output: str


class PlannerOut(BaseModel):
    attempts: int
    failed_attempts: int = Field(description="Rejected plans plus runs that submitted none.")
    running: dict[str, Any] | None
    last_problems: list[str]
    tokens_in: int
    tokens_out: int
    cost_usd: float


class LedgerOut(BaseModel):
    tokens_in: int
    tokens_out: int
    cost_usd: float
    planner_cost_usd: float
    stories_cost_usd: float
    evaluator_cost_usd: float = Field(
        default=0.0, description="The epic's evaluator runs (its stories' are in stories')."
    )
    max_budget_usd: float | None


class InterviewRoundOut(BaseModel):
    """One round of the interview: the planner's questions and a person's answers."""

    round: int
    attempt: int = Field(description="The planner attempt that asked.")
    questions: list[str]
    asked_by: str
    asked_at: datetime
    answers: list[str] | None = Field(description="None while the epic awaits them.")
    answered_by: str | None
    answered_at: datetime | None = None


class EvaluationOut(BaseModel):
    """The evaluator's verdict on the integration branch of one evolution."""

    attempt: int
    evolution: int = Field(description="0 for the first integration, then 1, 2, ...")
    commit: str = Field(description="The integration commit the evaluator judged.")
    score: float
    all_met: bool
    criteria: list[JudgementOut]
    summary: str = ""
    at: datetime


class EvolutionOut(BaseModel):
    """An evolution started because an evaluation fell short: follow-up stories for the gaps."""

    evolution: int
    from_commit: str = Field(description="The best integration so far, which the stories build on.")
    after_score: float = Field(description="The score of the evaluation that started it.")
    best_score: float
    gaps: list[JudgementOut]
    at: datetime


class DiscardedOut(BaseModel):
    """An evolution that scored worse than the best so far: its integration was dropped."""

    evolution: int
    score: float
    commit: str
    kept_evolution: int
    kept_commit: str


class BestOut(BaseModel):
    evolution: int
    score: float
    commit: str
    attempt: int


class EvaluationFinalOut(BaseModel):
    """How the evaluation ended: the integration that lands and its score."""

    passed: bool
    score: float
    best_evolution: int
    commit: str
    max_reached: bool = Field(
        description="No evolution reached the threshold within [review] max_evolutions."
    )
    evolutions: int


class EvaluatorOut(BaseModel):
    attempts: int
    failed_runs: int = Field(description="Runs in this evaluation that ended without a verdict.")
    running: dict[str, Any] | None
    pending_verdict: int | None = Field(
        description="The attempt whose verdict is submitted but not yet concluded."
    )
    tokens_in: int
    tokens_out: int
    cost_usd: float


class EpicEvaluationsOut(BaseModel):
    """An epic's evaluations and evolutions (``GET /epics/{id}/evaluations``)."""

    epic_id: str
    stage: EpicStage
    review: bool | None
    evolution: int = Field(description="The current evolution (0 before any).")
    evaluations: list[EvaluationOut] = Field(description="Every verdict, oldest first.")
    evolutions: list[EvolutionOut]
    discarded: list[DiscardedOut]
    best: BestOut | None
    final: EvaluationFinalOut | None = Field(description="Set once the evaluation concluded.")


class EpicOut(BaseModel):
    """The full state of an epic, its stories' stages and its cost ledger."""

    id: str
    version: int
    name: str
    goal: str
    acceptance_criteria: list[str]
    stage: EpicStage
    legal_events: list[str]
    last_event: str
    created_on: datetime
    modified_on: datetime
    max_budget_usd: float | None
    plan: dict[str, Any] | None
    plan_problems: list[str] = Field(
        description="Why the last submitted plan was refused (empty once one is accepted)."
    )
    single_session_reason: str | None
    planner: PlannerOut
    mode: RunMode | None
    round: int
    stories: list[EpicStoryOut]
    kept_stories: list[str]
    implicated: list[str] | None
    clean_stories: list[str]
    union: UnionVerdictOut | None = Field(description="The current round's union verdict.")
    union_verdicts: list[UnionVerdictOut]
    probes: list[ProbeOut] = Field(description="The current round's blame probes.")
    fork_point: str | None
    round_start_tip: str | None
    integration_branch: str
    integration_commit: str | None
    rebuilt_tip: str | None
    merge_commit: str | None
    landing_failures: list[dict[str, Any]]
    blocked_from: EpicStage | None
    blocked_reason: str | None
    failed_reason: str | None
    notes: int
    ledger: LedgerOut
    review: bool | None = Field(
        default=None, description="Evaluate before landing: as asked, or None for the project's."
    )
    questions: list[str] | None = Field(
        default=None, description="The planner's questions waiting for answers (awaiting_answers)."
    )
    interview: list[InterviewRoundOut] = Field(default_factory=list)
    evolution: int = 0
    evaluations: list[EvaluationOut] = Field(default_factory=list)
    evolutions: list[EvolutionOut] = Field(default_factory=list)
    discarded: list[DiscardedOut] = Field(default_factory=list)
    best: BestOut | None = None
    evaluation_final: EvaluationFinalOut | None = None
    running_evaluator: dict[str, Any] | None = None
    evaluator: EvaluatorOut | None = None
    position: int | None = Field(
        default=None,
        description="Global log position of the event this command committed (commands only).",
    )
    as_of: str | None = Field(
        default=None, description="The ?as_of= value this past state was computed for."
    )
    accepted: bool | None = Field(
        default=None, description="submit_plan only: whether the plan was accepted."
    )
    problems: list[str] | None = Field(
        default=None,
        description="submit_plan only: why the plan was refused (a refusal is recorded, "
        "counts toward [epic] max_plan_attempts, and is not an error).",
    )


class EpicSummaryOut(BaseModel):
    id: str
    version: int
    name: str
    stage: EpicStage
    mode: RunMode | None
    round: int
    stories_total: int
    stories_done: int
    cost_usd: float
    max_budget_usd: float | None
    blocked_reason: str | None


class EpicListOut(BaseModel):
    epics: list[EpicSummaryOut]


class EpicHistoryOut(BaseModel):
    epic_id: str
    events: list[LoggedEventOut]


class EpicBoardRow(BaseModel):
    id: str
    name: str
    stage: EpicStage
    mode: RunMode | None
    stories_done: int
    stories_total: int


class BoardWithEpicsOut(BoardOut):
    epics: list[EpicBoardRow] = Field(
        default_factory=list, description="Every epic, oldest first, with its stories' progress."
    )


# --------------------------------------------------------------------------- views


def epic_id_refusal(epic_id: str) -> tuple[str, dict[str, str]] | None:
    """``(message, details)`` of the 422 ``invalid_epic_id`` when ``epic_id`` is not of the
    epic form, else None: checked before anything reads the store or claims a key."""
    if is_epic_id(epic_id):
        return None
    shown = epic_id if len(epic_id) <= 64 else epic_id[:64] + "..."
    shown = shown.encode("unicode_escape").decode("ascii")
    return (
        f"invalid epic id {shown!r}: an epic id is 'epic-' followed by a number, e.g. epic-3",
        {"epic_id": shown},
    )


def _tail(text: str | None, limit: int = VIEW_OUTPUT) -> str:
    text = text or ""
    return text if len(text) <= limit else text[-limit:]


def _verdict(verdict: dict[str, Any]) -> dict[str, Any]:
    return {
        "round": int(verdict.get("round") or 0),
        "commit": verdict["commit"],
        "tree": verdict["tree"],
        "passed": bool(verdict["passed"]),
        "output": _tail(verdict.get("output")),
    }


def _probe(probe: dict[str, Any]) -> dict[str, Any]:
    return {
        "excluded": list(probe["excluded"]),
        "result": probe["result"],
        "commit": probe.get("commit"),
        "tree": probe.get("tree"),
        "output": _tail(probe.get("output")),
    }


def _story_row(epic: Epic, sid: str, story: Story | None) -> dict[str, Any]:
    implicated = set(epic.implicated or ())
    return {
        "id": sid,
        "name": story.name if story else None,
        "stage": story.stage.value if story else None,
        "current_round": sid in epic.round_stories,
        "kept": sid in epic.kept_stories,
        "implicated": sid in implicated,
        "clean": sid in epic.clean_stories,
        "merge_commit": story.merge_commit if story else None,
        "tokens_in": story.tokens_in if story else 0,
        "tokens_out": story.tokens_out if story else 0,
        "cost_usd": round(story.cost_usd, 6) if story else 0.0,
    }


def ledger_json(epic: Epic, ledger: Ledger) -> dict[str, Any]:
    return {
        "tokens_in": ledger.tokens_in,
        "tokens_out": ledger.tokens_out,
        "cost_usd": round(ledger.cost_usd, 6),
        "planner_cost_usd": round(ledger.planner_cost_usd, 6),
        "stories_cost_usd": round(ledger.stories_cost_usd, 6),
        "evaluator_cost_usd": round(ledger.evaluator_cost_usd, 6),
        "max_budget_usd": epic.max_budget_usd,
    }


def epic_view(
    epic: Epic,
    stories: dict[str, Story | None],
    ledger: Ledger,
    *,
    position: int | None = None,
    as_of: str | None = None,
) -> dict[str, Any]:
    """``EpicOut`` as JSON. ``stories`` maps each of the epic's story ids to the story as
    it is shown (None when it did not exist at the moment shown)."""
    return {
        "id": epic.id,
        "version": epic.version,
        "name": epic.name,
        "goal": epic.goal,
        "acceptance_criteria": list(epic.acceptance_criteria),
        "stage": epic.stage.value,
        "legal_events": epic.legal_events,
        "last_event": epic.last_event,
        "created_on": epic.created_on.isoformat(),
        "modified_on": epic.modified_on.isoformat(),
        "max_budget_usd": epic.max_budget_usd,
        "plan": epic.plan,
        "plan_problems": list(epic.last_plan_problems),
        "single_session_reason": epic.single_session_reason,
        "planner": {
            "attempts": epic.planner_attempts,
            "failed_attempts": epic.failed_plan_attempts,
            "running": dict(epic.running_planner) if epic.running_planner else None,
            "last_problems": list(epic.last_plan_problems),
            "tokens_in": epic.planner_tokens_in,
            "tokens_out": epic.planner_tokens_out,
            "cost_usd": round(epic.planner_cost_usd, 6),
        },
        "mode": epic.mode.value if epic.mode else None,
        "round": epic.round,
        "stories": [_story_row(epic, sid, stories.get(sid)) for sid in epic.stories],
        "kept_stories": list(epic.kept_stories),
        "implicated": list(epic.implicated) if epic.implicated is not None else None,
        "clean_stories": list(epic.clean_stories),
        "union": _verdict(epic.union) if epic.union else None,
        "union_verdicts": [_verdict(v) for v in epic.union_verdicts],
        "probes": [_probe(p) for p in epic.probes],
        "fork_point": epic.fork_point,
        "round_start_tip": epic.round_start_tip,
        "integration_branch": integration_branch(epic.id),
        "integration_commit": epic.integration_commit,
        "rebuilt_tip": epic.rebuilt_tip,
        "merge_commit": epic.merge_commit,
        "landing_failures": [
            {**f, "details": _tail(f.get("details"))} for f in epic.landing_failures
        ],
        "blocked_from": epic.blocked_from.value if epic.blocked_from else None,
        "blocked_reason": epic.blocked_reason,
        "failed_reason": epic.failed_reason,
        "notes": epic.notes,
        "ledger": ledger_json(epic, ledger),
        "review": epic.review,
        "questions": list(epic.questions) if epic.questions is not None else None,
        "interview": [_round(r) for r in epic.interview],
        **_evaluation_parts(epic),
        "evaluation_final": _copy(epic.evaluation_final),
        "running_evaluator": _copy(epic.running_evaluator),
        "evaluator": {
            "attempts": epic.evaluator_attempts,
            "failed_runs": epic.evaluator_failed_runs,
            "running": _copy(epic.running_evaluator),
            "pending_verdict": epic.pending_evaluation,
            "tokens_in": epic.evaluator_tokens_in,
            "tokens_out": epic.evaluator_tokens_out,
            "cost_usd": round(epic.evaluator_cost_usd, 6),
        },
        "position": position,
        "as_of": as_of,
    }


def _copy(value: dict[str, Any] | None) -> dict[str, Any] | None:
    return dict(value) if value is not None else None


def _round(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        **entry,
        "questions": list(entry["questions"]),
        "answers": list(entry["answers"]) if entry.get("answers") is not None else None,
        "answered_at": entry.get("answered_at"),
    }


def _judged(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(item) for item in items]


def _evaluation_parts(epic: Epic) -> dict[str, Any]:
    """What the view and ``GET /epics/{id}/evaluations`` share."""
    return {
        "evolution": epic.evolution,
        "evaluations": [{**e, "criteria": _judged(e["criteria"])} for e in epic.evaluations],
        "evolutions": [{**e, "gaps": _judged(e["gaps"])} for e in epic.evolutions],
        "discarded": [dict(d) for d in epic.discarded],
        "best": _copy(epic.best),
    }


def epic_evaluations(epic: Epic) -> dict[str, Any]:
    """``EpicEvaluationsOut`` as JSON."""
    return {
        "epic_id": epic.id,
        "stage": epic.stage.value,
        "review": epic.review,
        **_evaluation_parts(epic),
        "final": _copy(epic.evaluation_final),
    }


def _stories_as_of(
    epics: EpicService, epic: Epic, position: int | None, at: datetime | None
) -> dict[str, Story | None]:
    app = epics.app
    found: dict[str, Story | None] = {}
    for sid in epic.stories:
        try:
            if position is None and at is None:
                found[sid] = app.get_story(sid)
            else:
                found[sid] = app.get_story_as_of(sid, position=position, at=at)
        except StoryNotFound:
            found[sid] = None
    return found


def load_epic_view(
    epics: EpicService,
    epic_id: str,
    *,
    position: int | None = None,
    at: datetime | None = None,
    as_of: str | None = None,
    committed: int | None = None,
) -> dict[str, Any]:
    """The epic now (both None) or as of a log ``position`` or time ``at``, with its stories
    as of the same moment. ``committed`` is the position a command's answer reports."""
    if position is None and at is None:
        epic = epics.get(epic_id)
    else:
        epic = epics.get_as_of(epic_id, position=position, at=at)
    stories = _stories_as_of(epics, epic, position, at)
    ledger = epics.ledger(epic, [s for s in stories.values() if s is not None])
    return epic_view(epic, stories, ledger, position=committed, as_of=as_of)


def plan_verdict(epic: Epic, problems: Sequence[str] | None = None) -> dict[str, Any]:
    """What a ``submit_plan`` answer adds to the view: accepted, and the problems if not.

    Without ``problems`` (an answer rebuilt for an idempotent replay) they come from the
    epic as of the command: its last event says which way the plan went."""
    if problems is None:
        accepted = epic.last_event == "PlanAccepted"
        problems = [] if accepted else list(epic.last_plan_problems)
    return {"accepted": not problems, "problems": list(problems)}


def epic_summary(epic: Epic, stories: Sequence[Story], ledger: Ledger) -> dict[str, Any]:
    return {
        "id": epic.id,
        "version": epic.version,
        "name": epic.name,
        "stage": epic.stage.value,
        "mode": epic.mode.value if epic.mode else None,
        "round": epic.round,
        "stories_total": len(epic.stories),
        "stories_done": sum(1 for s in stories if s.stage is Stage.DONE),
        "cost_usd": round(ledger.cost_usd, 6),
        "max_budget_usd": epic.max_budget_usd,
        "blocked_reason": epic.blocked_reason,
    }


def epic_summaries(epics: EpicService) -> list[dict[str, Any]]:
    """Every epic, oldest first (``GET /epics``, ``/board``, ``storyline epic list``)."""
    rows = []
    for epic in epics.iter():
        stories = epics.stories(epic)
        rows.append(epic_summary(epic, stories, epics.ledger(epic, stories)))
    return rows


def epic_metrics(summaries: Sequence[dict[str, Any]]) -> str:
    """Prometheus families for the epics (appended to ``/metrics``): one gauge per stage,
    every stage present so that a stage emptied reads 0 rather than vanishing."""
    counts = {stage.value: 0 for stage in EpicStage}
    for row in summaries:
        counts[str(row["stage"])] = counts.get(str(row["stage"]), 0) + 1
    cost = sum(float(row["cost_usd"]) for row in summaries)
    lines = [
        "# HELP storyline_epics Epics per stage.",
        "# TYPE storyline_epics gauge",
        *(f'storyline_epics{{stage="{stage}"}} {n}' for stage, n in counts.items()),
        "# HELP storyline_epics_cost_usd Dollars spent on every epic (planner runs and stories).",
        "# TYPE storyline_epics_cost_usd gauge",
        f"storyline_epics_cost_usd {cost:.6f}",
    ]
    return "\n".join(lines) + "\n"
