"""The provider breaker with the real Claude Code CLI (pinned, ``scripts/install-agent-clis.sh``)
against the scripted model server answering 529: three runs that the CLI gives up on open
the breaker, no spawn happens while it is open, and the probe run, once the model answers
again, closes it and the story reaches the merge.

Skipped when the CLI is not installed locally; a failure in CI.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from domain.config import StorylineConfig
from domain.stages import Stage
from service import migrations
from service.settings import Database
from tests.doubles.anthropic_server import AnthropicServer
from tests.doubles.claude_cli import DUMMY_API_KEY, OFFLINE_ENV, claude_cli
from tests.pipeline_support import make_config, make_repo, running_pipeline

OVERLOADED = {"repeat": True, "error": {"status": 529, "message": "Overloaded"}}


@pytest.fixture
def model() -> Iterator[AnthropicServer]:
    with AnthropicServer() as server:
        yield server


def test_real_cli_outage_opens_the_breaker_and_the_probe_closes_it(
    tmp_path: Path, model: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = claude_cli()
    monkeypatch.setenv("STORYLINE_TEST_MODEL_KEY", DUMMY_API_KEY)
    db = Database(kind="sqlite", sqlite_path=tmp_path / "storyline.db")
    migrations.upgrade(db)
    repo = make_repo(tmp_path / "repo")
    (tmp_path / "home").mkdir()
    # The CLI's private HOME: git needs an identity to commit.
    (tmp_path / "home" / ".gitconfig").write_text(
        "[user]\n\tname = Agent\n\temail = agent@example.invalid\n"
    )
    agent = {
        "name": "claude",
        "stage": "coder",
        "runtime": "claude-code",
        "command": str(cli),
        "model": "sonnet",
        "base_url": model.url,
        # CLAUDE_CODE_MAX_RETRIES=1 (OFFLINE_ENV): each run gives up after one retry.
        "env": {**OFFLINE_ENV, "HOME": str(tmp_path / "home")},
        "secrets": {"ANTHROPIC_API_KEY": "STORYLINE_TEST_MODEL_KEY"},
    }
    base = make_config(tmp_path, {}).model_dump()
    config = StorylineConfig.model_validate(
        {**base, "agent": [agent, base["agent"][1]], "provider_breaker_base_secs": 4.0}
    )
    wt = repo / ".storyline" / "worktrees" / "s1"
    fixed = "def add(a, b):\n    return a + b\n"
    model.set_script([OVERLOADED])
    with running_pipeline(repo, db, config) as p:
        p.add("s1")
        p.start("s1")
        p.wait_for("s1", lambda s: "ProviderBreakerOpened" in p.types("s1"), timeout=120)
        (breaker,) = p.supervisor.status().breakers
        assert (breaker["provider"], breaker["state"]) == ("claude", "open")
        requests_while_open = len(model.main_requests)
        # The provider is back; the probe run, after the back-off, meets a working model.
        model.set_script(
            [
                {
                    "tool_use": [
                        {
                            "name": "Write",
                            "input": {"file_path": str(wt / "app.py"), "content": fixed},
                        }
                    ]
                },
                {
                    "tool_use": [
                        {
                            "name": "Bash",
                            "input": {"command": "git add -A && git commit -m 'fix add'"},
                        }
                    ]
                },
                {"text": "Done."},
            ]
        )
        story = p.wait_stage("s1", Stage.MERGE, Stage.DONE, Stage.MERGE_FAILURE, timeout=120)
        assert p.supervisor.status().breakers[0]["state"] == "closed"
    history = p.app.history("s1")
    exits = [e.data["outcome"] for e in history if e.type == "AgentExited"]
    assert exits == ["provider_unavailable"] * 3 + ["completed"]
    failed = next(e for e in history if e.type == "AgentExited")
    assert failed.data["api_error_status"] == 529 and failed.data["api_retries"] >= 1
    opened = next(e for e in history if e.type == "ProviderBreakerOpened")
    assert opened.data["provider"] == "claude" and opened.data["consecutive_failures"] == 3
    probe = [e for e in history if e.type == "AgentSpawnRequested"][3]
    assert probe.timestamp >= datetime.fromisoformat(str(opened.data["open_until"]))
    assert requests_while_open >= 6  # three runs, each with its retry, before the opening
    closed = next(e for e in history if e.type == "ProviderBreakerClosed")
    assert history.index(closed) > history.index(probe)
    assert story.retry_count == 0 and "StoryBlocked" not in [e.type for e in history]
