"""The real Claude Code CLI (pinned, ``scripts/install-agent-clis.sh``) against the scripted
model server, through the production runtime: argv, environment, watchdog, classification.

Skipped when the CLI is not installed locally; a failure in CI. Each run takes seconds.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from domain.config import AgentConfig
from runners.agents import AgentResult, CliRuntime, SpawnSpec, StoryText
from tests.doubles.anthropic_server import AnthropicServer
from tests.doubles.claude_cli import DUMMY_API_KEY, OFFLINE_ENV, claude_cli

WAIT = 90.0
GATE = ("git", "status")  # a harmless "gate" the agent may run under its allowlist


@pytest.fixture
def cli() -> Path:
    return claude_cli()


@pytest.fixture
def server() -> Iterator[AnthropicServer]:
    with AnthropicServer() as srv:
        yield srv


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    for argv in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.name", "Agent"],
        ["git", "config", "user.email", "agent@example.invalid"],
        ["git", "commit", "-q", "--allow-empty", "-m", "initial"],
    ):
        subprocess.run(argv, cwd=path, check=True)
    return path


def agent_config(cli: Path, server: AnthropicServer, tmp_path: Path, **kw: Any) -> AgentConfig:
    """An agent as ``storyline init`` writes it, pointed at the scripted server."""
    env = {**OFFLINE_ENV, "HOME": str(tmp_path / "home"), **kw.pop("env", {})}
    return AgentConfig(
        name="coder",
        command=str(cli),
        model="sonnet",
        base_url=server.url,
        env=env,
        **kw,
    )


def run(
    agent: AgentConfig,
    repo: Path,
    tmp_path: Path,
    *,
    inactivity: float = 60.0,
    secrets: dict[str, str] | None = None,
    strip: tuple[str, ...] = (),
) -> AgentResult:
    secrets = {"ANTHROPIC_API_KEY": DUMMY_API_KEY} if secrets is None else secrets
    (tmp_path / "home").mkdir(exist_ok=True)
    spec = SpawnSpec(
        story_id="1",
        attempt=1,
        role="coder",
        agent=agent,
        cwd=repo,
        base_branch="main",
        story=StoryText("Say hello", "Create hello.txt", ("hello.txt is committed",)),
        log_path=tmp_path / "logs" / "coder-1.log",
        inactivity_timeout_secs=inactivity,
        overall_timeout_secs=agent.max_run_secs,
        env={**agent.agent_env(), **secrets},
        secret_names=frozenset(secrets),
        gate_commands=(GATE,),
    )
    return CliRuntime(strip_env=strip).start(spec).wait(WAIT)


def write_and_commit(repo: Path) -> list[dict[str, Any]]:
    commit = "git add -A && git commit -m 'Add hello'"
    return [
        {
            "tool_use": [
                {
                    "name": "Write",
                    "input": {"file_path": str(repo / "hello.txt"), "content": "hello\n"},
                }
            ]
        },
        {"tool_use": [{"name": "Bash", "input": {"command": "git status"}}]},
        {"tool_use": [{"name": "Bash", "input": {"command": commit}}]},
        {"text": "Done: hello.txt is committed."},
    ]


def log(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", "log", "--format=%s"], cwd=repo, capture_output=True, text=True, check=True
    )
    return out.stdout.split("\n")[:-1]


# --- observation 1: the default permissions let the CLI commit ------------------------------


def test_default_permissions_let_the_cli_edit_run_gates_and_commit_as_root(
    cli: Path, server: AnthropicServer, repo: Path, tmp_path: Path
) -> None:
    server.set_script(write_and_commit(repo))
    result = run(agent_config(cli, server, tmp_path), repo, tmp_path)
    assert result.outcome == "completed", result.error
    assert result.permission_denials == ()
    assert log(repo) == ["Add hello", "initial"]
    results = [r for req in server.main_requests for r in req.tool_results()]
    assert not any(r.get("is_error") for r in results), results


def test_a_refused_command_is_outcome_permission_denied_naming_the_command(
    cli: Path, server: AnthropicServer, repo: Path, tmp_path: Path
) -> None:
    server.set_script(write_and_commit(repo))
    agent = agent_config(cli, server, tmp_path, allowed_tools=[], allow_gate_commands=False)
    result = run(agent, repo, tmp_path)
    assert result.outcome == "permission_denied"
    assert result.error is not None
    assert "git add -A && git commit -m 'Add hello'" in result.error
    assert result.permission_denials == ("Bash: git add -A && git commit -m 'Add hello'",)
    assert log(repo) == ["initial"]


# --- observations 2 and 7: what the CLI reports is recorded -------------------------------


def test_max_turns_is_its_own_outcome_with_the_reported_model_and_usage(
    cli: Path, server: AnthropicServer, repo: Path, tmp_path: Path
) -> None:
    server.set_script(
        [{"repeat": True, "tool_use": [{"name": "Bash", "input": {"command": "git status"}}]}]
    )
    result = run(agent_config(cli, server, tmp_path, max_turns=2), repo, tmp_path)
    assert result.outcome == "max_turns"
    assert result.error is not None and "turn cap" in result.error
    assert result.result_subtype == "error_max_turns"
    # The model the CLI resolved the alias to, not the alias.
    assert result.model is not None and result.model != "sonnet"
    assert result.model == server.main_requests[0].body["model"]
    assert result.tokens_in > 0 and result.model_usage[result.model]["tokens_in"] > 0


def test_max_budget_records_tokens_from_model_usage(
    cli: Path, server: AnthropicServer, repo: Path, tmp_path: Path
) -> None:
    server.set_script(
        [{"repeat": True, "tool_use": [{"name": "Bash", "input": {"command": "git status"}}]}]
    )
    result = run(agent_config(cli, server, tmp_path, max_budget_usd=0.0001), repo, tmp_path)
    assert result.outcome == "max_budget"
    assert result.tokens_in > 0 and result.tokens_out > 0
    assert result.cost_usd is not None and result.cost_usd > 0


def test_a_provider_outage_is_provider_unavailable(
    cli: Path, server: AnthropicServer, repo: Path, tmp_path: Path
) -> None:
    server.set_script([{"repeat": True, "error": {"status": 529, "message": "Overloaded"}}])
    result = run(agent_config(cli, server, tmp_path), repo, tmp_path)
    assert result.outcome == "provider_unavailable"
    assert result.api_error_status == 529 and result.api_retries >= 1
    assert result.error is not None and "HTTP 529" in result.error


# --- observation 5: root, --dangerously-skip-permissions, IS_SANDBOX ------------------------


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the CLI's root check needs root")


@needs_root
def test_skip_permissions_as_root_fails_with_the_cli_own_line_in_the_reason(
    cli: Path, server: AnthropicServer, repo: Path, tmp_path: Path
) -> None:
    agent = agent_config(
        cli,
        server,
        tmp_path,
        args=[
            "-p",
            "{{prompt}}",
            "--output-format",
            "stream-json",
            "--verbose",
            "--dangerously-skip-permissions",
        ],
    )
    result = run(agent, repo, tmp_path)
    assert result.outcome == "aborted_before_session"
    assert result.error is not None
    assert "cannot be used with root/sudo privileges" in result.error


@needs_root
def test_is_sandbox_in_the_agent_env_lets_root_skip_permissions(
    cli: Path, server: AnthropicServer, repo: Path, tmp_path: Path
) -> None:
    server.set_script(write_and_commit(repo))
    agent = agent_config(
        cli,
        server,
        tmp_path,
        args=[
            "-p",
            "{{prompt}}",
            "--output-format",
            "stream-json",
            "--verbose",
            "--dangerously-skip-permissions",
        ],
        env={"IS_SANDBOX": "1"},
    )
    result = run(agent, repo, tmp_path)
    assert result.outcome == "completed", result.error
    assert log(repo) == ["Add hello", "initial"]


# --- observation 6: a claude-code agent keeps its own key ----------------------------------


def test_api_key_env_anthropic_api_key_reaches_the_cli(
    cli: Path, server: AnthropicServer, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from domain.config import StorylineConfig
    from runners.launcher import AgentLauncher

    monkeypatch.setenv("ANTHROPIC_API_KEY", DUMMY_API_KEY)
    agent = agent_config(cli, server, tmp_path, api_key_env="ANTHROPIC_API_KEY")
    config = StorylineConfig(agent=[agent])
    launcher = AgentLauncher.__new__(AgentLauncher)
    launcher.config = config
    strip = launcher._strip_env(agent)
    secrets = launcher._agent_secrets(agent)
    assert "ANTHROPIC_API_KEY" not in strip
    server.set_script([{"text": "hello"}])
    result = run(agent, repo, tmp_path, secrets=secrets, strip=strip)
    assert result.outcome == "completed", result.error
    assert server.main_requests and server.main_requests[0].headers.get("x-api-key")


# --- observation 9: time ------------------------------------------------------------------


def test_a_long_generation_streams_partial_messages_and_is_not_inactive(
    cli: Path, server: AnthropicServer, repo: Path, tmp_path: Path
) -> None:
    # About 10 s of generation in 0.25 s pieces against a 4 s inactivity timeout: the
    # default args carry --include-partial-messages, so the CLI prints each piece.
    server.set_script([{"text": "word " * 200, "stream_delay_secs": 0.25}])
    result = run(agent_config(cli, server, tmp_path), repo, tmp_path, inactivity=4.0)
    assert result.outcome == "completed", result.error


def test_without_partial_messages_the_same_generation_looks_hung(
    cli: Path, server: AnthropicServer, repo: Path, tmp_path: Path
) -> None:
    # Why the flag is in the defaults: without it the CLI is silent for the whole call.
    server.set_script([{"text": "word " * 200, "stream_delay_secs": 0.25}])
    args = [a for a in AgentConfig(name="x").args if a != "--include-partial-messages"]
    agent = agent_config(cli, server, tmp_path, args=args)
    result = run(agent, repo, tmp_path, inactivity=4.0)
    assert result.outcome == "inactive"


def test_max_run_secs_stops_a_busy_run_as_timed_out(
    cli: Path, server: AnthropicServer, repo: Path, tmp_path: Path
) -> None:
    server.set_script([{"text": "word " * 400, "stream_delay_secs": 0.1}])
    result = run(agent_config(cli, server, tmp_path, max_run_secs=2), repo, tmp_path, inactivity=30)
    assert result.outcome == "timed_out"
    assert result.error is not None and "max_run_secs" in result.error
