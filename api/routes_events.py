"""The global log: paginated, and live as server-sent events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, may_read
from api.errors import ApiError
from api.params import Digits, is_position
from api.routes_common import JsonResponse, forbidden, principal, state_of
from api.schemas import EventsPage, responses
from api.sse import event_stream

router = APIRouter(tags=["events"])

MAX_POSITION = 2**62


@router.get(
    "/events",
    response_model=EventsPage,
    responses=responses(),
    summary="The global log after a position, oldest first",
)
async def list_events(
    request: Request,
    after: Annotated[int, Query(ge=0, le=MAX_POSITION), Digits] = 0,
    limit: Annotated[int, Query(ge=1, le=1000), Digits] = 100,
    caller: Principal = Depends(principal),
) -> Response:
    if not may_read(caller):
        raise forbidden(caller, "read the global log")
    state = state_of(request)

    def page() -> dict[str, object]:
        events = state.reader.read(after, limit)
        head = max(state.service.app.max_position(), after)
        next_after = events[-1].position if events else after
        return {"events": [e.as_json() for e in events], "next_after": next_after, "head": head}

    return JsonResponse(await run_in_threadpool(page))


def _start_position(last_event_id: str | None, after: int | None) -> int | None:
    if last_event_id is not None and last_event_id.strip():
        text = last_event_id.strip()
        if not is_position(text):
            raise ApiError(
                422,
                "invalid_last_event_id",
                "Last-Event-ID must be a log position (an integer)",
                {"last_event_id": last_event_id[:100]},
            )
        return int(text)
    return after


@router.get(
    "/events/stream",
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "Server-sent events: `id:` log position, `event:` event type, "
            "`data:` the event as JSON. Comments are heartbeats.",
        },
        **responses(),
    },
    summary="Live log as server-sent events",
)
async def stream_events(
    request: Request,
    after: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_POSITION,
            description="Start after this position (0: the whole log). Without it and "
            "without Last-Event-ID the stream starts at the current head (new events only).",
        ),
        Digits,
    ] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
    caller: Principal = Depends(principal),
) -> StreamingResponse:
    if not may_read(caller):
        raise forbidden(caller, "read the global log")
    state = state_of(request)
    start = _start_position(last_event_id, after)
    if start is None:
        start = await run_in_threadpool(state.service.app.max_position)
    return StreamingResponse(
        event_stream(state.reader, state.notifier, start, state.stream),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
