"""Request and response models of the HTTP API (they are also the OpenAPI schema).

Requests forbid unknown keys so a typo is a 422 naming the key, never a silently ignored
field. Limits here are the outer ones (sizes, types); the domain re-checks every value
(control characters, id alphabet, ...) and its refusals come back as 422 as well.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from domain.ids import STORY_ID_MAX, STORY_ID_PATTERN
from domain.stages import Stage

# The domain's text rules as JSON Schema patterns, so that generated clients and fuzzers
# know what the server accepts. They only document: the domain checks every value itself
# and names the field in its 422 (invalid_story_id, invalid_command), so the patterns are
# kept equal to those checks by tests (tests/unit/test_schema_patterns.py), not enforced
# twice. Written for every engine (ECMA, Rust, Python): no look-arounds; "blank" is what
# str.strip() removes.
_SPACE = "\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
LINE_PATTERN = "^[^\\x00-\\x1f\\x7f]*$"
"""One line of text: no control characters."""
TEXT_PATTERN = "^[^\\x00-\\x08\\x0b-\\x1f\\x7f]*$"
"""Text: no control characters except newline and tab."""
NAME_PATTERN = f"^[{_SPACE}]*[^\\x00-\\x1f\\x7f{_SPACE}][^\\x00-\\x1f\\x7f]*$"
"""One line with something on it besides white space."""
CRITERION_PATTERN = f"^[\\t\\n{_SPACE}]*[^\\x00-\\x1f\\x7f{_SPACE}][^\\x00-\\x08\\x0b-\\x1f\\x7f]*$"
"""Text with something in it besides white space."""


def _documented(pattern: str, max_length: int | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"pattern": pattern}
    if max_length is not None:
        extra["maxLength"] = max_length
    return extra


StoryIdText = Annotated[
    str,
    Field(min_length=1, max_length=STORY_ID_MAX, json_schema_extra=_documented(STORY_ID_PATTERN)),
]
Text = Annotated[str, Field(max_length=20_000, json_schema_extra=_documented(TEXT_PATTERN))]
PRIORITY_BOUND = 1_000_000
"""Priorities lie in [-bound, bound] (the domain's rule; the board column is 32-bit)."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateStoryRequest(_Request):
    name: Annotated[
        str, Field(min_length=1, max_length=200, json_schema_extra=_documented(NAME_PATTERN))
    ]
    description: Text = ""
    acceptance_criteria: Annotated[
        list[
            Annotated[
                str,
                Field(
                    max_length=20_000,
                    json_schema_extra=_documented(CRITERION_PATTERN),
                ),
            ]
        ],
        Field(min_length=1, max_length=100),
    ]
    depends_on: Annotated[
        list[StoryIdText],
        Field(
            max_length=100,
            description="Ids of existing stories, each at most once.",
            json_schema_extra={"uniqueItems": True},
        ),
    ] = []
    epic: (
        Annotated[str, Field(max_length=200, json_schema_extra=_documented(LINE_PATTERN))] | None
    ) = None
    priority: Annotated[int, Field(ge=-PRIORITY_BOUND, le=PRIORITY_BOUND)] = 0
    id: StoryIdText | None = Field(
        default=None, description="Story id; the next free number when omitted."
    )
    reason: Annotated[str, Field(max_length=10_000)] | None = None
    # Strict: "yes" or 1 is a 422, not a silent True.
    review: StrictBool | None = Field(
        default=None,
        description="Review the story against its acceptance criteria after its gates pass: "
        "true, false, or null for the project's ``[review] enabled``.",
    )


class TransitionRequest(_Request):
    event: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="Wire name of the transition, e.g. start_coding, block, merge_resolved."
    )
    expected_version: Annotated[int, Field(ge=0, le=2**53)] | None = Field(
        default=None,
        description="The story version the caller last saw; a different current version "
        "is a 409 version_conflict and nothing changes.",
    )
    reason: Annotated[str, Field(max_length=10_000)] | None = None
    data: dict[str, Any] = Field(
        default_factory=dict, description="Event-specific fields (see the event's data model)."
    )

    @field_validator("data")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_json(value, depth=0)
        return value


_INT64 = 2**63 - 1
MAX_DATA_DEPTH = 32


def _check_json(value: Any, depth: int) -> None:
    """Refuse what the event store cannot encode (numbers beyond 64 bits, NaN, infinities)
    and pathological nesting, so such input is a 422 instead of a failure at save time."""
    if depth > MAX_DATA_DEPTH:
        raise ValueError(f"data is nested deeper than {MAX_DATA_DEPTH} levels")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if not -_INT64 - 1 <= value <= _INT64:
            raise ValueError("integers in data must fit in 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("numbers in data must be finite")
    elif isinstance(value, dict):
        for item in value.values():
            _check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class LostHunkOut(BaseModel):
    """A hunk a conflict resolution dropped without declaring it (``hunks_lost``)."""

    file: str
    side: str = Field(
        description="``story`` (the story's branch) or ``base`` (what the base gained)."
    )
    hunk: str = Field(description="The ``git diff -U0`` hunk header the lines came from.")
    lines: list[str] = Field(default_factory=list, description="The lines missing from the result.")


class DeclaredDropOut(BaseModel):
    """A hunk a mergemaster declared dropped on purpose (``declare_dropped_hunk``)."""

    file: str
    side: str = Field(
        description="``story`` (the story's branch) or ``base`` (what the base gained)."
    )
    hunk: str = Field(description="The hunk header the check reports, e.g. ``@@ -12,0 +13,4 @@``.")
    reason: str | None


class JudgementOut(BaseModel):
    """One acceptance criterion as an evaluator judged it."""

    criterion: int = Field(description="The criterion's index in acceptance_criteria, from 0.")
    text: str = Field(description="The criterion as it read when it was judged.")
    met: bool
    score: float = Field(ge=0, le=1)
    evidence: str = Field(description="A file and line, a test name, or a command's output.")


class ReviewOut(BaseModel):
    """An evaluator's verdict on a story's branch (``submit_review``) and how it concluded."""

    attempt: int = Field(description="The evaluator attempt that gave the verdict.")
    score: float = Field(description="The mean of the criteria's scores.")
    all_met: bool
    passed: bool | None = Field(
        default=None, description="None until the review is concluded (``conclude_review``)."
    )
    min_score: float | None = Field(
        default=None, description="The threshold the verdict was concluded against."
    )
    criteria: list[JudgementOut]
    summary: str = ""
    commit: str | None = Field(default=None, description="The branch head the evaluator saw.")
    at: datetime


class ReviewFailureOut(BaseModel):
    """Why the last review sent the story back (or blocked it): what the coder must fix."""

    attempt: int
    score: float
    min_score: float
    gaps: list[JudgementOut] = Field(
        description="The unmet criteria with the evaluator's evidence (or, every criterion "
        "met but the score short, the lowest-scored ones)."
    )
    summary: str = ""


class StoryReviewsOut(BaseModel):
    story_id: str
    stage: Stage
    review: bool | None = Field(description="The story's own review flag (None: the project's).")
    reviews: list[ReviewOut] = Field(description="Every verdict, oldest first.")
    pending_review: int | None = Field(
        description="The attempt whose verdict is submitted but not yet concluded."
    )
    last_review_failure: ReviewFailureOut | None


def story_reviews(snapshot: dict[str, Any]) -> dict[str, Any]:
    """``StoryReviewsOut`` from a story's snapshot (the API and the CLI's local store)."""
    return {
        "story_id": snapshot["id"],
        "stage": snapshot["stage"],
        "review": snapshot.get("review"),
        "reviews": list(snapshot.get("reviews") or []),
        "pending_review": snapshot.get("pending_review"),
        "last_review_failure": snapshot.get("last_review_failure"),
    }


class StoryOut(BaseModel):
    """The full state of a story (``Story.snapshot()``) and the log position it reflects."""

    id: str
    version: int
    stage: Stage
    name: str
    description: str
    acceptance_criteria: list[str]
    depends_on: list[str]
    epic: str | None
    priority: int
    review: bool | None = Field(
        default=None, description="Review after the gates: as asked, or None for the project's."
    )
    retry_count: int
    failed_runs: int = 0
    abort_respawns: int
    mergemaster_spawns: int
    fixup_pending: bool
    final: bool
    tokens_in: int
    tokens_out: int
    cost_usd: float
    coder_attempts: int
    mergemaster_attempts: int
    evaluator_attempts: int = 0
    evaluator_failed_runs: int = Field(
        default=0, description="Evaluator runs in this review that ended without a verdict."
    )
    reviews: list[ReviewOut] = Field(
        default_factory=list, description="Every verdict, oldest first."
    )
    pending_review: int | None = Field(
        default=None, description="The attempt whose verdict awaits its conclusion."
    )
    last_review_failure: ReviewFailureOut | None = None
    running_agent: dict[str, Any] | None
    last_coder_outcome: str | None
    sessions: dict[str, str]
    worktree_path: str | None
    feature_branch: str | None
    commits_ahead: int
    gated_commit: str | None = Field(
        default=None, description="The commit the story's gates last passed on (``GatesPassed``)."
    )
    holder: str | None = Field(
        default=None,
        description="Scale-out: the worker runner whose claim (``WorkerClaimed``) the log "
        "records last; its lease may have expired since (``GET /workers`` lists live leases).",
    )
    holder_generation: int = Field(
        default=0, description="The lease generation of that claim (0: never claimed)."
    )
    merging: bool
    speculation: dict[str, Any] | None = Field(
        default=None,
        description="The speculative merge queue's build of this story while it merges: "
        "``state``, ``base_sha``, ``ahead`` (stacked below it when it started), ``parent`` "
        "(the commit it is squashed onto) and ``commit``; null outside the stack.",
    )
    in_merge_queue: bool
    resolved_pending: bool
    merge_commit: str | None
    merge_failure_kind: str | None
    merge_failure_details: str | None
    conflicts: list[str]
    lost_hunks: list[LostHunkOut] = Field(
        default_factory=list,
        description="What the last resolution checked dropped without declaring it (merge "
        "failure kind ``hunks_lost``).",
    )
    declared_drops: list[DeclaredDropOut] = Field(
        default_factory=list, description="Hunks declared dropped on purpose, with the reasons."
    )
    flaky_gates: list[str] = Field(
        default_factory=list,
        description="Gates that gave this story different verdicts on the same tree.",
    )
    blocked_from: str | None
    blocked_reason: str | None
    last_gate_output: str | None
    last_event: str
    created_on: datetime
    modified_on: datetime
    legal_events: list[str]
    position: int | None = Field(
        default=None,
        description="Global log position of the event this command committed (commands only).",
    )
    as_of: str | None = Field(
        default=None, description="The ?as_of= value this past state was computed for."
    )


class LoggedEventOut(BaseModel):
    position: int
    story_id: str
    version: int
    type: str
    timestamp: datetime
    actor: str
    reason: str | None
    from_stage: str | None
    to_stage: str | None
    data: dict[str, Any]
    aggregate: Literal["story", "epic", "project"] = "story"
    """Epics share the log with stories; ``story_id`` holds the epic's id for its events."""


class HistoryOut(BaseModel):
    story_id: str
    events: list[LoggedEventOut]


class EventsPage(BaseModel):
    events: list[LoggedEventOut]
    next_after: int = Field(description="Pass as ?after= to get the next page.")
    head: int = Field(description="The highest log position when the page was read.")


class StoryList(BaseModel):
    stories: list[dict[str, Any]]
    next_cursor: str | None


class BoardOut(BaseModel):
    stages: dict[str, list[dict[str, Any]]] = Field(
        description="Board rows per stage, every stage present (possibly empty)."
    )


class MergeQueueOut(BaseModel):
    queue: list[dict[str, Any]] = Field(
        description="Queued stories, next first. Besides the merge-queue projection's fields "
        "each row has ``declared_drops`` (with reasons), ``lost_hunks`` (``{file, side, "
        "hunk}`` the last resolution was sent back for) and ``flaky_gates`` (gate names)."
    )
    stack: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The speculative merge stack (``max_merge_slots`` > 1), head first: each "
        "build's ``state`` (building, waiting, batched, gating, passed, landing), its "
        "speculative base (``base_sha`` plus ``ahead``, the stories below it not landed "
        "yet; ``parent`` is the commit it is squashed onto) and its ``commit``.",
    )
    quarantined_gates: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Gates quarantined as flaky now, as ``GET /gates/flaky`` lists them "
        "(``gate``, ``phase``, ``since``, ``reason``, ``story_id``, ``actor``): their "
        "failures do not block a merge until a person clears them.",
    )


class AgentRunsOut(BaseModel):
    runs: list[dict[str, Any]]


class DatabaseHealth(BaseModel):
    kind: str
    location: str
    ok: bool
    head: int | None
    error: str | None = None


class WorkerOut(BaseModel):
    """A worker runner in the registry (scale-out), as its last heartbeat left it."""

    worker_id: str
    host: str
    pid: int
    role: str = Field(description="``worker``, ``merger`` or ``all``.")
    capacity: int = Field(description="Stories it codes at once (its ``max_coders``).")
    remote: str | None = Field(description="The git remote it clones and pushes to.")
    held: int = Field(description="Stories it held at its last heartbeat.")
    merger: bool = Field(description="Whether it holds the merger lease.")
    ttl_secs: float = Field(description="Its lease time: silent longer than this, it is stale.")
    heartbeat_age_secs: float = Field(
        description="Seconds since its last heartbeat, by the database's clock."
    )
    alive: bool = Field(description="Not stopped, and heard from within ``ttl_secs``.")
    stopped: bool = Field(description="It shut down cleanly (and released its leases).")


class LeaseOut(BaseModel):
    """A live story lease: which worker may record the story's steps now."""

    story_id: str
    holder: str
    generation: int = Field(description="The lease generation, recorded in the story's log.")
    expires_in_secs: float = Field(description="Seconds left unless the holder renews it.")


class WorkersOut(BaseModel):
    """Worker runners and live story leases (both empty on a single machine)."""

    workers: list[WorkerOut] = Field(
        description="Workers heard from within the last day, by id (stopped ones included)."
    )
    leases: list[LeaseOut] = Field(description="Live story leases, by story id.")
    alive: int = Field(description="Workers alive now.")
    stale: int = Field(
        default=0,
        description="Workers not stopped but silent for longer than their lease time: their "
        "stories are taken over by others once their leases expire.",
    )
    capacity: int = Field(description="Total capacity of the alive workers.")
    held: int = Field(description="Stories held by the alive workers, in all.")


WorkerList = list[WorkerOut]
"""(A name of its own: the health body's field is called ``list``.)"""


class WorkersHealth(BaseModel):
    alive: int
    stale: int
    list: WorkerList = Field(description="As ``GET /workers`` lists them.")
    note: str | None = Field(
        default=None,
        description="Why stale workers do not make the status degraded, when there are any.",
    )
    error: str | None = Field(
        default=None, description="The failure type when the registry could not be read."
    )


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    database: DatabaseHealth
    projections: list[dict[str, Any]]
    runners: list[dict[str, Any]]
    breakers: list[dict[str, Any]] = []
    """Provider circuit breakers of the runners: provider, state (closed, open,
    half_open), open_until, failures."""
    workers: WorkersHealth | None = None
    """Worker runners (scale-out): alive, stale, and the list; none on a single machine."""
    caught_up: bool


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid bearer token."},
    403: {"model": ErrorResponse, "description": "The token's role does not allow this."},
    413: {"model": ErrorResponse, "description": "Request body larger than the limit."},
    422: {"model": ErrorResponse, "description": "Malformed request."},
}
"""Failures any endpoint may answer (others are listed per endpoint)."""


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        404: "No such story.",
        409: "Illegal transition, stale expected_version, existing story, or a key in use.",
        503: "The database is unreachable.",
    }
    extra: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": descriptions.get(code, "Error.")}
        for code in codes
    }
    return {**ERROR_RESPONSES, **extra}
