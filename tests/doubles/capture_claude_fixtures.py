"""Record the real Claude Code CLI's stream-json output as the parser tests' fixtures.

``python -m tests.doubles.capture_claude_fixtures [OUT_DIR]`` runs the installed CLI
(``scripts/install-agent-clis.sh``) against the scripted model server once per scenario, in
a scratch git repository, and writes each run's stdout (``<name>.jsonl``) and stderr
(``<name>.stderr``). The fixtures are what the CLI printed, not an imitation of it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.doubles.anthropic_server import AnthropicServer
from tests.doubles.claude_cli import claude_cli_path, cli_env

OUT_DIR = Path(__file__).resolve().parents[1] / "agents" / "fixtures" / "claude-code"
ALLOW_GIT = "--allowedTools=Bash(git add:*),Bash(git commit:*),Bash(git status:*)"


@dataclass(frozen=True)
class Scenario:
    name: str
    script: list[dict[str, Any]]
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)


def _write(path: str) -> dict[str, Any]:
    return {"tool_use": [{"name": "Write", "input": {"file_path": path, "content": "hello\n"}}]}


def _bash(command: str) -> dict[str, Any]:
    return {"tool_use": [{"name": "Bash", "input": {"command": command, "description": "run"}}]}


def scenarios(repo: Path) -> list[Scenario]:
    hello = str(repo / "hello.txt")
    commit = "git add -A && git commit -m 'Add hello'"
    edits = ["--permission-mode", "acceptEdits"]
    return [
        Scenario(
            "success_commit",
            [_write(hello), _bash(commit), {"text": "Committed hello.txt."}],
            [*edits, ALLOW_GIT],
        ),
        Scenario(
            "permission_denied",
            [_write(hello), _bash(commit), {"text": "I could not commit."}],
            edits,
        ),
        Scenario(
            "max_turns",
            [{**_bash("git status"), "repeat": True}],
            [*edits, ALLOW_GIT, "--max-turns", "2"],
        ),
        Scenario(
            "max_budget",
            [{**_bash("git status"), "repeat": True}],
            [*edits, ALLOW_GIT, "--max-budget-usd", "0.001"],
        ),
        Scenario(
            "api_overloaded",
            [{"repeat": True, "error": {"status": 529, "message": "Overloaded"}}],
            edits,
            {"CLAUDE_CODE_MAX_RETRIES": "2"},
        ),
        Scenario(
            "partial_messages",
            [_write(hello), {"text": "Wrote hello.txt."}],
            [*edits, "--include-partial-messages"],
        ),
        Scenario(
            "root_skip_permissions", [{"text": "never reached"}], ["--dangerously-skip-permissions"]
        ),
    ]


def capture(out_dir: Path) -> list[Path]:
    cli = claude_cli_path()
    if cli is None:
        raise SystemExit("the Claude Code CLI is not installed (scripts/install-agent-clis.sh)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for scenario in scenarios(root / "repo"):
            repo = root / "repo"
            subprocess.run(["rm", "-rf", str(repo)], check=True)
            repo.mkdir()
            for argv in (
                ["git", "init", "-q", "-b", "main"],
                ["git", "config", "user.name", "Fixture"],
                ["git", "config", "user.email", "fixture@example.invalid"],
                ["git", "commit", "-q", "--allow-empty", "-m", "initial"],
            ):
                subprocess.run(argv, cwd=repo, check=True)
            with AnthropicServer(scenario.script) as server:
                env = {**cli_env(server.url, root / "home"), **scenario.env}
                env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
                argv = [str(cli), "-p", "Do the task.", "--output-format=stream-json"]
                proc = subprocess.run(
                    [*argv, "--verbose", *scenario.args],
                    cwd=repo,
                    env=env,
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
            stdout = out_dir / f"{scenario.name}.jsonl"
            stdout.write_bytes(proc.stdout)
            written.append(stdout)
            if proc.stderr:
                stderr = out_dir / f"{scenario.name}.stderr"
                stderr.write_bytes(proc.stderr)
                written.append(stderr)
            print(f"{scenario.name}: exit {proc.returncode}, {len(proc.stdout)} bytes")
    return written


if __name__ == "__main__":
    capture(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR)
