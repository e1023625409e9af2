"""What a runtime needs to start one agent attempt, and what it reports back.

Everything here is plain data: the coder/mergemaster runners assemble a :class:`SpawnSpec`
from the story's events and the config, hand it to a runtime, and record the
:class:`AgentResult` as an event. Runtimes never read the event store themselves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from domain.config import AgentConfig, FixupCaps
from domain.ids import validate_story_id

AgentRole = Literal["coder", "mergemaster", "planner", "evaluator"]
Outcome = Literal[
    "completed",
    "aborted_before_session",
    "timed_out",
    "inactive",
    "failed",
    "permission_denied",
    "max_turns",
    "max_budget",
    "provider_unavailable",
]
OUTCOMES: tuple[Outcome, ...] = (
    "completed",
    "aborted_before_session",
    "timed_out",
    "inactive",
    "failed",
    "permission_denied",
    "max_turns",
    "max_budget",
    "provider_unavailable",
)

# Environment variable names whose values must never reach argv, logs or reprs. Matching
# is on the name because values are opaque; the agent-scoped STORYLINE_TOKEN is the one
# every spawn carries.
_SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|PRIVATE_KEY|CREDENTIAL|DATABASE_URL)",
    re.IGNORECASE,
)


def is_secret_name(name: str) -> bool:
    """True for environment variable names that conventionally hold secrets."""
    return bool(_SECRET_NAME.search(name))


class AgentStartError(RuntimeError):
    """The agent could not be started at all (missing executable, missing API key, ...).

    Distinct from an agent that started and then failed: nothing ran, so there is no
    session, no pid and no usage to record.
    """


@dataclass(frozen=True)
class StoryText:
    """The parts of a story that go into the prompt."""

    name: str
    description: str = ""
    acceptance_criteria: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A list passed by a caller would make the frozen spec silently mutable.
        object.__setattr__(self, "acceptance_criteria", tuple(self.acceptance_criteria))


@dataclass(frozen=True)
class ReviewGap:
    """One criterion a review found unmet (or scored lowest), as the coder is told it."""

    criterion: int
    text: str
    score: float
    evidence: str


@dataclass(frozen=True)
class ReviewFailure:
    """The review verdict that sent a story back to coding (``story.last_review_failure``)."""

    attempt: int
    score: float
    min_score: float
    gaps: tuple[ReviewGap, ...]
    summary: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "gaps", tuple(self.gaps))

    @classmethod
    def from_story(cls, failure: Mapping[str, Any]) -> ReviewFailure:
        return cls(
            attempt=int(failure.get("attempt", 0)),
            score=float(failure.get("score", 0.0)),
            min_score=float(failure.get("min_score", 0.0)),
            gaps=tuple(
                ReviewGap(
                    criterion=int(g.get("criterion", 0)),
                    text=str(g.get("text", "")),
                    score=float(g.get("score", 0.0)),
                    evidence=str(g.get("evidence", "")),
                )
                for g in failure.get("gaps") or []
            ),
            summary=str(failure.get("summary") or ""),
        )


@dataclass(frozen=True)
class SpawnSpec:
    """One agent attempt, fully resolved. Building it does no I/O."""

    story_id: str
    attempt: int
    role: AgentRole
    agent: AgentConfig
    cwd: Path
    base_branch: str
    story: StoryText
    log_path: Path
    inactivity_timeout_secs: float
    epic_context: str | None = None
    project_prompt: str | None = None
    gate_failure: str | None = None
    """Whole output of the previous gate run; set only when ``retry_count > 0``."""
    fixup_pending: bool = False
    fixup_caps: FixupCaps = field(default_factory=FixupCaps)
    resume_session_id: str | None = None
    conflict_details: str | None = None
    # repr=False: the env carries STORYLINE_TOKEN, and specs end up in log messages.
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    overall_timeout_secs: float | None = None
    """``max_run_secs``: a wall-clock cap on the run, whatever it prints."""
    secret_names: frozenset[str] = frozenset()
    """Names in ``env`` that hold declared secrets, whatever the names look like."""
    purpose: str = "code"
    """Why this attempt runs (``code``, ``retry``, ``commit_leftovers``, ...): picks the prompt."""
    uncommitted_paths: tuple[str, ...] = ()
    """For ``commit_leftovers``: the files the previous run left uncommitted."""
    conflicts: tuple[str, ...] = ()
    """For a mergemaster: the conflicted files in the merge workspace."""
    gate_commands: tuple[tuple[str, ...], ...] = ()
    """The project's gate commands (argv), which the agent may run under its allowlist."""
    mcp_config: Path | None = None
    """The attempt's ``storyline mcp`` registration (``runners.agents.mcp_config``)."""
    review_failure: ReviewFailure | None = None
    """For a coder sent back by review: the verdict's unmet criteria and evidence."""
    review_diff: str | None = None
    """For an evaluator: the branch's diff against its target (already cut to size)."""
    review_commit: str | None = None
    """For an evaluator: the commit it judges (the feature branch's head at the spawn)."""

    def __post_init__(self) -> None:
        validate_story_id(self.story_id)
        if self.attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {self.attempt}")
        if self.role not in ("coder", "mergemaster", "planner", "evaluator"):
            raise ValueError(
                f"role must be 'coder', 'mergemaster', 'planner' or 'evaluator', got {self.role!r}"
            )
        for name, value in (
            ("inactivity_timeout_secs", self.inactivity_timeout_secs),
            ("overall_timeout_secs", self.overall_timeout_secs),
        ):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        object.__setattr__(self, "cwd", Path(self.cwd))
        object.__setattr__(self, "log_path", Path(self.log_path))
        # Copy so a caller mutating its dict after the fact cannot change a started run.
        object.__setattr__(self, "env", dict(self.env))
        object.__setattr__(self, "secret_names", frozenset(self.secret_names))
        object.__setattr__(self, "uncommitted_paths", tuple(self.uncommitted_paths))
        object.__setattr__(self, "conflicts", tuple(self.conflicts))
        object.__setattr__(self, "gate_commands", tuple(tuple(argv) for argv in self.gate_commands))
        for env_key, env_value in self.env.items():
            if not isinstance(env_key, str) or not isinstance(env_value, str):
                raise ValueError("env keys and values must be strings")

    def secret_values(self) -> list[str]:
        """Values of secret-looking entries of ``env`` (used to keep them out of argv/logs)."""
        return [
            v
            for k, v in self.env.items()
            if (k in self.secret_names and v) or (is_secret_name(k) and len(v) >= 8)
        ]


@dataclass(frozen=True)
class AgentResult:
    """How one attempt ended. Maps one-to-one onto the AgentExited event."""

    outcome: Outcome
    exit_code: int | None
    """Process exit status; None when killed by a signal or for in-process runtimes."""
    signal: int | None
    session_id: str | None
    turns: int | None
    tokens_in: int
    tokens_out: int
    cost_usd: float | None
    result_subtype: str | None
    log_path: Path
    duration_secs: float
    error: str | None = None
    """Human-readable reason when the outcome is not ``completed``."""
    killed_on_request: bool = False
    """True when :meth:`RunningAgent.kill` ended the run (demote, block, shutdown)."""
    model: str | None = None
    """The model the agent reported using (Claude Code: ``system/init``)."""
    is_error: bool | None = None
    result_text: str | None = None
    stop_reason: str | None = None
    duration_ms: int | None = None
    permission_denials: tuple[str, ...] = ()
    """Refused tool calls, ``Tool: input`` each, truncated."""
    model_usage: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    api_error_status: int | None = None
    api_retries: int = 0


@runtime_checkable
class RunningAgent(Protocol):
    """A started attempt. Thread-safe: the runner may wait in one thread and kill from another."""

    @property
    def pid(self) -> int | None:
        """OS process id (also its process group id); None for in-process runtimes."""
        ...

    @property
    def session_id(self) -> str | None:
        """The session id as soon as the agent announced it, before the run ends."""
        ...

    def poll(self) -> AgentResult | None:
        """The result if the attempt has ended, else None. Never blocks."""
        ...

    def wait(self, timeout: float | None = None) -> AgentResult:
        """Block until the attempt ended; raise TimeoutError if ``timeout`` passes first."""
        ...

    def kill(self) -> None:
        """Stop the attempt (the whole process group); ``wait`` then returns its result."""
        ...


class AgentRuntime(Protocol):
    def start(self, spec: SpawnSpec) -> RunningAgent:
        """Start an attempt; raise :class:`AgentStartError` when nothing could be started."""
        ...
