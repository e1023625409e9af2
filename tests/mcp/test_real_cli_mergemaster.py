"""Observation 4: a real Claude Code CLI mergemaster resolves a conflict and reports through
the ``storyline mcp`` tool the runner registered, not curl.

The configuration is what ``storyline init`` writes (the mergemaster's allowlist has no
unrestricted shell), with the model and base URL pointed at the scripted model server and
``max_coders = 1`` so the two coders' model turns come in a known order. The second story
forks from the same base as the first, so its merge conflicts; the scripted mergemaster
writes the resolution, commits it and calls ``mcp__storyline__report_merge_resolved``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_serve import free_port
from tests.doubles.anthropic_server import AnthropicServer
from tests.doubles.claude_cli import DUMMY_API_KEY, OFFLINE_ENV, claude_cli

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
BASE = "def add(a, b):\n    return 0\n"
TEST = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
FIRST = "def add(a, b):\n    return a + b\n"
SECOND = "def add(a, b):\n    return b + a\n"
RESOLVED = FIRST + "\n\n# The other story's b + a is the same sum.\n"
"""Keeps the base's line; the story's own ``b + a`` goes, declared (the no-hunk-lost check)."""
DECLARE = {
    "name": "mcp__storyline__declare_dropped_hunk",
    "input": {
        "file": "calc.py",
        "side": "story",
        "hunk": "@@ -2 +2 @@",
        "reason": "b + a is the same sum as the base's a + b",
    },
}
COMMIT = "git add -A && git commit -m \"$(cat <<'EOF'\nStory work\nEOF\n)\""
RESOLUTION = "kept a + b; both sides computed the same sum"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def write(path: Path, content: str) -> dict[str, Any]:
    return {"tool_use": [{"name": "Write", "input": {"file_path": str(path), "content": content}}]}


def bash(command: str) -> dict[str, Any]:
    return {"tool_use": [{"name": "Bash", "input": {"command": command, "description": "run"}}]}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    (path / "calc.py").write_text(BASE)
    (path / "test_calc.py").write_text(TEST)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "Storyline User")
    git(path, "config", "user.email", "user@example.invalid")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


@pytest.fixture
def served(project: Path, tmp_path: Path) -> Iterator[tuple[str, AnthropicServer]]:
    cli = claude_cli()
    with AnthropicServer() as model:
        subprocess.run([str(VENV_BIN / "storyline"), "init", "--project", str(project)], check=True)
        config = project / "storyline.toml"
        text = config.read_text()
        text = text.replace('# model = "sonnet"', 'model = "sonnet"')
        text = text.replace('# base_url = "https://api.anthropic.com"', f'base_url = "{model.url}"')
        assert text.count("max_coders = 2\n") == 1
        config.write_text(text.replace("max_coders = 2\n", "max_coders = 1\n"))
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("STORYLINE_", "ANTHROPIC_"))
        }
        env.update(OFFLINE_ENV)
        env.update(
            HOME=str(tmp_path / "home"),
            ANTHROPIC_API_KEY=DUMMY_API_KEY,
            PATH=os.pathsep.join([str(cli.parent), str(VENV_BIN), "/usr/local/bin:/usr/bin:/bin"]),
        )
        (tmp_path / "home").mkdir()
        port = free_port()
        log_path = tmp_path / "serve.log"
        with log_path.open("w") as log:
            serve = ["serve", "--project", str(project), "--port", str(port)]
            process = subprocess.Popen(
                [str(VENV_BIN / "storyline"), *serve],
                cwd=project,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert process.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.2)
                yield url, model
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def create_and_start(url: str, name: str) -> str:
    created = httpx.post(
        f"{url}/stories", json={"name": name, "acceptance_criteria": ["tests pass"]}, timeout=30
    )
    assert created.status_code == 201, created.text
    sid: str = created.json()["id"]
    started = httpx.post(
        f"{url}/stories/{sid}/transitions", json={"event": "start_coding"}, timeout=30
    )
    assert started.status_code == 200, started.text
    return sid


def wait_stage(url: str, sid: str, stages: set[str], timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        story: dict[str, Any] = httpx.get(f"{url}/stories/{sid}", timeout=10).json()
        if story["stage"] in stages or time.monotonic() > deadline:
            return story
        time.sleep(0.3)


def test_a_real_cli_mergemaster_reports_its_verdict_through_the_mcp_tool(
    served: tuple[str, AnthropicServer], project: Path
) -> None:
    url, model = served
    worktrees = project / ".storyline" / "worktrees"
    merge = project / ".storyline" / "merge"
    # Ids are allocated 1, 2: the script is written before either story exists.
    model.set_script(
        [
            write(worktrees / "1" / "calc.py", FIRST),
            bash(COMMIT),
            {"text": "add() fixed."},
            write(worktrees / "2" / "calc.py", SECOND),
            bash(COMMIT),
            {"text": "add() fixed too."},
            write(merge / "2" / "calc.py", RESOLVED),
            bash(COMMIT),
            {"tool_use": [DECLARE]},
            {
                "tool_use": [
                    {
                        "name": "mcp__storyline__report_merge_resolved",
                        "input": {"summary": RESOLUTION},
                    }
                ]
            },
            {"text": "Resolved and reported."},
        ]
    )
    first = create_and_start(url, "Fix add")
    second = create_and_start(url, "Fix add another way")
    assert (first, second) == ("1", "2")

    done = wait_stage(url, second, {"done", "blocked"})
    history = httpx.get(f"{url}/stories/{second}/history", timeout=10).json()["events"]
    assert done["stage"] == "done", json.dumps(history, indent=1)[-6000:]
    assert wait_stage(url, first, {"done"})["stage"] == "done"

    # The verdict came through the MCP tool, as the mergemaster's own actor.
    failed = next(e for e in history if e["type"] == "MergeFailed")
    assert failed["data"]["kind"] == "conflict_detected"
    declared = next(e for e in history if e["type"] == "DroppedHunkDeclared")
    assert declared["actor"] == f"agent:mergemaster-{second}-1"
    assert declared["data"]["hunk"] == "@@ -2 +2 @@" and declared["data"]["side"] == "story"
    assert not any(
        e["data"].get("kind") == "hunks_lost" for e in history if e["type"] == "MergeFailed"
    )
    requeued = next(e for e in history if e["type"] == "MergeRequeued")
    assert requeued["actor"] == f"agent:mergemaster-{second}-1"
    assert requeued["reason"] == RESOLUTION and requeued["data"]["resolved"] is True
    spawns = [e for e in history if e["type"] == "AgentSpawnRequested"]
    mergemaster = [e for e in spawns if e["data"]["role"] == "mergemaster"]
    assert len(mergemaster) == 1  # a verdict on the first run: never respawned

    # Registered per attempt through a file in the attempt's directory; no token in argv
    # nor in that file.
    argv = mergemaster[0]["data"]["argv"]
    flag = next(a for a in argv if a.startswith("--mcp-config="))
    config_path = Path(flag.split("=", 1)[1])
    assert config_path.parent == project / ".storyline" / "logs" / second
    config = json.loads(config_path.read_text())
    assert config["mcpServers"]["storyline"]["env"] == {"STORYLINE_TOKEN": "${STORYLINE_TOKEN:-}"}
    assert not any("sl_agent_" in a for a in argv)
    assert "sl_agent_" not in config_path.read_text()

    # The tool's answer (the story back in merge) reached the model.
    messages = json.dumps(model.main_requests[-1].body["messages"])
    answer = messages.replace(" ", "").replace("\\", "")
    assert '"event":"merge_resolved","stage":"merge"' in answer, messages[-3000:]

    assert git(project, "show", "main:calc.py") == RESOLVED
