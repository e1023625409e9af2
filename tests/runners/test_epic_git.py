"""The epic git primitives against real repositories: integration branch, candidates,
union gates, the integration CAS and the landing squash.

Stories reach the integration branch the way the pipeline lands them: a feature worktree
created from ``epic/<id>`` and a squash merge with a compare-and-swap of that branch
(:class:`Worktrees` and :class:`MergeWorkspaces` with the integration branch as their base).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from domain.config import GatesConfig
from domain.errors import InvalidStoryId
from runners.agents import process_identity
from runners.epic_git import LANDING, EpicGit
from runners.git_base import STORYLINE_EMAIL, GitError
from runners.merge_workspace import MergeWorkspaces
from runners.worktrees import Worktrees
from tests.runners.git_support import (
    git,
    no_git_identity,  # noqa: F401 (an autouse fixture)
    sha,
)

EPIC = "epic-1"


def commit(cwd: Path, files: dict[str, str], message: str = "change") -> str:
    for name, content in files.items():
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (cwd / name).write_text(content)
    git(cwd, "add", "-A")
    git(cwd, "commit", "-q", "-m", message)
    return sha(cwd, "HEAD")


def show(repo: Path, rev: str, name: str) -> str | None:
    proc = subprocess.run(
        ["git", "show", f"{rev}:{name}"], cwd=repo, capture_output=True, text=True, check=False
    )
    return proc.stdout if proc.returncode == 0 else None


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    commit(path, {"README.md": "hello\n", "a.txt": "one\ntwo\n"}, "initial")
    return path


@pytest.fixture
def eg(repo: Path) -> EpicGit:
    return EpicGit(repo, "main")


def land_story(repo: Path, story: str, files: dict[str, str], epic: str = EPIC) -> str:
    """Code a story on a feature branch from the integration branch and squash-merge it
    there with the CAS, as the pipeline does; return the squash commit."""
    branch = f"epic/{epic}"
    path = Worktrees(repo, branch).ensure(story)
    commit(path, files, f"work on {story}")
    merges = MergeWorkspaces(repo, branch)
    result = merges.squash_merge(story, f"{story} (story {story})")
    assert result.outcome == "merged" and result.commit_sha, result.output
    assert merges.advance_base(result.base_sha, result.commit_sha)
    return result.commit_sha


@pytest.fixture
def three_stories(repo: Path, eg: EpicGit) -> tuple[str, list[str]]:
    fork = eg.ensure_integration_branch(EPIC)
    stories = [
        land_story(repo, f"{EPIC}.1", {"x.txt": "x\n"}),
        land_story(repo, f"{EPIC}.2", {"y.txt": "y\n"}),
        land_story(repo, f"{EPIC}.3", {"z.txt": "z\n"}),
    ]
    return fork, stories


def registered(repo: Path) -> list[str]:
    out = git(repo, "worktree", "list", "--porcelain")
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("worktree ")]


# --------------------------------------------------------------------- integration branch


def test_integration_branch_is_created_at_the_base_tip_once(repo: Path, eg: EpicGit) -> None:
    base = sha(repo, "main")
    assert eg.integration_tip(EPIC) is None

    assert eg.ensure_integration_branch(EPIC) == base
    assert sha(repo, "refs/heads/epic/epic-1") == base
    land_story(repo, "epic-1.1", {"x.txt": "x\n"})
    commit(repo, {"README.md": "base moved\n"}, "base moves")
    tip = sha(repo, "epic/epic-1")

    # Idempotent: an existing branch stays where it is, whatever the base does.
    assert eg.ensure_integration_branch(EPIC) == tip
    assert eg.integration_tip(EPIC) == tip
    assert eg.fork_point(EPIC) == base


def test_integration_branch_can_start_at_a_given_commit(repo: Path, eg: EpicGit) -> None:
    first = sha(repo, "main")
    commit(repo, {"README.md": "later\n"}, "later")

    assert eg.ensure_integration_branch("epic-2", at=first) == first
    assert sha(repo, "epic/epic-2") == first
    with pytest.raises(GitError, match="not a commit"):
        eg.ensure_integration_branch("epic-3", at="f" * 40)
    assert eg.integration_tip("epic-3") is None


def test_squash_commits_lists_each_landed_story_oldest_first(
    repo: Path, eg: EpicGit, three_stories: tuple[str, list[str]]
) -> None:
    fork, stories = three_stories

    assert eg.squash_commits(EPIC, fork) == stories
    assert eg.squash_commits(EPIC, stories[0]) == stories[1:]
    subjects = [git(repo, "log", "-1", "--format=%s", c).strip() for c in stories]
    assert subjects == [f"epic-1.{n} (story epic-1.{n})" for n in (1, 2, 3)]
    # A commit that is not on the branch cannot bound the list.
    elsewhere = commit(repo, {"README.md": "base only\n"}, "base only")
    with pytest.raises(GitError, match="is not on epic/epic-1"):
        eg.squash_commits(EPIC, elsewhere)
    with pytest.raises(GitError, match="does not exist"):
        eg.squash_commits("epic-9", fork)


# ----------------------------------------------------------------------------- candidates


def test_leave_one_out_candidate_holds_exactly_the_other_stories(
    repo: Path, eg: EpicGit, three_stories: tuple[str, list[str]]
) -> None:
    fork, (s1, s2, s3) = three_stories

    cand = eg.build_candidate(EPIC, "without-2", fork, [s1, s3])

    assert cand.ok and cand.commit and cand.tree
    assert cand.conflict_with is None and cand.conflicts == []
    assert cand.path == (repo / ".storyline/epics/epic-1/scratch/without-2").resolve()
    assert sorted(p.name for p in cand.path.iterdir() if p.name != ".git") == [
        "README.md",
        "a.txt",
        "x.txt",
        "z.txt",
    ]
    assert git(repo, "rev-list", "--count", f"{fork}..{cand.commit}").strip() == "2"
    assert sha(repo, f"{cand.commit}^{{tree}}") == cand.tree
    assert git(repo, "log", "-1", "--format=%cE", cand.commit).strip() == STORYLINE_EMAIL
    # All three give the integration branch's own tree; the user's checkout stays clean.
    full = eg.build_candidate(EPIC, "all", fork, [s1, s2, s3])
    assert full.tree == sha(repo, "epic/epic-1^{tree}")
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    # Reusing a name rebuilds that worktree for the new subset.
    again = eg.build_candidate(EPIC, "all", fork, [s2])
    assert again.ok and not (again.path / "x.txt").exists()
    assert (again.path / "y.txt").read_text() == "y\n"


def test_conflicting_subset_names_the_commit_and_leaves_a_usable_worktree(
    repo: Path, eg: EpicGit
) -> None:
    fork = eg.ensure_integration_branch(EPIC)
    s1 = land_story(repo, "epic-1.1", {"a.txt": "A\ntwo\n"})
    s2 = land_story(repo, "epic-1.2", {"x.txt": "x\n"})
    s3 = land_story(repo, "epic-1.3", {"a.txt": "B\ntwo\n"})  # builds on story 1's line

    cand = eg.build_candidate(EPIC, "probe", fork, [s2, s3])

    assert not cand.ok and cand.commit is None and cand.tree is None
    assert cand.conflict_with == s3
    assert cand.conflicts == ["a.txt"]
    assert "CONFLICT" in cand.output
    admin = Path(git(cand.path, "rev-parse", "--absolute-git-dir").strip())
    assert not (admin / "CHERRY_PICK_HEAD").exists()
    # Back at `onto`, clean: the picks that did apply are gone too.
    assert sha(cand.path, "HEAD") == fork
    assert not (cand.path / "x.txt").exists()
    assert git(cand.path, "status", "--porcelain", "--untracked-files=all") == ""

    ok = eg.build_candidate(EPIC, "probe", fork, [s1, s2, s3])
    assert ok.ok and ok.path == cand.path
    assert (ok.path / "a.txt").read_text() == "B\ntwo\n"
    assert ok.tree == sha(repo, "epic/epic-1^{tree}")


def test_a_scratch_worktree_left_half_way_is_rebuilt(
    repo: Path, eg: EpicGit, three_stories: tuple[str, list[str]]
) -> None:
    fork, (s1, s2, s3) = three_stories
    path = eg.checkout_scratch(EPIC, "probe", fork)
    # A crashed runner: a cherry-pick stopped on a conflict, plus stray files.
    (path / "x.txt").write_text("in the way\n")
    git(path, "add", "x.txt")
    git(path, "commit", "-q", "-m", "clash")
    git(path, "cherry-pick", s1, check=False)
    admin = Path(git(path, "rev-parse", "--absolute-git-dir").strip())
    assert (admin / "CHERRY_PICK_HEAD").exists()
    (path / "junk.txt").write_text("junk\n")

    cand = eg.build_candidate(EPIC, "probe", fork, [s1, s3])

    assert cand.ok, cand.output
    assert (cand.path / "x.txt").read_text() == "x\n"
    assert not (cand.path / "junk.txt").exists()
    assert git(cand.path, "status", "--porcelain", "--untracked-files=all") == ""

    # A directory deleted under git's feet is rebuilt too.
    subprocess.run(["rm", "-rf", str(cand.path)], check=True)
    back = eg.checkout_scratch(EPIC, "probe", s2)
    assert sha(back, "HEAD") == s2 and (back / "y.txt").exists()


def test_candidate_refuses_unknown_or_malformed_commits(
    repo: Path, eg: EpicGit, three_stories: tuple[str, list[str]]
) -> None:
    fork, (s1, _s2, _s3) = three_stories
    with pytest.raises(GitError, match="full lower-case commit sha"):
        eg.build_candidate(EPIC, "bad", fork, [s1[:10]])
    with pytest.raises(GitError, match="not a commit"):
        eg.build_candidate(EPIC, "bad", fork, ["a" * 40])
    with pytest.raises(GitError, match="full lower-case commit sha"):
        eg.build_candidate(EPIC, "bad", "--upload-pack=x", [s1])
    assert not (repo / ".storyline/epics/epic-1/scratch/bad").exists()


# ----------------------------------------------------------------------------- union gates


UNION_GATE = (
    "import pathlib, sys\n"
    "names = sorted(p.name for p in pathlib.Path('.').glob('*.txt'))\n"
    "print('union sees', names)\n"
    "sys.exit(1 if 'y.txt' in names else 0)\n"
)


def test_union_gates_pass_and_fail_with_their_output(
    repo: Path, eg: EpicGit, three_stories: tuple[str, list[str]]
) -> None:
    fork, (s1, _s2, s3) = three_stories
    gates = GatesConfig(commands=[[sys.executable, "-c", UNION_GATE]], timeout_secs=60)

    good = eg.build_candidate(EPIC, "without-2", fork, [s1, s3])
    passed = eg.run_union_gates(gates, good.path, EPIC)
    full = eg.checkout_scratch(EPIC, "union", sha(repo, "epic/epic-1"))
    failed = eg.run_union_gates(gates, full, EPIC)

    assert passed.passed and passed.failed_command is None
    assert "union sees ['a.txt', 'x.txt', 'z.txt']" in passed.output
    assert not failed.passed
    assert "union sees ['a.txt', 'x.txt', 'y.txt', 'z.txt']" in failed.output
    assert "[exit 1" in failed.output
    assert failed.failed_command is not None and "y.txt" in failed.failed_command
    assert not eg.union_gate_pidfile(EPIC).exists()


def test_union_gate_left_by_a_crashed_runner_is_killed(
    repo: Path, eg: EpicGit, three_stories: tuple[str, list[str]]
) -> None:
    fork, _ = three_stories
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        pidfile = eg.union_gate_pidfile(EPIC)
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{leftover.pid} {process_identity(leftover.pid)}\n")
        path = eg.checkout_scratch(EPIC, "union", fork)

        run = eg.run_union_gates(GatesConfig(commands=[["true"]]), path, EPIC)

        assert run.passed
        assert leftover.wait(timeout=30) in (-signal.SIGTERM, -signal.SIGKILL)
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


# ------------------------------------------------------------------ integration branch CAS


def test_reset_integration_is_a_compare_and_swap_that_may_go_backwards(
    repo: Path, eg: EpicGit, three_stories: tuple[str, list[str]]
) -> None:
    fork, (s1, _s2, s3) = three_stories
    clean = eg.build_candidate(EPIC, "clean", fork, [s1, s3])
    assert clean.commit

    assert eg.reset_integration(EPIC, s3, clean.commit)
    assert sha(repo, "epic/epic-1") == clean.commit
    # A stale expectation (someone moved the branch since) changes nothing.
    assert not eg.reset_integration(EPIC, s3, s1)
    assert sha(repo, "epic/epic-1") == clean.commit
    # Backwards is allowed: the rebuild drops work on purpose.
    assert eg.reset_integration(EPIC, clean.commit, fork)
    assert sha(repo, "epic/epic-1") == fork
    assert not eg.reset_integration("epic-7", fork, s1)  # no such branch
    with pytest.raises(GitError, match="not a commit"):
        eg.reset_integration(EPIC, fork, "b" * 40)
    assert sha(repo, "epic/epic-1") == fork


def test_reset_integration_refuses_a_branch_someone_has_checked_out(
    repo: Path, eg: EpicGit, three_stories: tuple[str, list[str]], tmp_path: Path
) -> None:
    fork, (_s1, _s2, s3) = three_stories
    git(repo, "worktree", "add", "-q", str(tmp_path / "human"), "epic/epic-1")

    with pytest.raises(GitError, match="checked out"):
        eg.reset_integration(EPIC, s3, fork)
    assert sha(repo, "epic/epic-1") == s3


# ---------------------------------------------------------------------------------- landing


def test_clean_landing_is_one_commit_on_the_current_base_tip(
    repo: Path, eg: EpicGit, three_stories: tuple[str, list[str]]
) -> None:
    fork, _ = three_stories
    base = commit(repo, {"README.md": "base moved on\n"}, "base moves")

    result = eg.squash_for_landing(EPIC, fork, "Epic 1: the goal")

    assert result.outcome == "merged" and result.commit_sha, result.output
    assert result.base_sha == base
    landed = result.commit_sha
    assert git(repo, "rev-list", "--parents", "-n", "1", landed).split()[1:] == [base]
    assert git(repo, "log", "-1", "--format=%s|%aE|%cE", landed).strip() == (
        f"Epic 1: the goal|{STORYLINE_EMAIL}|{STORYLINE_EMAIL}"
    )
    # Its tree: the base tip plus exactly the epic's changes.
    assert sorted(git(repo, "diff", "--name-only", base, landed).split()) == [
        "x.txt",
        "y.txt",
        "z.txt",
    ]
    assert show(repo, landed, "README.md") == "base moved on\n"
    assert show(repo, landed, "y.txt") == "y\n"
    assert eg.landed_commit(EPIC) is None  # not on the base yet
    assert eg.landing_started_base(EPIC) == base
    assert eg.landing_path(EPIC) == (repo / ".storyline/epics/epic-1" / LANDING).resolve()

    assert not eg.advance_base(fork, landed)  # stale expectation
    assert sha(repo, "main") == base
    assert eg.advance_base(base, landed)
    assert sha(repo, "main") == landed
    assert (repo / "z.txt").read_text() == "z\n"  # the user's checkout moved with it
    assert git(repo, "status", "--porcelain") == ""
    assert eg.landed_commit(EPIC) == landed


def test_landing_conflict_names_the_files_and_a_resolution_lands(repo: Path, eg: EpicGit) -> None:
    fork = eg.ensure_integration_branch(EPIC)
    land_story(repo, "epic-1.1", {"a.txt": "epic\ntwo\n", "x.txt": "x\n"})
    base = commit(repo, {"a.txt": "base\ntwo\n"}, "base edits the same line")

    result = eg.squash_for_landing(EPIC, fork, "Epic 1")

    assert result.outcome == "conflict" and result.commit_sha is None
    assert result.conflicts == ["a.txt"]
    assert any("a.txt" in line for line in result.conflict_lines)
    assert sha(repo, "main") == base
    # A mergemaster resolves in the landing workspace; the check accepts one clean commit.
    path = eg.landing_path(EPIC)
    (path / "a.txt").write_text("base and epic\ntwo\n")
    git(path, "add", "a.txt")
    git(path, "commit", "-q", "--no-edit")
    resolved = eg.finish_landing_resolution(EPIC, "Epic 1 (resolved)")
    assert eg.advance_base(base, resolved)
    assert (repo / "a.txt").read_text() == "base and epic\ntwo\n"
    assert (repo / "x.txt").read_text() == "x\n"

    # The next landing starts from a clean workspace again.
    again = eg.squash_for_landing(EPIC, fork, "Epic 1")
    assert again.outcome == "conflict" and again.conflicts == ["a.txt"]
    assert eg.squash_for_landing("epic-1", sha(repo, "epic/epic-1"), "x").outcome == ("no_commits")


def test_landing_after_losing_the_base_race_reapplies_on_the_new_tip(
    repo: Path, eg: EpicGit, three_stories: tuple[str, list[str]]
) -> None:
    fork, _ = three_stories
    first = eg.squash_for_landing(EPIC, fork, "Epic 1")
    assert first.outcome == "merged" and first.commit_sha
    moved = commit(repo, {"README.md": "someone else landed\n"}, "other story")

    assert not eg.advance_base(first.base_sha, first.commit_sha)
    again = eg.rebase_landing(EPIC)

    assert again.outcome == "merged" and again.commit_sha and again.base_sha == moved
    assert eg.advance_base(moved, again.commit_sha)
    assert git(repo, "rev-list", "--count", f"{moved}..main").strip() == "1"
    assert show(repo, "main", "README.md") == "someone else landed\n"
    assert show(repo, "main", "x.txt") == "x\n"


def test_landing_with_nothing_on_the_branch_commits_nothing(repo: Path, eg: EpicGit) -> None:
    fork = eg.ensure_integration_branch(EPIC)
    base = sha(repo, "main")

    result = eg.squash_for_landing(EPIC, fork, "Epic 1")

    assert result.outcome == "no_commits"
    assert sha(repo, "main") == base
    with pytest.raises(ValueError, match="non-empty message"):
        eg.squash_for_landing(EPIC, fork, "  ")
    with pytest.raises(GitError, match="does not exist"):
        eg.squash_for_landing("epic-5", fork, "Epic 5")


# -------------------------------------------------------------------------- housekeeping


def test_remove_scratch_drops_every_worktree_of_the_epic_only(
    repo: Path, eg: EpicGit, three_stories: tuple[str, list[str]]
) -> None:
    fork, (s1, _s2, s3) = three_stories
    eg.build_candidate(EPIC, "a", fork, [s1])
    gone = eg.build_candidate(EPIC, "b", fork, [s3]).path
    eg.squash_for_landing(EPIC, fork, "Epic 1")
    other = eg.checkout_scratch("epic-2", "keep", fork)
    subprocess.run(["rm", "-rf", str(gone)], check=True)  # registration without directory

    eg.remove_scratch(EPIC)

    assert not (repo / ".storyline/epics/epic-1").exists()
    left = registered(repo)
    assert not any("epics/epic-1/" in p for p in left)
    assert str(other) in left
    assert sha(repo, "epic/epic-1") == s3  # the branch itself stays
    eg.remove_scratch(EPIC)  # again: nothing to do
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""


HOSTILE = ["../epic-1", "epic-1/../x", "epic-0", "epic-1\n", "EPIC-1", "epic-1.lock", "", "-x"]


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_epic_ids_touch_nothing(repo: Path, eg: EpicGit, bad: str) -> None:
    base = sha(repo, "main")
    calls = [
        lambda: eg.ensure_integration_branch(bad),
        lambda: eg.integration_tip(bad),
        lambda: eg.squash_commits(bad, base),
        lambda: eg.build_candidate(bad, "n", base, []),
        lambda: eg.checkout_scratch(bad, "n", base),
        lambda: eg.run_union_gates(GatesConfig(commands=[["true"]]), repo, bad),
        lambda: eg.reset_integration(bad, base, base),
        lambda: eg.squash_for_landing(bad, base, "m"),
        lambda: eg.remove_scratch(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidStoryId):
            call()
    assert not (repo / ".storyline").exists()
    assert git(repo, "for-each-ref", "--format=%(refname)").split() == ["refs/heads/main"]


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "x.lock"])
def test_hostile_scratch_names_are_refused(repo: Path, eg: EpicGit, bad: str) -> None:
    base = eg.ensure_integration_branch(EPIC)
    with pytest.raises(InvalidStoryId):
        eg.checkout_scratch(EPIC, bad, base)
    with pytest.raises(InvalidStoryId):
        eg.build_candidate(EPIC, bad, base, [])
    assert not (repo / ".storyline").exists()
