"""Scale-out end to end on PostgreSQL: a bare git remote, three worker runner processes each
with its own clone, one merger, thirty stories; one worker's "machine" dies mid-run (the
runner and its agents SIGKILLed) and a worker is started late in its old clone directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from bench.cluster import Cluster, create_stories, story_ids
from domain.stages import Stage
from runners.agents import process_alive
from service.application import StorylineApplication
from service.settings import Database

pytestmark = pytest.mark.slow

N = 30


def wait_until(what: str, predicate, cluster: Cluster, timeout: float = 240.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for name, proc in cluster.procs.items():
            assert proc.poll() is None, f"{name} exited:\n{cluster.log_tail()}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{cluster.log_tail()}")


def test_workers_share_thirty_stories_and_survive_a_dead_machine(
    tmp_path: Path, pg_database: Database
) -> None:
    stories = story_ids(N)
    cluster = Cluster.create(
        tmp_path, pg_database.url, stories, agent_secs=1.0, max_coders=2, lease_ttl=3.0
    )
    app = StorylineApplication(pg_database)
    try:
        create_stories(app, stories, "user:test")
        cluster.start("m1", role="merger")
        for worker in ("w1", "w2", "w3"):
            cluster.start(worker)
        for sid in stories:
            app.transition(sid, "start_coding", actor="user:test")

        def done() -> list[str]:
            return [s for s in stories if app.get_story(s).stage is Stage.DONE]

        def w1_mid_run() -> bool:
            mine = [a for a in cluster.agents() if a["env"].get("STORYLINE_WORKER") == "w1"]
            return len(mine) >= 3

        wait_until("w1 to be coding", w1_mid_run, cluster)
        killed = cluster.kill_machine("w1")
        assert killed, "w1 had no agent to kill"
        wait_until("ten stories done", lambda: len(done()) >= 10, cluster)
        cluster.start("w4", clone="w1")  # a late worker, in the dead one's old clone
        wait_until("every story done", lambda: len(done()) == N, cluster, timeout=300)
    finally:
        cluster.stop_all()

    histories = {sid: app.history(sid) for sid in stories}
    agents = cluster.agents()

    # Every attempt was spawned once: one agent process per (story, attempt), and exactly
    # the attempts the log records.
    spawned = Counter(
        (a["env"]["STORYLINE_STORY_ID"], a["env"]["STORYLINE_ATTEMPT"]) for a in agents
    )
    assert all(n == 1 for n in spawned.values()), [k for k, n in spawned.items() if n > 1]
    logged = {
        (sid, str(e.data["attempt"]))
        for sid, history in histories.items()
        for e in history
        if e.type == "AgentSpawnRequested"
    }
    assert set(spawned) == logged

    # No story was coded by two workers at once: each attempt ran on the worker whose
    # claim was the latest when it was spawned, and started only after the attempt before
    # it was recorded as over (a lost one only once its worker's lease had expired).
    started = {
        (a["env"]["STORYLINE_STORY_ID"], int(a["env"]["STORYLINE_ATTEMPT"])): a for a in agents
    }
    takeovers = 0
    for sid, history in histories.items():
        holder = None
        exits: dict[int, float] = {}
        holders: set[str] = set()
        for e in history:
            if e.type == "WorkerClaimed":
                holder = e.data["worker"]
                holders.add(holder)
            elif e.type == "AgentSpawnRequested":
                attempt = int(e.data["attempt"])
                assert started[(sid, attempt)]["env"]["STORYLINE_WORKER"] == holder, (sid, attempt)
                if attempt > 1:
                    assert started[(sid, attempt)]["time"] >= exits[attempt - 1], (sid, attempt)
            elif e.type == "AgentExited":
                exits[int(e.data["attempt"])] = e.timestamp.timestamp()
        takeovers += len(holders) > 1
    lost = [
        e
        for history in histories.values()
        for e in history
        if e.type == "AgentExited" and e.data["outcome"] == "lost"
    ]
    assert lost and all("lease expired" in (e.reason or "") for e in lost), [e.reason for e in lost]
    assert takeovers >= 1

    # The remote base holds exactly one squash commit per story, in a straight line, and
    # every landed tree passed the merge gates.
    log = subprocess.run(
        ["git", "log", "--format=%H %T %P%x09%s", "main"],
        cwd=cluster.remote,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    landed = log[:-1]  # the last is the seed commit
    assert len(landed) == N
    subjects = Counter()
    trees = []
    for line in landed:
        shas, subject = line.split("\t", 1)
        _commit, tree, *parents = shas.split()
        assert len(parents) == 1, line
        trees.append(tree)
        subjects.update(sid for sid in stories if subject.endswith(f"(story {sid})"))
    assert subjects == Counter(stories)
    passed_trees = {
        e.data["tree"]
        for history in histories.values()
        for e in history
        if e.type == "GateVerdictRecorded" and e.data["phase"] == "merge_gates" and e.data["passed"]
    }
    assert set(trees) <= passed_trees
    # Each worker held at most max_coders stories at a time: its agents' lifetimes (from
    # the agent's own start to the recorded exit) never overlapped more than twice.
    for worker in {a["env"]["STORYLINE_WORKER"] for a in agents}:
        spans = []
        for a in agents:
            if a["env"]["STORYLINE_WORKER"] != worker:
                continue
            sid, attempt = a["env"]["STORYLINE_STORY_ID"], int(a["env"]["STORYLINE_ATTEMPT"])
            end = next(
                e.timestamp.timestamp()
                for e in histories[sid]
                if e.type == "AgentExited" and int(e.data["attempt"]) == attempt
            )
            spans.append((a["time"], end))
        for start, _ in spans:
            overlapping = sum(1 for s, e in spans if s <= start < e)
            assert overlapping <= 2, (worker, start, overlapping)
    by_worker = defaultdict(int)
    for a in agents:
        by_worker[a["env"]["STORYLINE_WORKER"]] += 1
    assert set(by_worker) <= {"w1", "w2", "w3", "w4"} and len(by_worker) >= 3
    app.close()


def test_a_worker_that_comes_back_after_its_lease_was_taken_records_nothing(
    tmp_path: Path, pg_database: Database
) -> None:
    """SIGSTOP stands in for a network partition or a long pause: the worker's own agent
    finishes meanwhile, and when the worker resumes it tries to record that exit."""
    cluster = Cluster.create(
        tmp_path, pg_database.url, ["f1"], agent_secs=0, max_coders=2, lease_ttl=2.0
    )
    script = {
        "f1": {
            "1": [
                {"sleep": 4, "interval": 0.5},
                {"write": "mods/f1.py", "content": "VERSION = 1\n"},
                {"commit": "f1 from the paused worker"},
            ],
            "2": [
                {"sleep": 6, "interval": 0.5},
                {"write": "mods/f1.py", "content": "VERSION = 2\n"},
                {"commit": "f1 from the worker that took over"},
            ],
        }
    }
    (tmp_path / "coder-script.json").write_text(json.dumps(script))
    app = StorylineApplication(pg_database)
    try:
        create_stories(app, ["f1"], "user:test")
        cluster.start("m1", role="merger")
        paused = cluster.start("w1")
        app.transition("f1", "start_coding", actor="user:test")
        wait_until("w1's attempt to start", lambda: len(cluster.agents()) == 1, cluster)
        os.kill(paused.pid, signal.SIGSTOP)
        cluster.start("w2")
        wait_until(
            "w2's attempt to start",
            lambda: any(a["env"]["STORYLINE_WORKER"] == "w2" for a in cluster.agents()),
            cluster,
        )
        first = cluster.agents()[0]
        assert first["env"]["STORYLINE_WORKER"] == "w1"
        wait_until("w1's own agent to exit", lambda: not process_alive(first["pid"]), cluster)
        assert app.get_story("f1").stage is Stage.CODING
        os.kill(paused.pid, signal.SIGCONT)
        wait_until(
            "w1 to be refused",
            lambda: "holds it, not 'w1'" in cluster.logs["w1"].read_text(),
            cluster,
            timeout=30,
        )
        wait_until("f1 done", lambda: app.get_story("f1").stage is Stage.DONE, cluster)
    finally:
        cluster.stop_all()
    history = app.history("f1")
    exits = [(e.data["attempt"], e.data["outcome"]) for e in history if e.type == "AgentExited"]
    assert exits == [(1, "lost"), (2, "completed")]
    claims = [e.data["worker"] for e in history if e.type == "WorkerClaimed"]
    assert claims == ["w1", "w2"]
    shown = subprocess.run(
        ["git", "show", "main:mods/f1.py"], cwd=cluster.remote, capture_output=True, text=True
    )
    assert shown.stdout == "VERSION = 2\n"
    app.close()


def test_the_merger_stacks_merges_from_its_own_clone(tmp_path: Path, pg_database: Database) -> None:
    """The speculative merge queue (max_merge_slots = 3) run by the merger in its clone:
    every landing is a compare-and-swap push from the commit below it."""
    stories = story_ids(6)
    cluster = Cluster.create(
        tmp_path,
        pg_database.url,
        stories,
        agent_secs=0.5,
        max_coders=3,
        merge_gate_secs=1.0,
        lease_ttl=5.0,
        max_merge_slots=3,
    )
    app = StorylineApplication(pg_database)
    try:
        create_stories(app, stories, "user:test")
        cluster.start("m1", role="merger")
        cluster.start("w1")
        cluster.start("w2")
        for sid in stories:
            app.transition(sid, "start_coding", actor="user:test")
        wait_until(
            "every story done",
            lambda: all(app.get_story(s).stage is Stage.DONE for s in stories),
            cluster,
        )
    finally:
        cluster.stop_all()
    histories = {sid: app.history(sid) for sid in stories}
    stacked = [
        e for h in histories.values() for e in h if e.type == "MergeStarted" and e.data["ahead"]
    ]
    assert stacked, "no merge was stacked on another"
    log = subprocess.run(
        ["git", "log", "--format=%T %P", "main"],
        cwd=cluster.remote,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()[:-1]
    assert len(log) == len(stories) and all(len(line.split()) == 2 for line in log)
    passed_trees = {
        e.data["tree"]
        for h in histories.values()
        for e in h
        if e.type == "GateVerdictRecorded" and e.data["phase"] == "merge_gates" and e.data["passed"]
    }
    assert {line.split()[0] for line in log} <= passed_trees
    app.close()


def test_an_epic_runs_on_the_merger_and_its_stories_on_the_workers(
    tmp_path: Path, pg_database: Database
) -> None:
    """The merger plans the epic (its planner reports through the API), creates the
    integration branch on the remote; a worker codes the stories from it; the merger merges
    them into it, gates the union and lands the epic with one CAS push."""
    from domain.epic_events import EpicStage
    from service.container import Service
    from service.epics import EpicService
    from tests.epics.epic_support import add_epic, epic_config, epic_repo, subtask, write
    from tests.pipeline_support import api_server, dump_toml, git

    seed = epic_repo(tmp_path / "seed")
    plan = {"subtasks": [subtask("a", ["a.txt"]), subtask("b", ["b.txt"])]}
    config = epic_config(
        tmp_path,
        {"epic-1.1": write("a.txt"), "epic-1.2": write("b.txt")},
        {"*": [{"submit_plan": plan}]},
    )
    (seed / "storyline.toml").write_text(dump_toml(config))
    (seed / ".gitignore").write_text(".storyline/\n")
    git(seed, "add", "-A")
    git(seed, "commit", "-q", "-m", "configure storyline")
    base_before = git(seed, "rev-parse", "main")
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(remote)], check=True)
    cluster = Cluster(tmp_path, pg_database.url, remote, tmp_path / "coder-calls.jsonl", 5.0)
    app = StorylineApplication(pg_database)
    service = Service(project=seed, db=pg_database, config=config, app=app)
    epics = EpicService(app)
    try:
        with api_server(service) as url:
            cluster.start("m1", role="merger", api_url=url)
            cluster.start("w1", api_url=url)
            eid = add_epic(epics)
            wait_until(
                "the epic to land",
                lambda: epics.get(eid).stage in (EpicStage.DONE, EpicStage.FAILED),
                cluster,
            )
    finally:
        cluster.stop_all()
    epic = epics.get(eid)
    assert epic.stage is EpicStage.DONE, epic.failed_reason
    stories = {sid: app.get_story(sid) for sid in epic.stories}
    assert all(s.stage is Stage.DONE and s.holder == "w1" for s in stories.values())
    # On the remote: main gained exactly the epic's squash, holding both files; the
    # stories merged into the integration branch, which the workers branched from.
    assert git(remote, "rev-parse", "main~1") == base_before
    assert epic.merge_commit == git(remote, "rev-parse", "main")
    assert {"a.txt", "b.txt"} <= set(git(remote, "ls-tree", "--name-only", "main").split())
    assert git(remote, "rev-list", "--count", f"{base_before}..epic/{eid}") == "2"
    app.close()


def test_a_new_merger_records_a_landing_its_dead_predecessor_pushed(
    tmp_path: Path, pg_database: Database
) -> None:
    """The first merger pushed the squash commit and died before recording it; the next
    merger (another clone, no workspace) finds the commit on the remote and records the
    success instead of merging the story a second time."""
    cluster = Cluster.create(tmp_path, pg_database.url, ["t1"], agent_secs=0, max_coders=1)
    seed = tmp_path / "seed"

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@x", *args],
            cwd=seed,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    base = git("rev-parse", "main")
    git("checkout", "-q", "-b", "feature/story-t1")
    (seed / "mods").mkdir()
    (seed / "mods" / "t1.py").write_text("NAME = 't1'\n")
    git("add", "-A")
    git("commit", "-q", "-m", "add t1")
    feature = git("rev-parse", "HEAD")
    # What the dead merger did: squash onto main and push it (the CAS push that landed).
    git("checkout", "-q", "main")
    git("merge", "-q", "--squash", "feature/story-t1")
    git("commit", "-q", "-m", "module t1 (story t1)\n\nSquash-merged by storyline.")
    landed = git("rev-parse", "HEAD")
    git("push", "-q", str(cluster.remote), "main", "feature/story-t1")
    app = StorylineApplication(pg_database)
    create_stories(app, ["t1"], "user:test")
    for event, data in (
        ("start_coding", {}),
        ("worktree_ready", {"path": "/elsewhere/t1", "branch": "feature/story-t1"}),
        ("spawn_agent", {"role": "coder", "agent": "coder", "runtime": "cli"}),
        ("agent_started", {"role": "coder", "attempt": 1, "pid": 4242}),
        ("agent_exited", {"role": "coder", "attempt": 1, "outcome": "completed"}),
        ("start_gates", {"commits_ahead": 1}),
        (
            "gates_passed",
            {"feature_branch": "feature/story-t1", "commits_ahead": 1, "commit": feature},
        ),
        ("start_merge", {"base_sha": base}),
    ):
        app.transition("t1", event, actor="runner:merge", data=data)
    try:
        cluster.start("m2", role="merger")
        wait_until("t1 done", lambda: app.get_story("t1").stage is Stage.DONE, cluster)
    finally:
        cluster.stop_all()
    assert app.get_story("t1").merge_commit == landed
    log = subprocess.run(
        ["git", "log", "--format=%H", "main"], cwd=cluster.remote, capture_output=True, text=True
    ).stdout.split()
    assert log == [landed, base], "the story was merged a second time"
    app.close()
