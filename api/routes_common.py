"""What every router shares: the per-app state, the caller, JSON responses, idempotency."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import orjson
from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.auth import Authenticator, AuthFailure, Principal
from api.errors import ApiError, domain_error_body, domain_status
from api.sse import CommitNotifier, LogReader, StreamSettings
from domain.errors import DomainError
from service.container import Service
from service.idempotency import (
    ClaimLost,
    IdempotencyMark,
    IdempotencyStore,
    fingerprint,
    valid_key,
)

logger = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


class BackgroundComponent(Protocol):
    """Anything the server runs beside the API (projections, runners): started with the
    app, stopped (and joined) when it shuts down."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class ApiState:
    service: Service
    read_models: Any
    auth: Authenticator
    idempotency: IdempotencyStore
    notifier: CommitNotifier
    reader: LogReader
    stream: StreamSettings
    components: Sequence[BackgroundComponent] = ()
    runner_status: Callable[[], list[dict[str, Any]]] | None = None
    wait_timeout: float = 5.0
    idempotency_wait: float = 5.0
    health_timeout: float = 1.5
    """How long /healthz waits for the database before it reports it down."""
    thread_limit: int = 40
    extra: dict[str, Any] = field(default_factory=dict)


def _json_default(value: Any) -> Any:
    # Projection rows may hold database types orjson does not know (Decimal, memoryview).
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


class JsonResponse(JSONResponse):
    """orjson: several times faster than the standard encoder on story snapshots."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_json_default, option=orjson.OPT_NON_STR_KEYS)


def state_of(request: Request) -> ApiState:
    state: ApiState = request.app.state.storyline
    return state


# Registered for the OpenAPI "Authorize" button only; the header is parsed by `principal`
# so that a malformed one is an error even when no tokens are configured.
bearer_scheme = HTTPBearer(auto_error=False, description="API or agent token")


async def principal(request: Request, _: Any = Depends(bearer_scheme)) -> Principal:
    state = state_of(request)
    auth = state.auth
    try:
        token = auth.bearer(request.headers.get("authorization"))
        if auth.needs_database(token):
            return await run_in_threadpool(auth.authenticate, token)
        return auth.authenticate(token)
    except AuthFailure as exc:
        raise ApiError(401, exc.code, exc.message, headers={"WWW-Authenticate": "Bearer"}) from None


_QUERY_NAMES: dict[int, frozenset[str]] = {}


def _query_names(dependant: Any) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query(request: Request) -> None:
    """A query parameter the endpoint does not know, or one given twice, is a 422 (like an
    unknown body key): ``?stag=coding`` must not silently list every story."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    names = _QUERY_NAMES.get(id(route))
    if names is None:
        names = frozenset(_query_names(dependant))
        _QUERY_NAMES[id(route)] = names
    keys = [key for key, _ in request.query_params.multi_items()]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        # Every query parameter here is a single value; "the last one wins" would hide a
        # client bug.
        raise ApiError(
            422,
            "validation_error",
            f"query parameter(s) given more than once: {', '.join(repr(r[:64]) for r in repeated)}",
            [
                {"loc": ["query", name[:64]], "msg": "given more than once", "type": "repeated"}
                for name in repeated[:20]
            ],
        )
    unknown = sorted(set(keys) - names)
    if unknown:
        raise ApiError(
            422,
            "validation_error",
            f"unknown query parameter(s): {', '.join(repr(u[:64]) for u in unknown[:5])}",
            [
                {"loc": ["query", name[:64]], "msg": "unknown query parameter", "type": "extra"}
                for name in unknown[:20]
            ],
        )


def forbidden(principal: Principal, what: str) -> ApiError:
    return ApiError(
        403,
        "forbidden",
        f"{principal.actor} (role {principal.role}) may not {what}",
        {"actor": principal.actor, "role": principal.role},
    )


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not valid_key(key):
        raise ApiError(
            422,
            "invalid_idempotency_key",
            f"{IDEMPOTENCY_HEADER} must be 1 to 200 visible ASCII characters",
        )
    return key


Outcome = tuple[int, dict[str, Any]]


def run_command(
    state: ApiState,
    actor: str,
    key: str | None,
    request_fp: str,
    command: Callable[[IdempotencyMark | None], Outcome],
    recover: Callable[[str, int], Outcome],
) -> tuple[int, dict[str, Any], bool]:
    """Run ``command`` at most once per (actor, key): returns (status, body, replayed).

    ``command(mark)`` passes ``mark`` to the application, which marks the key in the
    event's transaction; ``recover(story_id, position)`` rebuilds the answer of a command
    that committed but whose process died before storing it. Domain refusals are answers
    too (stored and replayed); an unexpected failure releases the key so that a retry runs
    the command.
    """
    if key is None:
        status, body = _guarded(lambda: command(None))
        return status, body, False
    store = state.idempotency
    deadline = time.monotonic() + state.idempotency_wait
    seen = False
    while True:
        claim = store.claim(actor, key, request_fp, seen=seen)
        seen = claim.state == "in_progress"
        if claim.state == "replay":
            assert claim.status_code is not None
            return claim.status_code, claim.body, True
        if claim.state == "committed":
            assert claim.story_id is not None and claim.position is not None
            status, body = recover(claim.story_id, claim.position)
            store.complete(actor, key, status, body)
            return status, body, True
        if claim.state == "mismatch":
            raise ApiError(
                422,
                "idempotency_key_reused",
                f"{IDEMPOTENCY_HEADER} {key!r} was already used with a different request",
                {"idempotency_key": key},
            )
        if claim.state == "claimed":
            break
        # Another request with this key is running: wait for its answer to replay it.
        if time.monotonic() >= deadline:
            raise ApiError(
                409,
                "idempotency_key_in_use",
                f"a request with {IDEMPOTENCY_HEADER} {key!r} is still being processed",
                {"idempotency_key": key},
            )
        time.sleep(0.02)
    mark = IdempotencyMark(actor, key, claim.owner)
    try:
        status, body = _guarded(lambda: command(mark))
    except ClaimLost:
        # Another server took the key over (this one looked dead) and runs the command:
        # ours rolled back. The resend that the client makes gets that server's answer.
        raise ApiError(
            409,
            "idempotency_key_in_use",
            f"a request with {IDEMPOTENCY_HEADER} {key!r} is being processed by another server",
            {"idempotency_key": key},
        ) from None
    except BaseException:
        store.release(actor, key, claim.owner)
        raise
    try:
        store.complete(actor, key, status, body)
    except Exception:
        # The command is committed: answer it. A retry within the lease sees "in progress";
        # after it, the answer is rebuilt from the key's commit mark (service.idempotency).
        logger.exception("could not record the answer for an idempotency key")
    return status, body, False


def _guarded(command: Callable[[], Outcome]) -> Outcome:
    try:
        return command()
    except DomainError as exc:
        return domain_status(exc), domain_error_body(exc)


def request_fingerprint(request: Request, key: str | None, body: Callable[[], Any]) -> str:
    """The digest that tells a retried request from a different one (only with a key)."""
    if key is None:
        return ""
    return fingerprint(request.method, request.url.path, body())
