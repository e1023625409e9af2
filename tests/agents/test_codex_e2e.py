"""``storyline serve`` driving the real Codex CLI (runtime ``codex``) as root, against the
scripted Responses API server: a story to done with a commit codex made (and a note it added
through the ``storyline mcp`` tools), and a gate failure retried into a pass, with the failure
in what the model received.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agents.test_claude_code_e2e import (
    FIXED_ADD,
    TEST_SUB,
    VENV_BIN,
    WITH_SUB_BROKEN,
    WITH_SUB_FIXED,
    _create,
    _events,
    _free_port,
    _git,
    _start,
    _wait_done,
    project,  # noqa: F401 - the fixture
)
from tests.doubles.codex_cli import DUMMY_API_KEY, codex_cli
from tests.doubles.openai_responses_server import ResponsesServer

MODEL = "gpt-5.1-codex"
COMMIT = "git add -A && git commit -q -m 'Story work'"
CONFIG = """\
base_branch = "main"
inactivity_timeout_secs = 120

[gates]
commands = [["python", "-m", "pytest", "-q"]]

[merge_gates]
commands = [["python", "-m", "pytest", "-q"]]

[[agent]]
name = "coder"
stage = "coder"
runtime = "codex"
model = "{model}"
base_url = "{base_url}"
api_key_env = "CODEX_TEST_KEY"
max_run_secs = 120

[[agent]]
name = "mergemaster"
stage = "mergemaster"
runtime = "codex"
model = "{model}"
base_url = "{base_url}"
api_key_env = "CODEX_TEST_KEY"
"""


def _shell(cmd: str) -> dict[str, Any]:
    return {"function_call": [{"name": "exec_command", "arguments": {"cmd": cmd}}]}


def _write(path: Path, content: str) -> dict[str, Any]:
    return _shell(f"cat > {path.name} <<'EOF'\n{content}EOF")


@pytest.fixture
def served(project: Path, tmp_path: Path) -> Iterator[tuple[str, ResponsesServer]]:  # noqa: F811
    cli = codex_cli()
    with ResponsesServer() as model:
        (project / "storyline.toml").write_text(CONFIG.format(model=MODEL, base_url=model.url))
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STORYLINE_", "OPENAI_"))}
        home = tmp_path / "home"
        home.mkdir()
        env.update(
            HOME=str(home),
            CODEX_HOME=str(home),
            CODEX_TEST_KEY=DUMMY_API_KEY,
            PATH=os.pathsep.join([str(cli.parent), str(VENV_BIN), "/usr/local/bin:/usr/bin:/bin"]),
        )
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
            yield url, model
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def test_serve_drives_codex_to_done_and_through_a_gate_failure(
    served: tuple[str, ResponsesServer],
    project: Path,  # noqa: F811
) -> None:
    url, model = served
    worktrees = project / ".storyline" / "worktrees"

    first = _create(url, "Fix add")
    note = {"text": "add() subtracted; fixed it."}
    model.set_script(
        [
            _write(worktrees / first / "calc.py", FIXED_ADD),
            _shell("python -m pytest -q"),
            _shell(COMMIT),
            {
                "function_call": [
                    {"namespace": "mcp__storyline", "name": "add_note", "arguments": note}
                ]
            },
            {"text": "add() is fixed and committed."},
        ]
    )
    _start(url, first)
    done = _wait_done(url, first)
    (exited,) = _events(done["history"], "AgentExited")
    data = exited["data"]
    assert data["outcome"] == "completed", data
    assert data["session_id"] and data["tokens_in"] > 0 and data["tokens_out"] > 0
    # Codex reports no cost: the runtime records none, which the event schema stores as 0.
    assert data["cost_usd"] == 0.0 and data["model_usage"] == {}
    assert "Fix add" in _git(project, "log", "-1", "--format=%s%n%b", "main")
    (noted,) = _events(done["history"], "NoteAdded")
    assert noted["reason"] == note["text"]
    # The tool answered the model (through storyline mcp, with the attempt's token).
    assert any("NoteAdded" in out or "note" in out for out in model.requests[4].function_outputs())

    second = _create(url, "Add sub")
    model.set_script(
        [
            _write(worktrees / second / "calc.py", WITH_SUB_BROKEN),
            _write(worktrees / second / "test_sub.py", TEST_SUB),
            _shell(COMMIT),
            {"text": "sub() added."},
            _write(worktrees / second / "calc.py", WITH_SUB_FIXED),
            _shell(COMMIT),
            {"text": "sub() fixed."},
        ]
    )
    _start(url, second)
    done = _wait_done(url, second)
    exits = _events(done["history"], "AgentExited")
    assert [e["data"]["outcome"] for e in exits] == ["completed", "completed"]
    assert len(_events(done["history"], "GatesFailed")) == 1
    # The retry resumed the thread, and the model read the gate failure in its prompt.
    assert exits[1]["data"]["session_id"] == exits[0]["data"]["session_id"]
    retry = next(r for r in model.requests if "Continue your prior work" in json.dumps(r.body))
    received = retry.messages("user")[-1]
    assert "quality gates failed" in received and "test_sub" in received
    assert "def sub(a, b):\n    return a - b" in _git(project, "show", "main:calc.py")
