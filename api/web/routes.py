"""The web board: public page shells and authenticated HTML fragments.

A browser navigation cannot carry a bearer header, so every page (``/``, ``/ui/...``) is a
shell with no data in it; ``/static/board.js`` fetches the fragments (``/ui/fragments/...``)
with the token kept in the tab's sessionStorage and inserts them. Fragments go through the
API's own auth dependency and read the same application and read models as the JSON API;
they are rendered for their caller, so a reader gets no action buttons at all. Actions and
the live stream are the JSON API's (``POST /stories/{id}/transitions``, ``/events/stream``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, may_read
from api.errors import ApiError
from api.params import Digits, StoryIdPath
from api.routes_common import forbidden, principal, state_of
from api.routes_epics import EpicIdPath, check_epic_id, epics_of
from api.routes_projections import BOARD_PAGE, quarantined_gates, with_merge_trust
from api.schemas_epics import epic_summaries
from api.web import board_data, charts, epic_data, story_data, worker_data
from api.web.board_data import DEFAULT_LIMIT, BoardFilter
from api.web.render import html, no_content
from domain.ids import validate_story_id
from domain.stages import AgentRole, Stage
from service.merge_stack import merge_stack

router = APIRouter(include_in_schema=False)

TextQuery = Annotated[str | None, Query(max_length=200)]
LimitQuery = Annotated[int, Query(ge=1, le=1000), Digits]
OffsetQuery = Annotated[int, Query(ge=0, le=1_000_000), Digits]
# Shells take the board's query only to leave it to the script; they never validate it.
LooseQuery = Annotated[str | None, Query(max_length=200)]

CARD_WAIT_SECONDS = 5.0
"""How long a card waits for the board projection to apply the event that asked for it."""

NAV = (
    ("board", "/", "Board"),
    ("merge-queue", "/ui/merge-queue", "Merge queue"),
    ("runs", "/ui/runs", "Agent runs"),
    ("epics", "/ui/epics", "Epics"),
    ("metrics", "/ui/metrics", "Metrics"),
    ("workers", "/ui/workers", "Workers"),
)


def _shell(template: str, page: str, title: str, **context: Any) -> Response:
    return html(template, page=page, title=title, nav=NAV, **context)


def _reader(caller: Principal, what: str, story_id: str | None = None) -> None:
    if not may_read(caller, story_id):
        raise forbidden(caller, f"read {what}")


# --------------------------------------------------------------------------- shells


@router.get("/")
async def board_page(
    text: LooseQuery = None,
    epic: LooseQuery = None,
    stage: LooseQuery = None,
    offset: LooseQuery = None,
    limit: LooseQuery = None,
) -> Response:
    return _shell("board_page.html", "board", "Board", stages=[s.value for s in Stage])


@router.get("/ui/stories/{story_id}")
async def story_page(story_id: StoryIdPath, as_of: LooseQuery = None) -> Response:
    return _shell("story_page.html", "story", f"Story {story_id}", story_id=story_id)


@router.get("/ui/merge-queue")
async def merge_queue_page() -> Response:
    return _shell(
        "list_page.html",
        "merge-queue",
        "Merge queue",
        main_id="merge-queue-page",
        source="/ui/fragments/merge-queue",
    )


@router.get("/ui/runs")
async def runs_page() -> Response:
    return _shell(
        "list_page.html", "runs", "Agent runs", main_id="runs-page", source="/ui/fragments/runs"
    )


@router.get("/ui/epics")
async def epics_page() -> Response:
    return _shell(
        "list_page.html", "epics", "Epics", main_id="epics-page", source="/ui/fragments/epics"
    )


@router.get("/ui/epics/{epic_id}")
async def epic_page(epic_id: EpicIdPath) -> Response:
    return _shell("epic_page.html", "epic", f"Epic {epic_id}", epic_id=epic_id)


@router.get("/ui/metrics")
async def metrics_page() -> Response:
    return _shell(
        "list_page.html",
        "metrics",
        "Metrics",
        main_id="metrics-page",
        source="/ui/fragments/metrics",
    )


@router.get("/ui/workers")
async def workers_page() -> Response:
    return _shell(
        "list_page.html",
        "workers",
        "Workers",
        main_id="workers-page",
        source="/ui/fragments/workers",
    )


# --------------------------------------------------------------------------- board


@router.get("/ui/fragments/board")
async def board_fragment(
    request: Request,
    text: TextQuery = None,
    epic: TextQuery = None,
    stage: Stage | None = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    offset: OffsetQuery = 0,
    caller: Principal = Depends(principal),
) -> Response:
    _reader(caller, "the board")
    state = state_of(request)
    filters = BoardFilter.of(text, epic)

    def build() -> dict[str, Any]:
        holders = worker_data.holders(state.service.app)
        columns, position = board_data.board(
            state.read_models, filters, limit, offset, stage.value if stage else None, holders
        )
        options = board_data.epic_options(epic_summaries(epics_of(state)), columns, filters.epic)
        return {
            "columns": columns,
            "position": position,
            "epic_options": options,
            "quarantined_gates": quarantined_gates(state.service.app),
        }

    context = await run_in_threadpool(build)
    return html("board.html", limit=limit, filters=filters, **context)


@router.get("/ui/fragments/quarantined-gates")
async def quarantined_gates_fragment(
    request: Request, caller: Principal = Depends(principal)
) -> Response:
    """The banner of quarantined gates alone (re-read when the gate registry changes)."""
    _reader(caller, "the gate registry")
    gates = await run_in_threadpool(quarantined_gates, state_of(request).service.app)
    return html("quarantined_gates.html", quarantined_gates=gates)


@router.get("/ui/fragments/epic-options")
async def epic_options_fragment(
    request: Request, epic: TextQuery = None, caller: Principal = Depends(principal)
) -> Response:
    """The board's epic filter choices alone (re-read when an epic event comes)."""
    _reader(caller, "the board")
    epics = epics_of(state_of(request))
    summaries = await run_in_threadpool(epic_summaries, epics)
    options = board_data.epic_options(summaries, [], epic or None)
    return html("epic_options.html", epic_options=options)


@router.get("/ui/fragments/column/{stage}")
async def column_fragment(
    request: Request,
    stage: Stage,
    text: TextQuery = None,
    epic: TextQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    offset: OffsetQuery = 0,
    caller: Principal = Depends(principal),
) -> Response:
    _reader(caller, "the board")
    state = state_of(request)
    read_models = state.read_models
    filters = BoardFilter.of(text, epic)

    def build() -> board_data.Column:
        counts = None if filters.active else board_data.stage_counts(read_models)
        col = board_data.column(read_models, stage.value, filters, limit, offset, counts)
        holders = worker_data.holders(state.service.app)
        board_data.decorate(read_models, col.cards, holders=holders)
        return col

    col = await run_in_threadpool(build)
    return html("column.html", column=col)


@router.get("/ui/fragments/card/{story_id}")
async def card_fragment(
    request: Request,
    story_id: StoryIdPath,
    after: Annotated[
        int | None,
        Query(ge=0, le=2**62, description="Wait until the board has applied this position"),
        Digits,
    ] = None,
    text: TextQuery = None,
    epic: TextQuery = None,
    caller: Principal = Depends(principal),
) -> Response:
    """One card as the board shows it now; 204 when the board's filters exclude it."""
    _reader(caller, "the board")
    validate_story_id(story_id)
    state = state_of(request)
    read_models = state.read_models
    filters = BoardFilter.of(text, epic)

    def build() -> dict[str, Any] | None:
        if after is not None:
            # The event reached the browser as soon as it committed; the projection may
            # not have applied it yet. Bounded: a slow projection shows a slightly old card.
            read_models.wait_for(after, ["board"], min(CARD_WAIT_SECONDS, state.wait_timeout))
        row: dict[str, Any] | None = read_models.board_row(story_id)
        if row is not None:
            holders = worker_data.holders(state.service.app)
            board_data.decorate(read_models, [row], holders=holders)
        return row

    row = await run_in_threadpool(build)
    if row is None:
        raise ApiError(
            404,
            "story_not_found",
            f"story {story_id!r} is not on the board",
            {"story_id": story_id},
        )
    if not filters.matches(row):
        return no_content()
    return html("card.html", card=row)


# --------------------------------------------------------------------------- story


@router.get("/ui/fragments/stories/{story_id}")
async def story_fragment(
    request: Request,
    story_id: StoryIdPath,
    as_of: Annotated[str | None, Query(max_length=64)] = None,
    caller: Principal = Depends(principal),
) -> Response:
    _reader(caller, f"story {story_id!r}", story_id)
    state = state_of(request)
    context = await run_in_threadpool(story_data.story_page, state, story_id, caller, as_of)
    return html("story.html", **context)


@router.get("/ui/fragments/stories/{story_id}/log")
async def agent_log_fragment(
    request: Request,
    story_id: StoryIdPath,
    role: AgentRole | None = None,
    attempt: Annotated[int | None, Query(ge=1, le=2**31), Digits] = None,
    caller: Principal = Depends(principal),
) -> Response:
    _reader(caller, f"story {story_id!r}", story_id)
    if (role is None) != (attempt is None):
        raise ApiError(422, "validation_error", "give both role and attempt, or neither")
    state = state_of(request)

    def build() -> story_data.AgentLog:
        story = state.service.app.get_story(story_id)
        runs = state.read_models.agent_runs(story_id, 1)
        return story_data.agent_log(state, story, runs, role, attempt)

    log = await run_in_threadpool(build)
    return html("agent_log.html", log=log, story_id=story_id)


# --------------------------------------------------------------------------- lists


@router.get("/ui/fragments/merge-queue")
async def merge_queue_fragment(
    request: Request, caller: Principal = Depends(principal)
) -> Response:
    _reader(caller, "the merge queue")
    state = state_of(request)
    app = state.service.app

    def build() -> dict[str, Any]:
        queue = with_merge_trust(app, list(state.read_models.merge_queue()))
        gates = quarantined_gates(app)
        names = {str(gate["gate"]) for gate in gates}
        merging, _ = state.read_models.board(stage=Stage.MERGE.value, limit=BOARD_PAGE)
        stack = merge_stack(app, [str(row["id"]) for row in merging])
        return {
            "queue": queue,
            "stack": stack,
            "quarantined_gates": gates,
            "quarantined_names": names,
        }

    return html("merge_queue.html", **await run_in_threadpool(build))


@router.get("/ui/fragments/runs")
async def runs_fragment(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000), Digits] = 100,
    caller: Principal = Depends(principal),
) -> Response:
    _reader(caller, "agent runs")
    read_models = state_of(request).read_models
    runs = await run_in_threadpool(read_models.agent_runs, None, limit)
    return html("runs.html", runs=runs, limit=limit)


@router.get("/ui/fragments/epics")
async def epics_fragment(request: Request, caller: Principal = Depends(principal)) -> Response:
    _reader(caller, "epics")
    epics = epics_of(state_of(request))
    rows = await run_in_threadpool(epic_summaries, epics)
    return html("epics.html", epics=rows)


@router.get("/ui/fragments/epics/{epic_id}")
async def epic_fragment(
    request: Request,
    epic_id: Annotated[str, Path(max_length=64)],
    caller: Principal = Depends(principal),
) -> Response:
    _reader(caller, f"epic {epic_id!r}", epic_id)
    check_epic_id(epic_id)
    epics = epics_of(state_of(request))
    view, review = await run_in_threadpool(epic_data.epic_page, epics, epic_id)
    return html("epic.html", epic=view, review=review)


@router.get("/ui/fragments/metrics")
async def metrics_fragment(request: Request, caller: Principal = Depends(principal)) -> Response:
    _reader(caller, "metrics")
    read_models = state_of(request).read_models
    context = await run_in_threadpool(charts.metrics_page, read_models)
    return html("metrics.html", **context)


@router.get("/ui/fragments/workers")
async def workers_fragment(request: Request, caller: Principal = Depends(principal)) -> Response:
    _reader(caller, "workers")
    app = state_of(request).service.app
    return html("workers.html", **await run_in_threadpool(worker_data.workers_page, app))


__all__ = ["router"]
