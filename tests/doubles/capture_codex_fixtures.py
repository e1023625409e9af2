"""Record the real Codex CLI's ``exec --json`` output as the parser tests' fixtures.

``python -m tests.doubles.capture_codex_fixtures [OUT_DIR]`` runs the installed CLI
(``scripts/install-agent-clis.sh``) with the production argv (``build_codex_argv``) against
the scripted Responses API server once per scenario, in a scratch git repository, and
writes each run's stdout (``<name>.jsonl``). The fixtures are what the CLI printed, not an
imitation of it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domain.config import AgentConfig
from runners.agents.codex_argv import build_codex_argv
from runners.agents.codex_runtime import git_dirs
from runners.agents.spawn_spec import SpawnSpec, StoryText
from tests.doubles.codex_cli import DUMMY_API_KEY, codex_cli_path, codex_env
from tests.doubles.openai_responses_server import ResponsesServer

OUT_DIR = Path(__file__).resolve().parents[1] / "agents" / "fixtures" / "codex"
# The CLI's own retries as configured by default (stream_max_retries 5: "Reconnecting...
# n/5" lines), one request retry to keep the captures short.
FEW_RETRIES = ["-c", "model_providers.storyline.request_max_retries=1"]


@dataclass(frozen=True)
class Scenario:
    name: str
    script: list[dict[str, Any]]
    resume_of: str | None = None


def _shell(cmd: str) -> dict[str, Any]:
    return {"function_call": [{"name": "exec_command", "arguments": {"cmd": cmd}}]}


SCENARIOS = [
    Scenario(
        "success_commit",
        [
            _shell("printf 'hello\\n' > hello.txt && git add hello.txt"),
            _shell("git commit -q -m 'Add hello'"),
            {"text": "Committed hello.txt.", "input_tokens": 1200, "output_tokens": 55},
        ],
    ),
    Scenario("resumed", [{"text": "Continued."}], resume_of="success_commit"),
    Scenario("provider_429", [{"repeat": True, "error": {"status": 429, "message": "Slow down"}}]),
    Scenario("provider_500", [{"repeat": True, "error": {"status": 500, "message": "Oops"}}]),
    Scenario(
        "unauthorized_401",
        [{"repeat": True, "error": {"status": 401, "message": "Incorrect API key"}}],
    ),
    Scenario(
        "reconnect_then_success",
        [{"error": {"status": 500, "message": "Oops"}}, {"text": "Done after a retry."}],
    ),
]


def capture(cli: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, ResponsesServer() as server:
        root = Path(scratch)
        repo = root / "repo"
        repo.mkdir()
        for argv in (
            ["git", "init", "-q", "-b", "main"],
            ["git", "config", "user.name", "Agent"],
            ["git", "config", "user.email", "agent@example.invalid"],
            ["git", "commit", "-q", "--allow-empty", "-m", "initial"],
        ):
            subprocess.run(argv, cwd=repo, check=True)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", **codex_env(root / "home")}
        env["OPENAI_API_KEY"] = DUMMY_API_KEY
        agent = AgentConfig(
            name="coder",
            runtime="codex",
            command=str(cli),
            model="gpt-5.1-codex",
            base_url=server.url,
            api_key_env="OPENAI_API_KEY",
            args=["exec", "--json", *FEW_RETRIES],
        )
        sessions: dict[str, str] = {}
        for scenario in SCENARIOS:
            server.set_script(scenario.script)
            spec = SpawnSpec(
                story_id="1",
                attempt=1,
                role="coder",
                agent=agent,
                cwd=repo,
                base_branch="main",
                story=StoryText("Say hello", "Create hello.txt", ("hello.txt is committed",)),
                log_path=root / "unused.log",
                inactivity_timeout_secs=60.0,
                resume_session_id=sessions.get(scenario.resume_of or ""),
            )
            proc = subprocess.run(
                build_codex_argv(spec, git_dirs=git_dirs(repo)),
                cwd=repo,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            (out_dir / f"{scenario.name}.jsonl").write_text(proc.stdout, encoding="utf-8")
            first = proc.stdout.split("\n", 1)[0]
            if '"thread_id":"' in first:
                sessions[scenario.name] = first.split('"thread_id":"')[1].split('"')[0]
            print(f"{scenario.name}: exit {proc.returncode}, {proc.stdout.count(chr(10))} lines")


def main(argv: list[str]) -> int:
    cli = codex_cli_path()
    if cli is None:
        print("the Codex CLI is not installed (run scripts/install-agent-clis.sh)")
        return 1
    capture(cli, Path(argv[0]) if argv else OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
