"""Stories: create, list (board projection), read (now or as of), transition, history."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, may_create, may_read, may_transition
from api.errors import ApiError
from api.params import Digits, StoryIdPath, is_position
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
from api.schemas import (
    PRIORITY_BOUND,
    CreateStoryRequest,
    HistoryOut,
    StoryList,
    StoryOut,
    StoryReviewsOut,
    TransitionRequest,
    responses,
    story_reviews,
)
from domain.errors import InvalidStoryId
from domain.ids import validate_story_id
from domain.stages import AgentRole, Stage
from domain.story import Story
from service.idempotency import IdempotencyMark

router = APIRouter(tags=["stories"])

WAIT_HEADER = "X-Storyline-Caught-Up"

WaitQuery = Annotated[
    bool,
    Query(
        description="Read-your-writes: wait (bounded) until the projections have applied "
        f"this command before answering; the {WAIT_HEADER} header says whether they did."
    ),
]


def story_body(
    story: Story, position: int | None = None, as_of: str | None = None
) -> dict[str, Any]:
    body = story.snapshot()
    body["position"] = position
    body["as_of"] = as_of
    return body


def _recover(state: ApiState, status: int) -> Callable[[str, int], tuple[int, dict[str, Any]]]:
    """The answer a committed command gave: the story as of the command's log position."""

    def answer(story_id: str, position: int) -> tuple[int, dict[str, Any]]:
        story = state.service.app.get_story_as_of(story_id, position=position)
        return status, story_body(story, position)

    return answer


def _answer(
    state: ApiState, status: int, body: dict[str, Any], replayed: bool, wait: bool
) -> JsonResponse:
    headers: dict[str, str] = {}
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    if status == 201:
        headers["Location"] = f"/stories/{body['id']}"
    if wait and status < 300 and body.get("position") is not None:
        caught_up = state.read_models.wait_for(body["position"], None, state.wait_timeout)
        headers[WAIT_HEADER] = "true" if caught_up else "false"
    return JsonResponse(body, status_code=status, headers=headers)


@router.post(
    "/stories",
    status_code=201,
    response_model=StoryOut,
    responses=responses(404, 409),
    summary="Create a story",
)
async def create_story(
    body: CreateStoryRequest,
    request: Request,
    wait: WaitQuery = False,
    caller: Principal = Depends(principal),
) -> Response:
    if not may_create(caller):
        raise forbidden(caller, "create stories")
    state = state_of(request)
    key = idempotency_key(request)
    request_fp = request_fingerprint(request, key, lambda: body.model_dump(mode="json"))

    def command(mark: IdempotencyMark | None) -> tuple[int, dict[str, Any]]:
        committed = state.service.app.create_story(
            name=body.name,
            description=body.description,
            acceptance_criteria=list(body.acceptance_criteria),
            depends_on=list(body.depends_on),
            epic=body.epic,
            priority=body.priority,
            story_id=body.id,
            reason=body.reason,
            actor=caller.actor,
            idempotency=mark,
            review=body.review,
        )
        return 201, story_body(committed.story, committed.position)

    def run() -> Response:
        status, out, replayed = run_command(
            state, caller.actor, key, request_fp, command, _recover(state, 201)
        )
        return _answer(state, status, out, replayed, wait)

    return await run_in_threadpool(run)


@router.post(
    "/stories/{story_id}/transitions",
    response_model=StoryOut,
    responses=responses(404, 409),
    summary="Apply a named transition",
)
async def transition(
    story_id: StoryIdPath,
    body: TransitionRequest,
    request: Request,
    wait: WaitQuery = False,
    caller: Principal = Depends(principal),
) -> Response:
    if not may_transition(caller, story_id, body.event):
        raise forbidden(caller, f"send {body.event!r} to story {story_id!r}")
    state = state_of(request)
    key = idempotency_key(request)
    request_fp = request_fingerprint(request, key, lambda: body.model_dump(mode="json"))

    def command(mark: IdempotencyMark | None) -> tuple[int, dict[str, Any]]:
        committed = state.service.app.transition(
            story_id,
            body.event,
            actor=caller.actor,
            expected_version=body.expected_version,
            reason=body.reason,
            data=body.data,
            idempotency=mark,
        )
        return 200, story_body(committed.story, committed.position)

    def run() -> Response:
        status, out, replayed = run_command(
            state, caller.actor, key, request_fp, command, _recover(state, 200)
        )
        return _answer(state, status, out, replayed, wait)

    return await run_in_threadpool(run)


def parse_as_of(value: str) -> tuple[int | None, datetime | None]:
    """A log position (digits) or an ISO 8601 time (naive means UTC)."""
    text = value.strip()
    if is_position(text):
        return int(text), None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(
            422,
            "invalid_as_of",
            "as_of must be a log position (an integer) or an ISO 8601 time",
            {"as_of": value[:100]},
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return None, moment


@router.get(
    "/stories/{story_id}",
    response_model=StoryOut,
    responses=responses(404),
    summary="A story now, or as it was",
)
async def get_story(
    story_id: StoryIdPath,
    request: Request,
    as_of: Annotated[
        str | None,
        Query(
            max_length=64,
            description="A log position or an ISO 8601 time: the story as it was then.",
        ),
    ] = None,
    caller: Principal = Depends(principal),
) -> Response:
    if not may_read(caller, story_id):
        raise forbidden(caller, f"read story {story_id!r}")
    app = state_of(request).service.app
    if as_of is None:
        story = await run_in_threadpool(app.get_story, story_id)
        return JsonResponse(story_body(story))
    position, moment = parse_as_of(as_of)
    validate_story_id(story_id)
    past = await run_in_threadpool(
        lambda: app.get_story_as_of(story_id, position=position, at=moment)
    )
    return JsonResponse(story_body(past, as_of=as_of))


@router.get(
    "/stories/{story_id}/history",
    response_model=HistoryOut,
    responses=responses(404),
    summary="The story's events, oldest first (the audit trail)",
)
async def story_history(
    story_id: StoryIdPath,
    request: Request,
    after: Annotated[
        int, Query(ge=0, le=2**62, description="Only events after this position"), Digits
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000), Digits] = 1000,
    caller: Principal = Depends(principal),
) -> Response:
    if not may_read(caller, story_id):
        raise forbidden(caller, f"read story {story_id!r}")
    app = state_of(request).service.app
    events = await run_in_threadpool(app.history, story_id)
    selected = [e.as_json() for e in events if e.position > after][:limit]
    return JsonResponse({"story_id": story_id, "events": selected})


@router.get(
    "/stories/{story_id}/reviews",
    response_model=StoryReviewsOut,
    responses=responses(404),
    summary="The story's review verdicts, oldest first, each criterion judged with evidence",
)
async def story_reviews_route(
    story_id: StoryIdPath, request: Request, caller: Principal = Depends(principal)
) -> Response:
    if not may_read(caller, story_id):
        raise forbidden(caller, f"read story {story_id!r}")
    app = state_of(request).service.app
    story = await run_in_threadpool(app.get_story, story_id)
    return JsonResponse(story_reviews(story.snapshot()))


@router.get(
    "/stories",
    response_model=StoryList,
    responses=responses(),
    summary="List stories from the board projection",
)
async def list_stories(
    request: Request,
    stage: Stage | None = None,
    limit: Annotated[int, Query(ge=1, le=1000), Digits] = 100,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    caller: Principal = Depends(principal),
) -> Response:
    if not may_read(caller):
        raise forbidden(caller, "list stories")
    if cursor is not None:
        check_cursor(cursor)
    read_models = state_of(request).read_models

    def board() -> tuple[list[Any], str | None]:
        try:
            rows, next_cursor = read_models.board(stage.value if stage else None, limit, cursor)
        except ValueError as exc:
            raise ApiError(422, "invalid_cursor", "the cursor is not valid", None) from exc
        return list(rows), next_cursor

    rows, next_cursor = await run_in_threadpool(board)
    return JsonResponse({"stories": [_row(r) for r in rows], "next_cursor": next_cursor})


def check_cursor(cursor: str) -> None:
    """A cursor is opaque but comes back from the client: its fields must lie in the
    ranges of the columns they are compared with, or PostgreSQL answers "integer out of
    range" or refuses a NUL where SQLite simply finds nothing."""
    from projections.read_models import decode_cursor

    try:
        priority, story_id = decode_cursor(cursor)
        validate_story_id(story_id)
    except (ValueError, InvalidStoryId):
        raise ApiError(422, "invalid_cursor", "the cursor is not valid", None) from None
    if not -PRIORITY_BOUND <= priority <= PRIORITY_BOUND:
        raise ApiError(422, "invalid_cursor", "the cursor is not valid", None)


def _row(row: Any) -> dict[str, Any]:
    """Projection rows may be mappings or dataclass-like objects."""
    if isinstance(row, dict):
        return row
    if hasattr(row, "as_json"):
        return dict(row.as_json())
    if hasattr(row, "_asdict"):
        return dict(row._asdict())
    import dataclasses

    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return dataclasses.asdict(row)
    return dict(row)


LOG_TAIL_MAX = 8 * 1024 * 1024


@router.get(
    "/stories/{story_id}/agents/{role}/{attempt}/log",
    responses={**responses(404), 200: {"content": {"text/plain": {}}}},
    response_class=Response,
    summary="The log of one agent attempt (its stdout/stderr as the runner captured it)",
)
async def agent_log(
    story_id: StoryIdPath,
    role: AgentRole,
    attempt: Annotated[int, Path(ge=1, le=2**31), Digits],
    request: Request,
    tail: Annotated[
        int, Query(ge=1, le=LOG_TAIL_MAX, description="Only the last this many bytes"), Digits
    ] = 1024 * 1024,
    caller: Principal = Depends(principal),
) -> Response:
    if not may_read(caller, story_id):
        raise forbidden(caller, f"read story {story_id!r}")
    state = state_of(request)
    validate_story_id(story_id)
    await run_in_threadpool(state.service.app.get_story, story_id)  # 404 for unknown stories
    # Every part of the path is validated (story id alphabet, role enum, integer attempt):
    # nothing a client sends can leave the logs directory.
    path = state.service.project / ".storyline" / "logs" / story_id / f"{role.value}-{attempt}.log"

    def read() -> bytes | None:
        try:
            with path.open("rb") as handle:
                handle.seek(0, 2)
                size = handle.tell()
                handle.seek(max(0, size - tail))
                return handle.read()
        except FileNotFoundError:
            return None

    data = await run_in_threadpool(read)
    if data is None:
        raise ApiError(
            404,
            "log_not_found",
            f"story {story_id!r} has no log for {role.value} attempt {attempt}",
            {"story_id": story_id, "role": role.value, "attempt": attempt},
        )
    return Response(data, media_type="text/plain; charset=utf-8")
