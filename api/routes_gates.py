"""Flaky and quarantined gates: what the gate verdicts showed, and a person's clearing.

``GET /gates/flaky`` lists flaky detections (newest first), the quarantined gates and the
registry's decisions; ``POST /gates/clear`` lifts a quarantine (write role, with a reason,
recorded in the registry as the person's event). The conventions are the stories': one
error shape, the same bearer tokens, idempotency keys on the write. The verdicts
themselves are story events and show in each story's history.
"""

from __future__ import annotations

from typing import Annotated, Any

from eventsourcing.persistence import IntegrityError
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, may_read
from api.errors import ApiError
from api.params import Digits
from api.routes_common import (
    REPLAYED_HEADER,
    JsonResponse,
    forbidden,
    idempotency_key,
    principal,
    request_fingerprint,
    run_command,
    state_of,
)
from api.schemas import CRITERION_PATTERN, NAME_PATTERN, responses
from domain.errors import VersionConflict
from domain.gate_registry import MAX_GATE, REGISTRY_ID
from runners.gate_verdicts import (
    count_ignored_failures,
    flaky_report,
    not_quarantined,
    quarantined_name,
)
from service.application import StorylineApplication, _marked
from service.gate_registry import GateRegistryService
from service.idempotency import IdempotencyMark

router = APIRouter(tags=["gates"])


class ClearGateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gate: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_GATE,
            description="The gate's command line as `GET /gates/flaky` names it.",
            json_schema_extra={"pattern": NAME_PATTERN},
        ),
    ]
    reason: Annotated[
        str,
        Field(
            min_length=1,
            max_length=10_000,
            description="Why its failures may block again (recorded).",
            json_schema_extra={"pattern": CRITERION_PATTERN},
        ),
    ]


class FlakyDetectionOut(BaseModel):
    gate: str
    phase: str
    tree: str
    story_id: str
    at: str
    position: int
    action: str
    verdicts: list[bool]
    reason: str | None


class QuarantinedGateOut(BaseModel):
    gate: str
    phase: str
    since: str
    reason: str | None = None
    story_id: str | None = None
    actor: str


class GateDecisionOut(BaseModel):
    type: str
    gate: str | None
    actor: str
    reason: str | None
    at: str
    position: int


class FlakyGatesOut(BaseModel):
    detections: list[FlakyDetectionOut]
    quarantined: list[QuarantinedGateOut]
    decisions: list[GateDecisionOut]
    failures_ignored: int
    """Failures of quarantined gates recorded as not blocking, ever."""


class GateClearedOut(BaseModel):
    gate: str
    position: int
    quarantined: list[QuarantinedGateOut]


@router.get(
    "/gates/flaky",
    response_model=FlakyGatesOut,
    responses=responses(),
    summary="Flaky gate detections, quarantined gates, and the registry's decisions",
)
async def flaky_gates(
    request: Request,
    limit: Annotated[
        int, Query(ge=1, le=1000, description="At most this many detections"), Digits
    ] = 100,
    caller: Principal = Depends(principal),
) -> Response:
    if not may_read(caller):
        raise forbidden(caller, "read the gate registry")
    app = state_of(request).service.app

    def read() -> dict[str, Any]:
        report = flaky_report(app, limit=limit)
        report["failures_ignored"] = count_ignored_failures(app)
        return report

    return JsonResponse(await run_in_threadpool(read))


def _quarantined_rows(app: StorylineApplication) -> list[dict[str, Any]]:
    quarantined = GateRegistryService(app).quarantined()
    return [{"gate": gate, **info} for gate, info in sorted(quarantined.items())]


@router.post(
    "/gates/clear",
    response_model=GateClearedOut,
    responses={
        **responses(409),
        404: {"description": "The gate is not quarantined."},
    },
    summary="Clear a quarantined gate: its failures block again",
)
async def clear_gate(
    body: ClearGateRequest, request: Request, caller: Principal = Depends(principal)
) -> Response:
    if not caller.at_least("write"):
        raise forbidden(caller, "clear a quarantined gate")
    state = state_of(request)
    app = state.service.app
    key = idempotency_key(request)
    request_fp = request_fingerprint(request, key, lambda: body.model_dump(mode="json"))

    def command(mark: IdempotencyMark | None) -> tuple[int, dict[str, Any]]:
        registry = GateRegistryService(app).get()
        gate = quarantined_name(body.gate, registry.quarantined)
        if gate is None:
            raise ApiError(
                404,
                "gate_not_quarantined",
                not_quarantined(body.gate, registry.quarantined),
                {"gate": body.gate[:200], "quarantined": sorted(registry.quarantined)},
            )
        registry.clear(actor=caller.actor, gate=gate, reason=body.reason)
        try:
            # Saved here rather than by the service: the idempotency key is marked in the
            # same transaction, so a retry after a lost answer is not cleared twice.
            recordings = app.save(registry, **_marked(mark))
        except IntegrityError:
            raise VersionConflict(REGISTRY_ID, registry.version, registry.version) from None
        position = recordings[-1].notification.id
        app._committed(position)
        return 200, {"gate": gate, "position": position, "quarantined": _quarantined_rows(app)}

    def recover(_: str, position: int) -> tuple[int, dict[str, Any]]:
        return 200, {"gate": body.gate, "position": position, "quarantined": _quarantined_rows(app)}

    def run() -> Response:
        status, out, replayed = run_command(state, caller.actor, key, request_fp, command, recover)
        headers = {REPLAYED_HEADER: "true"} if replayed else {}
        return JsonResponse(out, status_code=status, headers=headers)

    return await run_in_threadpool(run)


def gate_metrics(app: StorylineApplication) -> str:
    """Prometheus families for flaky gates (appended to ``/metrics``), read from the log
    and the registry on each scrape (a scan of the gate verdicts' rows, in the database)."""
    return _render(count_ignored_failures(app), len(GateRegistryService(app).quarantined()))


def _render(ignored: int, quarantined: int) -> str:
    lines = [
        "# HELP storyline_gate_failures_ignored_total Gate failures that did not block "
        "because the gate was quarantined as flaky.",
        "# TYPE storyline_gate_failures_ignored_total counter",
        f"storyline_gate_failures_ignored_total {ignored}",
        "# HELP storyline_gates_quarantined Gates quarantined as flaky now (until a person "
        "clears them).",
        "# TYPE storyline_gates_quarantined gauge",
        f"storyline_gates_quarantined {quarantined}",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["ClearGateRequest", "FlakyGatesOut", "gate_metrics", "router"]
