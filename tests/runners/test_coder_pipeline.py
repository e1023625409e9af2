"""Runners I end to end: real git, real subprocesses, the scripted agent, the supervisor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from domain.stages import AgentOutcome, Stage
from runners.agents import GATE_FAILURE_HEADER, process_alive
from service.settings import Database
from tests.pipeline_support import calls, make_config, make_repo, running_pipeline

FIX = [{"write": "app.py", "content": "def add(a, b):\n    return a + b\n"}, {"commit": "fix add"}]
BREAK = [{"write": "app.py", "content": "def add(a, b):\n    return a * b\n"}, {"commit": "try"}]


def test_first_attempt_passes_gates(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"s1": FIX})
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", Stage.MERGE, Stage.DONE, Stage.MERGE_FAILURE)
    assert story.retry_count == 0
    types = p.types("s1")
    assert types[:7] == [
        "StoryCreated",
        "CodingStarted",
        "WorktreeReady",
        "AgentSpawnRequested",
        "AgentStarted",
        "AgentExited",
        "GatesStarted",
    ]
    assert "GatesPassed" in types
    passed = next(e for e in p.app.history("s1") if e.type == "GatesPassed")
    assert passed.data["commits_ahead"] == 1 and "ok: all checks passed" in passed.data["output"]
    exited = next(e for e in p.app.history("s1") if e.type == "AgentExited")
    assert exited.data["outcome"] == "completed" and exited.data["session_id"]
    assert exited.data["tokens_in"] > 0 and exited.data["cost_usd"] > 0
    assert Path(exited.data["log_path"]).read_text().count("\n") >= 3
    (call,) = calls(tmp_path)
    assert call["cwd"] == str(repo / ".storyline" / "worktrees" / "s1")
    assert call["env"]["STORYLINE_STORY_ID"] == "s1" and call["env"]["STORYLINE_ATTEMPT"] == "1"
    assert call["token_present"] is True
    assert GATE_FAILURE_HEADER.strip() not in (call["system_prompt"] or "")


def test_gate_failure_is_injected_into_the_retry(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"s1": {"1": BREAK, "2": FIX}})
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", Stage.MERGE, Stage.DONE, Stage.MERGE_FAILURE)
    assert story.retry_count == 1
    first, second = calls(tmp_path)
    assert "quality gates failed" not in " ".join(first["args"])
    args = second["args"]
    injected = args[args.index("--append-system-prompt") + 1]
    assert injected.startswith("Your previous run's quality gates failed:")
    assert "FAILED: add(2, 3) should be 5, got 6" in injected
    spawns = [e for e in p.app.history("s1") if e.type == "AgentSpawnRequested"]
    assert [s.data["purpose"] for s in spawns] == ["code", "retry"]
    # The event records exactly the argv the agent received.
    recorded = spawns[1].data["argv"]
    assert recorded[-len(args) :] == args
    assert "--append-system-prompt" not in spawns[0].data["argv"]


def test_retries_exhausted_blocks_with_reason(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"s1": [*BREAK[:1], {"commit": "again", "allow_empty": True}]})
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", Stage.BLOCKED)
    assert story.retry_count == 3  # max_retries = 2 in the test config
    assert "retries exhausted" in (story.blocked_reason or "")
    assert len(calls(tmp_path)) == 3
    assert p.types("s1").count("GatesFailed") == 3


def test_five_aborts_block_without_consuming_retries(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"s1": [{"crash_before_session": True}]})
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", Stage.BLOCKED)
    assert story.retry_count == 0
    assert story.abort_respawns == 5
    assert "crashed before establishing a session 5 times" in (story.blocked_reason or "")
    exits = [e for e in p.app.history("s1") if e.type == "AgentExited"]
    assert [e.data["outcome"] for e in exits] == ["aborted_before_session"] * 5
    spawns = [e for e in p.app.history("s1") if e.type == "AgentSpawnRequested"]
    assert all(s.data["resume_session_id"] is None for s in spawns)


def test_abort_then_normal_exit_resets_the_counter(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    script = {
        "s1": {
            "1": [{"crash_before_session": True}],
            "2": [{"crash_before_session": True}],
            "3": FIX,
        }
    }
    config = make_config(tmp_path, script)
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", Stage.MERGE, Stage.DONE, Stage.MERGE_FAILURE)
    assert story.abort_respawns == 0 and story.retry_count == 0
    exits = [e.data["outcome"] for e in p.app.history("s1") if e.type == "AgentExited"]
    assert exits == ["aborted_before_session", "aborted_before_session", "completed"]


def test_inactive_agent_is_killed_with_its_whole_group(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    pid_file = tmp_path / "child.pid"
    script = {
        "s1": {
            "1": [{"spawn_child_sleep": 300, "pid_file": str(pid_file)}, {"silent": 120}],
            "2": FIX,
        }
    }
    config = make_config(tmp_path, script, inactivity_timeout_secs=1.5)
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", Stage.MERGE, Stage.DONE, Stage.MERGE_FAILURE)
    exits = [e for e in p.app.history("s1") if e.type == "AgentExited"]
    assert exits[0].data["outcome"] == AgentOutcome.INACTIVE.value
    assert story.failed_runs == 0  # reset by the completed second run
    agent_pid = calls(tmp_path)[0]["pid"]
    child_pid = int(pid_file.read_text())
    assert not process_alive(agent_pid)
    assert not process_alive(child_pid), "the agent's child survived the watchdog"


@pytest.mark.parametrize(
    ("configured", "expected_turns", "expected_budget"), [(None, "20", "1"), (5, "5", "0.5")]
)
def test_fixup_caps(
    tmp_path: Path,
    database: Database,
    configured: int | None,
    expected_turns: str,
    expected_budget: str,
) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"s1": FIX})
    if configured is not None:
        agent = config.agent[0].model_copy(update={"max_turns": configured, "max_budget_usd": 0.5})
        config = config.model_copy(update={"agent": [agent, config.agent[1]]})
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        # Bring the story to merge_failure(gates_failed) by hand, as a merge would.
        app = p.app
        p.supervisor.stop(kill_agents=True)
        app.transition("s1", "start_coding", actor="user:t")
        app.transition(
            "s1", "spawn_agent", actor="user:t", data={"agent": "coder", "runtime": "cli"}
        )
        app.transition("s1", "agent_started", actor="user:t", data={"attempt": 1, "pid": 1})
        app.transition(
            "s1", "agent_exited", actor="user:t", data={"attempt": 1, "outcome": "completed"}
        )
        app.transition("s1", "start_gates", actor="user:t")
        app.transition(
            "s1",
            "gates_passed",
            actor="user:t",
            data={"feature_branch": "feature/story-s1", "commits_ahead": 1},
        )
        app.transition("s1", "start_merge", actor="user:t")
        app.transition(
            "s1",
            "merge_failed",
            actor="user:t",
            data={"kind": "gates_failed", "details": "ruff: Would reformat app.py"},
        )
        app.transition("s1", "request_fixup", actor="user:t", reason="formatter")
    with running_pipeline(repo, database, config) as p2:
        p2.wait_stage("s1", Stage.MERGE, Stage.DONE, Stage.MERGE_FAILURE)
    (call,) = calls(tmp_path)
    args = call["args"]
    assert args[args.index("--max-turns") + 1] == expected_turns
    assert float(args[args.index("--max-budget-usd") + 1]) == float(expected_budget)
    assert "Would reformat app.py" in args[args.index("--append-system-prompt") + 1]


def test_resume_uses_the_recorded_session(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"s1": {"1": BREAK, "2": FIX}})
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        p.wait_stage("s1", Stage.MERGE, Stage.DONE, Stage.MERGE_FAILURE)
    first, second = calls(tmp_path)
    exits = [e for e in p.app.history("s1") if e.type == "AgentExited"]
    assert first["resume"] is None
    assert second["resume"] == exits[0].data["session_id"]
    args = second["args"]
    assert args[args.index("--resume") + 1] == exits[0].data["session_id"]


def test_dependent_story_starts_by_itself(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"*": FIX})
    with running_pipeline(repo, database, config) as p:
        p.add("base")
        p.add("dep", depends_on=["base"])
        p.app.transition("base", "archive", actor="user:t", reason="done elsewhere")
        story = p.wait_for("dep", lambda s: s.stage is not Stage.BACKLOG)
        started = next(e for e in p.app.history("dep") if e.type == "CodingStarted")
    assert story.stage is not Stage.BACKLOG
    assert started.actor == "runner:scheduler" and "base (archived)" in (started.reason or "")


def test_agent_pid_is_gone_after_block(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"s1": [{"sleep": 60, "interval": 0.2}]})
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        running = p.wait_for("s1", lambda s: bool(s.running_agent and s.running_agent["pid"]))
        pid = running.running_agent["pid"]  # type: ignore[index]
        p.app.transition("s1", "block", actor="user:ops", reason="stop that")
        p.wait_for("s1", lambda s: s.running_agent is None)
    assert not process_alive(pid)
    assert os.getpid() != pid


def test_agent_logs_are_reachable_through_the_api(tmp_path: Path, database: Database) -> None:
    import httpx

    repo = make_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"s1": FIX})
    with running_pipeline(repo, database, config, with_api=True) as p:
        p.add("s1")
        p.start("s1")
        p.wait_stage("s1", Stage.MERGE, Stage.DONE, Stage.MERGE_FAILURE)
        url = p.supervisor.launcher.api_url
        assert url is not None
        with httpx.Client(base_url=url) as http:
            log = http.get("/stories/s1/agents/coder/1/log")
            tail = http.get("/stories/s1/agents/coder/1/log", params={"tail": 40})
            missing = http.get("/stories/s1/agents/coder/9/log")
            unknown = http.get("/stories/nope/agents/coder/1/log")
            bad_role = http.get("/stories/s1/agents/boss/1/log")
            hostile = http.get("/stories/..%2F..%2Fetc/agents/coder/1/log")
    assert log.status_code == 200 and log.headers["content-type"].startswith("text/plain")
    assert '"type":"result"' in log.text.replace(" ", "") and "fix add" in log.text
    assert len(tail.content) == 40 and log.content.endswith(tail.content)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "log_not_found"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "story_not_found"
    assert bad_role.status_code == 422
    assert hostile.status_code in (404, 422)
