"""A new user's path with the real Claude Code CLI, as root: ``storyline init``, change the
model and base URL, ``storyline serve``, and stories go to done.

The agent sections are exactly what ``storyline init`` wrote (``command = "claude"`` on PATH,
its args, its permission rules); only ``model`` and ``base_url`` are filled in. The model is
the scripted Anthropic server, which records what the model was sent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.doubles.anthropic_server import AnthropicServer
from tests.doubles.claude_cli import DUMMY_API_KEY, OFFLINE_ENV, claude_cli

VENV_BIN = Path(sys.executable).parent
BROKEN_ADD = "def add(a, b):\n    return a - b\n"
TEST_CALC = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
FIXED_ADD = "def add(a, b):\n    return a + b\n"
WITH_SUB_BROKEN = FIXED_ADD + "\n\ndef sub(a, b):\n    return a + b\n"
WITH_SUB_FIXED = FIXED_ADD + "\n\ndef sub(a, b):\n    return a - b\n"
TEST_SUB = "from calc import sub\n\n\ndef test_sub():\n    assert sub(5, 3) == 2\n"
COMMIT = "git add -A && git commit -m \"$(cat <<'EOF'\nStory work\n\nDone by the agent.\nEOF\n)\""


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=T", "-c", "user.email=t@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    (path / "calc.py").write_text(BROKEN_ADD)
    (path / "test_calc.py").write_text(TEST_CALC)
    _git(path, "init", "-q", "-b", "main")
    _git(path, "config", "user.name", "Storyline User")
    _git(path, "config", "user.email", "user@example.invalid")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "initial")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write(path: Path, content: str) -> dict[str, Any]:
    return {"tool_use": [{"name": "Write", "input": {"file_path": str(path), "content": content}}]}


def _bash(command: str) -> dict[str, Any]:
    return {"tool_use": [{"name": "Bash", "input": {"command": command, "description": "run"}}]}


@pytest.fixture
def served(
    project: Path, tmp_path: Path
) -> Iterator[tuple[str, AnthropicServer, subprocess.Popen[str]]]:
    cli = claude_cli()
    with AnthropicServer() as model:
        subprocess.run([str(VENV_BIN / "storyline"), "init", "--project", str(project)], check=True)
        config = project / "storyline.toml"
        text = config.read_text()
        assert text.count('# model = "sonnet"') == 2
        text = text.replace('# model = "sonnet"', 'model = "sonnet"')
        text = text.replace('# base_url = "https://api.anthropic.com"', f'base_url = "{model.url}"')
        config.write_text(text)
        port = _free_port()
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
        log = (tmp_path / "serve.log").open("w")
        process = subprocess.Popen(
            [str(VENV_BIN / "storyline"), "serve", "--project", str(project), "--port", str(port)],
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert process.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
            yield url, model, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _create(url: str, name: str) -> str:
    answer = httpx.post(
        f"{url}/stories",
        params={"wait": "true"},
        json={"name": name, "acceptance_criteria": ["the tests pass"]},
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    story_id: str = answer.json()["id"]
    return story_id


def _start(url: str, story_id: str) -> None:
    answer = httpx.post(
        f"{url}/stories/{story_id}/transitions", json={"event": "start_coding"}, timeout=30
    )
    assert answer.status_code == 200, answer.text


def _wait_done(url: str, story_id: str, timeout: float = 150.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    story: dict[str, Any] = {}
    while time.monotonic() < deadline:
        story = httpx.get(f"{url}/stories/{story_id}", timeout=10).json()
        if story.get("stage") in ("done", "blocked", "merge_failure"):
            break
        time.sleep(0.3)
    history = httpx.get(f"{url}/stories/{story_id}/history", timeout=10).json()
    assert story.get("stage") == "done", (story.get("stage"), history)
    return {"story": story, "history": history}


def _events(history: Any, kind: str) -> list[dict[str, Any]]:
    items = history["events"] if isinstance(history, dict) else history
    return [e for e in items if e["type"] == kind]


def test_storyline_init_config_drives_the_real_cli_to_done_and_through_a_gate_failure(
    served: tuple[str, AnthropicServer, subprocess.Popen[str]], project: Path
) -> None:
    url, model, _ = served
    worktrees = project / ".storyline" / "worktrees"

    first = _create(url, "Fix add")
    model.set_script(
        [
            _write(worktrees / first / "calc.py", FIXED_ADD),
            _bash("python -m pytest -q"),
            _bash(COMMIT),
            {"text": "add() is fixed and committed."},
        ]
    )
    _start(url, first)
    done = _wait_done(url, first)
    (exited,) = _events(done["history"], "AgentExited")
    data = exited["data"]
    assert data["outcome"] == "completed"
    assert data["model"] == model.main_requests[0].body["model"] != "sonnet"
    assert data["result_subtype"] == "success" and data["permission_denials"] == []
    assert data["tokens_in"] > 0 and data["model_usage"][data["model"]]["tokens_in"] > 0
    assert "Fix add" in _git(project, "log", "-1", "--format=%s%n%b", "main")

    second = _create(url, "Add sub")
    wt = worktrees / second
    model.set_script(
        [
            _write(wt / "calc.py", WITH_SUB_BROKEN),
            _write(wt / "test_sub.py", TEST_SUB),
            _bash(COMMIT),
            {"text": "sub() added."},
            # The retry: the gate failure is in the system prompt the model receives.
            _write(wt / "calc.py", WITH_SUB_FIXED),
            _bash(COMMIT),
            {"text": "sub() fixed."},
        ]
    )
    _start(url, second)
    done = _wait_done(url, second)
    assert [e["data"]["outcome"] for e in _events(done["history"], "AgentExited")] == [
        "completed",
        "completed",
    ]
    assert len(_events(done["history"], "GatesFailed")) == 1
    # The retry resumes the session. Claude Code 2.1.332 drops --append-system-prompt on
    # --resume (the first request of the retry has the same system prompt as before), so
    # the failure travels in the resumed prompt too, and that is what the model read.
    retry = next(r for r in model.main_requests if "Continue your prior work" in json.dumps(r.body))
    received = json.dumps(retry.body["messages"])
    assert "quality gates failed" in received
    assert "test_sub" in received and "assert" in received
    assert "def sub(a, b):\n    return a - b" in _git(project, "show", "main:calc.py")
