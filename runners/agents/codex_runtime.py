"""The ``codex`` runtime: OpenAI's Codex CLI (``codex exec --json``) as a CLI agent.

Process handling, the watchdog, logs and outcome rules are the CLI runtime's; what differs is
the argv (:mod:`runners.agents.codex_argv`) and the event parser
(:mod:`runners.agents.codex_events`). The I/O the pure argv builder needs happens here: the
worktree's git directory (writable under the sandbox so the agent can commit) and the
attempt's ``storyline mcp`` registration, read from the file the launcher wrote.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

from runners.agents.cli_runtime import CliRunningAgent, CliRuntime, agent_environment
from runners.agents.codex_argv import build_codex_argv
from runners.agents.codex_events import CodexEventParser
from runners.agents.mcp_config import SERVER_NAME
from runners.agents.spawn_spec import SpawnSpec


class CodexRunningAgent(CliRunningAgent):
    parser_class = CodexEventParser

    _error_lines: tuple[str, ...] = ()

    def _line(self, line: bytes, is_stdout: bool) -> None:
        super()._line(line, is_stdout)
        if is_stdout:
            return
        # Codex reports a refusal to start over several stderr lines ("Error loading
        # config.toml: unknown variant `bogus`, ..." then "in `sandbox_mode`"): the exit
        # reason quotes the error and its continuation, not only the last fragment.
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return
        with self._lock:
            if text.startswith("Error"):
                self._error_lines = (text,)
            elif self._error_lines and len(self._error_lines) < _ERROR_LINES:
                self._error_lines = (*self._error_lines, text)
            if self._error_lines:
                self._last_text_line = " ".join(self._error_lines)


_ERROR_LINES = 3


def git_dirs(cwd: Path) -> list[Path]:
    """The worktree's own git directory and the repository's shared one (objects, refs):
    a linked worktree's ``.git`` is only a pointer to the first, inside the second."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-dir", "--git-common-dir"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return list(dict.fromkeys(Path(line) for line in out.stdout.splitlines() if line))


def mcp_server_of(config: Path | None) -> tuple[str, Sequence[str]] | None:
    """Command and args of the storyline server in the attempt's MCP registration file."""
    if config is None:
        return None
    try:
        entry = json.loads(config.read_text(encoding="utf-8"))["mcpServers"][SERVER_NAME]
        command = entry["command"]
        args = entry["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(command, str) or not all(isinstance(a, str) for a in args):
        return None
    return command, list(args)


class CodexRuntime(CliRuntime):
    def start(self, spec: SpawnSpec) -> CodexRunningAgent:
        argv = build_codex_argv(
            spec, git_dirs=git_dirs(spec.cwd), mcp_server=mcp_server_of(spec.mcp_config)
        )
        env = agent_environment(spec.env, self.strip_env)
        return CodexRunningAgent(
            spec,
            argv,
            env,
            kill_grace_secs=self.kill_grace_secs,
            poll_interval_secs=self.poll_interval_secs,
        )
