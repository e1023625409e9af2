"""Named transitions: validate a wire event's ``data`` and call the Story's command method.

This is the single dispatch used by the API, the CLI and the runners, so every client drives
the state machine through the same guards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from domain.errors import InvalidCommand, InvalidField, UnknownEvent
from domain.stages import AgentOutcome, AgentRole, MergeFailureKind, Stage
from domain.story import Story, check_reason
from domain.transitions import EVENT_NAMES

MAX_OUTPUT = 2_000_000
"""Gate and merge output is stored whole, up to this many characters (the tail is kept)."""

_NUL_ERROR = "nul_character"


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError(_NUL_ERROR, "contains a NUL character (U+0000)")
    return value


Clean = AfterValidator(_no_nul)
"""Names, paths, branches and ids that a runner or client composes: a NUL is refused.

Text that a process produced and that must be kept whole (gate and merge output, what an
agent reported) is not: it is stored as it came, and the read models replace NUL when they
write (``projections.engine``), so no such value can stop a projection."""

ShortText = Annotated[str, Field(max_length=4096)]
PathText = Annotated[str, Field(max_length=4096), Clean]
"""A path, branch or ref (none can hold a NUL)."""
Label = Annotated[str, Field(min_length=1, max_length=64), Clean]
Count = Annotated[int, Field(ge=0, le=2**62)]
"""Counters from agents and processes: bounded so a hostile value cannot overflow storage."""


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoData(_Data):
    pass


class WorktreeReadyData(_Data):
    path: PathText
    branch: PathText


class SpawnAgentData(_Data):
    role: AgentRole = AgentRole.CODER
    agent: Label
    runtime: Label
    model: Annotated[str, Field(max_length=200), Clean] | None = None
    purpose: Annotated[str, Field(max_length=64), Clean] = "code"
    resume_session_id: Annotated[str, Field(max_length=200)] | None = None
    argv: Annotated[
        list[Annotated[str, Field(max_length=200_000), Clean]], Field(max_length=500)
    ] = []
    log_path: PathText | None = None


class AgentStartedData(_Data):
    role: AgentRole = AgentRole.CODER
    attempt: Annotated[int, Field(ge=1, le=2**31)]
    pid: Annotated[int, Field(ge=1, le=2**31)]


class AgentExitedData(_Data):
    role: AgentRole = AgentRole.CODER
    attempt: Annotated[int, Field(ge=1, le=2**31)]
    outcome: AgentOutcome
    exit_code: Annotated[int, Field(ge=-(2**31), le=2**31)] | None = None
    signal: Annotated[int, Field(ge=0, le=1024)] | None = None
    session_id: Annotated[str, Field(max_length=200)] | None = None
    turns: Count = 0
    tokens_in: Count = 0
    tokens_out: Count = 0
    cost_usd: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)] = 0.0
    log_path: ShortText | None = None
    model: Annotated[str, Field(max_length=200)] | None = None
    result_subtype: Annotated[str, Field(max_length=64)] | None = None
    is_error: bool | None = None
    result_text: Annotated[str, Field(max_length=4096)] | None = None
    stop_reason: Annotated[str, Field(max_length=64)] | None = None
    duration_ms: Count | None = None
    permission_denials: Annotated[list[ShortText], Field(max_length=100)] = []
    model_usage: Annotated[
        dict[
            Annotated[str, Field(max_length=200)],
            dict[
                Annotated[str, Field(max_length=32)],
                Annotated[float, Field(ge=0, le=1e15, allow_inf_nan=False)],
            ],
        ],
        Field(max_length=20),
    ] = {}
    api_error_status: Annotated[int, Field(ge=0, le=999)] | None = None
    api_retries: Count = 0


class UncommittedData(_Data):
    paths: Annotated[list[PathText], Field(max_length=10_000)] = []


class StartGatesData(_Data):
    commits_ahead: Count = 0


CommitSha = Annotated[str, Field(min_length=4, max_length=64, pattern=r"^[0-9a-f]+$")]


class GatesPassedData(_Data):
    feature_branch: PathText
    commits_ahead: Count
    output: str = ""
    review: bool = False
    """Go to review before the merge queue (the story's flag or the project's ``[review]``)."""
    commit: CommitSha | None = None


class SubmitReviewData(_Data):
    attempt: Annotated[int, Field(ge=1, le=2**31)]
    criteria: Annotated[list[Any], Field(max_length=100)]
    """``{criterion, met, score, evidence}`` each; checked by ``domain.review``."""
    summary: Annotated[str, Field(max_length=4000)] = ""
    commit: Annotated[str, Field(min_length=4, max_length=64, pattern=r"^[0-9a-f]+$")] | None = None


class GatesFailedData(_Data):
    output: str


StoryRef = Annotated[str, Field(min_length=1, max_length=200), Clean]


class StartMergeData(_Data):
    base_sha: Annotated[str, Field(max_length=64), Clean] | None = None
    ahead: Annotated[list[StoryRef], Field(max_length=64)] = []
    speculative_base: CommitSha | None = None


class SpeculationUpdatedData(_Data):
    state: Annotated[str, Field(pattern=r"^(waiting|batched|gating|passed|landing)$")]
    commit: CommitSha | None = None
    parent: CommitSha | None = None


class RestartSpeculationData(_Data):
    queued_position: Annotated[int, Field(ge=1, le=2**62)] | None = None
    alone: bool = False


class MergeSucceededData(_Data):
    merge_commit: Annotated[str, Field(min_length=1, max_length=64), Clean]
    base_branch: PathText


class LostHunk(_Data):
    file: PathText
    side: Annotated[str, Field(pattern=r"^(story|base)$")]
    hunk: Annotated[str, Field(max_length=200), Clean]
    lines: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(max_length=200)] = []


class MergeFailedData(_Data):
    kind: MergeFailureKind
    details: str = ""
    conflicts: Annotated[list[PathText], Field(max_length=10_000)] = []
    lost_hunks: Annotated[list[LostHunk], Field(max_length=1_000)] = []


class DeclareDropData(_Data):
    file: PathText
    side: Annotated[str, Field(pattern=r"^(story|base)$")]
    hunk: Annotated[str, Field(min_length=2, max_length=200), Clean]


Phase = Annotated[str, Field(pattern=r"^(gates|merge_gates)$")]
Sha = Annotated[str, Field(min_length=4, max_length=64, pattern=r"^[0-9a-f]+$")]
GateName = Annotated[str, Field(min_length=1, max_length=4096), Clean]


class GateVerdictData(_Data):
    phase: Phase
    gate: GateName
    tree: Sha
    fingerprint: Sha
    passed: bool
    output: Annotated[str, Field(max_length=MAX_OUTPUT)] = ""
    rerun: Annotated[int, Field(ge=0, le=100)] = 0
    ignored: bool = False
    reused_from: Annotated[int, Field(ge=1, le=2**62)] | None = None


class FlakyGateData(_Data):
    phase: Phase
    gate: GateName
    tree: Sha
    fingerprint: Sha
    outputs: Annotated[list[Annotated[str, Field(max_length=MAX_OUTPUT)]], Field(max_length=10)]
    verdicts: Annotated[list[bool], Field(min_length=2, max_length=10)]
    action: Annotated[str, Field(pattern=r"^(retried|quarantined|recorded)$")]


class ProviderBreakerOpenedData(_Data):
    provider: Label
    consecutive_failures: Annotated[int, Field(ge=1, le=10_000)]
    open_until: AwareDatetime
    opened_times: Annotated[int, Field(ge=1, le=10_000)]


WorkerId = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$")
]


class ClaimData(_Data):
    worker: WorkerId
    generation: Annotated[int, Field(ge=1, le=2**62)]
    drop_sessions: bool = False


class ProviderBreakerClosedData(_Data):
    provider: Label


@dataclass(frozen=True)
class Policy:
    """The configuration values that guards need (from ``storyline.toml``)."""

    max_retries: int = 3
    min_score: float = 0.8
    """``[review] min_score``: the score a review verdict needs (with every criterion met)."""


def _tail(text: str) -> str:
    return text if len(text) <= MAX_OUTPUT else text[-MAX_OUTPUT:]


# What a handler returns (a spawn's attempt number, say) is not the dispatcher's business.
Handler = Callable[[Story, str, str | None, Any, Policy, Mapping[str, Stage | None]], object]


def _spec(model: type[_Data], handler: Handler) -> tuple[type[_Data], Handler]:
    return model, handler


COMMANDS: dict[str, tuple[type[_Data], Handler]] = {
    "start_coding": _spec(
        NoData,
        lambda s, a, r, d, p, deps: s.start_coding(actor=a, reason=r, dependency_stages=deps),
    ),
    "worktree_ready": _spec(
        WorktreeReadyData,
        lambda s, a, r, d, p, deps: s.worktree_ready(actor=a, path=d.path, branch=d.branch),
    ),
    "spawn_agent": _spec(
        SpawnAgentData,
        lambda s, a, r, d, p, deps: s.request_agent_spawn(actor=a, reason=r, **d.model_dump()),
    ),
    "agent_started": _spec(
        AgentStartedData,
        lambda s, a, r, d, p, deps: s.agent_started(actor=a, **d.model_dump()),
    ),
    "agent_exited": _spec(
        AgentExitedData,
        lambda s, a, r, d, p, deps: s.agent_exited(actor=a, reason=r, **d.model_dump()),
    ),
    "uncommitted_changes_found": _spec(
        UncommittedData,
        lambda s, a, r, d, p, deps: s.uncommitted_changes_found(actor=a, paths=d.paths),
    ),
    "start_gates": _spec(
        StartGatesData,
        lambda s, a, r, d, p, deps: s.start_gates(actor=a, reason=r, commits_ahead=d.commits_ahead),
    ),
    "gates_passed": _spec(
        GatesPassedData,
        lambda s, a, r, d, p, deps: s.pass_gates(
            actor=a,
            feature_branch=d.feature_branch,
            commits_ahead=d.commits_ahead,
            output=_tail(d.output),
            review=d.review,
            commit=d.commit,
        ),
    ),
    "gates_failed": _spec(
        GatesFailedData,
        lambda s, a, r, d, p, deps: s.fail_gates(
            actor=a, output=_tail(d.output), max_retries=p.max_retries
        ),
    ),
    "submit_review": _spec(
        SubmitReviewData,
        lambda s, a, r, d, p, deps: s.submit_review(
            actor=a,
            attempt=d.attempt,
            verdict={"criteria": d.criteria, "summary": d.summary},
            commit=d.commit,
        ),
    ),
    "conclude_review": _spec(
        NoData,
        lambda s, a, r, d, p, deps: s.conclude_review(
            actor=a, min_score=p.min_score, max_retries=p.max_retries
        ),
    ),
    "start_merge": _spec(
        StartMergeData,
        lambda s, a, r, d, p, deps: s.start_merge(
            actor=a,
            reason=r,
            base_sha=d.base_sha,
            ahead=list(d.ahead),
            speculative_base=d.speculative_base,
        ),
    ),
    "restart_speculation": _spec(
        RestartSpeculationData,
        lambda s, a, r, d, p, deps: s.restart_speculation(
            actor=a, reason=r, queued_position=d.queued_position, alone=d.alone
        ),
    ),
    "update_speculation": _spec(
        SpeculationUpdatedData,
        lambda s, a, r, d, p, deps: s.update_speculation(
            actor=a, reason=r, state=d.state, commit=d.commit, parent=d.parent
        ),
    ),
    "merge_succeeded": _spec(
        MergeSucceededData,
        lambda s, a, r, d, p, deps: s.succeed_merge(
            actor=a, merge_commit=d.merge_commit, base_branch=d.base_branch
        ),
    ),
    "merge_failed": _spec(
        MergeFailedData,
        lambda s, a, r, d, p, deps: s.fail_merge(
            actor=a,
            reason=r,
            kind=d.kind,
            details=_tail(d.details),
            conflicts=d.conflicts,
            lost_hunks=[h.model_dump() for h in d.lost_hunks],
        ),
    ),
    "request_fixup": _spec(NoData, lambda s, a, r, d, p, deps: s.request_fixup(actor=a, reason=r)),
    "requeue_merge": _spec(NoData, lambda s, a, r, d, p, deps: s.requeue_merge(actor=a, reason=r)),
    "merge_resolved": _spec(
        NoData, lambda s, a, r, d, p, deps: s.requeue_merge(actor=a, reason=r, resolved=True)
    ),
    "merge_gave_up": _spec(
        NoData, lambda s, a, r, d, p, deps: s.mergemaster_gave_up(actor=a, reason=r)
    ),
    "block": _spec(NoData, lambda s, a, r, d, p, deps: s.block(actor=a, reason=r)),
    "unblock": _spec(NoData, lambda s, a, r, d, p, deps: s.unblock(actor=a, reason=r)),
    "demote": _spec(NoData, lambda s, a, r, d, p, deps: s.demote(actor=a, reason=r)),
    "archive": _spec(NoData, lambda s, a, r, d, p, deps: s.archive(actor=a, reason=r)),
    "add_note": _spec(NoData, lambda s, a, r, d, p, deps: s.add_note(actor=a, text=r)),
    "claim": _spec(
        ClaimData,
        lambda s, a, r, d, p, deps: s.claim(
            actor=a,
            reason=r,
            worker=d.worker,
            generation=d.generation,
            drop_sessions=d.drop_sessions,
        ),
    ),
    "provider_breaker_opened": _spec(
        ProviderBreakerOpenedData,
        lambda s, a, r, d, p, deps: s.provider_breaker_opened(
            actor=a,
            reason=r,
            provider=d.provider,
            consecutive_failures=d.consecutive_failures,
            open_until=d.open_until,
            opened_times=d.opened_times,
        ),
    ),
    "provider_breaker_closed": _spec(
        ProviderBreakerClosedData,
        lambda s, a, r, d, p, deps: s.provider_breaker_closed(
            actor=a, reason=r, provider=d.provider
        ),
    ),
    "declare_dropped_hunk": _spec(
        DeclareDropData,
        lambda s, a, r, d, p, deps: s.declare_dropped_hunk(
            actor=a, reason=r, file=d.file, side=d.side, hunk=d.hunk
        ),
    ),
    "record_gate_verdict": _spec(
        GateVerdictData,
        lambda s, a, r, d, p, deps: s.record_gate_verdict(
            actor=a, reason=r, **{**d.model_dump(), "output": _tail(d.output)}
        ),
    ),
    "flaky_gate_detected": _spec(
        FlakyGateData,
        lambda s, a, r, d, p, deps: s.flaky_gate_detected(
            actor=a, reason=r, **{**d.model_dump(), "outputs": [_tail(o) for o in d.outputs]}
        ),
    ),
}

assert set(COMMANDS) == set(EVENT_NAMES), "every transition needs a command handler"


def parse_data(event: str, data: Mapping[str, Any] | None) -> _Data:
    """Validate ``data`` for ``event``; raise a DomainError that names the bad field."""
    if event not in COMMANDS:
        raise UnknownEvent(event, EVENT_NAMES)
    model, _ = COMMANDS[event]
    try:
        return model.model_validate(dict(data or {}))
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] == _NUL_ERROR:
                where = ("data", *err["loc"])
                field = ".".join(str(p) for p in where)
                raise InvalidField(where, f"{field} {err['msg']}") from None
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'data'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidCommand(f"invalid data for event {event!r}: {problems}") from None


def apply_named(
    story: Story,
    event: str,
    *,
    actor: str,
    reason: str | None,
    data: Mapping[str, Any] | None,
    policy: Policy,
    dependency_stages: Mapping[str, Stage | None] | None = None,
) -> None:
    """Run the named transition on ``story`` (pending events are left on the story)."""
    parsed = parse_data(event, data)
    check_reason(reason)
    _, handler = COMMANDS[event]
    handler(story, actor, reason, parsed, policy, dependency_stages or {})
