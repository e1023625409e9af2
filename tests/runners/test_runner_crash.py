"""The runner process is SIGKILLed while an agent runs; a new one finishes the story."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from domain.stages import Stage
from runners.agents import process_alive
from runners.lease import TABLE as LEASE_TABLE
from service.application import StorylineApplication
from service.settings import Database
from service.sqlstore import SqlStore
from tests.pipeline_support import calls, dump_toml, make_config, make_repo

pytestmark = pytest.mark.slow

FIX = [{"write": "app.py", "content": "def add(a, b):\n    return a + b\n"}, {"commit": "fix add"}]


def start_runner(repo: Path, db: Database, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runners",
            "--project",
            str(repo),
            "--database-url",
            db.url,
            "--poll-interval",
            "0.2",
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )


def stop_runner(runner: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, and the runner's own account of what it waited for if it does not stop."""
    runner.send_signal(signal.SIGTERM)
    try:
        # The shutdown's own bounded waits (loop 10 s, listener 5 s, agents 10 s, the step
        # in progress) can add up past 30 s on a loaded machine; the runner prints every
        # thread's stack to this log when its shutdown takes over 20 s.
        runner.wait(timeout=60)
    except subprocess.TimeoutExpired:
        runner.kill()
        runner.wait()
        raise AssertionError(f"the runner did not stop on SIGTERM:\n{log.read_text()}") from None


def expire_dead_runners_lease(app: StorylineApplication) -> None:
    """The SIGKILLed runner's lease would expire by itself after its TTL (15 s); expiring it
    now only saves that wait. What is tested is what the next runner does."""
    SqlStore(app).write(f"UPDATE {LEASE_TABLE} SET expires_at = 0 WHERE name = ?", ("runners",))


def wait(app: StorylineApplication, sid: str, predicate, timeout: float = 150.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        story = app.get_story(sid)
        if predicate(story):
            return story
        time.sleep(0.05)
    raise AssertionError([(e.type, e.reason) for e in app.history(sid)])


def test_runner_killed_mid_agent_recovers_without_double_spawn(
    tmp_path: Path, database: Database
) -> None:
    repo = make_repo(tmp_path / "repo")
    # Silent: a talkative agent dies of a broken pipe with its runner, and the reaper would
    # then have nothing left to kill (the checks below could not tell).
    script = {"s1": {"1": [{"silent": 60}], "2": FIX}}
    config = make_config(tmp_path, script)
    (repo / "storyline.toml").write_text(dump_toml(config))
    app = StorylineApplication(database)
    app.create_story(
        story_id="s1",
        name="fix add",
        description="d",
        acceptance_criteria=["passes"],
        actor="user:t",
    )
    log = tmp_path / "runner.log"
    runner = start_runner(repo, database, log)
    try:
        app.transition("s1", "start_coding", actor="user:t")
        story = wait(app, "s1", lambda s: bool(s.running_agent and s.running_agent["started"]))
        deadline = time.monotonic() + 30
        while not calls(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        agent_pid = calls(tmp_path)[0]["pid"]
        assert process_alive(agent_pid)
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
        # The agent has its own process group: it outlives the runner.
        assert process_alive(agent_pid)
        assert story.coder_attempts == 1

        expire_dead_runners_lease(app)
        runner = start_runner(repo, database, log)
        final = wait(
            app, "s1", lambda s: s.stage in (Stage.MERGE, Stage.DONE) and s.running_agent is None
        )
    finally:
        stop_runner(runner, log)
    assert not process_alive(agent_pid), "the orphaned agent was not killed"
    history = app.history("s1")
    spawns = [e.data["attempt"] for e in history if e.type == "AgentSpawnRequested"]
    assert spawns == [1, 2], f"an attempt was spawned twice: {spawns}"
    exits = [(e.data["attempt"], e.data["outcome"]) for e in history if e.type == "AgentExited"]
    assert exits == [(1, "lost"), (2, "completed")]
    lost = next(e for e in history if e.type == "AgentExited")
    assert lost.reason is not None and "killed orphaned process group" in lost.reason
    assert final.abort_respawns == 0
    assert len(calls(tmp_path)) == 2
    app.close()


def test_runner_killed_mid_merge_lands_the_change_at_most_once(
    tmp_path: Path, database: Database
) -> None:
    repo = make_repo(tmp_path / "repo")
    started = tmp_path / "merge-gate-started"
    # The first merge-gate run announces itself and hangs: the runner dies right there.
    gate = (
        "import pathlib, runpy, time\n"
        f"marker = pathlib.Path({str(started)!r})\n"
        "if not marker.exists():\n"
        "    marker.write_text('x')\n"
        "    time.sleep(120)\n"
        "runpy.run_path('check.py')\n"
    )
    config = make_config(
        tmp_path, {"s1": FIX}, merge_gates={"commands": [[sys.executable, "-c", gate]]}
    )
    (repo / "storyline.toml").write_text(dump_toml(config))
    app = StorylineApplication(database)
    app.create_story(
        story_id="s1",
        name="fix add",
        description="d",
        acceptance_criteria=["passes"],
        actor="user:t",
    )
    log = tmp_path / "runner.log"
    runner = start_runner(repo, database, log)
    try:
        app.transition("s1", "start_coding", actor="user:t")
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), log.read_text()
        assert app.get_story("s1").merging
        gate_pid = int((repo / ".storyline/run/gate-s1.pid").read_text().split()[0])
        assert process_alive(gate_pid)
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
        expire_dead_runners_lease(app)
        runner = start_runner(repo, database, log)
        final = wait(app, "s1", lambda s: s.stage in (Stage.DONE, Stage.MERGE_FAILURE))
    finally:
        stop_runner(runner, log)
    subjects = subprocess.run(
        ["git", "log", "--format=%s", "main"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert final.stage is Stage.DONE
    assert not process_alive(gate_pid), "the hung merge gate of the dead runner survived"
    assert subjects.count("fix add (story s1)") == 1
    assert subjects[-1] == "initial" and len(subjects) == 2
    merges = [e.type for e in app.history("s1") if e.type.startswith("Merge")]
    assert merges == ["MergeStarted", "MergeSucceeded"]
    app.close()


def test_two_runner_processes_never_spawn_an_attempt_twice(
    tmp_path: Path, database: Database
) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"*": FIX})
    (repo / "storyline.toml").write_text(dump_toml(config))
    app = StorylineApplication(database)
    ids = ["a1", "a2", "a3"]
    for sid in ids:
        app.create_story(
            story_id=sid, name=sid, description="d", acceptance_criteria=["passes"], actor="user:t"
        )
    log = tmp_path / "runner.log"
    runners = [start_runner(repo, database, log), start_runner(repo, database, log)]
    try:
        for sid in ids:
            app.transition(sid, "start_coding", actor="user:t")
        for sid in ids:
            wait(app, sid, lambda s: s.stage in (Stage.DONE, Stage.MERGE_FAILURE))
    finally:
        for runner in runners:
            runner.send_signal(signal.SIGTERM)
        for runner in runners:
            runner.wait(timeout=30)
    for sid in ids:
        attempts = [e.data["attempt"] for e in app.history(sid) if e.type == "AgentSpawnRequested"]
        assert attempts == [1], f"{sid}: {attempts}"
    assert len(calls(tmp_path)) == len(ids)
    app.close()
