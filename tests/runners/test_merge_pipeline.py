"""Runners II: the merge queue with real git, squash merges, compare-and-swap, fix-ups."""

from __future__ import annotations

import sys
from pathlib import Path

from domain.stages import MergeFailureKind, Stage
from service.settings import Database
from tests.pipeline_support import calls, git, make_config, make_repo, running_pipeline

FIX = [{"write": "app.py", "content": "def add(a, b):\n    return a + b\n"}, {"commit": "fix add"}]
DONE_OR_FAILED = (Stage.DONE, Stage.MERGE_FAILURE, Stage.BLOCKED)


def log(repo: Path) -> list[str]:
    return git(repo, "log", "--format=%s", "main").splitlines()


def test_clean_merge_lands_one_squash_commit(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    script = {
        "s1": [
            FIX[0],
            {"commit": "first"},
            {"write": "notes.txt", "content": "n\n"},
            {"commit": "second"},
        ]
    }
    config = make_config(tmp_path, script)
    with running_pipeline(repo, database, config) as p:
        p.add("s1", name="Fix add")
        p.start("s1")
        story = p.wait_stage("s1", *DONE_OR_FAILED)
    assert story.stage is Stage.DONE
    assert log(repo) == ["Fix add (story s1)", "initial"]  # two commits squashed into one
    assert story.merge_commit == git(repo, "rev-parse", "main")
    assert "return a + b" in (repo / "app.py").read_text()  # the user's checkout followed
    assert git(repo, "status", "--porcelain") == ""
    assert not (repo / ".storyline" / "worktrees" / "s1").exists()  # cleaned up after done


def test_conflict_is_detected_and_names_the_file(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    other = [
        {"sleep": 1.5, "interval": 0.3},
        {"write": "app.py", "content": "def add(a, b):\n    return b + a\n"},
        {"commit": "commutative"},
    ]
    config = make_config(tmp_path, {"s1": FIX, "s2": other})
    # No mergemaster configured: the conflict waits for a person.
    config = config.model_copy(update={"agent": config.agent[:1]})
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.add("s2")
        p.start("s1")
        p.start("s2")
        assert p.wait_stage("s1", *DONE_OR_FAILED).stage is Stage.DONE
        s2 = p.wait_stage("s2", *DONE_OR_FAILED)
    assert s2.stage is Stage.MERGE_FAILURE
    assert s2.merge_failure_kind is MergeFailureKind.CONFLICT_DETECTED
    assert s2.conflicts == ["app.py"]
    assert "CONFLICT (content): Merge conflict in app.py" in (s2.merge_failure_details or "")
    assert log(repo) == ["story s1 (story s1)", "initial"]


def test_merge_gate_failure_is_gates_failed(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(
        tmp_path,
        {"s1": FIX},
        merge_gates={
            "commands": [
                [sys.executable, "-c", "print('integration suite: 1 failed'); raise SystemExit(1)"]
            ]
        },
    )
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", *DONE_OR_FAILED)
    assert story.stage is Stage.MERGE_FAILURE
    assert story.merge_failure_kind is MergeFailureKind.GATES_FAILED
    assert "integration suite: 1 failed" in (story.merge_failure_details or "")
    assert log(repo) == ["initial"]  # the base never moved


def test_empty_branch_is_no_commits(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo")
    slow_fix = [{"sleep": 1.5, "interval": 0.3}, *FIX]
    config = make_config(tmp_path, {"s1": FIX, "s2": slow_fix})
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.add("s2")
        p.start("s1")
        p.start("s2")
        assert p.wait_stage("s1", *DONE_OR_FAILED).stage is Stage.DONE
        s2 = p.wait_stage("s2", *DONE_OR_FAILED)
    # s2 made the very change s1 already landed: nothing left to merge, and never "done".
    assert s2.stage is Stage.MERGE_FAILURE
    assert s2.merge_failure_kind is MergeFailureKind.NO_COMMITS
    assert len(log(repo)) == 2


def test_base_moved_during_merge_is_retried_not_overwritten(
    tmp_path: Path, database: Database
) -> None:
    repo = make_repo(tmp_path / "repo")
    marker = tmp_path / "moved"
    # The merge gate plays "someone else pushes to main while we merge", once.
    mover = (
        "import pathlib, subprocess, sys\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "if not marker.exists():\n"
        "    marker.write_text('x')\n"
        f"    subprocess.run(['git', '-c', 'user.name=o', '-c', 'user.email=o@x', '-C', "
        f"{str(repo)!r}, 'commit', '--allow-empty', '-q', '-m', 'someone else'], check=True)\n"
        "import runpy; runpy.run_path('check.py')\n"
    )
    config = make_config(
        tmp_path, {"s1": FIX}, merge_gates={"commands": [[sys.executable, "-c", mover]]}
    )
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_stage("s1", *DONE_OR_FAILED)
    assert story.stage is Stage.DONE
    assert log(repo) == ["story s1 (story s1)", "someone else", "initial"]
    assert story.merge_commit == git(repo, "rev-parse", "main")


def test_self_evident_merge_gate_failure_goes_back_as_capped_fixup(
    tmp_path: Path, database: Database
) -> None:
    repo = make_repo(tmp_path / "repo")
    formatter = (
        "import sys\n"
        "text = open('app.py').read()\n"
        "if not text.startswith('# formatted'):\n"
        "    print('Would reformat app.py'); sys.exit(1)\n"
        "import runpy; runpy.run_path('check.py')\n"
    )
    formatted = "# formatted\ndef add(a, b):\n    return a + b\n"
    script = {
        "s1": {
            "1": FIX,
            "2": [
                {"expect_in_prompt": "Would reformat app.py"},
                {"write": "app.py", "content": formatted},
                {"commit": "format"},
            ],
        }
    }
    config = make_config(
        tmp_path, script, merge_gates={"commands": [[sys.executable, "-c", formatter]]}
    )
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        story = p.wait_for("s1", lambda s: s.stage is Stage.DONE, timeout=90)
        types = p.types("s1")
    assert "FixupRequested" in types and types[-1] == "MergeSucceeded"
    first, second = calls(tmp_path)
    assert "--max-turns" not in first["args"]
    args = second["args"]
    assert args[args.index("--max-turns") + 1] == "20"
    assert float(args[args.index("--max-budget-usd") + 1]) == 1.0
    assert (repo / "app.py").read_text() == formatted
    assert story.retry_count == 0 and not story.fixup_pending
