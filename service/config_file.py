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

[[agent]]
name = "coder"
stage = "coder"
runtime = "claude-code"
command = "claude"
args = ["-p", "{{prompt}}", "--output-format", "stream-json", "--verbose",
        "--permission-mode", "acceptEdits"]
# model = "sonnet"
# max_turns = 50
# max_budget_usd = 5.0

[[agent]]
name = "mergemaster"
stage = "mergemaster"
runtime = "claude-code"
command = "claude"
args = ["-p", "{{prompt}}", "--output-format", "stream-json", "--verbose",
        "--permission-mode", "acceptEdits"]

[server]
host = "127.0.0.1"
port = 8765
# API tokens. With none configured the server only binds to localhost.
# [[server.tokens]]
# actor = "user:alice"
# role = "admin"
# token_env = "STORYLINE_ALICE_TOKEN"
"""
