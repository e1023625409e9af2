"""Liveness and catch-up: is the database reachable, are projections and runners current.

A failed projection makes the status ``degraded`` but still answers 200: the process is
alive and serves commands and story reads (which never depend on projections), so a
liveness probe must not restart it; monitoring reads ``status``/``caught_up``. Only an
unreachable database answers 503 (``unavailable``): then nothing works.

Worker runners (scale-out) are listed under ``workers``: alive, stale and each one. A stale
worker does not make the status degraded (its stories are taken over when its leases
expire); the block's ``note`` says so, and a registry that cannot be read is an ``error``
in the block, not a failed check.

The check itself is bounded: a database host that is gone (packets dropped, or a listener
that never answers) leaves a query waiting for minutes, and a probe that waits with it is
useless. ``/healthz`` answers within ``health_timeout`` either way, and only one check runs
at a time, so a probe every second during an outage does not pile up stuck threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.routes_common import ApiState, JsonResponse, state_of
from api.routes_workers import workers_health
from api.schemas import HealthOut, responses

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    if hasattr(value, "as_json"):
        return dict(value.as_json())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "_asdict"):
        return dict(value._asdict())
    if hasattr(value, "model_dump"):
        return dict(value.model_dump(mode="json"))
    return {k: v for k, v in vars(value).items() if not k.startswith("_")}


def health(state: ApiState) -> tuple[int, dict[str, Any]]:
    db = state.service.db
    database: dict[str, Any] = {"kind": db.kind, "location": db.display, "ok": True, "head": None}
    try:
        database["head"] = state.service.app.max_position()
    except Exception as exc:
        logger.warning("health check: database unreachable: %s", type(exc).__name__)
        database.update(ok=False, error=type(exc).__name__)
    projections: list[dict[str, Any]] = []
    projections_ok = True
    if database["ok"]:
        try:
            projections = [_as_dict(s) for s in state.read_models.status()]
        except Exception as exc:
            logger.warning("health check: projection status failed: %s", type(exc).__name__)
            projections_ok = False
    workers = (
        workers_health(state.service.app)
        if database["ok"]
        else {"alive": 0, "stale": 0, "list": []}
    )
    runners = list(state.runner_status()) if state.runner_status else []
    breakers = provider_breakers(runners)
    failed = any(p.get("error") for p in projections) or any(
        r.get("error") or r.get("running") is False for r in runners
    )
    caught_up = (
        database["ok"]
        and projections_ok
        and not failed
        and all(int(p.get("lag") or 0) == 0 for p in projections)
        and all(r.get("caught_up", True) for r in runners)
    )
    if not database["ok"]:
        status, code = "unavailable", 503
    elif failed or not projections_ok:
        status, code = "degraded", 200
    else:
        status, code = "ok", 200
    body = {
        "status": status,
        "database": database,
        "projections": projections,
        "runners": runners,
        "breakers": breakers,
        "workers": workers,
        "caught_up": bool(caught_up),
    }
    return code, body


def provider_breakers(runners: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runners' provider circuit breakers (provider, state, open_until, failures).

    An open breaker does not make the server degraded: commands and reads work, and the
    stories waiting on it are spawned when it closes; monitoring reads ``state``."""
    found: list[dict[str, Any]] = []
    for runner in runners:
        found.extend(dict(b) for b in runner.get("breakers") or ())
    return found


def breaker_metrics(runners: list[dict[str, Any]]) -> str:
    """Prometheus families for the provider breakers (appended to ``/metrics``)."""
    breakers = provider_breakers(runners)

    def label(value: object) -> str:
        text = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        return f'{{provider="{text}"}}'

    lines = [
        "# HELP storyline_provider_breaker_open 1 while no agent of this provider is spawned "
        "(open, or half-open waiting for its probe run).",
        "# TYPE storyline_provider_breaker_open gauge",
        *(
            f"storyline_provider_breaker_open{label(b['provider'])} "
            f"{0 if b.get('state') == 'closed' else 1}"
            for b in breakers
        ),
        "# HELP storyline_provider_breaker_opened_total Times the breaker opened since the "
        "runner started.",
        "# TYPE storyline_provider_breaker_opened_total counter",
        *(
            f"storyline_provider_breaker_opened_total{label(b['provider'])} "
            f"{int(b.get('opened_total') or 0)}"
            for b in breakers
        ),
    ]
    return "\n".join(lines) + "\n"


class HealthProbe:
    """At most one health check in flight per app; callers share it and wait a bounded time."""

    def __init__(self) -> None:
        self._running: asyncio.Future[tuple[int, dict[str, Any]]] | None = None

    async def answer(self, state: ApiState) -> tuple[int, dict[str, Any]]:
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(run_in_threadpool(health, state))
            # Retrieved here so that a check finishing after everyone stopped waiting
            # does not log "exception was never retrieved".
            self._running.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(self._running), state.health_timeout)
        except TimeoutError:
            return 503, _unanswered(state)


def _unanswered(state: ApiState) -> dict[str, Any]:
    db = state.service.db
    logger.warning(
        "health check: database %s did not answer within %.1f s", db.display, state.health_timeout
    )
    return {
        "status": "unavailable",
        "database": {
            "kind": db.kind,
            "location": db.display,
            "ok": False,
            "head": None,
            "error": f"no answer within {state.health_timeout:g} s",
        },
        "projections": [],
        "runners": [],
        "breakers": [],
        "workers": {"alive": 0, "stale": 0, "list": []},
        "caught_up": False,
    }


@router.get(
    "/healthz",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "The database is unreachable."}},
    summary="Liveness, and whether projections and runners are caught up",
)
async def healthz(request: Request) -> Response:
    state = state_of(request)
    probe = state.extra.get("health_probe")
    if probe is None:
        probe = state.extra["health_probe"] = HealthProbe()
    code, body = await probe.answer(state)
    return JsonResponse(body, status_code=code)


__all__ = ["breaker_metrics", "health", "provider_breakers", "responses", "router"]
