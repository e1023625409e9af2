"""The ``codex`` runtime's argv and config rules (pure: no CLI needed)."""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from domain.config import CODEX_ARGS, AgentConfig
from runners.agents import SecretInArgvError, SpawnSpec, StoryText, runtime_for
from runners.agents.codex_argv import build_codex_argv, toml_value
from runners.agents.codex_runtime import CodexRuntime

KEY = "sk-openai-secret-value-0123456789"
TOKEN = "story-token-0123456789abcdef"


def codex(**kw: Any) -> AgentConfig:
    return AgentConfig(name="coder", runtime="codex", model="gpt-5.1-codex", **kw)


def spec(agent: AgentConfig | None = None, **kw: Any) -> SpawnSpec:
    env = {"OPENAI_API_KEY": KEY, "STORYLINE_TOKEN": TOKEN}
    return SpawnSpec(
        story_id="7",
        attempt=1,
        role="coder",
        agent=agent or codex(base_url="http://127.0.0.1:9/v1", api_key_env="MY_KEY"),
        cwd=Path("/work/wt"),
        base_branch="main",
        story=kw.pop("story", StoryText("Greet", "Say hello", ("hello.txt exists",))),
        log_path=Path("/tmp/coder-1.log"),
        inactivity_timeout_secs=60.0,
        env=env,
        secret_names=frozenset({"OPENAI_API_KEY"}),
        **kw,
    )


def overrides(argv: list[str]) -> dict[str, Any]:
    """The -c key=value pairs, values parsed as the CLI parses them (TOML)."""
    out: dict[str, Any] = {}
    for flag, pair in itertools.pairwise(argv):
        if flag == "-c":
            key, _, value = pair.partition("=")
            out[key] = tomllib.loads(f"v = {value}")["v"]
    return out


def test_a_codex_agent_defaults_to_codex_exec_json_and_gets_its_own_runtime() -> None:
    agent = codex()
    assert (agent.command, agent.args) == ("codex", CODEX_ARGS)
    assert isinstance(runtime_for(agent), CodexRuntime)


def test_a_cold_start_runs_exec_in_the_sandbox_with_the_prompt_last() -> None:
    argv = build_codex_argv(spec(), git_dirs=[Path("/repo/.git/worktrees/7"), Path("/repo/.git")])
    assert argv[:3] == ["codex", "exec", "--json"]
    assert "resume" not in argv
    assert argv[-3:-1] == ["--model", "gpt-5.1-codex"]
    assert argv[-1].startswith("You are working on story 7") and "Say hello" in argv[-1]
    assert overrides(argv) == {
        "sandbox_mode": "workspace-write",
        "sandbox_workspace_write.writable_roots": ["/repo/.git/worktrees/7", "/repo/.git"],
        "approval_policy": "never",
        "model_provider": "storyline",
        "model_providers.storyline.name": "storyline",
        "model_providers.storyline.base_url": "http://127.0.0.1:9/v1",
        "model_providers.storyline.wire_api": "responses",
        "model_providers.storyline.env_key": "OPENAI_API_KEY",
    }


def test_a_resume_names_the_thread_before_the_prompt() -> None:
    argv = build_codex_argv(spec(resume_session_id="01a2-thread"))
    assert argv[:4] == ["codex", "exec", "resume", "--json"]
    assert argv[-2] == "01a2-thread"
    assert argv[-1].startswith("Continue your prior work on story 7.")


def test_a_gate_failure_is_developer_instructions_cold_and_the_prompt_on_resume() -> None:
    failure = "FAILED test_x - assert \"a\\b\" == 'c'\n\ttab \x7f end \u00e9"
    cold = build_codex_argv(spec(gate_failure=failure))
    assert overrides(cold)["developer_instructions"] == (
        "Your previous run's quality gates failed:\n" + failure
    )
    assert failure not in cold[-1]
    resumed = build_codex_argv(spec(gate_failure=failure, resume_session_id="t"))
    assert "developer_instructions" not in overrides(resumed)
    assert failure in resumed[-1]


@pytest.mark.parametrize(
    "text", ["plain", 'quote " and \\ backslash', "line\nbreak\r\t", "del \x7f", "\U0001f600 é"]
)
def test_toml_values_read_back_as_written(text: str) -> None:
    assert tomllib.loads(f"v = {toml_value(text)}")["v"] == text
    assert tomllib.loads(f"v = {toml_value([text, 'x'])}")["v"] == [text, "x"]


def test_the_mcp_server_gets_the_token_by_name_only() -> None:
    argv = build_codex_argv(spec(), mcp_server=("/venv/python", ["-P", "-m", "api.cli", "mcp"]))
    found = overrides(argv)
    assert found["mcp_servers.storyline.command"] == "/venv/python"
    assert found["mcp_servers.storyline.args"] == ["-P", "-m", "api.cli", "mcp"]
    assert found["mcp_servers.storyline.env_vars"] == ["STORYLINE_TOKEN"]
    assert found["mcp_servers.storyline.required"] is True
    assert found["mcp_servers.storyline.default_tools_approval_mode"] == "approve"
    assert not any(TOKEN in arg or KEY in arg for arg in argv)


def test_a_secret_in_the_prompt_is_refused() -> None:
    leaky = StoryText("Greet", f"use the key {KEY}")
    with pytest.raises(SecretInArgvError):
        build_codex_argv(spec(story=leaky))


def test_the_agents_own_sandbox_choice_is_kept() -> None:
    agent = codex(args=["exec", "--json", "--dangerously-bypass-approvals-and-sandbox"])
    argv = build_codex_argv(spec(agent), git_dirs=[Path("/repo/.git")])
    assert not any(key.startswith(("sandbox", "approval")) for key in overrides(argv))
    assert "--dangerously-bypass-approvals-and-sandbox" in argv


def test_a_prompt_starting_with_a_dash_stays_a_positional_argument() -> None:
    agent = codex(prompt="--help me with story {{story_id}}")
    assert build_codex_argv(spec(agent))[-1].startswith("\n--help me with story 7")


def test_api_key_env_becomes_the_agents_openai_api_key() -> None:
    assert codex(api_key_env="TEAM_OPENAI_KEY").agent_secrets() == {
        "OPENAI_API_KEY": "TEAM_OPENAI_KEY"
    }
    assert codex(base_url="http://x/v1").agent_env() == {}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_turns": 5}, "no turn or spending cap"),
        ({"max_budget_usd": 1.0}, "no turn or spending cap"),
        ({"args": ["exec", "--json", "{{prompt}}"]}, "remove {{prompt}}"),
        ({"args": ["--json"]}, "args starting with exec"),
        ({"args": ["exec"]}, "holding --json"),
        ({"base_url": "http://x/v1", "env": {"OPENAI_BASE_URL": "http://y"}}, "base URL"),
        ({"api_key_env": "K", "secrets": {"OPENAI_API_KEY": "K2"}}, "codex key"),
    ],
)
def test_settings_that_cannot_work_with_codex_are_refused(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("{", r"\{").replace("}", r"\}")):
        codex(**settings)
