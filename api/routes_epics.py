"""Epics: create, list, read (now or as of), transition, history, answer the planner's
questions (``POST /epics/{id}/answers``), evaluations and evolutions.

The conventions are the stories' (``api.routes_stories``): one error shape, idempotency
keys on every command, the caller's token deciding the actor and what it may send. Epic
ids have their own form (``epic-<n>``); a path that is not one is a 422 naming the form,
so a 404 always means "well-formed, but no such epic". A planner's rejected plan is an
answer, not an error: it is recorded, counts toward the plan attempts, and comes back as
200 with ``accepted: false`` and the problems the planner has to fix.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, may_create, may_read, may_transition_epic
from api.errors import ApiError
from api.params import Digits
from api.routes_common import (
    REPLAYED_HEADER,
    ApiState,
    JsonResponse,
    forbidden,
    idempotency_key,
    principal,
    request_fingerprint,
    run_command,
    state_of,
)
from api.routes_stories import parse_as_of
from api.schemas import ErrorResponse, TransitionRequest, responses
from api.schemas_epics import (
    AnswersRequest,
    CreateEpicRequest,
    EpicEvaluationsOut,
    EpicHistoryOut,
    EpicListOut,
    EpicOut,
    epic_evaluations,
    epic_id_refusal,
    epic_summaries,
    epic_view,
    load_epic_view,
    plan_verdict,
)
from domain.ids import EPIC_ID_PATTERN
from domain.story import Story
from service.epics import EpicCommitted, EpicService
from service.idempotency import IdempotencyMark
from service.policies import epic_policy

router = APIRouter(tags=["epics"])

EPIC_ID_MAX = 23
"""``epic-`` and at most 18 digits (``domain.ids.EPIC_ID_PATTERN``)."""

EpicIdPath = Annotated[
    str,
    Path(
        description="An epic id: 'epic-' and a number, e.g. epic-3.",
        json_schema_extra={"pattern": EPIC_ID_PATTERN, "maxLength": EPIC_ID_MAX},
    ),
]

EPIC_RESPONSES: dict[int | str, dict[str, Any]] = {
    **responses(409),
    404: {"model": ErrorResponse, "description": "No such epic."},
}


def epics_of(state: ApiState) -> EpicService:
    """The app's one EpicService (``create_app`` makes it; an ``ApiState`` put together by
    hand gets one on first use)."""
    service = state.extra.get("epics")
    if service is None:
        service = EpicService(state.service.app, epic_policy(state.service.config))
        state.extra["epics"] = service
    assert isinstance(service, EpicService)
    return service


def check_epic_id(epic_id: str) -> None:
    refusal = epic_id_refusal(epic_id)
    if refusal is not None:
        raise ApiError(422, "invalid_epic_id", *refusal)


def _committed_view(epics: EpicService, committed: EpicCommitted) -> dict[str, Any]:
    epic = committed.epic
    found = epics.stories(epic)
    stories: dict[str, Story | None] = {story.id: story for story in found}
    return epic_view(epic, stories, epics.ledger(epic, found), position=committed.position)


def _recover(
    epics: EpicService, status: int, event: str | None = None
) -> Callable[[str, int], tuple[int, dict[str, Any]]]:
    """The answer a committed command gave: the epic as of the command's log position."""

    def answer(epic_id: str, position: int) -> tuple[int, dict[str, Any]]:
        body = load_epic_view(epics, epic_id, position=position, committed=position)
        if event == "submit_plan":
            body |= plan_verdict(epics.get_as_of(epic_id, position=position))
        return status, body

    return answer


def _answer(status: int, body: dict[str, Any], replayed: bool) -> JsonResponse:
    headers: dict[str, str] = {}
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    if status == 201:
        headers["Location"] = f"/epics/{body['id']}"
    return JsonResponse(body, status_code=status, headers=headers)


@router.post(
    "/epics",
    status_code=201,
    response_model=EpicOut,
    responses=responses(409),
    summary="Create an epic: a goal a planner splits into stories",
)
async def create_epic(
    body: CreateEpicRequest, request: Request, caller: Principal = Depends(principal)
) -> Response:
    if not may_create(caller):
        raise forbidden(caller, "create epics")
    state = state_of(request)
    epics = epics_of(state)
    key = idempotency_key(request)
    request_fp = request_fingerprint(request, key, lambda: body.model_dump(mode="json"))

    def command(mark: IdempotencyMark | None) -> tuple[int, dict[str, Any]]:
        committed = epics.create(
            name=body.name,
            goal=body.goal,
            acceptance_criteria=list(body.acceptance_criteria),
            max_budget_usd=body.max_budget_usd,
            reason=body.reason,
            actor=caller.actor,
            idempotency=mark,
            review=body.review,
        )
        return 201, _committed_view(epics, committed)

    def run() -> Response:
        status, out, replayed = run_command(
            state, caller.actor, key, request_fp, command, _recover(epics, 201)
        )
        return _answer(status, out, replayed)

    return await run_in_threadpool(run)


@router.post(
    "/epics/{epic_id}/transitions",
    response_model=EpicOut,
    responses=EPIC_RESPONSES,
    summary="Apply a named epic transition (people: block, unblock, fail, add_note, "
    "answer_questions; the epic's agents: submit_plan, ask_questions, submit_evaluation, "
    "add_note)",
)
async def transition_epic(
    epic_id: EpicIdPath,
    body: TransitionRequest,
    request: Request,
    caller: Principal = Depends(principal),
) -> Response:
    if not may_transition_epic(caller, epic_id, body.event):
        raise forbidden(caller, f"send {body.event!r} to epic {epic_id!r}")
    check_epic_id(epic_id)
    state = state_of(request)
    epics = epics_of(state)
    key = idempotency_key(request)
    request_fp = request_fingerprint(request, key, lambda: body.model_dump(mode="json"))

    def command(mark: IdempotencyMark | None) -> tuple[int, dict[str, Any]]:
        committed = epics.transition(
            epic_id,
            body.event,
            actor=caller.actor,
            expected_version=body.expected_version,
            reason=body.reason,
            data=body.data,
            idempotency=mark,
        )
        out = _committed_view(epics, committed)
        if body.event == "submit_plan":
            problems = committed.result if isinstance(committed.result, list) else None
            out |= plan_verdict(committed.epic, problems)
        return 200, out

    def run() -> Response:
        status, out, replayed = run_command(
            state, caller.actor, key, request_fp, command, _recover(epics, 200, body.event)
        )
        return _answer(status, out, replayed)

    return await run_in_threadpool(run)


@router.post(
    "/epics/{epic_id}/answers",
    response_model=EpicOut,
    responses=EPIC_RESPONSES,
    summary="Answer the planner's questions (one answer per question, in order): planning "
    "resumes with the answers in the planner's prompt",
)
async def answer_questions(
    epic_id: EpicIdPath,
    body: AnswersRequest,
    request: Request,
    caller: Principal = Depends(principal),
) -> Response:
    # The same rule as the transition: a person's event (write role); a planner's or an
    # evaluator's token may not answer its own questions.
    if not may_transition_epic(caller, epic_id, "answer_questions"):
        raise forbidden(caller, f"answer the questions of epic {epic_id!r}")
    check_epic_id(epic_id)
    state = state_of(request)
    epics = epics_of(state)
    key = idempotency_key(request)
    request_fp = request_fingerprint(request, key, lambda: body.model_dump(mode="json"))

    def command(mark: IdempotencyMark | None) -> tuple[int, dict[str, Any]]:
        committed = epics.transition(
            epic_id,
            "answer_questions",
            actor=caller.actor,
            expected_version=body.expected_version,
            reason=body.reason,
            data={"answers": list(body.answers)},
            idempotency=mark,
        )
        return 200, _committed_view(epics, committed)

    def run() -> Response:
        status, out, replayed = run_command(
            state, caller.actor, key, request_fp, command, _recover(epics, 200)
        )
        return _answer(status, out, replayed)

    return await run_in_threadpool(run)


@router.get(
    "/epics/{epic_id}/evaluations",
    response_model=EpicEvaluationsOut,
    responses=EPIC_RESPONSES,
    summary="The epic's evaluations (each criterion judged with evidence), its evolutions, "
    "the discarded ones, the best so far and the final verdict",
)
async def evaluations(
    epic_id: EpicIdPath, request: Request, caller: Principal = Depends(principal)
) -> Response:
    if not may_read(caller, epic_id):
        raise forbidden(caller, f"read epic {epic_id!r}")
    check_epic_id(epic_id)
    epics = epics_of(state_of(request))
    epic = await run_in_threadpool(epics.get, epic_id)
    return JsonResponse(epic_evaluations(epic))


@router.get(
    "/epics/{epic_id}",
    response_model=EpicOut,
    responses=EPIC_RESPONSES,
    summary="An epic now, or as it was: plan, stories and their stages, integration evidence, cost",
)
async def get_epic(
    epic_id: EpicIdPath,
    request: Request,
    as_of: Annotated[
        str | None,
        Query(
            max_length=64,
            description="A log position or an ISO 8601 time: the epic (and its stories) "
            "as they were then.",
        ),
    ] = None,
    caller: Principal = Depends(principal),
) -> Response:
    if not may_read(caller, epic_id):
        raise forbidden(caller, f"read epic {epic_id!r}")
    check_epic_id(epic_id)
    epics = epics_of(state_of(request))
    position: int | None = None
    moment: datetime | None = None
    if as_of is not None:
        position, moment = parse_as_of(as_of)
    body = await run_in_threadpool(
        lambda: load_epic_view(epics, epic_id, position=position, at=moment, as_of=as_of)
    )
    return JsonResponse(body)


@router.get(
    "/epics/{epic_id}/history",
    response_model=EpicHistoryOut,
    responses=EPIC_RESPONSES,
    summary="The epic's events, oldest first: who did what, when and why (each blame probe "
    "included)",
)
async def epic_history(
    epic_id: EpicIdPath,
    request: Request,
    after: Annotated[
        int, Query(ge=0, le=2**62, description="Only events after this position"), Digits
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000), Digits] = 1000,
    caller: Principal = Depends(principal),
) -> Response:
    if not may_read(caller, epic_id):
        raise forbidden(caller, f"read epic {epic_id!r}")
    check_epic_id(epic_id)
    epics = epics_of(state_of(request))
    events = await run_in_threadpool(epics.history, epic_id)
    selected = [e.as_json() for e in events if e.position > after][:limit]
    return JsonResponse({"epic_id": epic_id, "events": selected})


@router.get(
    "/epics",
    response_model=EpicListOut,
    responses=responses(),
    summary="Every epic, oldest first: stage, run mode, stories done, cost",
)
async def list_epics(request: Request, caller: Principal = Depends(principal)) -> Response:
    if not may_read(caller):
        raise forbidden(caller, "list epics")
    epics = epics_of(state_of(request))
    rows = await run_in_threadpool(epic_summaries, epics)
    return JsonResponse({"epics": rows})


def board_rows(state: ApiState) -> list[dict[str, Any]]:
    """The epics' part of ``/board`` (blocking: call from a worker thread)."""
    return [
        {
            "id": row["id"],
            "name": row["name"],
            "stage": row["stage"],
            "mode": row["mode"],
            "stories_done": row["stories_done"],
            "stories_total": row["stories_total"],
        }
        for row in epic_summaries(epics_of(state))
    ]


__all__ = ["board_rows", "check_epic_id", "epics_of", "router"]
