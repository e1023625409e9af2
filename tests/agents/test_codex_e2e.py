"""``storyline serve`` driving the real Codex CLI (runtime ``codex``) as root, against the
scripted Responses API server: a story to done with a commit codex made (and a note it added
through the ``storyline mcp`` tools), a gate failure retried into a pass, with the failure in
what the model received, and a merge conflict resolved by a codex mergemaster that reports
its verdict through the MCP tool.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
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

pytestmark = pytest.mark.slow

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


@contextmanager
def codex_served(
    root: Path, tmp_path: Path, top: str = ""
) -> Iterator[tuple[str, ResponsesServer]]:
    """``storyline serve`` on the project ``root`` with codex agents on a scripted model."""
    cli = codex_cli()
    with ResponsesServer() as model:
        config = top + CONFIG.format(model=MODEL, base_url=model.url)
        (root / "storyline.toml").write_text(config)
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
            [str(VENV_BIN / "storyline"), "serve", "--project", str(root), "--port", str(port)],
            cwd=root,
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


@pytest.fixture
def served(project: Path, tmp_path: Path) -> Iterator[tuple[str, ResponsesServer]]:  # noqa: F811
    with codex_served(project, tmp_path) as served:
        yield served


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


# --- a codex mergemaster resolves a conflict and reports through storyline mcp ---------------

BASE = "def add(a, b):\n    return 0\n"
TEST_ADD = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
FIRST = "def add(a, b):\n    return a + b\n"
SECOND = "def add(a, b):\n    return b + a\n"
RESOLVED = FIRST + "\n\n# The other story's b + a is the same sum.\n"
"""Keeps the base's line; the story's own ``b + a`` goes, declared (the no-hunk-lost check)."""
DROP = {
    "file": "calc.py",
    "side": "story",
    "hunk": "@@ -2 +2 @@",
    "reason": "b + a is the same sum as the base's a + b",
}
RESOLUTION = "kept a + b; both sides computed the same sum"


def test_a_codex_mergemaster_resolves_a_conflict_and_reports_through_mcp(
    tmp_path: Path,
) -> None:
    repo_dir = tmp_path / "conflicts"
    repo_dir.mkdir()
    (repo_dir / "calc.py").write_text(BASE)
    (repo_dir / "test_calc.py").write_text(TEST_ADD)
    _git(repo_dir, "init", "-q", "-b", "main")
    _git(repo_dir, "config", "user.name", "Storyline User")
    _git(repo_dir, "config", "user.email", "user@example.invalid")
    _git(repo_dir, "add", "-A")
    _git(repo_dir, "commit", "-q", "-m", "initial")
    verdict = {"summary": RESOLUTION}
    # One coder at a time, so the two coders' model turns come in a known order.
    with codex_served(repo_dir, tmp_path, top="max_coders = 1\n") as (url, model):
        model.set_script(
            [
                _write(Path("calc.py"), FIRST),
                _shell(COMMIT),
                {"text": "add() fixed."},
                _write(Path("calc.py"), SECOND),
                _shell(COMMIT),
                {"text": "add() fixed too."},
                _write(Path("calc.py"), RESOLVED),
                _shell(COMMIT),
                {
                    "function_call": [
                        {
                            "namespace": "mcp__storyline",
                            "name": "declare_dropped_hunk",
                            "arguments": DROP,
                        }
                    ]
                },
                {
                    "function_call": [
                        {
                            "namespace": "mcp__storyline",
                            "name": "report_merge_resolved",
                            "arguments": verdict,
                        }
                    ]
                },
                {"text": "Resolved and reported."},
            ]
        )
        first = _create(url, "Fix add")
        second = _create(url, "Fix add another way")
        _start(url, first)
        _start(url, second)
        # merge_failure is where the mergemaster works: wait past it.
        deadline = time.monotonic() + 180.0
        while time.monotonic() < deadline:
            stage = httpx.get(f"{url}/stories/{second}", timeout=10).json()["stage"]
            if stage in ("done", "blocked"):
                break
            time.sleep(0.3)
        history = _wait_done(url, second)["history"]
        _wait_done(url, first)
    (failed,) = _events(history, "MergeFailed")
    assert failed["data"]["kind"] == "conflict_detected"
    (declared,) = _events(history, "DroppedHunkDeclared")
    assert declared["actor"] == f"agent:mergemaster-{second}-1"
    assert (declared["data"]["side"], declared["reason"]) == ("story", DROP["reason"])
    (requeued,) = _events(history, "MergeRequeued")
    assert requeued["actor"] == f"agent:mergemaster-{second}-1"
    assert requeued["reason"] == RESOLUTION
    spawns = _events(history, "AgentSpawnRequested")
    (mergemaster,) = [e for e in spawns if e["data"]["role"] == "mergemaster"]
    assert mergemaster["data"]["argv"][:3] == ["codex", "exec", "--json"]
    # The full argv is in the attempt's log: the server registered by name, the token
    # forwarded from the environment, never written.
    logged = (repo_dir / ".storyline" / "logs" / second / "mergemaster-1.log").read_text()
    argv = json.loads(logged.split("argv=", 1)[1].split("\n", 1)[0])
    assert 'mcp_servers.storyline.env_vars=["STORYLINE_TOKEN"]' in argv
    assert not any("sl_agent_" in a for a in argv)
    # The tool's answer reached the model.
    answer = "".join(model.requests[-1].function_outputs()).replace(" ", "").replace("\\", "")
    assert '"event":"merge_resolved"' in answer, answer[-2000:]
    assert _git(repo_dir, "show", "main:calc.py") == RESOLVED
