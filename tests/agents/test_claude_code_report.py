"""What the real Claude Code CLI reports, read from its own recorded stream-json.

The fixtures under ``fixtures/claude-code`` are the CLI's stdout/stderr (2.1.332) captured by
``python -m tests.doubles.capture_claude_fixtures``. The runtime tests replay one through a
real subprocess (``cat`` plus the CLI's exit code), so the classification sees exactly the
bytes and exit status the CLI produced.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from domain.config import AgentConfig
from runners.agents import CliRuntime, SpawnSpec, StoryText, StreamJsonParser

FIXTURES = Path(__file__).parent / "fixtures" / "claude-code"
WAIT = 30.0


def parse(name: str) -> StreamJsonParser:
    parser = StreamJsonParser()
    for line in (FIXTURES / f"{name}.jsonl").read_bytes().splitlines():
        parser.feed(line)
    return parser


def test_the_model_is_the_one_the_cli_reported_in_init() -> None:
    parser = parse("success_commit")
    assert parser.model is not None and parser.model.startswith("claude-")
    assert parser.result_subtype == "success" and not parser.result_is_error
    assert parser.stop_reason == "end_turn"
    assert parser.duration_ms is not None and parser.duration_ms > 0
    usage = parser.model_usage
    assert list(usage) == [parser.model]
    assert usage[parser.model]["tokens_in"] > 0 and usage[parser.model]["cost_usd"] > 0


def test_permission_denials_are_read_from_the_result() -> None:
    parser = parse("permission_denied")
    (denial,) = parser.permission_denials
    assert denial["tool_name"] == "Bash"
    assert "git add -A && git commit" in denial["tool_input"]["command"]
    assert parser.result_subtype == "success"  # the CLI still calls it a success


def test_max_budget_tokens_come_from_model_usage_when_usage_is_all_zeros() -> None:
    parser = parse("max_budget")
    assert parser.result_subtype == "error_max_budget_usd"
    assert parser.tokens_in > 0 and parser.tokens_out > 0
    assert parser.cost_usd is not None and parser.cost_usd > 0


def test_api_retries_and_the_provider_status_are_counted() -> None:
    parser = parse("api_overloaded")
    assert parser.api_retries == 2
    assert parser.api_error_status == 529
    assert parser.result_is_error


def _replay_spec(tmp_path: Path, name: str, exit_code: int) -> SpawnSpec:
    stdout = FIXTURES / f"{name}.jsonl"
    stderr = FIXTURES / f"{name}.stderr"
    script = (
        "import sys\n"
        f"sys.stdout.buffer.write(open({str(stdout)!r}, 'rb').read())\n"
        f"sys.stdout.flush()\n"
        + (
            f"sys.stderr.buffer.write(open({str(stderr)!r}, 'rb').read())\n"
            if stderr.exists()
            else ""
        )
        + f"sys.exit({exit_code})\n"
    )
    agent = AgentConfig(name="replay", runtime="cli", command=sys.executable, args=["-c", script])
    cwd = tmp_path / "wt"
    cwd.mkdir(exist_ok=True)
    return SpawnSpec(
        story_id="7",
        attempt=1,
        role="coder",
        agent=agent,
        cwd=cwd,
        base_branch="main",
        story=StoryText("replay"),
        log_path=tmp_path / "logs" / f"{name}.log",
        inactivity_timeout_secs=30,
    )


@pytest.mark.parametrize(
    ("name", "exit_code", "outcome", "in_reason"),
    [
        ("success_commit", 0, "completed", None),
        ("permission_denied", 0, "permission_denied", "git add -A && git commit"),
        ("max_turns", 1, "max_turns", "Reached maximum number of turns (2)"),
        ("max_budget", 1, "max_budget", "Reached maximum budget"),
        ("api_overloaded", 1, "provider_unavailable", "HTTP 529"),
        ("root_skip_permissions", 1, "aborted_before_session", "root/sudo privileges"),
    ],
)
def test_each_cli_ending_is_an_outcome_with_a_reason_a_person_understands(
    tmp_path: Path, name: str, exit_code: int, outcome: str, in_reason: str | None
) -> None:
    result = CliRuntime().start(_replay_spec(tmp_path, name, exit_code)).wait(WAIT)
    assert result.outcome == outcome
    if in_reason is None:
        assert result.error is None
    else:
        assert result.error is not None and in_reason in result.error
    if name != "root_skip_permissions":
        assert result.model is not None and result.model.startswith("claude-")
        assert result.duration_ms is not None
    if name == "permission_denied":
        assert result.permission_denials == ("Bash: git add -A && git commit -m 'Add hello'",)
        assert result.result_text == "I could not commit."
    if name == "max_budget":
        assert result.tokens_in > 0 and result.model_usage


def test_result_text_and_denials_never_carry_a_secret(tmp_path: Path) -> None:
    spec = _replay_spec(tmp_path, "permission_denied", 0)
    secret = "I could not"  # a value the fixture contains, declared as a secret
    spec = SpawnSpec(
        **{
            **{f: getattr(spec, f) for f in spec.__dataclass_fields__},
            "env": {"MY_VALUE": secret},
            "secret_names": frozenset({"MY_VALUE"}),
        }
    )
    result = CliRuntime().start(spec).wait(WAIT)
    assert result.result_text == "[redacted] commit."
    assert secret not in spec.log_path.read_text()


def test_a_cli_backing_off_after_an_api_retry_line_is_alive(tmp_path: Path) -> None:
    # The CLI's own lines: its init, an api_retry (its back-off stretched to 4 s), then
    # silence while it waits on the provider, then its result. Inactivity is 1.5 s.
    lines = (FIXTURES / "api_overloaded.jsonl").read_text().splitlines()
    init = next(line for line in lines if '"subtype":"init"' in line)
    retry = json.loads(next(line for line in lines if '"api_retry"' in line))
    retry["retry_delay_ms"] = 4000
    result = (FIXTURES / "success_commit.jsonl").read_text().splitlines()[-1]
    script = (
        "import sys, time\n"
        f"print({init!r}, flush=True)\n"
        f"print({json.dumps(retry)!r}, flush=True)\n"
        "time.sleep(3)\n"
        f"print({result!r}, flush=True)\n"
    )
    spec = _replay_spec(tmp_path, "success_commit", 0)
    agent = AgentConfig(name="replay", runtime="cli", command=sys.executable, args=["-c", script])
    spec = SpawnSpec(
        **{
            **{f: getattr(spec, f) for f in spec.__dataclass_fields__},
            "agent": agent,
            "inactivity_timeout_secs": 1.5,
        }
    )
    outcome = CliRuntime().start(spec).wait(WAIT)
    assert outcome.outcome == "completed", outcome.error
    assert outcome.api_retries == 1
