"""Worker runners (scale-out): the registry and the live story leases, for people and probes.

``GET /workers`` lists them; ``/healthz`` and ``/metrics`` carry the same figures (see
``workers_health`` and ``worker_metrics``). Everything is read from the two tables the
workers write in the database (``service.workers``): on a single machine, with no worker
runners, both are empty and so is every list here.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, may_read
from api.routes_common import JsonResponse, forbidden, principal, state_of
from api.schemas import WorkersOut, responses
from projections.read_models import _label
from service.application import StorylineApplication
from service.workers import LeaseRow, WorkerRow, Workers

router = APIRouter(tags=["workers"])

STALE_NOTE = (
    "a stale worker (silent for longer than its lease time) does not make the status "
    "degraded: other workers take its stories over as its leases expire"
)


def worker_json(row: WorkerRow) -> dict[str, Any]:
    """A registry row as the API shows it (``WorkerOut``; the registry holds no
    credentials: ``Workers.heartbeat`` strips them from the remote's URL)."""
    return row.as_json()


def state_of_worker(row: WorkerRow) -> str:
    """``alive``, ``stale`` (not stopped, silent past its lease time) or ``stopped``."""
    if row.stopped:
        return "stopped"
    return "alive" if row.alive else "stale"


def lease_json(row: LeaseRow) -> dict[str, Any]:
    return {
        "story_id": row.story_id,
        "holder": row.holder,
        "generation": row.generation,
        "expires_in_secs": round(row.expires_in, 3),
    }


def report(rows: list[WorkerRow], leases: list[LeaseRow]) -> dict[str, Any]:
    """The ``GET /workers`` body (``WorkersOut``)."""
    alive = [row for row in rows if row.alive]
    return {
        "workers": [worker_json(row) for row in rows],
        "leases": [lease_json(lease) for lease in leases],
        "alive": len(alive),
        "stale": sum(state_of_worker(row) == "stale" for row in rows),
        "capacity": sum(row.capacity for row in alive),
        "held": sum(row.held for row in alive),
    }


def workers_report(app: StorylineApplication) -> dict[str, Any]:
    """Reads the registry and the leases (blocks: call from a worker thread)."""
    workers = Workers(app)
    return report(workers.rows(), workers.leases())


def workers_health(app: StorylineApplication) -> dict[str, Any]:
    """The ``workers`` block of ``/healthz``. A failed read is reported in it, never raised:
    the registry is not what the health of this process depends on."""
    try:
        rows = Workers(app).rows()
    except Exception as exc:
        return {"alive": 0, "stale": 0, "list": [], "error": type(exc).__name__}
    stale = sum(state_of_worker(row) == "stale" for row in rows)
    block: dict[str, Any] = {
        "alive": sum(row.alive for row in rows),
        "stale": stale,
        "list": [worker_json(row) for row in rows],
    }
    if stale:
        block["note"] = STALE_NOTE
    return block


def render_metrics(rows: list[WorkerRow], leases: int) -> str:
    """Prometheus families for the workers (appended to ``/metrics``). The state gauge has
    every state, so one emptied reads 0 rather than vanishing."""
    states = {"alive": 0, "stale": 0, "stopped": 0}
    for row in rows:
        states[state_of_worker(row)] += 1

    def worker(row: WorkerRow) -> str:
        return f'{{worker="{_label(row.worker_id)}"}}'

    lines = [
        "# HELP storyline_workers Worker runners heard from within the last day, by state "
        "(stale: silent for longer than their lease time).",
        "# TYPE storyline_workers gauge",
        *(f'storyline_workers{{state="{state}"}} {n}' for state, n in states.items()),
        "# HELP storyline_worker_capacity Stories a worker codes at once (its max_coders).",
        "# TYPE storyline_worker_capacity gauge",
        *(f"storyline_worker_capacity{worker(row)} {row.capacity}" for row in rows),
        "# HELP storyline_worker_stories_held Stories a worker held at its last heartbeat.",
        "# TYPE storyline_worker_stories_held gauge",
        *(f"storyline_worker_stories_held{worker(row)} {row.held}" for row in rows),
        "# HELP storyline_worker_heartbeat_age_seconds Seconds since a worker's last "
        "heartbeat, by the database's clock.",
        "# TYPE storyline_worker_heartbeat_age_seconds gauge",
        *(
            f"storyline_worker_heartbeat_age_seconds{worker(row)} {row.heartbeat_age:.3f}"
            for row in rows
        ),
        "# HELP storyline_story_leases Live story leases (stories held by a worker now).",
        "# TYPE storyline_story_leases gauge",
        f"storyline_story_leases {leases}",
    ]
    return "\n".join(lines) + "\n"


def worker_metrics(app: StorylineApplication) -> str:
    workers = Workers(app)
    return render_metrics(workers.rows(), len(workers.leases()))


@router.get(
    "/workers",
    response_model=WorkersOut,
    responses=responses(),
    summary="Worker runners (scale-out) and the stories they hold",
    description="The registry of worker runners (``storyline runner --remote``) as their "
    "heartbeats left it, and the live story leases. Both are empty on a single machine.",
)
async def workers(request: Request, caller: Principal = Depends(principal)) -> Response:
    if not may_read(caller):
        raise forbidden(caller, "read workers")
    body = await run_in_threadpool(workers_report, state_of(request).service.app)
    return JsonResponse(body)


__all__ = [
    "STALE_NOTE",
    "render_metrics",
    "router",
    "state_of_worker",
    "worker_json",
    "worker_metrics",
    "workers_health",
    "workers_report",
]
