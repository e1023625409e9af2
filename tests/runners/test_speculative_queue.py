"""The speculative merge queue with real git and real merge-gate processes (issue 17).

Stories are put straight into the queue (their feature branches made with git plumbing),
then a real supervisor with ``max_merge_slots`` = 4 stacks, gates and lands them. The
invariant is checked against git itself: every commit on main has a tree on which a merge
gate passed, in queue order, each story once, and main only moved forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from domain.stages import MergeFailureKind, Stage
from service.application import StorylineApplication
from service.settings import Database
from tests.pipeline_support import make_config, make_repo, running_pipeline
from tests.runners.spec_support import (
    base_only_moved_forward,
    base_trees,
    gate_runs,
    landed,
    passed_merge_trees,
    queue,
    write_gate,
)

SETTLED = (Stage.DONE, Stage.MERGE_FAILURE, Stage.BLOCKED)


def config(tmp: Path, gate: list[str], **overrides: Any) -> Any:
    return make_config(
        tmp,
        {},
        max_merge_slots=overrides.pop("k", 4),
        merge_gates={"commands": [gate], "timeout_secs": 60},
        **overrides,
    )


def files(n: int, *extra: str) -> dict[str, str]:
    found = {f"s{n}.txt": f"story {n}\n"}
    for name in extra:
        found[name] = "x\n"
    return found


def run_queue(
    tmp: Path, database: Database, stories: dict[str, dict[str, str]], cfg: Any
) -> tuple[StorylineApplication, dict[str, Any], Path]:
    repo = make_repo(tmp / "repo")
    app = StorylineApplication(database)
    for sid, written in stories.items():
        queue(app, repo, sid, written)
    with running_pipeline(repo, database, cfg) as p:
        final = {sid: p.wait_stage(sid, *SETTLED, timeout=120) for sid in stories}
    return p.app, final, repo


def merge_started(app: StorylineApplication, sid: str) -> list[dict[str, Any]]:
    return [e.data for e in app.history(sid) if e.type == "MergeStarted"]


def test_all_pass_with_k4_lands_in_order_each_tree_gated_as_is(
    tmp_path: Path, database: Database
) -> None:
    # s1's gate only passes once s4's gate started while it ran: the gates overlap.
    gate = write_gate(tmp_path, sleep=0.2, wait={"1": 4})
    stories = {f"s{i}": files(i) for i in range(1, 6)}
    app, final, repo = run_queue(tmp_path, database, stories, config(tmp_path, gate))
    assert all(s.stage is Stage.DONE for s in final.values()), final
    assert landed(repo) == [f"story s{i} (story s{i})" for i in range(1, 6)]
    trees = base_trees(repo)
    assert set(trees) <= passed_merge_trees(app, list(stories))
    assert base_only_moved_forward(repo)
    # Stacked: s4 was squashed on s1 + s2 + s3, its parent being s3's speculative commit.
    s4 = merge_started(app, "s4")[-1]
    assert s4["ahead"] == ["s1", "s2", "s3"]
    assert s4["speculative_base"] != s4["base_sha"]
    assert final["s4"].merge_commit is not None
    for sid, story in final.items():
        assert [e.type for e in app.history(sid)].count("MergeSucceeded") == 1, sid
        assert story.speculation is None


def test_one_failure_in_the_middle_of_five_ejects_only_it(
    tmp_path: Path, database: Database
) -> None:
    gate = write_gate(tmp_path, sleep=0.3)
    stories = {f"s{i}": files(i) for i in range(1, 6)}
    stories["s3"] = files(3, "BROKEN-s3")
    app, final, repo = run_queue(tmp_path, database, stories, config(tmp_path, gate))
    assert final["s3"].stage is Stage.MERGE_FAILURE
    assert final["s3"].merge_failure_kind is MergeFailureKind.GATES_FAILED
    assert "BROKEN-s3" in (final["s3"].merge_failure_details or "")
    failed = [e for e in app.history("s3") if e.type == "MergeFailed"][-1]
    assert failed.reason is not None and failed.reason.startswith("ejected: merge gate failed")
    assert "s1, s2" in failed.reason
    for sid in ("s1", "s2", "s4", "s5"):
        assert final[sid].stage is Stage.DONE, (sid, final[sid].stage)
    assert landed(repo) == [f"story {s} (story {s})" for s in ("s1", "s2", "s4", "s5")]
    assert set(base_trees(repo)) <= passed_merge_trees(app, list(stories))
    assert base_only_moved_forward(repo)
    # The builds behind it were dropped with the reason and rebuilt without it.
    for sid in ("s4", "s5"):
        restarts = [e for e in app.history(sid) if e.type == "SpeculationRestarted"]
        if restarts:
            assert "s3" in (restarts[0].reason or "")
        assert "s3" not in merge_started(app, sid)[-1]["ahead"]


def test_two_failures(tmp_path: Path, database: Database) -> None:
    gate = write_gate(tmp_path, sleep=0.2)
    stories = {f"s{i}": files(i) for i in range(1, 7)}
    stories["s2"] = files(2, "BROKEN-s2")
    stories["s5"] = files(5, "BROKEN-s5")
    app, final, repo = run_queue(tmp_path, database, stories, config(tmp_path, gate))
    assert [sid for sid, s in final.items() if s.stage is Stage.MERGE_FAILURE] == ["s2", "s5"]
    assert landed(repo) == [f"story {s} (story {s})" for s in ("s1", "s3", "s4", "s6")]
    assert set(base_trees(repo)) <= passed_merge_trees(app, list(stories))
    assert base_only_moved_forward(repo)


def test_conflict_with_a_story_ahead_counts_once_that_one_landed(
    tmp_path: Path, database: Database
) -> None:
    gate = write_gate(tmp_path, sleep=0.3)
    stories = {
        "s1": {"s1.txt": "1\n", "app.py": "def add(a, b):\n    return a + b\n"},
        "s2": {"s2.txt": "2\n", "app.py": "def add(a, b):\n    return b + a\n"},
        "s3": files(3),
    }
    cfg = config(tmp_path, gate)
    cfg = cfg.model_copy(update={"agent": cfg.agent[:1]})  # no mergemaster: a person decides
    app, final, repo = run_queue(tmp_path, database, stories, cfg)
    assert final["s1"].stage is Stage.DONE and final["s3"].stage is Stage.DONE
    assert final["s2"].stage is Stage.MERGE_FAILURE
    assert final["s2"].merge_failure_kind is MergeFailureKind.CONFLICT_DETECTED
    assert final["s2"].conflicts == ["app.py"]
    # It waited for s1 (the story it conflicts with) before the conflict counted.
    updates = [e.data.get("state") for e in app.history("s2") if e.type == "SpeculationUpdated"]
    assert "waiting" in updates
    assert landed(repo) == ["story s1 (story s1)", "story s3 (story s3)"]


def test_conflict_with_an_ejected_story_is_no_conflict(tmp_path: Path, database: Database) -> None:
    gate = write_gate(tmp_path, sleep=0.3)
    stories = {
        "s1": {"BROKEN-s1": "x\n", "app.py": "def add(a, b):\n    return a + b\n"},
        "s2": {"s2.txt": "2\n", "app.py": "def add(a, b):\n    return b + a\n"},
    }
    app, final, repo = run_queue(tmp_path, database, stories, config(tmp_path, gate))
    assert final["s1"].stage is Stage.MERGE_FAILURE
    assert final["s1"].merge_failure_kind is MergeFailureKind.GATES_FAILED
    assert final["s2"].stage is Stage.DONE
    restarts = [e for e in app.history("s2") if e.type == "SpeculationRestarted"]
    assert restarts and "s1" in (restarts[0].reason or "")
    assert landed(repo) == ["story s2 (story s2)"]


def test_batch_lands_a_group_on_one_gate_run_and_splits_a_failed_one(
    tmp_path: Path, database: Database
) -> None:
    gate = write_gate(tmp_path, sleep=0.3)
    stories = {f"s{i}": files(i) for i in range(1, 7)}
    stories["s5"] = files(5, "BROKEN-s5")
    cfg = config(tmp_path, gate, k=2, merge_queue={"batch": 3})
    app, final, repo = run_queue(tmp_path, database, stories, cfg)
    assert final["s5"].stage is Stage.MERGE_FAILURE
    for sid in ("s1", "s2", "s3", "s4", "s6"):
        assert final[sid].stage is Stage.DONE, (sid, final[sid].stage)
    assert landed(repo) == [f"story {s} (story {s})" for s in ("s1", "s2", "s3", "s4", "s6")]
    assert base_only_moved_forward(repo)
    # Fewer gate runs than stories landed: groups were gated on their top only.
    batched = [
        e
        for sid in stories
        for e in app.history(sid)
        if e.type == "SpeculationUpdated"
        if e.data.get("state") == "batched"
    ]
    assert batched
    split = [
        e
        for sid in stories
        for e in app.history(sid)
        if e.type == "SpeculationRestarted"
        if e.data.get("alone")
    ]
    assert any(e.story_id == "s5" for e in split) or final["s5"].stage is Stage.MERGE_FAILURE
    assert len(gate_runs(tmp_path)) < 2 * len(stories)


def test_runner_sigkilled_during_a_stacked_build_resumes_the_stack(
    tmp_path: Path, database: Database
) -> None:
    import signal
    import time

    from runners.lease import TABLE as LEASE_TABLE
    from service.sqlstore import SqlStore
    from tests.pipeline_support import dump_toml
    from tests.runners.test_runner_crash import start_runner, stop_runner

    # s3's gate holds until released: the runner is killed while s1, s2 landed, s3 gates
    # and s4 passed on s1 + s2 + s3 and waits for s3.
    gate = write_gate(tmp_path, sleep=0.2, hold={"3": "release"})
    out = tmp_path / "gate-out"
    repo = make_repo(tmp_path / "repo")
    (repo / "storyline.toml").write_text(dump_toml(config(tmp_path, gate)))
    app = StorylineApplication(database)
    stories = [f"s{i}" for i in range(1, 5)]
    for i, sid in enumerate(stories, start=1):
        queue(app, repo, sid, files(i))
    log = tmp_path / "runner.log"

    def wait(what: str, predicate: Any, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()}")

    def spec_state(sid: str) -> str | None:
        spec = app.get_story(sid).speculation
        return spec.get("state") if spec else None

    runner = start_runner(repo, database, log)
    try:
        wait(
            "s1 and s2 to land",
            lambda: landed(repo)[:2] == ["story s1 (story s1)", "story s2 (story s2)"],
        )
        wait("s3's gate to run", lambda: (out / "started-3").exists())
        wait("s4 to pass and wait", lambda: spec_state("s4") == "passed")
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
        before = git_tip(repo)
        (out / "release").write_text("")  # the orphaned gate may end now
        SqlStore(app).write(f"UPDATE {LEASE_TABLE} SET expires_at = 0 WHERE name = ?", ("runners",))
        runner = start_runner(repo, database, log)
        wait(
            "every story to land",
            lambda: all(app.get_story(s).stage is Stage.DONE for s in stories),
        )
    finally:
        if runner.poll() is None:
            stop_runner(runner, log)
    assert landed(repo) == [f"story {s} (story {s})" for s in stories]
    assert set(base_trees(repo)) <= passed_merge_trees(app, stories)
    assert base_only_moved_forward(repo)
    assert before in git_log(repo)
    for sid in stories:
        types = [e.type for e in app.history(sid)]
        assert types.count("MergeSucceeded") == 1, (sid, types)
    for sid in ("s3", "s4"):
        restarts = [e for e in app.history(sid) if e.type == "SpeculationRestarted"]
        assert restarts and "runner stopped" in (restarts[0].reason or ""), sid
    # s4 was rebuilt on the same tree as before: its recorded pass is reused, not rerun.
    verdicts = [e for e in app.history("s4") if e.type == "GateVerdictRecorded"]
    assert verdicts[-1].data.get("reused_from") == verdicts[0].position


def git_tip(repo: Path) -> str:
    from tests.pipeline_support import git

    return git(repo, "rev-parse", "main")


def git_log(repo: Path) -> list[str]:
    from tests.pipeline_support import git

    return git(repo, "log", "--format=%H", "main").splitlines()


def test_a_story_blocked_in_the_stack_does_not_land_and_those_behind_rebuild(
    tmp_path: Path, database: Database
) -> None:
    import time

    gate = write_gate(tmp_path, sleep=0.2, hold={"1": "release"})
    out = tmp_path / "gate-out"
    repo = make_repo(tmp_path / "repo")
    app = StorylineApplication(database)
    for i in (1, 2, 3):
        queue(app, repo, f"s{i}", files(i))
    with running_pipeline(repo, database, config(tmp_path, gate)) as p:
        p.wait_for("s3", lambda s: (s.speculation or {}).get("state") == "passed")
        p.app.transition("s2", "block", actor="user:test", reason="a person stops it")
        (out / "release").write_text("")
        for sid in ("s1", "s3"):
            assert p.wait_stage(sid, *SETTLED).stage is Stage.DONE, sid
        time.sleep(0.3)
        assert p.story("s2").stage is Stage.BLOCKED
    assert landed(repo) == ["story s1 (story s1)", "story s3 (story s3)"]
    assert set(base_trees(repo)) <= passed_merge_trees(p.app, ["s1", "s2", "s3"])
    restarts = [e for e in p.app.history("s3") if e.type == "SpeculationRestarted"]
    assert restarts and "s2" in (restarts[0].reason or "")
