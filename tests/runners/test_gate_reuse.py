"""Gate verdicts reused by tree: the same gate command on the same tree (same environment)
passes from the recorded verdict instead of running again, recorded as a verdict that names
the position it reuses; a failure is never reused; ``nondeterministic`` gates always run.
Off unless asked (``reuse_verdicts``) or the speculative merge queue is on."""

from __future__ import annotations

import sys
from pathlib import Path

from domain.config import GatesConfig
from runners.gate_verdicts import GateJudge, VerdictMemory
from service.application import StorylineApplication
from service.settings import Database
from tests.pipeline_support import make_repo
from tests.runners.spec_support import queue

COUNTER = "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.write_text(p.read_text() + 'x')"


def counting_gate(tmp: Path, fail: bool = False) -> tuple[list[str], Path]:
    counter = tmp / "runs.txt"
    counter.write_text("")
    code = COUNTER + ("; sys.exit(1)" if fail else "")
    return [sys.executable, "-c", code, str(counter)], counter


def judge_twice(
    tmp: Path, database: Database, gates: GatesConfig, by_default: bool = False
) -> tuple[StorylineApplication, list[bool]]:
    repo = make_repo(tmp / "repo")
    app = StorylineApplication(database)
    queue(app, repo, "s1", {"a.txt": "a\n"})  # in merge: verdicts may be recorded
    judge = GateJudge(app, VerdictMemory())
    judge.reuse_by_default = by_default
    passed = []
    for _ in range(2):
        run = judge.run(
            app.get_story("s1"),
            "merge_gates",
            gates,
            repo,
            pidfile=tmp / "gate.pid",
            actor="runner:merge",
        )
        passed.append(run.passed)
    return app, passed


def verdicts(app: StorylineApplication) -> list[dict[str, object]]:
    return [
        {**e.data, "position": e.position}
        for e in app.history("s1")
        if e.type == "GateVerdictRecorded"
    ]


def test_a_pass_on_the_same_tree_is_reused(tmp_path: Path, database: Database) -> None:
    argv, counter = counting_gate(tmp_path)
    gates = GatesConfig(commands=[argv], reuse_verdicts=True)
    app, passed = judge_twice(tmp_path, database, gates)
    assert passed == [True, True]
    assert counter.read_text() == "x"  # ran once
    first, second = verdicts(app)
    assert first["reused_from"] is None and second["reused_from"] == first["position"]
    assert second["tree"] == first["tree"] and second["passed"] is True


def test_a_failure_is_never_reused(tmp_path: Path, database: Database) -> None:
    argv, counter = counting_gate(tmp_path, fail=True)
    gates = GatesConfig(commands=[argv], reuse_verdicts=True)
    app, passed = judge_twice(tmp_path, database, gates)
    assert passed == [False, False]
    assert counter.read_text() == "xx"
    assert [v["reused_from"] for v in verdicts(app)] == [None, None]


def test_explicitly_off_beats_the_queue_default(tmp_path: Path, database: Database) -> None:
    argv, counter = counting_gate(tmp_path)
    gates = GatesConfig(commands=[argv], reuse_verdicts=False)
    _app, passed = judge_twice(tmp_path, database, gates, by_default=True)
    assert passed == [True, True] and counter.read_text() == "xx"


def test_a_nondeterministic_gate_always_runs(tmp_path: Path, database: Database) -> None:
    import shlex

    argv, counter = counting_gate(tmp_path)
    gates = GatesConfig(commands=[argv], nondeterministic=[shlex.join(argv)])
    app, passed = judge_twice(tmp_path, database, gates, by_default=True)
    assert passed == [True, True]
    assert counter.read_text() == "xx"  # opted out: no reuse
    assert [v["reused_from"] for v in verdicts(app)] == [None, None]


def test_a_reused_verdict_is_not_new_evidence(tmp_path: Path, database: Database) -> None:
    """A memory rebuilt from the log skips reuse records: the next reuse still names the
    run, not an earlier reuse."""
    from service.events_log import LoggedEvent

    argv, _counter = counting_gate(tmp_path)
    app, _ = judge_twice(tmp_path, database, GatesConfig(commands=[argv]), by_default=True)
    first, second = verdicts(app)
    memory = VerdictMemory()
    events: list[LoggedEvent] = [e for e in app.history("s1") if e.type == "GateVerdictRecorded"]
    memory.feed(events)
    key = (str(first["tree"]), str(first["gate"]), str(first["fingerprint"]))
    reusable = memory.reusable(key)
    assert reusable is not None and reusable.position == first["position"]
    assert second["position"] != first["position"]


def test_off_by_default_outside_the_speculative_queue(tmp_path: Path, database: Database) -> None:
    """Today's behaviour: with ``flaky`` policies a rerun on the same tree is evidence."""
    argv, counter = counting_gate(tmp_path)
    app, passed = judge_twice(tmp_path, database, GatesConfig(commands=[argv]))
    assert passed == [True, True]
    assert counter.read_text() == "xx"
    assert [v["reused_from"] for v in verdicts(app)] == [None, None]
