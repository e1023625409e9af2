"""How an attempt registers ``storyline mcp``: a config file with no secret, one argv flag for
Claude Code, nothing for other runtimes."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

from domain.config import AgentConfig, AgentRuntime
from runners.agents import SpawnSpec, StoryText, build_argv
from runners.agents.mcp_config import write_mcp_config

TOKEN = "sl_agent_not-a-real-token-0123456789"


def spec(tmp_path: Path, runtime: AgentRuntime, mcp_config: Path | None) -> SpawnSpec:
    return SpawnSpec(
        story_id="7",
        attempt=1,
        role="mergemaster",
        agent=AgentConfig(name="mm", stage="mergemaster", runtime=runtime, command="claude"),
        cwd=tmp_path,
        base_branch="main",
        story=StoryText("Merge me", "", ("merged",)),
        log_path=tmp_path / "mergemaster-1.log",
        inactivity_timeout_secs=60,
        env={"STORYLINE_TOKEN": TOKEN},
        mcp_config=mcp_config,
    )


def test_the_config_file_names_the_server_and_story_but_holds_no_token(tmp_path: Path) -> None:
    path = write_mcp_config(
        tmp_path / "logs" / "7" / "mergemaster-1.mcp.json", url="http://127.0.0.1:9", story_id="7"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = json.loads(path.read_text())["mcpServers"]["storyline"]
    assert entry["command"] == sys.executable
    assert entry["args"] == [
        "-P",
        "-m",
        "api.cli",
        "mcp",
        "--url",
        "http://127.0.0.1:9",
        "--story",
        "7",
    ]
    assert entry["env"] == {"STORYLINE_TOKEN": "${STORYLINE_TOKEN:-}"}


def test_claude_code_gets_one_mcp_config_flag_and_the_token_stays_out(tmp_path: Path) -> None:
    config = tmp_path / "mergemaster-1.mcp.json"
    argv = build_argv(spec(tmp_path, "claude-code", config))
    assert [a for a in argv if a.startswith("--mcp-config")] == [f"--mcp-config={config}"]
    assert not any(TOKEN in a for a in argv)
    assert not any("--mcp-config" in a for a in build_argv(spec(tmp_path, "claude-code", None)))
    assert not any("--mcp-config" in a for a in build_argv(spec(tmp_path, "cli", config)))
