"""Flaky gates from history (issue 19): real git, real gate processes, the supervisor.

The flaky gate is a script outside the worktree that keeps a run counter beside it (also
outside): it fails on odd runs and passes on even ones, whatever tree it judges; with a
``.mode`` file saying ``fail`` it fails every run (a deterministic failure).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from api.cli import main_app
from domain.stages import Stage
from runners.gate_verdicts import VOLATILE_ENV, Verdict, VerdictMemory, fingerprint
from service.events_log import LoggedEvent
from service.gate_registry import GateRegistryService
from service.settings import Database
from tests.pipeline_support import Pipeline, calls, git, make_config, make_repo, running_pipeline

FIX = [{"write": "app.py", "content": "def add(a, b):\n    return a + b\n"}, {"commit": "fix add"}]
SAME_TREE = [{"commit": "try the gates again", "allow_empty": True}]
CHECK = [sys.executable, "check.py"]
FINISHED = (Stage.DONE, Stage.MERGE_FAILURE, Stage.BLOCKED)

FLAKY_SCRIPT = """\
import pathlib, sys
counter = pathlib.Path(sys.argv[1])
count = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(count))
mode = counter.with_suffix(".mode")
if mode.exists() and mode.read_text().strip() == "fail":
    print(f"run {count}: failing for good")
    sys.exit(1)
if count % 2:
    print(f"run {count}: odd run, failing")
    sys.exit(1)
print(f"run {count}: even run, passing")
"""


def flaky_gate(tmp_path: Path) -> list[str]:
    script = tmp_path / "flaky_gate.py"
    script.write_text(FLAKY_SCRIPT)
    return [sys.executable, str(script), str(tmp_path / "flaky.count")]


def always_fail(tmp_path: Path) -> None:
    (tmp_path / "flaky.mode").write_text("fail")


def setup(tmp_path: Path, script: dict[str, Any], **gates: Any) -> tuple[Path, Any, list[str], str]:
    repo = make_repo(tmp_path / "repo")
    argv = flaky_gate(tmp_path)
    config = make_config(
        tmp_path,
        script,
        gates={"commands": [argv, CHECK], "timeout_secs": 60, **gates},
        merge_gates={"commands": [CHECK], "timeout_secs": 60},
    )
    return repo, config, argv, shlex.join(argv)


def events(p: Pipeline, story_id: str, kind: str) -> list[LoggedEvent]:
    return [e for e in p.app.history(story_id) if e.type == kind]


def verdicts(p: Pipeline, story_id: str, gate: str) -> list[tuple[bool, int, bool]]:
    return [
        (e.data["passed"], e.data["rerun"], e.data["ignored"])
        for e in events(p, story_id, "GateVerdictRecorded")
        if e.data["gate"] == gate and e.data["phase"] == "gates"
    ]


def tree_of_branch(repo: Path, story_id: str) -> str:
    return git(repo, "rev-parse", f"feature/story-{story_id}^{{tree}}")


def database_url(db: Database) -> str:
    if db.kind == "sqlite":
        return f"sqlite:///{db.sqlite_path}"
    return f"postgresql://{db.user}@{db.host}:{db.port}/{db.dbname}"


def cli(repo: Path, db: Database, *args: str) -> Any:
    result = CliRunner().invoke(
        main_app, ["gates", *args, "--project", str(repo), "--database-url", database_url(db)]
    )
    return result


# --------------------------------------------------------------------------- policies


def test_off_records_the_flakiness_and_changes_nothing(tmp_path: Path, database: Database) -> None:
    repo, config, _, gate = setup(tmp_path, {"s1": {"1": FIX, "2": SAME_TREE}})
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", *FINISHED)
    assert story.stage is Stage.DONE
    # The first verdict stood (the agent was sent back); the second, on the same tree,
    # passed: flaky, recorded, and nothing was rerun by the runner.
    assert story.retry_count == 1
    assert verdicts(p, "s1", gate) == [(False, 0, False), (True, 0, False)]
    first, second = [e for e in events(p, "s1", "GateVerdictRecorded") if e.data["gate"] == gate]
    assert first.data["tree"] == second.data["tree"] == tree_of_branch(repo, "s1")
    assert first.data["fingerprint"] == second.data["fingerprint"]
    assert "odd run, failing" in first.data["output"]
    (flaky,) = events(p, "s1", "GateFlakyDetected")
    assert flaky.data["action"] == "recorded" and flaky.data["verdicts"] == [False, True]
    assert "odd run, failing" in flaky.data["outputs"][0]
    assert "even run, passing" in flaky.data["outputs"][1]
    assert "flaky = off" not in (flaky.reason or "")  # a pass: nothing to say about failing
    assert "this verdict (a pass) stands" in (flaky.reason or "")
    assert p.story("s1").flaky_gates == [gate]
    # The check gate was recorded as well, in both phases, and never called flaky.
    check = shlex.join(CHECK)
    phases = [
        (e.data["phase"], e.data["passed"])
        for e in events(p, "s1", "GateVerdictRecorded")
        if e.data["gate"] == check
    ]
    assert phases == [("gates", True), ("merge_gates", True)]


def test_retry_passes_on_a_rerun_and_says_so(tmp_path: Path, database: Database) -> None:
    repo, config, _, gate = setup(tmp_path, {"s1": FIX}, flaky="retry", flaky_retries=2)
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", *FINISHED)
    assert story.stage is Stage.DONE and story.retry_count == 0
    assert len(calls(tmp_path)) == 1  # no second agent run: the rerun settled it
    assert verdicts(p, "s1", gate) == [(False, 0, False), (True, 1, False)]
    (flaky,) = events(p, "s1", "GateFlakyDetected")
    assert flaky.data["action"] == "retried" and flaky.data["verdicts"] == [False, True]
    assert "rerun 1 passed" in (flaky.reason or "")
    (passed,) = events(p, "s1", "GatesPassed")
    assert "passed on rerun 1 of 2" in passed.data["output"]
    assert "odd run, failing" in passed.data["output"]  # the failed run is not hidden
    assert GateRegistryService(p.app).quarantined() == {}  # retry never quarantines


def test_a_deterministic_failure_is_never_flaky(tmp_path: Path, database: Database) -> None:
    script = {"s1": {"1": FIX, "*": SAME_TREE}}
    repo, config, _, gate = setup(tmp_path, script, flaky="quarantine", flaky_retries=2)
    always_fail(tmp_path)
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", Stage.BLOCKED)
    # Three agent runs on one tree, each gate run rerun twice: nine failures with nine
    # different outputs, one verdict. Never flaky, never quarantined.
    assert verdicts(p, "s1", gate) == [(False, k, False) for k in (0, 1, 2)] * 3
    trees = {e.data["tree"] for e in events(p, "s1", "GateVerdictRecorded")}
    assert trees == {tree_of_branch(repo, "s1")}
    assert events(p, "s1", "GateFlakyDetected") == []
    assert story.flaky_gates == []
    assert GateRegistryService(p.app).quarantined() == {}
    failed = events(p, "s1", "GatesFailed")
    assert len(failed) == 3
    assert "failed on every one of 2 reruns as well" in failed[0].data["output"]


def test_nondeterministic_gates_are_never_compared(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    argv = flaky_gate(tmp_path)
    written = " ".join(argv)  # as a person writes it in storyline.toml
    config = make_config(
        tmp_path,
        {"s1": {"1": FIX, "2": SAME_TREE}},
        gates={
            "commands": [written],
            "timeout_secs": 60,
            "flaky": "quarantine",
            "nondeterministic": [written],
        },
        merge_gates={"commands": [CHECK], "timeout_secs": 60},
    )
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", *FINISHED)
    assert story.stage is Stage.DONE
    # Not rerun (its failure stood and the agent went again), not compared, not quarantined.
    assert verdicts(p, "s1", shlex.join(argv)) == [(False, 0, False), (True, 0, False)]
    assert events(p, "s1", "GateFlakyDetected") == []
    assert GateRegistryService(p.app).quarantined() == {}


# --------------------------------------------------------------------------- quarantine


def test_quarantine_stops_blocking_until_a_person_clears_it(
    tmp_path: Path, database: Database
) -> None:
    script = {
        "s1": FIX,
        "s2": [*FIX[:1], {"write": "two.txt", "content": "2\n"}, {"commit": "two"}],
        "s3": [*FIX[:1], {"write": "three.txt", "content": "3\n"}, {"commit": "three"}],
    }
    repo, config, _, gate = setup(tmp_path, script, flaky="quarantine", flaky_retries=2)
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        assert p.wait_stage("s1", *FINISHED).stage is Stage.DONE
        # Failed, then passed on the rerun: found flaky and quarantined.
        assert verdicts(p, "s1", gate) == [(False, 0, False), (True, 1, False)]
        (flaky,) = events(p, "s1", "GateFlakyDetected")
        assert flaky.data["action"] == "quarantined"
        quarantined = GateRegistryService(p.app).quarantined()
        assert list(quarantined) == [gate]
        reason = str(quarantined[gate]["reason"])
        assert "story s1" in reason and flaky.data["tree"][:12] in reason

        # From now on the gate fails every time: while quarantined it does not block.
        always_fail(tmp_path)
        p.add("s2")
        p.start("s2")
        s2 = p.wait_stage("s2", *FINISHED)
        assert s2.stage is Stage.DONE and s2.retry_count == 0
        assert verdicts(p, "s2", gate) == [(False, 0, True)]  # not rerun: it is ignored
        (ignored,) = [e for e in events(p, "s2", "GateVerdictRecorded") if e.data["gate"] == gate]
        assert "quarantined as flaky" in (ignored.reason or "")
        (passed,) = events(p, "s2", "GatesPassed")
        assert "ok: all checks passed" in passed.data["output"]  # the next command ran

        listed = cli(repo, database, "flaky", "--json")
        assert listed.exit_code == 0, listed.output
        report = json.loads(listed.output)
        assert [q["gate"] for q in report["quarantined"]] == [gate]
        assert [(d["story_id"], d["action"]) for d in report["detections"]] == [
            ("s1", "quarantined")
        ]
        assert report["failures_ignored"] == 1
        table = cli(repo, database, "flaky")
        assert table.exit_code == 0 and "Quarantined" in table.output

        refused = cli(repo, database, "clear", "no such gate", "--reason", "x")
        assert refused.exit_code == 1 and "is not quarantined" in refused.output
        cleared = cli(repo, database, "clear", gate, "--reason", "fixed the race in the test")
        assert cleared.exit_code == 0, cleared.output
        assert GateRegistryService(p.app).quarantined() == {}

        # Cleared: its failures block again (rerun, still failing, and not ignored).
        p.add("s3")
        p.start("s3")
        p.wait_for("s3", lambda s: "GatesFailed" in p.types("s3"))
        assert verdicts(p, "s3", gate)[:3] == [(False, k, False) for k in (0, 1, 2)]
    decisions = [(e.type, e.actor, e.reason) for e in GateRegistryService(p.app).history()]
    assert [d[0] for d in decisions] == ["GateRegistryCreated", "GateQuarantined", "GateCleared"]
    assert decisions[2][1].startswith("user:") and decisions[2][2] == "fixed the race in the test"


# --------------------------------------------------------------------------- restart


def test_a_new_supervisor_remembers_verdicts_from_the_log(
    tmp_path: Path, database: Database
) -> None:
    script = {"s1": {"1": FIX, "2": SAME_TREE}, "s2": SAME_TREE}
    repo, config, _, gate = setup(tmp_path, script)
    with running_pipeline(repo, database, config) as first:
        first.add("s1")
        first.start("s1")
        assert first.wait_stage("s1", *FINISHED).stage is Stage.DONE
    tree = tree_of_branch(repo, "s1")
    assert git(repo, "rev-parse", "main^{tree}") == tree  # the squash kept the tree

    # Another runner process: its memory holds nothing but what the log says.
    with running_pipeline(repo, database, config) as second:
        second.add("s2")
        second.start("s2")
        second.wait_for("s2", lambda s: "GatesFailed" in second.types("s2"))
        memory = second.supervisor.verdicts
    (s2_verdict,) = [
        e for e in events(second, "s2", "GateVerdictRecorded") if e.data["gate"] == gate
    ][:1]
    assert s2_verdict.data["tree"] == tree and not s2_verdict.data["passed"]
    (flaky,) = events(second, "s2", "GateFlakyDetected")
    # The earlier pass was s1's, recorded by the first runner: found in the log.
    assert flaky.data["verdicts"] == [True, False] and flaky.data["action"] == "recorded"
    assert "story s1" in (flaky.reason or "")
    assert "even run, passing" in flaky.data["outputs"][0]
    key = (tree, gate, s2_verdict.data["fingerprint"])
    earlier = memory.differing(key, False)
    assert earlier is not None and earlier.story_id == "s1"


# --------------------------------------------------------------------------- the memory


def test_the_fingerprint_ignores_session_noise_only() -> None:
    argv = ["pytest", "-x"]
    env = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "PWD": "/a", "SHLVL": "1"}
    same = {**env, "PWD": "/b", "SHLVL": "3", "PYTEST_CURRENT_TEST": "t (call)"}
    assert {"PWD", "SHLVL", "PYTEST_CURRENT_TEST"} <= VOLATILE_ENV
    assert fingerprint(argv, env) == fingerprint(argv, same)
    assert fingerprint(argv, env) != fingerprint(argv, {**env, "PATH": "/opt/bin"})
    assert fingerprint(argv, env) != fingerprint(["pytest"], env)


def test_the_memory_is_bounded_and_keeps_the_latest_of_each_verdict() -> None:
    memory = VerdictMemory(max_keys=2)
    a, b, c = ("t1", "g", "f"), ("t2", "g", "f"), ("t3", "g", "f")
    memory.remember(a, Verdict(False, "old failure", "s1", 5))
    memory.remember(a, Verdict(False, "new failure", "s1", 9))
    memory.remember(a, Verdict(False, "late copy of the old one", "s1", 5))
    earlier = memory.differing(a, True)
    assert earlier is not None and earlier.output == "new failure"
    assert memory.differing(a, False) is None  # same verdict: no difference
    memory.remember(b, Verdict(True, "", "s2", 10))
    memory.differing(a, True)  # a used: b is now the least recently used
    memory.remember(c, Verdict(True, "", "s3", 11))
    assert len(memory) == 2
    assert memory.differing(b, False) is None and memory.differing(a, True) is not None
