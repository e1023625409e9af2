"""Stories with a target branch (an epic's integration branch): they branch from it, merge into
it by compare-and-swap, and never move the base branch. Real git, real pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from domain.stages import MergeFailureKind, Stage
from service.settings import Database
from tests.pipeline_support import Pipeline, calls, git, make_config, make_repo, running_pipeline

pytestmark = pytest.mark.slow

EPIC = "epic/epic-1"
FIXED_APP = "def add(a, b):\n    return a + b\n"
DONE_OR_STUCK = (Stage.DONE, Stage.MERGE_FAILURE, Stage.BLOCKED)


def make_epic_repo(path: Path) -> tuple[Path, str, str]:
    """A repository whose ``main`` still fails check.py and whose epic branch has one more
    commit that fixes it and adds ``epic.txt``. Returns (repo, main tip, epic tip)."""
    repo = make_repo(path)
    git(repo, "switch", "-q", "-c", EPIC)
    (repo / "app.py").write_text(FIXED_APP)
    (repo / "epic.txt").write_text("epic\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "epic groundwork")
    git(repo, "switch", "-q", "main")
    return repo, git(repo, "rev-parse", "main"), git(repo, "rev-parse", EPIC)


def subjects(repo: Path, ref: str) -> list[str]:
    return git(repo, "log", "--format=%s", ref).splitlines()


def add(p: Pipeline, story_id: str, target: str = EPIC) -> None:
    p.app.create_story(
        story_id=story_id,
        name=f"story {story_id}",
        description="work on the epic",
        acceptance_criteria=["check.py passes"],
        actor="user:test",
        epic="epic-1",
        target_branch=target,
    )


def test_story_branches_from_and_lands_on_its_target_branch(
    tmp_path: Path, database: Database
) -> None:
    repo, main_tip, epic_tip = make_epic_repo(tmp_path / "repo")
    # Appending only keeps the epic's line when the worktree was made from the epic branch;
    # and check.py passes only there, since main's add() is still wrong.
    script = {"epic-1.1": [{"append": "epic.txt", "content": "story\n"}, {"commit": "more"}]}
    config = make_config(tmp_path, script)
    with running_pipeline(repo, database, config) as p:
        add(p, "epic-1.1")
        p.start("epic-1.1")
        story = p.wait_stage("epic-1.1", *DONE_OR_STUCK)
        history = p.app.history("epic-1.1")
    assert story.stage is Stage.DONE, [(e.type, e.reason) for e in history]
    new_tip = git(repo, "rev-parse", EPIC)
    assert story.merge_commit == new_tip
    assert git(repo, "rev-parse", f"{new_tip}^") == epic_tip  # one squash commit on the epic
    assert subjects(repo, EPIC)[:2] == ["story epic-1.1 (story epic-1.1)", "epic groundwork"]
    assert git(repo, "show", f"{EPIC}:epic.txt") == "epic\nstory"
    assert git(repo, "merge-base", epic_tip, "feature/story-epic-1.1") == epic_tip
    # The base branch and the user's checkout of it never moved.
    assert git(repo, "rev-parse", "main") == main_tip
    assert (repo / "app.py").read_text() == "def add(a, b):\n    return a - b\n"
    assert not (repo / "epic.txt").exists()
    assert git(repo, "status", "--porcelain") == ""
    succeeded = next(e for e in history if e.type == "MergeSucceeded")
    assert succeeded.data["base_branch"] == EPIC
    started = next(e for e in history if e.type == "MergeStarted")
    assert started.data["base_sha"] == epic_tip


def test_two_stories_racing_into_one_target_both_land(tmp_path: Path, database: Database) -> None:
    repo, main_tip, epic_tip = make_epic_repo(tmp_path / "repo")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # Each story's first merge gate waits until the other's has started too: both squash
    # commits then sit on the same epic tip, so the second compare-and-swap must fail and
    # re-apply its commit on the moved target.
    gate = (
        "import pathlib, runpy, time\n"
        f"barrier = pathlib.Path({str(barrier)!r})\n"
        "me = barrier / pathlib.Path.cwd().name\n"
        "if not me.exists():\n"
        "    me.write_text('x')\n"
        "    for _ in range(1200):\n"
        "        if len(list(barrier.iterdir())) >= 2:\n"
        "            break\n"
        "        time.sleep(0.05)\n"
        "runpy.run_path('check.py')\n"
    )
    script = {
        "epic-1.1": [{"write": "one.txt", "content": "1\n"}, {"commit": "one"}],
        "epic-1.2": [{"write": "two.txt", "content": "2\n"}, {"commit": "two"}],
    }
    config = make_config(
        tmp_path,
        script,
        max_mergemasters=2,
        merge_gates={"commands": [[sys.executable, "-c", gate]], "timeout_secs": 120},
    )
    with running_pipeline(repo, database, config) as p:
        add(p, "epic-1.1")
        add(p, "epic-1.2")
        p.start("epic-1.1")
        p.start("epic-1.2")
        first = p.wait_stage("epic-1.1", *DONE_OR_STUCK)
        second = p.wait_stage("epic-1.2", *DONE_OR_STUCK)
        started = [
            e.data["base_sha"]
            for sid in ("epic-1.1", "epic-1.2")
            for e in p.app.history(sid)
            if e.type == "MergeStarted"
        ]
    assert (first.stage, second.stage) == (Stage.DONE, Stage.DONE)
    assert sorted(barrier.iterdir()) == [barrier / "epic-1.1", barrier / "epic-1.2"]
    assert started == [epic_tip, epic_tip]  # both merges began on the same tip
    log = subjects(repo, EPIC)
    assert sorted(log[:2]) == ["story epic-1.1 (story epic-1.1)", "story epic-1.2 (story epic-1.2)"]
    assert log[2:] == ["epic groundwork", "initial"]
    tip = git(repo, "rev-parse", EPIC)
    assert {first.merge_commit, second.merge_commit} == {tip, git(repo, "rev-parse", f"{tip}^")}
    assert git(repo, "show", f"{EPIC}:one.txt") == "1"
    assert git(repo, "show", f"{EPIC}:two.txt") == "2"
    assert git(repo, "rev-parse", "main") == main_tip


def test_target_moved_by_someone_else_is_reapplied_not_overwritten(
    tmp_path: Path, database: Database
) -> None:
    repo, main_tip, _ = make_epic_repo(tmp_path / "repo")
    marker = tmp_path / "moved"
    # The merge gate plays "someone else commits to the epic branch while we merge", once.
    mover = (
        "import pathlib, runpy, subprocess\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "if not marker.exists():\n"
        "    marker.write_text('x')\n"
        "    def g(*a):\n"
        "        return subprocess.run(['git', '-c', 'user.name=o', '-c', 'user.email=o@x', "
        f"'-C', {str(repo)!r}, *a], check=True, capture_output=True, text=True).stdout.strip()\n"
        f"    old = g('rev-parse', {EPIC!r})\n"
        "    new = g('commit-tree', old + '^{tree}', '-p', old, '-m', 'someone else')\n"
        f"    g('update-ref', 'refs/heads/{EPIC}', new, old)\n"
        "runpy.run_path('check.py')\n"
    )
    config = make_config(
        tmp_path,
        {"epic-1.1": [{"write": "one.txt", "content": "1\n"}, {"commit": "one"}]},
        merge_gates={"commands": [[sys.executable, "-c", mover]]},
    )
    with running_pipeline(repo, database, config) as p:
        add(p, "epic-1.1")
        p.start("epic-1.1")
        story = p.wait_stage("epic-1.1", *DONE_OR_STUCK)
    assert marker.exists()
    assert story.stage is Stage.DONE
    assert subjects(repo, EPIC) == [
        "story epic-1.1 (story epic-1.1)",
        "someone else",
        "epic groundwork",
        "initial",
    ]
    assert story.merge_commit == git(repo, "rev-parse", EPIC)
    assert git(repo, "rev-parse", "main") == main_tip


def test_missing_target_branch_blocks_before_any_agent_runs(
    tmp_path: Path, database: Database
) -> None:
    repo, main_tip, _ = make_epic_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"*": [{"write": "x.txt", "content": "x\n"}, {"commit": "x"}]})
    with running_pipeline(repo, database, config) as p:
        add(p, "epic-9.1", target="epic/epic-9")
        p.start("epic-9.1")
        story = p.wait_stage("epic-9.1", *DONE_OR_STUCK)
    assert story.stage is Stage.BLOCKED
    assert "target branch epic/epic-9 does not exist" in (story.blocked_reason or "")
    assert calls(tmp_path) == []
    assert git(repo, "rev-parse", "main") == main_tip
    assert git(repo, "branch", "--list", "feature/story-epic-9.1") == ""


def test_target_deleted_before_the_merge_fails_it_clearly(
    tmp_path: Path, database: Database
) -> None:
    repo, main_tip, _ = make_epic_repo(tmp_path / "repo")
    # The coding gates pass, then the epic branch vanishes before the merge starts.
    vanish = (
        "import runpy, subprocess\n"
        f"subprocess.run(['git', '-C', {str(repo)!r}, 'update-ref', '-d', "
        f"'refs/heads/{EPIC}'], check=True)\n"
        "runpy.run_path('check.py')\n"
    )
    config = make_config(
        tmp_path,
        {"epic-1.1": [{"write": "one.txt", "content": "1\n"}, {"commit": "one"}]},
        gates={"commands": [[sys.executable, "-c", vanish]], "timeout_secs": 60},
    )
    with running_pipeline(repo, database, config) as p:
        add(p, "epic-1.1")
        p.start("epic-1.1")
        story = p.wait_stage("epic-1.1", *DONE_OR_STUCK)
        merges = [e.type for e in p.app.history("epic-1.1") if e.type.startswith("Merge")]
    assert story.stage is Stage.MERGE_FAILURE
    assert story.merge_failure_kind is MergeFailureKind.OTHER
    assert story.merge_failure_details == f"target branch {EPIC} does not exist"
    assert merges == ["MergeStarted", "MergeFailed"]  # once, not a retry loop
    assert git(repo, "rev-parse", "main") == main_tip


def test_resumed_merge_finds_the_commit_already_on_the_target(
    tmp_path: Path, database: Database
) -> None:
    """Crash resume: a squash that reached the target branch counts as landed there."""
    repo, main_tip, epic_tip = make_epic_repo(tmp_path / "repo")
    git(repo, "switch", "-q", "-c", "feature/story-epic-1.1", EPIC)
    (repo / "one.txt").write_text("1\n")
    git(repo, "add", "one.txt")
    git(repo, "commit", "-q", "-m", "one")
    git(repo, "switch", "-q", "main")

    config = make_config(tmp_path, {})
    with running_pipeline(repo, database, config) as p:
        add(p, "epic-1.1")  # stays in the backlog: the supervisor leaves it alone
        story = p.story("epic-1.1")
        merger = p.supervisor.merger
        workspaces = merger._workspaces(story)
        result = workspaces.squash_merge("epic-1.1", "squash")
        assert result.outcome == "merged" and result.base_sha == epic_tip
        assert merger._landed_commit(story) is None  # not on the target yet: redo the merge
        assert workspaces.advance_base(result.base_sha, result.commit_sha or "")
        assert merger._landed_commit(story) == result.commit_sha
    assert git(repo, "rev-parse", EPIC) == result.commit_sha
    assert git(repo, "rev-parse", "main") == main_tip
