"""CliRuntime end to end: the real scripted agent as a subprocess against real git repos."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from domain.config import AgentConfig, FixupCaps
from runners.agents import (
    AgentStartError,
    CliRuntime,
    group_alive,
    kill_process_group,
    process_alive,
    process_identity,
)
from tests.agents.conftest import Scripted, SpecFactory, git

WAIT = 60.0  # generous: only a hang should ever reach it


@pytest.fixture
def runtime() -> CliRuntime:
    return CliRuntime(kill_grace_secs=2.0, strip_env=["MY_ADMIN_TOKEN"], poll_interval_secs=0.05)


def wait_until_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_completed_run_lands_commits_and_records_session_usage_and_log(
    runtime: CliRuntime,
    scripted: Scripted,
    make_spec: SpecFactory,
    repo: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STORYLINE_DATABASE_URL", "postgresql://admin:pw@db/storyline")
    monkeypatch.setenv("MY_ADMIN_TOKEN", "admin-token-value-123456")
    agent = scripted.config(
        {
            "42": [
                {"write": "greeting.txt", "content": "hello\n"},
                {"raw": "this line is not JSON"},
                {"raw": "an agent echoing its env: tok-scoped-secret-0123456789"},
                {"commit": "Add greeting"},
                {"say": "done", "input_tokens": 1000, "output_tokens": 300, "cost_usd": 0.25},
            ]
        }
    )
    spec = make_spec(agent, repo)
    running = runtime.start(spec)
    result = running.wait(WAIT)

    assert result.outcome == "completed", result
    assert result.exit_code == 0 and result.signal is None
    assert git(repo, "log", "-1", "--format=%s").strip() == "Add greeting"
    assert git(repo, "show", "HEAD:greeting.txt") == "hello\n"
    assert result.turns == 3
    assert result.tokens_in == 1200 and result.tokens_out == 340
    assert result.cost_usd == pytest.approx(0.252)
    assert result.result_subtype == "success"
    assert result.session_id is not None and result.session_id == running.session_id

    log_text = spec.log_path.read_text(encoding="utf-8")
    assert '"subtype": "init"' in log_text and '"type": "result"' in log_text
    assert "this line is not JSON" in log_text
    assert spec.env["STORYLINE_TOKEN"] not in log_text
    assert "an agent echoing its env: [redacted]" in log_text

    (call,) = scripted.records()
    assert call["pid"] == running.pid and call["pgid"] == running.pid  # own process group
    assert call["cwd"] == str(repo)
    assert call["prompt"].startswith("You are working on story 42")
    assert call["env"] == {
        "STORYLINE_URL": "http://127.0.0.1:9",
        "STORYLINE_STORY_ID": "42",
        "STORYLINE_ATTEMPT": "1",
    }
    assert call["token_present"]
    assert "STORYLINE_DATABASE_URL" not in call["env_names"]
    assert "MY_ADMIN_TOKEN" not in call["env_names"]
    assert all(spec.env["STORYLINE_TOKEN"] not in arg for arg in call["args"])


def test_a_crash_before_the_session_is_aborted_before_session(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path
) -> None:
    agent = scripted.config({"*": [{"crash_before_session": True}, {"write": "x", "content": ""}]})
    result = runtime.start(make_spec(agent, repo)).wait(WAIT)
    assert result.outcome == "aborted_before_session"
    assert result.signal == signal.SIGKILL
    assert result.exit_code is None
    assert result.session_id is None
    assert not (repo / "x").exists()


def test_a_non_zero_exit_after_the_session_is_failed_with_the_session_kept(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path
) -> None:
    agent = scripted.config({"*": [{"say": "trying"}, {"exit": 7}]})
    result = runtime.start(make_spec(agent, repo)).wait(WAIT)
    assert result.outcome == "failed"
    assert result.exit_code == 7
    assert result.session_id is not None
    assert result.turns == 2


def test_a_signal_after_the_session_is_failed_not_aborted(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path
) -> None:
    agent = scripted.config({"*": [{"say": "hi"}, {"kill_self": "SIGABRT"}]})
    result = runtime.start(make_spec(agent, repo)).wait(WAIT)
    assert result.outcome == "failed"
    assert result.signal == signal.SIGABRT
    assert result.session_id is not None


def test_an_error_result_with_exit_zero_is_failed_but_keeps_session_and_usage(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path
) -> None:
    agent = scripted.config({"*": [{"say": "hi"}, {"fail_result": "error_during_execution"}]})
    result = runtime.start(make_spec(agent, repo)).wait(WAIT)
    assert result.outcome == "failed"
    assert result.exit_code == 0
    assert result.result_subtype == "error_during_execution"
    assert result.error is not None and "error_during_execution" in result.error
    assert result.session_id is not None
    assert result.turns == 2 and result.cost_usd == pytest.approx(0.002)


def test_a_silent_agent_is_killed_as_inactive_with_its_whole_process_group(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    agent = scripted.config(
        {
            "*": [
                {"spawn_child_sleep": 300, "pid_file": str(pid_file)},
                {"silent": 300},
            ]
        }
    )
    running = runtime.start(make_spec(agent, repo, inactivity_timeout_secs=1.0))
    result = running.wait(WAIT)
    assert result.outcome == "inactive"
    assert result.signal == signal.SIGTERM
    assert result.session_id is not None  # recorded: the next spawn may resume it
    child = int(pid_file.read_text())
    assert wait_until_gone(child), "the agent's grandchild survived the watchdog"
    assert not group_alive(running.pid)
    assert "inactivity timeout" in spec_log(result.log_path)


def spec_log(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_busy_agent_that_keeps_talking_is_not_inactive(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path
) -> None:
    agent = scripted.config({"*": [{"sleep": 3.5, "interval": 0.05}]})
    result = runtime.start(make_spec(agent, repo, inactivity_timeout_secs=3.0)).wait(WAIT)
    assert result.outcome == "completed"


def test_the_overall_timeout_kills_a_talkative_agent(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path
) -> None:
    agent = scripted.config({"*": [{"sleep": 300, "interval": 0.05}]})
    spec = make_spec(agent, repo, inactivity_timeout_secs=60.0, overall_timeout_secs=1.0)
    running = runtime.start(spec)
    result = running.wait(WAIT)
    assert result.outcome == "timed_out"
    assert not group_alive(running.pid)


def test_children_left_behind_by_a_finished_agent_are_cleaned_up(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    agent = scripted.config({"*": [{"spawn_child_sleep": 300, "pid_file": str(pid_file)}]})
    result = runtime.start(make_spec(agent, repo)).wait(WAIT)
    assert result.outcome == "completed"
    assert wait_until_gone(int(pid_file.read_text()))


def test_kill_stops_the_group_and_is_not_mistaken_for_a_crash(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    agent = scripted.config(
        {"*": [{"spawn_child_sleep": 300, "pid_file": str(pid_file)}, {"silent": 300}]}
    )
    running = runtime.start(make_spec(agent, repo))
    deadline = time.monotonic() + WAIT
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    running.kill()
    result = running.wait(WAIT)
    assert result.outcome == "failed"
    assert result.killed_on_request
    assert wait_until_gone(int(pid_file.read_text()))
    assert not group_alive(running.pid)


def test_resume_continues_the_recorded_session(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path
) -> None:
    agent = scripted.config({"*": [{"say": "continuing"}]})
    result = runtime.start(make_spec(agent, repo, resume_session_id="sess-earlier")).wait(WAIT)
    assert result.outcome == "completed"
    assert result.session_id == "sess-earlier"
    assert scripted.records()[0]["resume"] == "sess-earlier"


def test_a_retry_sees_the_gate_failure_and_per_attempt_scripts_apply(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path
) -> None:
    agent = scripted.config(
        {
            "42": {
                "1": [{"write": "greeting.txt", "content": "helo\n"}, {"commit": "typo"}],
                "2": [
                    {"expect_in_prompt": "Your previous run's quality gates failed:\n"},
                    {"expect_in_prompt": "assert 'helo' == 'hello'"},
                    {"write": "greeting.txt", "content": "hello\n"},
                    {"commit": "fix typo"},
                ],
            }
        }
    )
    first = runtime.start(make_spec(agent, repo, attempt=1)).wait(WAIT)
    assert first.outcome == "completed"
    gate_output = "x" * 10_000 + "\nassert 'helo' == 'hello'"
    second = runtime.start(
        make_spec(agent, repo, attempt=2, gate_failure=gate_output, resume_session_id=None)
    ).wait(WAIT)
    assert second.outcome == "completed", spec_log(second.log_path)
    assert git(repo, "log", "--format=%s").split("\n")[:2] == ["fix typo", "typo"]
    first_call, second_call = scripted.records()
    assert "quality gates failed" not in first_call["system_prompt"]
    assert second_call["system_prompt"].endswith("assert 'helo' == 'hello'")
    assert len(second_call["system_prompt"].encode()) <= 3000 + 100


def test_a_missing_expectation_fails_the_run(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path
) -> None:
    agent = scripted.config({"*": [{"expect_in_prompt": "quality gates failed"}]})
    result = runtime.start(make_spec(agent, repo)).wait(WAIT)
    assert result.outcome == "failed"
    assert result.exit_code == 3


def test_fixup_caps_reach_the_agent_and_stop_it(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path
) -> None:
    agent = scripted.config(
        {"*": [{"write": f"f{i}.txt", "content": str(i)} for i in range(5)]},
        args=[*scripted.config({}).args, "--max-turns", "50"],
    )
    spec = make_spec(agent, repo, fixup_pending=True, fixup_caps=FixupCaps(max_turns=2))
    result = runtime.start(spec).wait(WAIT)
    assert result.outcome == "max_turns"
    assert result.result_subtype == "error_max_turns"
    assert result.turns == 2
    assert (repo / "f1.txt").exists() and not (repo / "f2.txt").exists()
    assert scripted.records()[0]["max_turns"] == 2


def test_a_missing_executable_is_a_start_error(
    runtime: CliRuntime, make_spec: SpecFactory, repo: Path
) -> None:
    agent = AgentConfig(name="c", command="definitely-not-an-agent-cli-xyz")
    with pytest.raises(AgentStartError, match="definitely-not-an-agent-cli-xyz"):
        runtime.start(make_spec(agent, repo))


def test_two_agents_run_concurrently_in_their_own_worktrees(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path, tmp_path: Path
) -> None:
    agent = scripted.config(
        {"*": [{"write": "work.txt", "content": "x\n"}, {"commit": "work"}]},
    )
    worktrees = []
    for story in ("a1", "b2"):
        path = tmp_path / "wt" / story
        git(repo, "worktree", "add", "-q", "-b", f"feature/story-{story}", str(path), "main")
        worktrees.append((story, path))
    running = [runtime.start(make_spec(agent, path, story_id=story)) for story, path in worktrees]
    results = [r.wait(WAIT) for r in running]
    assert [r.outcome for r in results] == ["completed", "completed"]
    for story, _ in worktrees:
        assert git(repo, "log", "-1", "--format=%s", f"feature/story-{story}").strip() == "work"
    assert git(repo, "log", "-1", "--format=%s", "main").strip() == "initial"


# --- reconciling a recorded pid after a runner restart ------------------------------------


def test_a_restarted_runner_can_kill_a_recorded_agent_group(tmp_path: Path) -> None:
    leader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, time; subprocess.Popen(['sleep', '300']); "
            "print('ready', flush=True); time.sleep(300)",
        ],
        start_new_session=True,
        stdout=subprocess.PIPE,
    )
    try:
        assert leader.stdout is not None and leader.stdout.readline() == b"ready\n"
        identity = process_identity(leader.pid)
        assert process_alive(leader.pid) and group_alive(leader.pid)
        # A reused pid (different start time) must never be killed.
        assert not kill_process_group(leader.pid, expected_identity="not-the-recorded-one")
        assert process_alive(leader.pid)
        assert kill_process_group(leader.pid, grace_secs=2.0, expected_identity=identity)
        assert leader.wait(WAIT) == -signal.SIGTERM
        assert not group_alive(leader.pid)
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()


def test_kill_process_group_refuses_a_pid_that_is_not_a_group_leader() -> None:
    child = subprocess.Popen(["sleep", "300"])  # in our process group, not its own
    try:
        assert not kill_process_group(child.pid, grace_secs=0.5)
        assert process_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


def test_process_alive_is_false_for_a_pid_that_does_not_exist() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not process_alive(proc.pid)
    assert not process_alive(0)
    with pytest.raises(ValueError):
        kill_process_group(1)


def test_log_file_of_each_attempt_is_separate(
    runtime: CliRuntime, scripted: Scripted, make_spec: SpecFactory, repo: Path, tmp_path: Path
) -> None:
    agent = scripted.config({"*": [{"say": "attempt"}]})
    for attempt in (1, 2):
        runtime.start(make_spec(agent, repo, attempt=attempt)).wait(WAIT)
    logs = sorted((tmp_path / "logs").iterdir())
    assert [p.name for p in logs] == ["42-1.log", "42-2.log"]
    for path in logs:
        lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
        assert [json.loads(line)["type"] for line in lines] == ["system", "assistant", "result"]
