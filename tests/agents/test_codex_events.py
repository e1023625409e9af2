"""The ``codex exec --json`` parser and the runtime's outcomes, on what the real CLI printed.

The fixtures in ``fixtures/codex`` are recorded from Codex CLI 0.171 by
``python -m tests.doubles.capture_codex_fixtures``. The outcome tests replay one through a
real process (a shell script that prints it and exits as the CLI did) under the production
``codex`` runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domain.config import AgentConfig
from runners.agents import SpawnSpec, StoryText
from runners.agents.codex_events import CodexEventParser
from runners.agents.codex_runtime import CodexRuntime

FIXTURES = Path(__file__).parent / "fixtures" / "codex"


def parse(name: str) -> CodexEventParser:
    parser = CodexEventParser()
    for line in (FIXTURES / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
        parser.feed(line)
    return parser


def thread_of(name: str) -> str:
    first = (FIXTURES / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[0]
    thread: str = json.loads(first)["thread_id"]
    return thread


def test_a_completed_run_reports_thread_usage_and_last_message() -> None:
    parser = parse("success_commit")
    assert parser.session_id == thread_of("success_commit")
    assert parser.saw_result and not parser.result_is_error
    assert parser.result_subtype == "success"
    assert parser.turns == 1
    # Three model requests: 150 + 150 + 1200 in, 40 + 40 + 55 out.
    assert (parser.tokens_in, parser.tokens_out) == (1500, 135)
    assert parser.result_text == "Committed hello.txt."
    assert parser.cost_usd is None and parser.model is None
    assert parser.api_retries == 0 and parser.permission_denials == []


def test_a_resumed_run_keeps_the_thread_id() -> None:
    assert parse("resumed").session_id == thread_of("success_commit")


def test_the_model_metadata_warning_item_is_not_an_error() -> None:
    parser = parse("reconnect_then_success")
    assert not parser.result_is_error and parser.errors == []


@pytest.mark.parametrize(("name", "status"), [("provider_429", 429), ("provider_500", None)])
def test_a_provider_outage_counts_the_clis_retries_and_the_status(
    name: str, status: int | None
) -> None:
    parser = parse(name)
    assert parser.result_is_error
    assert parser.api_retries == 5
    assert parser.api_error_status == status
    assert parser.terminal_reason == "api_error"
    assert parser.result_text and parser.errors == [parser.result_text]


def test_a_refused_key_is_an_api_error_with_its_status() -> None:
    parser = parse("unauthorized_401")
    assert parser.result_is_error and parser.api_error_status == 401
    assert "Incorrect API key" in (parser.result_text or "")


# --- outcomes through the runtime, replaying the CLI's output --------------------------------


def replay(tmp_path: Path, name: str, exit_code: int) -> SpawnSpec:
    script = tmp_path / "codex"
    script.write_text(f"#!/bin/sh\ncat '{FIXTURES / (name + '.jsonl')}'\nexit {exit_code}\n")
    script.chmod(0o755)
    agent = AgentConfig(name="coder", runtime="codex", command=str(script), model="gpt-5.1-codex")
    return SpawnSpec(
        story_id="1",
        attempt=1,
        role="coder",
        agent=agent,
        cwd=tmp_path,
        base_branch="main",
        story=StoryText("Say hello"),
        log_path=tmp_path / "coder-1.log",
        inactivity_timeout_secs=30.0,
    )


@pytest.mark.parametrize(
    ("name", "exit_code", "outcome", "says"),
    [
        ("success_commit", 0, "completed", None),
        ("provider_429", 1, "provider_unavailable", "HTTP 429, 5 retries"),
        ("provider_500", 1, "provider_unavailable", "high demand"),
        ("unauthorized_401", 1, "failed", "refused the request (HTTP 401)"),
    ],
)
def test_outcomes_of_the_recorded_runs(
    tmp_path: Path, name: str, exit_code: int, outcome: str, says: str | None
) -> None:
    result = CodexRuntime().start(replay(tmp_path, name, exit_code)).wait(30)
    assert result.outcome == outcome, result.error
    assert result.session_id == thread_of(name)
    assert result.exit_code == exit_code
    if says is None:
        assert result.error is None
    else:
        assert result.error is not None and says in result.error
