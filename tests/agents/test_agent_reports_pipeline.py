"""What an agent reports reaches the story: prompts of their own, block reasons that quote
the agent, permission refusals, old AgentExited events replaying unchanged.

Pipelines run on a real SQLite file with real git and real agent processes (the scripted
stand-in, or the real Claude Code CLI against the scripted model server).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from eventsourcing.persistence import StoredEvent

from domain.config import AgentConfig, StorylineConfig
from domain.events import AgentExited
from domain.stages import AgentOutcome, Stage
from runners.agents import SpawnSpec, StoryText, build_prompt
from service import migrations
from service.codec import OrjsonTranscoder, PydanticMapper
from service.settings import Database
from tests.doubles.anthropic_server import AnthropicServer
from tests.doubles.claude_cli import DUMMY_API_KEY, OFFLINE_ENV, claude_cli
from tests.pipeline_support import calls, make_config, make_repo, running_pipeline


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    db = Database(kind="sqlite", sqlite_path=tmp_path / "storyline.db")
    migrations.upgrade(db)
    return db


@pytest.fixture
def model() -> Iterator[AnthropicServer]:
    with AnthropicServer() as server:
        yield server


def real_cli_agent(model: AnthropicServer, tmp_path: Path, **kw: Any) -> dict[str, Any]:
    (tmp_path / "home").mkdir(exist_ok=True)
    return {
        "name": "coder",
        "stage": "coder",
        "runtime": "claude-code",
        "command": str(claude_cli()),
        "model": "sonnet",
        "base_url": model.url,
        "env": {**OFFLINE_ENV, "HOME": str(tmp_path / "home"), **kw.pop("env", {})},
        "secrets": {"ANTHROPIC_API_KEY": "STORYLINE_TEST_MODEL_KEY"},
        **kw,
    }


# --- observation 3: the commit-leftovers respawn says what is uncommitted -------------------


def test_the_leftovers_respawn_prompt_names_the_uncommitted_files(
    tmp_path: Path, sqlite_db: Database
) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(
        tmp_path,
        {
            "s1": {
                "1": [{"write": "app.py", "content": "def add(a, b):\n    return a + b\n"}],
                "2": [{"commit": "fix add"}],
            }
        },
    )
    with running_pipeline(repo, sqlite_db, config) as p:
        p.add("s1")
        p.start("s1")
        p.wait_stage("s1", Stage.MERGE, Stage.DONE, Stage.MERGE_FAILURE)
    _, second = calls(tmp_path)
    assert "UncommittedChangesFound" in p.types("s1")
    prompt = second["prompt"]
    assert "uncommitted changes" in prompt and "- app.py" in prompt
    assert "git commit" in prompt


# --- observation 8: the mergemaster's own prompt --------------------------------------------


def test_the_mergemaster_prompt_is_about_the_merge_workspace(tmp_path: Path) -> None:
    spec = SpawnSpec(
        story_id="7",
        attempt=1,
        role="mergemaster",
        agent=AgentConfig(name="mm", stage="mergemaster"),
        cwd=tmp_path,
        base_branch="main",
        story=StoryText("Banner"),
        log_path=tmp_path / "mm.log",
        inactivity_timeout_secs=60,
        conflicts=("banner.txt", "src/app.py"),
        conflict_details="CONFLICT (content): Merge conflict in banner.txt",
        purpose="mergemaster",
    )
    prompt = build_prompt(spec)
    assert "mergemaster" in prompt and "merge workspace" in prompt
    assert "detached HEAD" in prompt
    assert "- banner.txt\n- src/app.py" in prompt
    assert "report_merge_resolved" in prompt and "report_merge_gave_up" in prompt
    assert "$STORYLINE_URL/stories/$STORYLINE_STORY_ID/transitions" in prompt  # the fallback
    assert "commit your work on the current branch" not in prompt


# --- observation 5: a block reason quotes the agent's own last line -------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI's root check needs root")
def test_a_cli_refusing_to_start_blocks_the_story_quoting_its_own_error(
    tmp_path: Path, sqlite_db: Database, model: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORYLINE_TEST_MODEL_KEY", DUMMY_API_KEY)
    repo = make_repo(tmp_path / "repo")
    args = ["-p", "{{prompt}}", "--output-format", "stream-json", "--verbose"]
    agent = real_cli_agent(model, tmp_path, args=[*args, "--dangerously-skip-permissions"])
    config = make_config(tmp_path, {}, abort_respawn_cap=1)
    config = StorylineConfig.model_validate(
        {**config.model_dump(), "agent": [agent, config.model_dump()["agent"][1]]}
    )
    with running_pipeline(repo, sqlite_db, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", Stage.BLOCKED, timeout=90)
    exited = next(e for e in p.app.history("s1") if e.type == "AgentExited")
    assert exited.data["outcome"] == "aborted_before_session"
    assert "cannot be used with root/sudo privileges" in (exited.reason or "")
    assert story.blocked_reason is not None
    assert "cannot be used with root/sudo privileges" in story.blocked_reason


# --- observation 1: a refusal that left work uncommitted blocks, naming the command ---------


def test_a_refused_commit_blocks_with_the_refused_command(
    tmp_path: Path, sqlite_db: Database, model: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORYLINE_TEST_MODEL_KEY", DUMMY_API_KEY)
    repo = make_repo(tmp_path / "repo")
    agent = real_cli_agent(model, tmp_path, allowed_tools=[], allow_gate_commands=False)
    config = make_config(tmp_path, {})
    config = StorylineConfig.model_validate(
        {**config.model_dump(), "agent": [agent, config.model_dump()["agent"][1]]}
    )
    wt = repo / ".storyline" / "worktrees" / "s1"
    commit = "git add -A && git commit -m 'fix add'"
    model.set_script(
        [
            {
                "tool_use": [
                    {
                        "name": "Write",
                        "input": {
                            "file_path": str(wt / "app.py"),
                            "content": "def add(a, b):\n    return a + b\n",
                        },
                    }
                ]
            },
            {"tool_use": [{"name": "Bash", "input": {"command": commit}}]},
            {"text": "I could not commit."},
        ]
    )
    with running_pipeline(repo, sqlite_db, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", Stage.BLOCKED, timeout=90)
    exited = next(e for e in p.app.history("s1") if e.type == "AgentExited")
    assert exited.data["outcome"] == "permission_denied"
    assert exited.data["permission_denials"] == [f"Bash: {commit}"]
    assert exited.data["result_subtype"] == "success"
    assert exited.data["result_text"] == "I could not commit."
    assert story.blocked_reason is not None
    assert commit in story.blocked_reason and "app.py" in story.blocked_reason
    # One run, no respawn into the same refusal.
    assert [e.type for e in p.app.history("s1")].count("AgentSpawnRequested") == 1
    spawn = next(e for e in p.app.history("s1") if e.type == "AgentSpawnRequested")
    assert DUMMY_API_KEY not in orjson.dumps(spawn.data).decode()


# --- AgentExited v2: old events replay unchanged ------------------------------------------


def test_a_version_1_agent_exited_event_is_upcast_with_empty_reports() -> None:
    mapper = PydanticMapper(transcoder=OrjsonTranscoder())
    v1 = {
        "timestamp": "2026-01-01T00:00:00+00:00",
        "actor": "runner:coder",
        "reason": None,
        "from_stage": None,
        "to_stage": None,
        "role": "coder",
        "attempt": 1,
        "outcome": "completed",
        "exit_code": 0,
        "signal": None,
        "session_id": "s",
        "turns": 3,
        "tokens_in": 10,
        "tokens_out": 2,
        "cost_usd": 0.01,
        "log_path": None,
    }
    stored = StoredEvent(
        originator_id="s1",
        originator_version=5,
        topic=AgentExited.TOPIC,
        state=orjson.dumps(v1),
    )
    event = mapper.to_domain_event(stored)
    assert isinstance(event, AgentExited)
    assert event.outcome is AgentOutcome.COMPLETED and event.turns == 3
    assert event.model is None and event.permission_denials == [] and event.api_retries == 0
    again = mapper.to_stored_event(event)
    assert orjson.loads(again.state)["class_version"] == 2


# --- observation 6: combinations that cannot work are config errors -------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"env": {"ANTHROPIC_API_KEY": "sk-live"}}, "looks like a secret"),
        ({"env": {"STORYLINE_TOKEN": "x"}}, "reserved"),
        ({"secrets": {"A": "not a name"}}, "not a valid variable name"),
        ({"env": {"X": "1"}, "secrets": {"X": "Y"}}, "both env and secrets"),
        ({"base_url": "http://a", "env": {"ANTHROPIC_BASE_URL": "http://b"}}, "base URL"),
        (
            {"api_key_env": "K", "secrets": {"ANTHROPIC_API_KEY": "K2"}},
            "both set the claude-code key",
        ),
        (
            {"runtime": "openai", "base_url": "http://a/v1", "secrets": {"A": "B"}},
            "runtime 'openai' runs in the server",
        ),
    ],
)
def test_agent_settings_that_cannot_work_are_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AgentConfig.model_validate({"name": "a", **raw})


def test_secrets_and_base_url_reach_the_agent_env_and_own_keys_are_kept() -> None:
    agent = AgentConfig(
        name="c",
        base_url="http://127.0.0.1:9/",
        api_key_env="ANTHROPIC_API_KEY",
        secrets={"GH_TOKEN": "SERVER_GH_TOKEN"},
    )
    other = AgentConfig(name="o", stage="mergemaster", secrets={"GH_TOKEN": "OTHER_GH"})
    assert agent.agent_env() == {"ANTHROPIC_BASE_URL": "http://127.0.0.1:9/"}
    assert agent.agent_secrets() == {
        "GH_TOKEN": "SERVER_GH_TOKEN",
        "ANTHROPIC_API_KEY": "ANTHROPIC_API_KEY",
    }
    from runners.launcher import AgentLauncher

    launcher = AgentLauncher.__new__(AgentLauncher)
    launcher.config = StorylineConfig(agent=[agent, other])
    strip = launcher._strip_env(agent)
    assert "ANTHROPIC_API_KEY" not in strip and "SERVER_GH_TOKEN" not in strip
    assert "OTHER_GH" in strip


# --- observation 7: the agent_runs read model shows the model the CLI reported --------------


def test_agent_runs_show_the_reported_model_instead_of_the_alias() -> None:
    from datetime import UTC, datetime

    from projections.state import apply_run_event
    from service.events_log import LoggedEvent

    def logged(position: int, kind: str, data: dict[str, Any]) -> LoggedEvent:
        return LoggedEvent(
            position,
            "s1",
            position,
            kind,
            f"storyline.{kind}.v1",
            datetime.now(UTC),
            "runner:coder",
            None,
            None,
            None,
            {"role": "coder", "attempt": 1, **data},
        )

    run = apply_run_event(None, logged(1, "AgentSpawnRequested", {"agent": "c", "model": "sonnet"}))
    assert run.model == "sonnet"
    run = apply_run_event(
        run, logged(2, "AgentExited", {"outcome": "completed", "model": "claude-sonnet-5-5"})
    )
    assert run.model == "claude-sonnet-5-5"
    old = apply_run_event(None, logged(1, "AgentSpawnRequested", {"agent": "c", "model": "sonnet"}))
    assert (
        apply_run_event(old, logged(2, "AgentExited", {"outcome": "completed"})).model == "sonnet"
    )
