"""The FastAPI application: ``create_app(service, read_models, tokens=...)``.

Everything a request needs hangs off ``app.state.storyline`` (an :class:`ApiState`); there
are no module globals, so tests and several apps in one process do not interfere.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import (
    routes_epics,
    routes_events,
    routes_gates,
    routes_health,
    routes_projections,
    routes_stories,
    routes_workers,
)
from api.auth import Authenticator, StaticTokens, load_tokens
from api.errors import error_body, install_error_handlers
from api.routes_common import ApiState, BackgroundComponent, JsonResponse, reject_unknown_query
from api.sse import CommitNotifier, LogReader, StreamSettings
from api.web import STATIC_DIR as WEB_STATIC_DIR
from api.web import router as web_router
from domain.config import TokenConfig
from service.agent_tokens import AgentTokens
from service.container import Service
from service.epics import EpicService
from service.idempotency import IdempotencyStore
from service.policies import epic_policy

logger = logging.getLogger(__name__)

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with 413 before anything parses them.

    A declared Content-Length over the limit is refused without buffering; a chunked body
    is counted as it arrives and refused as soon as it passes the limit. The rest of an
    oversize body is read and dropped (up to ``drain_bytes``) so that the client, which is
    usually still sending, gets to read the 413 instead of a reset connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else max(8 * max_bytes, 8 << 20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, received=0)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = bool(message.get("more_body", False))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, received=size if more else -1)
                return
            chunks.append(chunk)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, *, received: int) -> None:
        # received == -1: the whole body has been read already.
        drained = max(received, 0)
        while received != -1 and drained <= self.drain_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        response = JsonResponse(
            error_body(
                "body_too_large",
                f"the request body is larger than {self.max_bytes} bytes",
                {"max_bytes": self.max_bytes},
            ),
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _tidy_openapi(app: FastAPI, auth_required: bool) -> None:
    """Text endpoints (metrics, the event stream) document only their own media type, not
    the JSON one FastAPI adds for the app's default response class.

    Without configured tokens the bearer token is optional (an empty security requirement
    says so): anyone on loopback may call, and a token that is sent is still checked.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    content = operation.get("responses", {}).get("200", {}).get("content", {})
                    if "application/json" in content and len(content) > 1:
                        del content["application/json"]
                    security = operation.get("security")
                    if security and not auth_required and {} not in security:
                        operation["security"] = [{}, *security]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    service: Service,
    read_models: Any,
    *,
    tokens: StaticTokens | Sequence[TokenConfig] | None = None,
    agent_tokens: AgentTokens | None = None,
    components: Sequence[BackgroundComponent] = (),
    runner_status: Callable[[], list[dict[str, Any]]] | None = None,
    max_body_bytes: int | None = None,
    thread_limit: int = 40,
    wait_timeout: float = 5.0,
    poll_interval: float = 1.0,
    heartbeat_interval: float = 15.0,
    gap_timeout: float = 5.0,
    health_timeout: float = 1.5,
) -> FastAPI:
    """The HTTP API over ``service`` (commands, story reads) and ``read_models`` (lists).

    ``tokens``: the configured tokens (default: ``service.config.server`` plus
    ``$STORYLINE_TOKENS``); empty means no authentication (bind to loopback only).
    ``components`` are started when the app starts and stopped when it stops (projection
    runner, runner supervisor). ``runner_status`` feeds ``/healthz``.
    """
    if tokens is None:
        static = load_tokens(service.config.server)
    elif isinstance(tokens, StaticTokens):
        static = tokens
    else:
        static = load_tokens(list(tokens), environ={})
    state = ApiState(
        service=service,
        read_models=read_models,
        auth=Authenticator(static, agent_tokens or AgentTokens(service.app)),
        idempotency=IdempotencyStore(service.app),
        notifier=CommitNotifier(service.app),
        reader=LogReader(service.app, gap_timeout=gap_timeout),
        stream=StreamSettings(poll_interval=poll_interval, heartbeat_interval=heartbeat_interval),
        components=list(components),
        runner_status=runner_status,
        wait_timeout=wait_timeout,
        thread_limit=thread_limit,
        health_timeout=health_timeout,
    )
    # One per app: it serialises the choice of the next epic number within this process.
    state.extra["epics"] = EpicService(service.app, epic_policy(service.config))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Sync endpoints share one pool per event loop; size it for the database pool
        # rather than the library default of 40 unrelated to it.
        anyio.to_thread.current_default_thread_limiter().total_tokens = state.thread_limit
        started: list[BackgroundComponent] = []
        try:
            for component in state.components:
                await anyio.to_thread.run_sync(component.start)
                started.append(component)
            yield
        finally:
            for component in reversed(started):
                try:
                    await anyio.to_thread.run_sync(component.stop)
                except Exception:
                    logger.exception("stopping %s failed", type(component).__name__)
            # Gives up this server's liveness lock: its unanswered claims are free at once.
            state.idempotency.close()

    app = FastAPI(
        title="storyline",
        version="0.1.0",
        description="Drive, audit and watch stories: an event-sourced story pipeline.",
        lifespan=lifespan,
        default_response_class=JsonResponse,
        dependencies=[Depends(reject_unknown_query)],
    )
    app.state.storyline = state
    install_error_handlers(app)
    for module in (
        routes_stories,
        routes_epics,
        routes_events,
        routes_projections,
        routes_health,
        routes_gates,
        routes_workers,
    ):
        app.include_router(module.router)
    # The web board: public page shells, fragments behind the same auth, script and styles.
    app.include_router(web_router)
    app.mount("/static", StaticFiles(directory=WEB_STATIC_DIR), name="static")
    _tidy_openapi(app, state.auth.required)
    limit = max_body_bytes if max_body_bytes is not None else service.config.server.max_body_bytes
    app.add_middleware(BodyLimitMiddleware, max_bytes=limit)
    return app


__all__ = ["ApiState", "BackgroundComponent", "BodyLimitMiddleware", "create_app"]
