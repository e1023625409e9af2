"""The real Codex CLI (pinned, ``scripts/install-agent-clis.sh``) against the scripted
Responses API server, through the production ``codex`` runtime: argv, sandbox, resume,
gate-failure injection, event parsing and outcomes.

Skipped when the CLI is not installed locally; a failure in CI. Each run takes seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from domain.config import AgentConfig
from runners.agents import AgentResult, SpawnSpec, StoryText, runtime_for
from runners.agents.codex_runtime import CodexRuntime
from tests.doubles.codex_cli import DUMMY_API_KEY, codex_cli, codex_env
from tests.doubles.openai_responses_server import ResponsesServer

WAIT = 90.0
MODEL = "gpt-5.1-codex"


@pytest.fixture
def cli() -> Path:
    return codex_cli()


@pytest.fixture
def server() -> Iterator[ResponsesServer]:
    with ResponsesServer() as srv:
        yield srv


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The story's worktree, as the runner makes it: a linked worktree of a repository, so
    the git directory the agent must write to is outside the worktree."""
    main = tmp_path / "project"
    main.mkdir()
    for argv in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.name", "Agent"],
        ["git", "config", "user.email", "agent@example.invalid"],
        ["git", "commit", "-q", "--allow-empty", "-m", "initial"],
        ["git", "worktree", "add", "-q", "-b", "feature/story-1", str(tmp_path / "wt")],
    ):
        subprocess.run(argv, cwd=main, check=True)
    return tmp_path / "wt"


def agent_config(cli: Path, server: ResponsesServer, **kw: Any) -> AgentConfig:
    return AgentConfig(
        name="coder",
        runtime="codex",
        command=str(cli),
        model=MODEL,
        base_url=server.url,
        api_key_env="STORYLINE_TEST_OPENAI_KEY",
        **kw,
    )


def spec_for(
    agent: AgentConfig,
    repo: Path,
    tmp_path: Path,
    *,
    attempt: int = 1,
    gate_failure: str | None = None,
    resume: str | None = None,
) -> SpawnSpec:
    secrets = {"OPENAI_API_KEY": DUMMY_API_KEY}
    return SpawnSpec(
        story_id="1",
        attempt=attempt,
        role="coder",
        agent=agent,
        cwd=repo,
        base_branch="main",
        story=StoryText("Say hello", "Create hello.txt", ("hello.txt is committed",)),
        log_path=tmp_path / "logs" / f"coder-{attempt}.log",
        inactivity_timeout_secs=60.0,
        overall_timeout_secs=agent.max_run_secs,
        env={**agent.agent_env(), **codex_env(tmp_path / "home"), **secrets},
        secret_names=frozenset(secrets),
        gate_failure=gate_failure,
        resume_session_id=resume,
    )


def run(agent: AgentConfig, repo: Path, tmp_path: Path, **kw: Any) -> AgentResult:
    runtime = runtime_for(agent)
    assert isinstance(runtime, CodexRuntime)
    return runtime.start(spec_for(agent, repo, tmp_path, **kw)).wait(WAIT)


def shell(cmd: str) -> dict[str, Any]:
    return {"function_call": [{"name": "exec_command", "arguments": {"cmd": cmd}}]}


def log(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", "log", "--format=%s"], cwd=repo, capture_output=True, text=True, check=True
    )
    return out.stdout.split("\n")[:-1]


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory outside the worktree and outside /tmp (which the sandbox leaves
    writable, as test runners need it)."""
    path = Path(tempfile.mkdtemp(prefix="storyline-sandbox-", dir=Path.home()))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_codex_edits_and_commits_in_its_worktree_under_the_sandbox(
    cli: Path, server: ResponsesServer, repo: Path, tmp_path: Path, outside: Path
) -> None:
    server.set_script(
        [
            shell("printf 'hello\\n' > hello.txt && git add hello.txt"),
            shell("git commit -q -m 'Add hello' && git log --oneline -1"),
            shell(f"touch {outside}/probe.txt"),
            {"text": "Done: hello.txt is committed."},
        ]
    )
    result = run(agent_config(cli, server), repo, tmp_path)
    assert result.outcome == "completed", (result.error, result.log_path.read_text())
    assert log(repo) == ["Add hello", "initial"]
    assert result.session_id and result.exit_code == 0
    assert result.turns == 1
    assert (result.tokens_in, result.tokens_out) == (4 * 150, 4 * 40)
    assert result.cost_usd is None
    assert result.result_text == "Done: hello.txt is committed."
    first = server.requests[0]
    assert first.headers["authorization"] == "[redacted]"
    assert "Create hello.txt" in first.messages("user")[-1]
    assert "`sandbox_mode` is `workspace-write`" in first.instructions
    assert "Add hello" in server.requests[2].function_outputs()[-1]
    # The sandbox holds: writable are the worktree and its git directories, nothing else.
    assert "Read-only file system" in server.requests[3].function_outputs()[-1]
    assert not (outside / "probe.txt").exists()


# --- a gate failure reaches the model, on a cold start and on a resume -----------------------

GATE_OUTPUT = "FAILED test_hello.py::test_greeting - AssertionError: 'helo' != 'hello'"


def test_a_gate_failure_reaches_the_model_as_developer_instructions_on_a_cold_start(
    cli: Path, server: ResponsesServer, repo: Path, tmp_path: Path
) -> None:
    server.set_script([{"text": "Fixed."}])
    result = run(agent_config(cli, server), repo, tmp_path, gate_failure=GATE_OUTPUT)
    assert result.outcome == "completed", result.error
    (request,) = server.requests
    assert "Your previous run's quality gates failed:\n" + GATE_OUTPUT in request.instructions
    assert GATE_OUTPUT not in request.messages("user")[-1]


def test_a_retry_resumes_the_thread_with_the_gate_failure_in_its_prompt(
    cli: Path, server: ResponsesServer, repo: Path, tmp_path: Path
) -> None:
    agent = agent_config(cli, server)
    server.set_script([shell("printf 'helo\\n' > hello.txt"), {"text": "First try."}])
    first = run(agent, repo, tmp_path)
    assert first.outcome == "completed" and first.session_id

    server.set_script([shell("printf 'hello\\n' > hello.txt"), {"text": "Fixed."}])
    second = run(
        agent, repo, tmp_path, attempt=2, gate_failure=GATE_OUTPUT, resume=first.session_id
    )
    assert second.outcome == "completed", second.error
    assert second.session_id == first.session_id
    assert (repo / "hello.txt").read_text() == "hello\n"
    resumed = server.requests[2]
    users = resumed.messages("user")
    # The thread holds the first run (its task, its tool call's output) and the new prompt.
    assert any("Create hello.txt" in text for text in users[:-1])
    assert users[-1].startswith("Continue your prior work on story 1.")
    assert GATE_OUTPUT in users[-1]
    # Codex keeps a thread's first developer instructions on resume: the failure is not
    # there, which is why a resume carries it in the prompt.
    assert GATE_OUTPUT not in resumed.instructions


# --- outcomes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message"),
    [(429, "Rate limit reached for requests"), (500, "The server had an error"), (503, "busy")],
)
def test_a_provider_outage_is_provider_unavailable(
    cli: Path, server: ResponsesServer, repo: Path, tmp_path: Path, status: int, message: str
) -> None:
    server.set_script([{"repeat": True, "error": {"status": status, "message": message}}])
    agent = agent_config(cli, server, args=["exec", "--json", *FEW_RETRIES])
    result = run(agent, repo, tmp_path)
    assert result.outcome == "provider_unavailable", (result.error, result.log_path.read_text())
    assert result.session_id is not None
    assert result.error is not None and "the model provider is unavailable" in result.error
    assert all(r.answered_with == f"error {status}" for r in server.requests)


def test_a_refused_api_key_is_a_failure_naming_the_status(
    cli: Path, server: ResponsesServer, repo: Path, tmp_path: Path
) -> None:
    server.set_script([{"repeat": True, "error": {"status": 401, "message": "Incorrect API key"}}])
    result = run(agent_config(cli, server, args=["exec", "--json", *FEW_RETRIES]), repo, tmp_path)
    assert result.outcome == "failed"
    assert result.error is not None and "HTTP 401" in result.error
    assert "Incorrect API key" in result.error


def test_max_run_secs_stops_a_run_that_waits_on_its_model(
    cli: Path, server: ResponsesServer, repo: Path, tmp_path: Path
) -> None:
    server.set_script([{"delay_secs": 30.0, "text": "too late"}])
    result = run(agent_config(cli, server, max_run_secs=2.0), repo, tmp_path)
    assert result.outcome == "timed_out"
    assert result.duration_secs < 25.0
    assert result.session_id is not None


FEW_RETRIES = [
    "-c",
    "model_providers.storyline.request_max_retries=1",
    "-c",
    "model_providers.storyline.stream_max_retries=0",
]


def test_a_cli_refusing_its_configuration_is_aborted_before_session_with_its_own_line(
    cli: Path, server: ResponsesServer, repo: Path, tmp_path: Path
) -> None:
    agent = agent_config(cli, server, args=["exec", "--json", "-c", 'sandbox_mode="bogus"'])
    result = run(agent, repo, tmp_path)
    assert result.outcome == "aborted_before_session"
    assert result.session_id is None and server.requests == []
    assert result.error is not None and "bogus" in result.error, result.error
