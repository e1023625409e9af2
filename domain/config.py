"""Configuration models for a project's ``storyline.toml``.

Pure pydantic: parsing the TOML file (I/O) lives in ``service.config_file``. Every model
forbids unknown keys so that a typo is an error naming the key instead of a silently
ignored setting.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from domain.ids import validate_branch_name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Command = list[str]
"""One command as an argv list. Strings in the TOML file are split with shlex, never run
through a shell."""


def _to_argv(value: object) -> object:
    if isinstance(value, str):
        argv = shlex.split(value)
        if not argv:
            raise ValueError("a command must not be empty")
        return argv
    return value


def _commands(value: object) -> object:
    if isinstance(value, list):
        return [_to_argv(item) for item in value]
    return value


class GatesConfig(_Strict):
    """Quality gates run by the server in a story's worktree after a completed agent run."""

    commands: list[Command] = Field(default_factory=list)
    timeout_secs: Annotated[float, Field(gt=0, le=24 * 3600)] = 600.0
    flaky: Literal["off", "retry", "quarantine"] = "off"
    """What a gate that gives different verdicts on the same tree gets: ``off`` records it;
    ``retry`` reruns a failed gate up to ``flaky_retries`` times first (a pass on a rerun
    counts, recorded as flaky); ``quarantine`` also lets a gate found flaky stop blocking
    until a person clears it (``storyline gates clear``)."""
    flaky_retries: Annotated[int, Field(ge=1, le=10)] = 2
    nondeterministic: list[str] = Field(default_factory=list)
    """Gate commands (as written, joined) whose verdicts are never compared: their
    different verdicts on one tree are expected, never called flaky (nor reused)."""
    reuse_verdicts: bool | None = None
    """Reuse a recorded pass of the same command on the same tree (same environment)
    instead of running it again (recorded as a verdict naming the pass it reuses);
    ``nondeterministic`` gates never are. None: on with the speculative merge queue
    (``max_merge_slots`` > 1 or ``[merge_queue] batch`` > 1), off otherwise, where a
    rerun on the same tree is how ``flaky`` finds flaky gates."""

    @field_validator("commands", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return _commands(value)

    @field_validator("commands")
    @classmethod
    def _non_empty(cls, value: list[Command]) -> list[Command]:
        for argv in value:
            if not argv or not argv[0]:
                raise ValueError("a gate command must not be empty")
        return value


class MergeGatesConfig(GatesConfig):
    """Gates run in the merge workspace on the squashed result, before the base moves."""

    fixup_patterns: list[str] = Field(
        default_factory=lambda: [
            "would reformat",
            "Would reformat",
            "files would be reformatted",
            "Found \\d+ errors?",
            "\\[\\*\\] \\d+ fixable",
        ]
    )
    """Regular expressions: a merge-gate output matching one is a self-evident failure
    (formatter diff, lint finding) and sends the story back to coding as a fixup."""

    @field_validator("fixup_patterns")
    @classmethod
    def _compile(cls, value: list[str]) -> list[str]:
        import re

        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
        return value


class MergeQueueConfig(_Strict):
    """The speculative merge queue (with ``max_merge_slots`` > 1)."""

    batch: Annotated[int, Field(ge=1, le=16)] = 1
    """Stories landed together on one merge-gate run (on the top of the batch). A batch
    whose gate fails is split: each of its stories is then gated on its own (in the
    stack, in parallel), which finds the culprit. 1: every story is gated alone."""


class EpicConfig(_Strict):
    """``[epic]``: how epics are planned, verified as a whole and recovered."""

    union_gates: GatesConfig = Field(default_factory=GatesConfig)
    """Run on the integration branch once every story of a round is done (the goal check).
    Without commands the union passes as soon as its stories merged."""
    max_plan_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    """Rejected plans plus planner runs without a plan; then the goal runs as one session."""
    recover_via_single_session: bool = False
    """After a union failure that blame cannot localise (or a failed regional replan), re-run
    the whole goal as one session. Off by default, as in the seed: a whole extra session."""
    max_blame_probes: Annotated[int, Field(ge=0, le=50)] = 12
    """Leave-one-out probes at most per union failure (one per story of the round)."""
    max_interviews: Annotated[int, Field(ge=0, le=10)] = 2
    """Rounds of clarifying questions a planner may ask before it must submit a plan."""


class ReviewConfig(_Strict):
    """``[review]``: an evaluator judges work against its acceptance criteria.

    For a story: after its gates pass and before the merge queue. For an epic: after its
    union gates pass and before it lands, with evolutions (follow-up stories) while the
    score is under ``min_score``. A story's or an epic's own ``review`` flag wins over
    ``enabled``."""

    enabled: bool = False
    min_score: Annotated[float, Field(ge=0.0, le=1.0)] = 0.8
    """The score a verdict needs (the mean of its criteria's scores), every criterion met."""
    max_evolutions: Annotated[int, Field(ge=0, le=10)] = 2
    """Rounds of follow-up stories an epic may take to reach ``min_score`` (0: evaluate
    only). The best-scoring integration lands either way; the epic records the final score
    and whether the maximum was reached."""
    max_failed_runs: Annotated[int, Field(ge=1, le=20)] = 3
    """Evaluator runs in a row that give no verdict before the story (or epic) is blocked."""


class FixupCaps(_Strict):
    max_turns: Annotated[int, Field(ge=1, le=10_000)] = 20
    max_budget_usd: Annotated[float, Field(gt=0, le=10_000)] = 1.0


AgentStage = Literal["coder", "mergemaster", "planner", "evaluator"]
AgentRuntime = Literal["claude-code", "cli", "openai", "codex"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names whose values are conventionally secrets (kept in step with runners' redaction).
_SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|PRIVATE_KEY|CREDENTIAL|DATABASE_URL)",
    re.IGNORECASE,
)

CLAUDE_CODE_ARGS = [
    "-p",
    "{{prompt}}",
    "--output-format",
    "stream-json",
    "--verbose",
    "--include-partial-messages",
    "--permission-mode",
    "acceptEdits",
]
"""Claude Code in print mode. ``--include-partial-messages`` makes the CLI print while the
model is still generating, so the inactivity watchdog sees a healthy long call as alive;
``acceptEdits`` lets it edit files in its worktree without a person to ask."""

CLAUDE_CODE_ALLOWED_TOOLS = [
    "Bash(git add:*)",
    "Bash(git commit:*)",
    "Bash(git status:*)",
    "Bash(git diff:*)",
    "Bash(git log:*)",
    "Bash(git show:*)",
    "Bash(git rm:*)",
    "Bash(git mv:*)",
    "Bash(git restore:*)",
    "mcp__storyline",
]
"""Shell commands a Claude Code agent may run without a person to approve them: what it
needs to inspect and commit its work, and the storyline MCP server's tools (``storyline
mcp``: story, history, gate output, verdicts, notes). The gate commands are added at spawn
time."""


CODEX_ARGS = ["exec", "--json"]
"""OpenAI's Codex CLI non-interactively, printing its events as JSON lines. The runtime adds
the sandbox, the model provider, the MCP server, the session to resume and the prompt."""


class AgentConfig(_Strict):
    """One ``[[agent]]`` entry."""

    name: Annotated[
        str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    ]
    stage: AgentStage = "coder"
    runtime: AgentRuntime = "claude-code"
    model: str | None = None
    command: Annotated[str, Field(min_length=1)] = "claude"
    """Executable for the ``cli``/``claude-code`` runtimes (looked up on PATH)."""
    args: list[str] = Field(default_factory=lambda: list(CLAUDE_CODE_ARGS))
    """Argument templates: ``{{story_id}}``, ``{{worktree_path}}``, ``{{base_branch}}``,
    ``{{prompt}}``, ``{{model}}`` are substituted, each as one argv element."""
    prompt: str | None = None
    """The opening of the prompt (templates as in ``args``); unset, each role has its own."""
    max_turns: Annotated[int, Field(ge=1, le=100_000)] | None = None
    max_budget_usd: Annotated[float, Field(gt=0, le=100_000)] | None = None
    base_url: str | None = None
    """``openai``: the OpenAI-compatible endpoint, e.g. ``http://127.0.0.1:8000/v1``;
    ``claude-code``: the agent's ``ANTHROPIC_BASE_URL``; ``codex``: a Responses API model
    provider of its own (``-c model_providers.storyline.base_url=...``)."""
    api_key_env: str | None = None
    """Name of the server's variable holding the key (never the key). ``claude-code``: the
    agent gets it as ``ANTHROPIC_API_KEY``; ``codex``: as ``OPENAI_API_KEY``; ``cli``: under
    its own name."""
    command_timeout_secs: Annotated[float, Field(gt=0, le=3600)] = 120.0
    """``openai`` runtime: timeout of one ``run_command`` tool call."""
    max_run_secs: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = None
    """Wall-clock cap on one run, however busy it is (outcome ``timed_out``)."""
    env: dict[str, str] = Field(default_factory=dict)
    """CLI runtimes: extra variables for the agent process (plain settings, not secrets)."""
    secrets: dict[str, str] = Field(default_factory=dict)
    """CLI runtimes: agent variable <- name of the server's variable holding the value. The
    value is read at spawn time and kept out of argv, events and logs."""
    allowed_tools: list[str] = Field(default_factory=lambda: list(CLAUDE_CODE_ALLOWED_TOOLS))
    """``claude-code``: permission rules passed as ``--allowedTools`` (with the gates')."""
    allow_gate_commands: bool = True
    """``claude-code``: also allow the project's gate commands (``Bash(<command>:*)``)."""

    @model_validator(mode="before")
    @classmethod
    def _codex_defaults(cls, data: object) -> object:
        # The defaults of command and args are Claude Code's; a codex agent gets its own.
        if isinstance(data, dict) and data.get("runtime") == "codex":
            data = {"command": "codex", "args": list(CODEX_ARGS), **data}
        return data

    @model_validator(mode="after")
    def _combinations(self) -> AgentConfig:
        """Refuse settings that cannot work together, naming them."""
        if self.runtime == "openai":
            if not self.base_url:
                raise ValueError("base_url is required for runtime 'openai'")
            if self.env or self.secrets:
                raise ValueError(
                    "env and secrets are for CLI runtimes; runtime 'openai' runs in the "
                    "server and reads its key through api_key_env"
                )
        for where, mapping in (("env", self.env), ("secrets", self.secrets)):
            for name in mapping:
                if not _ENV_NAME.match(name):
                    raise ValueError(f"{where}: {name!r} is not a valid variable name")
                if name.startswith("STORYLINE_"):
                    raise ValueError(
                        f"{where}: {name} is reserved (storyline sets STORYLINE_* itself)"
                    )
        for name in self.env:
            if _SECRET_NAME.search(name):
                raise ValueError(
                    f"env: {name} looks like a secret; declare it under secrets "
                    f'({name} = "SERVER_VARIABLE") so its value stays out of the config file'
                )
        for name, source in self.secrets.items():
            if not _ENV_NAME.match(source):
                raise ValueError(f"secrets: {name} <- {source!r} is not a valid variable name")
        both = sorted(set(self.env) & set(self.secrets))
        if both:
            raise ValueError(f"{', '.join(both)} is set in both env and secrets")
        if self.runtime == "claude-code":
            if self.base_url and "ANTHROPIC_BASE_URL" in self.env:
                raise ValueError(
                    "base_url and env.ANTHROPIC_BASE_URL both set the claude-code base URL"
                )
            if self.api_key_env and "ANTHROPIC_API_KEY" in self.secrets:
                raise ValueError(
                    "api_key_env and secrets.ANTHROPIC_API_KEY both set the claude-code key"
                )
        if self.runtime == "codex":
            self._codex_combinations()
        return self

    def _codex_combinations(self) -> None:
        if not self.args or self.args[0] != "exec" or "--json" not in self.args:
            raise ValueError(
                "runtime 'codex' needs args starting with exec and holding --json "
                "(codex exec --json is what storyline reads)"
            )
        if any("{{prompt}}" in arg for arg in self.args):
            raise ValueError(
                "runtime 'codex' passes the prompt itself (after the session to resume); "
                "remove {{prompt}} from args"
            )
        if self.max_turns is not None or self.max_budget_usd is not None:
            raise ValueError(
                "the Codex CLI has no turn or spending cap: max_turns and max_budget_usd "
                "cannot work with runtime 'codex'; use max_run_secs"
            )
        if self.base_url and "OPENAI_BASE_URL" in self.env:
            raise ValueError("base_url and env.OPENAI_BASE_URL both set the codex base URL")
        if self.api_key_env and "OPENAI_API_KEY" in self.secrets:
            raise ValueError("api_key_env and secrets.OPENAI_API_KEY both set the codex key")

    def agent_env(self) -> dict[str, str]:
        """The plain variables this agent gets, ``base_url`` included (claude-code)."""
        env = dict(self.env)
        if self.runtime == "claude-code" and self.base_url:
            env["ANTHROPIC_BASE_URL"] = self.base_url
        return env

    def agent_secrets(self) -> dict[str, str]:
        """Agent variable <- server variable, ``api_key_env`` included (CLI runtimes)."""
        secrets = dict(self.secrets)
        if self.api_key_env and self.runtime == "claude-code":
            secrets["ANTHROPIC_API_KEY"] = self.api_key_env
        elif self.api_key_env and self.runtime == "codex":
            secrets["OPENAI_API_KEY"] = self.api_key_env
        elif self.api_key_env and self.runtime == "cli":
            secrets[self.api_key_env] = self.api_key_env
        return secrets


Role = Literal["read", "write", "admin"]


class TokenConfig(_Strict):
    """An API token. ``token`` holds it inline; ``token_env`` names an environment variable."""

    actor: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[a-z]+:[A-Za-z0-9_.@-]+$")]
    role: Role = "write"
    token: Annotated[str, Field(min_length=16)] | None = None
    token_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TokenConfig:
        if (self.token is None) == (self.token_env is None):
            raise ValueError("give exactly one of token or token_env")
        return self


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8765
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    tokens: list[TokenConfig] = Field(default_factory=list)


class StorylineConfig(_Strict):
    """The whole ``storyline.toml``."""

    base_branch: Annotated[str, Field(min_length=1, max_length=200)] = "main"
    max_coders: Annotated[int, Field(ge=1, le=256)] = 2
    max_retries: Annotated[int, Field(ge=0, le=100)] = 3
    max_mergemasters: Annotated[int, Field(ge=1, le=64)] = 1
    max_merge_slots: Annotated[int, Field(ge=1, le=16)] = 1
    """The depth of the speculative merge stack: the first ``max_merge_slots`` queued
    stories are squashed on top of each other and gated in parallel, landing in queue
    order. 1: one merge at a time per ``max_mergemasters`` slot (no speculation)."""
    abort_respawn_cap: Annotated[int, Field(ge=1, le=100)] = 5
    mergemaster_respawn_cap: Annotated[int, Field(ge=1, le=100)] = 3
    provider_breaker_failures: Annotated[int, Field(ge=1, le=100)] = 3
    """Consecutive ``provider_unavailable`` exits of one ``[[agent]]`` that open its circuit
    breaker: no spawns for it until the back-off ends, then one probe run."""
    provider_breaker_base_secs: Annotated[float, Field(gt=0, le=300)] = 10.0
    """How long a breaker first stays open; doubled at each re-opening, at most 5 minutes."""
    inactivity_timeout_secs: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] = 600.0
    worktree_parallelism: Annotated[int, Field(ge=1, le=64)] = 4
    prompt_file: str = ".storyline/prompt.md"
    """Project-local prompt file, appended to every coder prompt when it exists."""
    gates: GatesConfig = Field(default_factory=GatesConfig)
    merge_gates: MergeGatesConfig = Field(default_factory=MergeGatesConfig)
    merge_queue: MergeQueueConfig = Field(default_factory=MergeQueueConfig)
    fixup: FixupCaps = Field(default_factory=FixupCaps)
    agent: list[AgentConfig] = Field(default_factory=list)
    server: ServerConfig = Field(default_factory=ServerConfig)
    epics: dict[str, str] = Field(default_factory=dict)
    """Epic name -> context text prepended to the prompt of that epic's stories."""
    epic: EpicConfig = Field(default_factory=EpicConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)

    @field_validator("base_branch")
    @classmethod
    def _branch(cls, value: str) -> str:
        return validate_branch_name(value)

    @field_validator("agent")
    @classmethod
    def _unique_names(cls, value: list[AgentConfig]) -> list[AgentConfig]:
        names = [a.name for a in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate agent names: {', '.join(dupes)}")
        return value

    def agent_for(self, stage: AgentStage) -> AgentConfig | None:
        """The first configured agent for a stage, or None."""
        for agent in self.agent:
            if agent.stage == stage:
                return agent
        return None
