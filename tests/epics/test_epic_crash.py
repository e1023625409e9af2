"""A runner process SIGKILLed in each epic stage; a second runner process finishes the epic.

What must hold (issue 14): no step is done twice (one plan, each story created and farmed out
once, one verdict per union, each blame probe recorded once, one landing) and no verdict is
lost (a gate killed with its runner runs again, and its leftover process is killed).

The runner runs as its own process (``python -m runners``), the API in this process (the
planner reports its plan through it). A gate hangs by script at the chosen point (see
``SLOW_GATE``), which fixes where the runner dies without any timing guess.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from domain.commands import Policy
from domain.epic_events import EpicStage, RunMode
from domain.stages import Stage
from runners.agents import kill_process_group, process_alive
from runners.lease import TABLE as LEASE_TABLE
from service.application import StorylineApplication
from service.container import Service
from service.epics import EpicService
from service.settings import Database
from service.sqlstore import SqlStore
from tests.epics.epic_support import (
    THREE,
    add_epic,
    epic_config,
    epic_repo,
    files_on,
    subtask,
    wait_epic_stage,
    write,
)
from tests.pg_relay import Relay
from tests.pipeline_support import api_server, calls, dump_toml, git
from tests.runners.test_runner_crash import stop_runner

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

SLOW_GATE = """\
import json, os, subprocess, sys, time
log, hang_in, hang_at, script = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
where = os.path.basename(os.getcwd())  # union, probe (scratch worktrees), land, a story's
try:
    with open(log) as f:
        before = sum(1 for line in f if json.loads(line)["where"] == where)
except FileNotFoundError:
    before = 0
with open(log, "a") as f:
    f.write(json.dumps({"where": where, "pid": os.getpid()}) + "\\n")
if where == hang_in and before + 1 == hang_at:
    # The runner is killed meanwhile and the next one must kill this, unless the test
    # lets it go on (``release``).
    deadline = time.monotonic() + 120
    while not os.path.exists(log + ".release") and time.monotonic() < deadline:
        time.sleep(0.05)
sys.exit(subprocess.call([sys.executable, script]))
"""
"""A gate wrapper: logs each run (where, pid) and hangs on run ``hang_at`` in ``hang_in``
(until the log's ``.release`` file appears)."""


def slow_gate(tmp: Path, script: str, hang_in: str, hang_at: int) -> dict[str, Any]:
    wrapper = tmp / "slow_gate.py"
    wrapper.write_text(SLOW_GATE)
    log = tmp / "gate-runs.jsonl"
    argv = [sys.executable, str(wrapper), str(log), hang_in, str(hang_at), script]
    return {"commands": [argv], "timeout_secs": 150}


def gate_runs(tmp: Path, where: str) -> list[int]:
    """Pids of the gate runs in ``where``, in order."""
    log = tmp / "gate-runs.jsonl"
    if not log.exists():
        return []
    runs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r["pid"] for r in runs if r["where"] == where]


def pid_in(pidfile: Path) -> int | None:
    """The pid a gate's pid file names (written by the runner right after the start)."""
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wait_until(what: str, predicate: Callable[[], bool], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; runner log:\n{log.read_text()}")


@dataclass
class Crash:
    """The runner processes of one test, the API they report to, and the test's view."""

    tmp: Path
    repo: Path
    db: Database
    api_url: str
    epics: EpicService
    log: Path
    runner_db: Database | None = None
    """Where the runner processes find the database (default: where this test does)."""
    runner: subprocess.Popen[bytes] | None = None
    orphans: list[int] = field(default_factory=list)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
        argv = [sys.executable, "-m", "runners", "--project", str(self.repo)]
        db = self.runner_db or self.db
        argv += ["--database-url", db.url, "--api-url", self.api_url]
        self.runner = subprocess.Popen(
            [*argv, "--poll-interval", "0.2"],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )

    def kill_and_restart(self, *left_running: int, runner_db: Database | None = None) -> None:
        """SIGKILL the runner (``left_running`` must outlive it), then start a new one."""
        assert self.runner is not None
        self.orphans += left_running
        self.runner.send_signal(signal.SIGKILL)
        self.runner.wait(timeout=10)
        for pid in left_running:
            assert process_alive(pid), f"pid {pid} died with the runner: nothing to reap"
        # The dead runner's lease would expire by itself after its TTL (15 s); expiring it
        # now only saves that wait. What is tested is what the next runner does.
        SqlStore(self.epics.app).write(
            f"UPDATE {LEASE_TABLE} SET expires_at = 0 WHERE name = ?", ("runners",)
        )
        self.runner_db = runner_db or self.runner_db
        self.start()

    def stop(self) -> None:
        if self.runner is not None and self.runner.poll() is None:
            stop_runner(self.runner, self.log)
        for pid in self.orphans:  # only after a failure: the test asserts they are gone
            if process_alive(pid):
                kill_process_group(pid, grace_secs=1.0)

    def types(self, epic_id: str) -> Counter[str]:
        return Counter(e.type for e in self.epics.history(epic_id))

    def wait_done(self, epic_id: str) -> None:
        epic = wait_epic_stage(
            self.epics, epic_id, EpicStage.DONE, EpicStage.FAILED, EpicStage.BLOCKED
        )
        assert epic.stage is EpicStage.DONE, (
            epic.failed_reason or epic.blocked_reason,
            self.log.read_text()[-5000:],
        )


@contextmanager
def crash_setup(
    tmp: Path, repo: Path, db: Database, config: Any, runner_db: Database | None = None
) -> Iterator[Crash]:
    (repo / "storyline.toml").write_text(dump_toml(config))
    app = StorylineApplication(db, policy=Policy(max_retries=config.max_retries))
    service = Service(project=repo, db=db, config=config, app=app)
    with api_server(service) as url:
        crash = Crash(tmp, repo, db, url, EpicService(app), tmp / "runner.log", runner_db)
        crash.start()
        try:
            yield crash
        finally:
            crash.stop()


def assert_stories_once(crash: Crash, epic_id: str, expected: list[str]) -> None:
    """Each story created and started once, each in one StoriesFarmedOut."""
    epic = crash.epics.get(epic_id)
    assert epic.stories == expected
    farmed = [
        s
        for e in crash.epics.history(epic_id)
        if e.type == "StoriesFarmedOut"
        for s in e.data["stories"]
    ]
    assert sorted(farmed) == sorted(expected), farmed
    for sid in expected:
        types = Counter(e.type for e in crash.epics.app.history(sid))
        assert types["StoryCreated"] == 1 and types["CodingStarted"] == 1, (sid, types)
        assert types["MergeSucceeded"] == 1, (sid, types)


def spawns(crash: Crash, story_id: str) -> list[tuple[int, str]]:
    return [
        (e.data["attempt"], e.data["outcome"])
        for e in crash.epics.app.history(story_id)
        if e.type == "AgentExited"
    ]


def coder_calls(tmp: Path) -> Counter[str]:
    return Counter(c["env"]["STORYLINE_STORY_ID"] for c in calls(tmp))


def assert_landed_once(crash: Crash, epic_id: str, base: str) -> None:
    epic = crash.epics.get(epic_id)
    history = crash.epics.history(epic_id)
    assert crash.types(epic_id)["EpicLanded"] == 1 and history[-1].type == "EpicLanded"
    # Every step, the resumed ones too, says who and why.
    assert all(e.actor and (e.reason or e.type == "EpicCreated") for e in history), [
        (e.type, e.actor, e.reason) for e in history
    ]
    assert git(crash.repo, "rev-parse", "main~1") == base
    assert epic.merge_commit == git(crash.repo, "rev-parse", "main")


def test_killed_while_planning_the_next_runner_plans_once(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    base = git(repo, "rev-parse", "main")
    plan = {"subtasks": [subtask("a", ["a.txt"]), subtask("b", ["b.txt"])]}
    planner = {
        "*": {
            # Silent: an agent that prints dies of the broken pipe once its runner is gone, and
            # only a live orphan shows the reaping. It would submit too, late: an orphan left
            # alive would show as a second plan.
            "1": [{"silent": 30}, {"submit_plan": plan}],
            "2": [{"submit_plan": plan}],
        }
    }
    coder = {"epic-1.1": write("a.txt"), "epic-1.2": write("b.txt")}
    config = epic_config(tmp_path, coder, planner)
    with crash_setup(tmp_path, repo, database, config) as crash:
        eid = add_epic(crash.epics)
        wait_until(
            "the planner to run",
            lambda: (
                bool(calls(tmp_path, "planner"))
                and (crash.epics.get(eid).running_planner or {}).get("pid") is not None
            ),
            crash.log,
        )
        planner_pid = calls(tmp_path, "planner")[0]["pid"]
        assert crash.epics.get(eid).stage is EpicStage.PLANNING
        crash.kill_and_restart(planner_pid)
        crash.wait_done(eid)
        assert not process_alive(planner_pid), "the orphaned planner was not killed"

        history = crash.epics.history(eid)
        requested = [e.data["attempt"] for e in history if e.type == "PlannerSpawnRequested"]
        assert requested == [1, 2]
        exits = [
            (e.data["attempt"], e.data["outcome"]) for e in history if e.type == "PlannerExited"
        ]
        assert exits == [(1, "lost"), (2, "completed")]
        lost = next(e for e in history if e.type == "PlannerExited")
        assert lost.reason is not None and "killed orphaned process group" in lost.reason
        types = crash.types(eid)
        assert types["PlanAccepted"] == 1 and types["PlanRejected"] == 0
        assert types["StoriesFarmedOut"] == 1
        assert crash.epics.get(eid).mode is RunMode.PARALLEL
        assert_stories_once(crash, eid, ["epic-1.1", "epic-1.2"])
        assert_landed_once(crash, eid, base)
    assert [c["env"]["STORYLINE_ATTEMPT"] for c in calls(tmp_path, "planner")] == ["1", "2"]
    assert coder_calls(tmp_path) == {"epic-1.1": 1, "epic-1.2": 1}
    assert {"a.txt", "b.txt"} <= files_on(repo, "main")


def test_killed_after_the_plan_while_the_planner_runs_no_second_plan(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    base = git(repo, "rev-parse", "main")
    plan = {"subtasks": [subtask("a", ["a.txt"]), subtask("b", ["b.txt"])]}
    # The plan is in, the planner still runs (a farm-out waits for its exit): the runner dies.
    planner = {"*": [{"submit_plan": plan}, {"silent": 30}]}
    coder = {"epic-1.1": write("a.txt"), "epic-1.2": write("b.txt")}
    config = epic_config(tmp_path, coder, planner)
    with crash_setup(tmp_path, repo, database, config) as crash:
        eid = add_epic(crash.epics)
        wait_until(
            "the plan to be accepted",
            lambda: (
                crash.epics.get(eid).plan is not None
                and (crash.epics.get(eid).running_planner or {}).get("pid") is not None
            ),
            crash.log,
        )
        planner_pid = calls(tmp_path, "planner")[0]["pid"]
        assert crash.epics.get(eid).stage is EpicStage.PLANNING
        crash.kill_and_restart(planner_pid)
        crash.wait_done(eid)
        assert not process_alive(planner_pid), "the orphaned planner was not killed"

        history = crash.epics.history(eid)
        assert [e.data["attempt"] for e in history if e.type == "PlannerSpawnRequested"] == [1]
        exits = [
            (e.data["attempt"], e.data["outcome"]) for e in history if e.type == "PlannerExited"
        ]
        assert exits == [(1, "lost")]
        types = crash.types(eid)
        assert types["PlanAccepted"] == 1 and types["StoriesFarmedOut"] == 1
        assert_stories_once(crash, eid, ["epic-1.1", "epic-1.2"])
        assert_landed_once(crash, eid, base)
    assert len(calls(tmp_path, "planner")) == 1
    assert coder_calls(tmp_path) == {"epic-1.1": 1, "epic-1.2": 1}


def test_killed_while_running_then_while_the_union_gate_runs(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    base = git(repo, "rev-parse", "main")
    plan = {"subtasks": [subtask("a", ["a.txt"]), subtask("b", ["b.txt"])]}
    coder = {
        "epic-1.1": write("a.txt"),
        # Attempt 1 is still at work when the runner dies (the epic is running).
        # Silent, so it outlives its runner (output would end it on the broken pipe).
        "epic-1.2": {"1": [{"silent": 30}, *write("b.txt")], "2": write("b.txt")},
    }
    union = slow_gate(tmp_path, "union_check.py", hang_in="union", hang_at=1)
    config = epic_config(
        tmp_path, coder, {"*": [{"submit_plan": plan}]}, epic={"union_gates": union}
    )
    with crash_setup(tmp_path, repo, database, config) as crash:
        eid = add_epic(crash.epics)
        app = crash.epics.app
        wait_until(
            "epic-1.1 to land on the integration branch and epic-1.2's coder to run",
            lambda: (
                "epic-1.2" in coder_calls(tmp_path)
                and crash.epics.get(eid).stories == ["epic-1.1", "epic-1.2"]
                and app.get_story("epic-1.1").stage is Stage.DONE
                # Started (its pid file written): the next runner can find it.
                and bool((app.get_story("epic-1.2").running_agent or {}).get("started"))
            ),
            crash.log,
        )
        assert crash.epics.get(eid).stage is EpicStage.RUNNING
        coder_pid = next(
            c["pid"] for c in calls(tmp_path) if c["env"]["STORYLINE_STORY_ID"] == "epic-1.2"
        )
        crash.kill_and_restart(coder_pid)

        wait_until("the union gate to run", lambda: bool(gate_runs(tmp_path, "union")), crash.log)
        assert crash.types(eid)["IntegrationStarted"] == 1
        assert crash.epics.get(eid).union is None
        gate_pid = gate_runs(tmp_path, "union")[0]
        pidfile = repo / ".storyline" / "run" / f"union-gate-{eid}.pid"
        wait_until("the gate's pid file", lambda: pid_in(pidfile) == gate_pid, crash.log)
        crash.kill_and_restart(gate_pid)
        crash.wait_done(eid)
        assert not process_alive(coder_pid), "the orphaned coder was not killed"
        assert not process_alive(gate_pid), "the union gate of the dead runner survived"

        types = crash.types(eid)
        assert types["PlanAccepted"] == 1 and types["StoriesFarmedOut"] == 1
        assert types["IntegrationStarted"] == 1
        verdicts = [
            e.data["passed"] for e in crash.epics.history(eid) if e.type == "UnionGatesJudged"
        ]
        assert verdicts == [True]
        assert_stories_once(crash, eid, ["epic-1.1", "epic-1.2"])
        assert spawns(crash, "epic-1.1") == [(1, "completed")]
        assert spawns(crash, "epic-1.2") == [(1, "lost"), (2, "completed")]
        lost = next(e for e in crash.epics.app.history("epic-1.2") if e.type == "AgentExited")
        assert lost.reason is not None and "killed orphaned process group" in lost.reason
        assert_landed_once(crash, eid, base)
        fork = crash.epics.get(eid).fork_point
    # The killed union gate ran again once: no verdict lost, none doubled.
    assert len(gate_runs(tmp_path, "union")) == 2
    assert coder_calls(tmp_path) == {"epic-1.1": 1, "epic-1.2": 2}
    # Each story merged into the integration branch once.
    assert git(repo, "rev-list", "--count", f"{fork}..epic/{eid}") == "2"
    assert not pidfile.exists()


def test_killed_during_a_blame_probe_records_each_probe_once(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    base = git(repo, "rev-parse", "main")
    coder = {
        "epic-1.1": write("x.txt"),
        "epic-1.2": write("y.txt"),
        "epic-1.3": write("c.txt"),
        "epic-1.r1": [
            {"expect_in_prompt": "x.txt and y.txt clash"},
            *write("x.txt"),
            *write("y.txt"),
            *write("fix.txt"),
        ],
    }
    # The second leave-one-out probe hangs: one probe is recorded when the runner dies.
    union = slow_gate(tmp_path, "union_check.py", hang_in="probe", hang_at=2)
    config = epic_config(
        tmp_path, coder, {"*": [{"submit_plan": THREE}]}, epic={"union_gates": union}
    )
    with crash_setup(tmp_path, repo, database, config) as crash:
        eid = add_epic(crash.epics)
        wait_until(
            "the second blame probe to run",
            lambda: len(gate_runs(tmp_path, "probe")) == 2,
            crash.log,
        )
        epic = crash.epics.get(eid)
        assert epic.stage is EpicStage.INTEGRATING
        assert [p["excluded"] for p in epic.probes] == [["epic-1.1"]]
        gate_pid = gate_runs(tmp_path, "probe")[1]
        crash.kill_and_restart(gate_pid)
        crash.wait_done(eid)
        assert not process_alive(gate_pid), "the probe's gate of the dead runner survived"

        epic = crash.epics.get(eid)
        assert epic.mode is RunMode.REGIONAL_REPLAN
        assert epic.kept_stories == ["epic-1.3"]
        history = crash.epics.history(eid)
        probes = [
            (e.data["excluded"], e.data["result"]) for e in history if e.type == "BlameProbed"
        ]
        assert probes == [
            (["epic-1.1"], "passed"),
            (["epic-1.2"], "passed"),
            (["epic-1.3"], "failed"),
        ]
        types = crash.types(eid)
        assert types["BlameConcluded"] == 1 and types["IntegrationRebuilt"] == 1
        assert types["StoriesFarmedOut"] == 2 and types["IntegrationStarted"] == 2
        blame = next(e for e in history if e.type == "BlameConcluded")
        assert sorted(blame.data["implicated"]) == ["epic-1.1", "epic-1.2"]
        verdicts = [e.data["passed"] for e in history if e.type == "UnionGatesJudged"]
        assert verdicts == [False, True]
        assert_stories_once(crash, eid, ["epic-1.1", "epic-1.2", "epic-1.3", "epic-1.r1"])
        assert_landed_once(crash, eid, base)
    # One run per probe plus the one killed; one per union.
    assert len(gate_runs(tmp_path, "probe")) == 4
    assert len(gate_runs(tmp_path, "union")) == 2
    assert coder_calls(tmp_path) == {"epic-1.1": 1, "epic-1.2": 1, "epic-1.3": 1, "epic-1.r1": 1}
    assert {"c.txt", "x.txt", "y.txt", "fix.txt"} <= files_on(repo, "main")


def test_killed_while_landing_lands_the_epic_once(tmp_path: Path, database: Database) -> None:
    repo = epic_repo(tmp_path / "repo")
    base = git(repo, "rev-parse", "main")
    plan = {"subtasks": [subtask("a", ["a.txt"]), subtask("b", ["b.txt"])]}
    coder = {"epic-1.1": write("a.txt"), "epic-1.2": write("b.txt")}
    # Stories' merges run the same merge gates elsewhere; only the epic's landing hangs.
    merge_gates = slow_gate(tmp_path, "check.py", hang_in="land", hang_at=1)
    config = epic_config(tmp_path, coder, {"*": [{"submit_plan": plan}]}, merge_gates=merge_gates)
    with crash_setup(tmp_path, repo, database, config) as crash:
        eid = add_epic(crash.epics)
        wait_until(
            "the landing's merge gate to run", lambda: bool(gate_runs(tmp_path, "land")), crash.log
        )
        assert crash.epics.get(eid).stage is EpicStage.MERGING
        gate_pid = gate_runs(tmp_path, "land")[0]
        pidfile = repo / ".storyline" / "run" / f"gate-{eid}.pid"
        wait_until("the gate's pid file", lambda: pid_in(pidfile) == gate_pid, crash.log)
        assert git(repo, "rev-parse", "main") == base
        crash.kill_and_restart(gate_pid)
        crash.wait_done(eid)
        assert not process_alive(gate_pid), "the landing's merge gate of the dead runner survived"

        types = crash.types(eid)
        assert types["UnionGatesJudged"] == 1 and types["EpicLandingFailed"] == 0
        assert_stories_once(crash, eid, ["epic-1.1", "epic-1.2"])
        assert_landed_once(crash, eid, base)
    subjects = git(repo, "log", "--format=%s", "main").splitlines()
    assert subjects == ["Markers (epic epic-1)", "initial"]
    assert len(gate_runs(tmp_path, "land")) == 2
    assert {"a.txt", "b.txt"} <= files_on(repo, "main")


def test_killed_after_the_base_moved_records_the_landing_once(
    tmp_path: Path, pg_database: Database
) -> None:
    """The window between the base's compare-and-swap and recording it, held open by taking
    the database away from the runner (PostgreSQL behind a relay) once its gate passed."""
    relay = Relay((pg_database.host, pg_database.port))
    through = dataclasses.replace(pg_database, port=relay.port)
    repo = epic_repo(tmp_path / "repo")
    base = git(repo, "rev-parse", "main")
    plan = {"subtasks": [subtask("a", ["a.txt"]), subtask("b", ["b.txt"])]}
    coder = {"epic-1.1": write("a.txt"), "epic-1.2": write("b.txt")}
    merge_gates = slow_gate(tmp_path, "check.py", hang_in="land", hang_at=1)
    config = epic_config(tmp_path, coder, {"*": [{"submit_plan": plan}]}, merge_gates=merge_gates)
    try:
        with crash_setup(tmp_path, repo, pg_database, config, runner_db=through) as crash:
            eid = add_epic(crash.epics)
            wait_until(
                "the landing's merge gate to run",
                lambda: bool(gate_runs(tmp_path, "land")),
                crash.log,
            )
            relay.interrupt()
            (tmp_path / "gate-runs.jsonl.release").write_text("go")
            wait_until("main to move", lambda: git(repo, "rev-parse", "main") != base, crash.log)
            moved = git(repo, "rev-parse", "main")
            epic = crash.epics.get(eid)
            assert epic.stage is EpicStage.MERGING and epic.merge_commit is None
            crash.kill_and_restart(runner_db=pg_database)
            crash.wait_done(eid)

            types = crash.types(eid)
            assert types["EpicLandingFailed"] == 0
            assert_landed_once(crash, eid, base)
            assert crash.epics.get(eid).merge_commit == moved
    finally:
        relay.close()
    # Found on the base and recorded: not squashed, gated or landed a second time.
    assert git(repo, "log", "--format=%s", "main").splitlines() == [
        "Markers (epic epic-1)",
        "initial",
    ]
    assert len(gate_runs(tmp_path, "land")) == 1
