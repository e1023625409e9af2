"""Reading ``storyline.toml`` into :class:`domain.config.StorylineConfig`."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import ValidationError

from domain.config import StorylineConfig

CONFIG_NAME = "storyline.toml"


class ConfigError(Exception):
    """The config file is unreadable or invalid; the message names the file and the key."""


def _describe(exc: ValidationError, path: Path) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key '{key}'")
        else:
            lines.append(f"{path}: key '{key}': {err['msg']}")
    return "\n".join(lines)


def parse_config(text: str, path: Path = Path(CONFIG_NAME)) -> StorylineConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return StorylineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def load_config(project: Path) -> StorylineConfig:
    """The project's config, or the defaults when it has no ``storyline.toml``."""
    path = project / CONFIG_NAME
    if not path.exists():
        return StorylineConfig()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_config(text, path)


DEFAULT_CONFIG = """\
# storyline.toml: how storyline drives stories on this repository.
# Every key is optional; the values shown are the defaults. Unknown keys are errors.

# Branch that stories are cut from and merged back into.
base_branch = "main"

# How many coder agents may run at once.
max_coders = 2
# Gate failures allowed before a story is blocked.
max_retries = 3
# Merge slots (each may also host a mergemaster agent resolving a conflict).
max_mergemasters = 1
# > 1: the speculative merge queue, this many queued stories squashed on top of each other
# and gated in parallel, landing in queue order ([merge_queue] batch = n: n stories landed
# on one gate run on the top of them; see README, "Trusting the merge").
# max_merge_slots = 1
# Consecutive agent crashes before any session existed, before the story is blocked.
abort_respawn_cap = 5
# Mergemaster exits without a verdict before the attempt counts as a genuine failure.
mergemaster_respawn_cap = 3
# Kill an agent (its whole process group) after this many silent seconds.
inactivity_timeout_secs = 600
# Worktrees created in parallel at most.
worktree_parallelism = 4
# Appended to every coder prompt when the file exists (path relative to the project).
prompt_file = ".storyline/prompt.md"

[gates]
# Commands run by the server in the story's worktree; argv lists or strings (split, never
# run through a shell). All must exit 0 for the gates to pass.
commands = [["python", "-m", "pytest", "-q"]]
timeout_secs = 600
# A gate that gives different verdicts on the same tree is recorded as flaky. "retry" reruns
# a failed command up to flaky_retries times first; "quarantine" also stops a gate found
# flaky from blocking until `storyline gates clear` (every decision is an event).
# flaky = "off"
# flaky_retries = 2
# nondeterministic = []   # commands whose verdicts are never compared

[merge_gates]
# Run on the squashed result in the merge workspace before the base branch moves.
commands = [["python", "-m", "pytest", "-q"]]
timeout_secs = 600
# Output matching one of these regular expressions is a self-evident failure (formatter or
# lint) that sends the story back to coding as a capped fix-up.
# fixup_patterns = ["would reformat", "Found \\\\d+ errors?"]

[fixup]
# Caps on a fix-up spawn (applied unless the agent's own values are lower).
max_turns = 20
max_budget_usd = 1.0

# Agents. runtime = "claude-code" runs the Claude Code CLI in print mode in the story's
# worktree. Its permission model: acceptEdits lets it edit files there without asking;
# shell commands need a rule. allowed_tools (the default shown) lets it inspect and commit
# with git, and allow_gate_commands adds one rule per [gates]/[merge_gates] command, so it
# can run exactly what the server will run. Anything else it tries is refused, recorded in
# the run's AgentExited event, and named in the story's history. The flags go in as
# --allowedTools; no --dangerously-skip-permissions (refused as root unless the agent's env
# has IS_SANDBOX = "1"). --include-partial-messages keeps output flowing while the model
# writes, so a long generation is not taken for a hung agent.
[[agent]]
name = "coder"
stage = "coder"
runtime = "claude-code"
command = "claude"
args = ["-p", "{{prompt}}", "--output-format", "stream-json", "--verbose",
        "--include-partial-messages", "--permission-mode", "acceptEdits"]
allowed_tools = ["Bash(git add:*)", "Bash(git commit:*)", "Bash(git status:*)",
                 "Bash(git diff:*)", "Bash(git log:*)", "Bash(git show:*)", "Bash(git rm:*)",
                 "Bash(git mv:*)", "Bash(git restore:*)", "mcp__storyline"]
allow_gate_commands = true
# model = "sonnet"
# base_url = "https://api.anthropic.com"   # the agent's ANTHROPIC_BASE_URL
# max_turns = 50
# max_budget_usd = 5.0
# max_run_secs = 3600                      # wall-clock cap on one run
# Plain variables for the agent, and secrets: agent variable = "SERVER_VARIABLE" (read
# when the agent starts; never in argv, events or logs).
# env = { IS_SANDBOX = "1" }
# secrets = { ANTHROPIC_API_KEY = "STORYLINE_CODER_ANTHROPIC_KEY" }

[[agent]]
name = "mergemaster"
stage = "mergemaster"
runtime = "claude-code"
command = "claude"
args = ["-p", "{{prompt}}", "--output-format", "stream-json", "--verbose",
        "--include-partial-messages", "--permission-mode", "acceptEdits"]
allowed_tools = ["Bash(git add:*)", "Bash(git commit:*)", "Bash(git status:*)",
                 "Bash(git diff:*)", "Bash(git log:*)", "Bash(git show:*)", "Bash(git rm:*)",
                 "Bash(git mv:*)", "Bash(git restore:*)", "mcp__storyline"]
allow_gate_commands = true
# model = "sonnet"
# base_url = "https://api.anthropic.com"

# An epic's planner: it reads a scratch checkout of the base branch (its edits there are
# thrown away) and submits its plan with the storyline MCP tool submit_plan. Without a
# planner agent an epic runs as one whole-goal session.
[[agent]]
name = "planner"
stage = "planner"
runtime = "claude-code"
command = "claude"
args = ["-p", "{{prompt}}", "--output-format", "stream-json", "--verbose",
        "--include-partial-messages", "--permission-mode", "acceptEdits"]
allowed_tools = ["Bash(git ls-files:*)", "Bash(git log:*)", "Bash(git show:*)",
                 "mcp__storyline"]
allow_gate_commands = false

[epic]
# Plans refused or missing before the goal runs as one session instead.
max_plan_attempts = 3
# After a union failure blame cannot localise: re-run the whole goal as one session
# (a whole extra session's cost, so off by default).
recover_via_single_session = false
# Leave-one-out probes at most per union failure.
max_blame_probes = 12

[epic.union_gates]
# Run on the integration branch once every story of a round is done: the goal's own check.
commands = [["python", "-m", "pytest", "-q"]]
timeout_secs = 600

[server]
host = "127.0.0.1"
port = 8765
# API tokens. With none configured the server only binds to localhost.
# [[server.tokens]]
# actor = "user:alice"
# role = "admin"
# token_env = "STORYLINE_ALICE_TOKEN"
"""
