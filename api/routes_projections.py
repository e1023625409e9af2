"""Read models served from the projections: board, merge queue, agent runs, metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, may_read
from api.params import Digits
from api.routes_common import JsonResponse, forbidden, principal, state_of
from api.routes_epics import board_rows, epics_of
from api.routes_gates import gate_metrics
from api.routes_health import breaker_metrics
from api.routes_stories import _row
from api.routes_workers import worker_metrics
from api.schemas import AgentRunsOut, MergeQueueOut, responses
from api.schemas_epics import BoardWithEpicsOut, epic_metrics, epic_summaries
from domain.errors import DomainError
from domain.ids import STORY_ID_PATTERN, validate_story_id
from domain.stages import Stage
from service.application import StorylineApplication
from service.gate_registry import GateRegistryService
from service.merge_stack import merge_stack

router = APIRouter(tags=["projections"])

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BOARD_PAGE = 1000


def _require_read(caller: Principal, what: str) -> None:
    if not may_read(caller):
        raise forbidden(caller, f"read {what}")


@router.get("/board", response_model=BoardWithEpicsOut, responses=responses(), summary="The board")
async def board(
    request: Request,
    stage: Stage | None = None,
    limit: Annotated[
        int | None,
        Query(ge=1, le=1000, description="At most this many stories per stage column"),
        Digits,
    ] = None,
    caller: Principal = Depends(principal),
) -> Response:
    _require_read(caller, "the board")
    state = state_of(request)
    read_models = state.read_models

    def whole(name: str | None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            rows, cursor = read_models.board(name, BOARD_PAGE, cursor)
            found.extend(map(_row, rows))
            if not cursor:
                return found

    def columns() -> dict[str, list[dict[str, Any]]]:
        wanted = [stage] if stage is not None else list(Stage)
        if limit is not None:
            # One page per column: a board of 100,000 stories stays a small answer.
            return {
                s.value: list(map(_row, read_models.board(s.value, limit, None)[0])) for s in wanted
            }
        if stage is not None:
            return {stage.value: whole(stage.value)}
        out: dict[str, list[dict[str, Any]]] = {s.value: [] for s in Stage}
        for row in whole(None):
            out.setdefault(str(row.get("stage")), []).append(row)
        return out

    stages = await run_in_threadpool(columns)
    # Epics are few and not projected: read from the log (a replay each) beside the columns.
    epics = await run_in_threadpool(board_rows, state)
    return JsonResponse({"stages": stages, "epics": epics})


@router.get(
    "/merge-queue",
    response_model=MergeQueueOut,
    responses=responses(),
    summary="Stories waiting to merge, in merge order",
)
async def merge_queue(request: Request, caller: Principal = Depends(principal)) -> Response:
    _require_read(caller, "the merge queue")
    state = state_of(request)
    app = state.service.app

    def read() -> dict[str, Any]:
        rows = [_row(r) for r in state.read_models.merge_queue()]
        merging, _ = state.read_models.board(stage=Stage.MERGE.value, limit=BOARD_PAGE)
        return {
            "queue": with_merge_trust(app, rows),
            "stack": merge_stack(app, [str(r["id"]) for r in merging]),
            "quarantined_gates": quarantined_gates(app),
        }

    return JsonResponse(await run_in_threadpool(read))


def with_merge_trust(app: StorylineApplication, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each queued story's declared drops (with reasons), the hunks its resolution was
    last sent back for, and the gates found flaky on it: what a reviewer of the queue
    should see before it lands.

    From the story itself (the queue is short), not a projection column."""
    for row in rows:
        try:
            story = app.get_story(str(row["story_id"]))
        except DomainError:
            story = None
        row["declared_drops"] = [dict(d) for d in story.declared_drops] if story else []
        row["lost_hunks"] = (
            [{k: h.get(k) for k in ("file", "side", "hunk")} for h in story.lost_hunks]
            if story
            else []
        )
        row["flaky_gates"] = list(story.flaky_gates) if story else []
    return rows


def quarantined_gates(app: StorylineApplication) -> list[dict[str, Any]]:
    """The gates quarantined as flaky now, by name (their failures do not block)."""
    quarantined = GateRegistryService(app).quarantined()
    return [{"gate": gate, **info} for gate, info in sorted(quarantined.items())]


@router.get(
    "/agents/runs",
    response_model=AgentRunsOut,
    responses=responses(),
    summary="Agent runs (one per attempt), newest first",
)
async def agent_runs(
    request: Request,
    story_id: Annotated[
        str | None, Query(max_length=64, json_schema_extra={"pattern": STORY_ID_PATTERN})
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000), Digits] = 100,
    caller: Principal = Depends(principal),
) -> Response:
    # An agent token may list the runs of its own story.
    if not may_read(caller, story_id):
        raise forbidden(caller, "read agent runs")
    if story_id is not None:
        validate_story_id(story_id)
    read_models = state_of(request).read_models
    rows = await run_in_threadpool(read_models.agent_runs, story_id, limit)
    return JsonResponse({"runs": [_row(r) for r in rows]})


@router.get(
    "/metrics",
    responses={
        200: {"content": {PROMETHEUS_TYPE: {"schema": {"type": "string"}}}},
        **responses(),
    },
    summary="Metrics in the Prometheus text format",
)
async def metrics(request: Request, caller: Principal = Depends(principal)) -> Response:
    _require_read(caller, "metrics")
    state = state_of(request)
    read_models = state.read_models

    def render() -> str:
        values = read_models.metrics()
        statuses = read_models.status()
        renderer = getattr(read_models, "render_prometheus", None)
        if renderer is None:
            # The projections package may provide the renderer at module level instead.
            import projections

            renderer = getattr(projections, "render_prometheus", None)
            if renderer is None:
                from projections import read_models as module

                renderer = module.render_prometheus
        text = str(renderer(values, statuses))
        runners = state.runner_status() if state.runner_status else []
        epics = epic_metrics(epic_summaries(epics_of(state)))
        gates = gate_metrics(state.service.app)
        workers = worker_metrics(state.service.app)
        return text + breaker_metrics(list(runners)) + epics + gates + workers

    text = await run_in_threadpool(render)
    return Response(text, media_type=PROMETHEUS_TYPE)
