"""The git layer against real repositories: worktrees, squash merges, base compare-and-swap.

Every test builds a throwaway repository under tmp_path and runs the real git binary. The
global and system git config are switched off for the whole module, so storyline's own
commits prove they do not depend on a configured identity.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from domain.errors import InvalidStoryId
from runners import git_base
from runners.git_ops import (
    STORYLINE_EMAIL,
    GitError,
    MergeWorkspaces,
    SquashResult,
    Worktrees,
)
from tests.runners.git_support import (
    git,
    no_git_identity,  # noqa: F401 (an autouse fixture)
    sha,
)

# ------------------------------------------------------------------------------- helpers


def write(root: Path, files: dict[str, str | None]) -> None:
    for name, content in files.items():
        target = root / name
        if content is None:
            target.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)


def commit(cwd: Path, files: dict[str, str | None], message: str = "change") -> str:
    write(cwd, files)
    git(cwd, "add", "-A")
    git(cwd, "commit", "-q", "-m", message)
    return sha(cwd, "HEAD")


def init_repo(path: Path, files: dict[str, str], branch: str = "main") -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", branch)
    commit(path, dict(files), "initial")
    return path


def registered_worktrees(repo: Path) -> list[str]:
    out = git(repo, "worktree", "list", "--porcelain")
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("worktree ")]


def admin_dir(worktree: Path) -> Path:
    return Path(git(worktree, "rev-parse", "--absolute-git-dir").strip())


def user_status(repo: Path) -> str:
    return git(repo, "status", "--porcelain", "--untracked-files=all")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return init_repo(tmp_path / "project", {"README.md": "hello\n", "a.txt": "one\ntwo\n"})


@pytest.fixture
def worktrees(repo: Path) -> Worktrees:
    return Worktrees(repo, "main")


@pytest.fixture
def merges(repo: Path) -> MergeWorkspaces:
    return MergeWorkspaces(repo, "main")


def story_with_commit(
    worktrees: Worktrees, story: str, files: dict[str, str | None], message: str = "story work"
) -> Path:
    path = worktrees.ensure(story)
    commit(path, files, message)
    return path


# ------------------------------------------------------------------------------ worktrees


def test_ensure_creates_worktree_on_feature_branch_from_base(
    repo: Path, worktrees: Worktrees
) -> None:
    path = worktrees.ensure("42")

    assert path == (repo / ".storyline" / "worktrees" / "42").resolve()
    assert (path / "a.txt").read_text() == "one\ntwo\n"
    assert git(path, "symbolic-ref", "HEAD").strip() == "refs/heads/feature/story-42"
    assert sha(path, "HEAD") == sha(repo, "main")
    # The user's own checkout does not see storyline's directory as untracked noise.
    assert user_status(repo) == ""
    assert "locked" not in git(repo, "worktree", "list", "--porcelain")


def test_ensure_reuses_a_healthy_worktree_with_its_uncommitted_work(
    worktrees: Worktrees,
) -> None:
    path = worktrees.ensure("7")
    write(path, {"wip.txt": "half done\n"})

    again = worktrees.ensure("7")

    assert again == path
    assert (path / "wip.txt").read_text() == "half done\n"


def test_ensure_after_directory_was_deleted_keeps_the_branch_commits(
    repo: Path, worktrees: Worktrees
) -> None:
    path = story_with_commit(worktrees, "s1", {"feature.txt": "work\n"})
    shutil.rmtree(path)  # crash: git's metadata for the worktree is left behind

    again = worktrees.ensure("s1")

    assert (again / "feature.txt").read_text() == "work\n"
    assert worktrees.status("s1").commits_ahead == 1
    assert registered_worktrees(repo).count(str(again)) == 1


def test_ensure_recovers_from_a_crash_in_the_middle_of_worktree_add(
    repo: Path, worktrees: Worktrees
) -> None:
    path = worktrees.path_for("s2")
    # What a kill between git's registration and its checkout leaves: a locked entry,
    # HEAD on the new branch, an empty index and no files.
    git(
        repo, "worktree", "add", "--no-checkout", "--lock", "--reason", "initializing",
        "-b", "feature/story-s2", str(path), "main",
    )  # fmt: skip
    assert not (path / "a.txt").exists()

    again = worktrees.ensure("s2")

    assert (again / "a.txt").read_text() == "one\ntwo\n"
    assert worktrees.status("s2").dirty is False
    assert "locked" not in git(repo, "worktree", "list", "--porcelain")


def test_ensure_recovers_a_locked_registration_whose_directory_is_gone(
    repo: Path, worktrees: Worktrees
) -> None:
    path = story_with_commit(worktrees, "s3", {"x.txt": "x\n"})
    git(repo, "worktree", "lock", str(path))
    shutil.rmtree(path)  # `git worktree prune` alone would keep this entry forever

    again = worktrees.ensure("s3")

    assert (again / "x.txt").read_text() == "x\n"
    assert registered_worktrees(repo).count(str(again)) == 1


def test_ensure_clears_a_stale_index_lock_so_the_agent_can_commit(
    worktrees: Worktrees,
) -> None:
    path = worktrees.ensure("s4")
    (admin_dir(path) / "index.lock").write_text("")  # a killed `git add`

    worktrees.ensure("s4")

    commit(path, {"new.txt": "ok\n"})  # would fail with "index.lock: File exists"
    assert worktrees.status("s4").commits_ahead == 1


def test_ensure_replaces_a_directory_that_is_not_a_worktree(
    repo: Path, worktrees: Worktrees
) -> None:
    path = worktrees.path_for("s5")
    write(path, {"junk.txt": "left over\n", "sub/more.txt": "x"})

    again = worktrees.ensure("s5")

    assert not (again / "junk.txt").exists()
    assert (again / "a.txt").exists()
    assert git(again, "symbolic-ref", "HEAD").strip() == "refs/heads/feature/story-s5"
    assert git(repo, "status", "--porcelain") == ""


def test_ensure_replaces_a_worktree_whose_git_pointer_is_broken(
    repo: Path, worktrees: Worktrees
) -> None:
    path = story_with_commit(worktrees, "s6", {"f.txt": "f\n"})
    (path / ".git").write_text("gitdir: /nonexistent/worktrees/s6\n")

    again = worktrees.ensure("s6")

    assert (again / "f.txt").read_text() == "f\n"
    # The user's checkout was never mistaken for the worktree.
    assert git(repo, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
    assert git(repo, "status", "--porcelain") == ""


def test_ensure_recreates_a_worktree_left_on_the_wrong_branch(worktrees: Worktrees) -> None:
    path = story_with_commit(worktrees, "s7", {"f.txt": "f\n"})
    git(path, "checkout", "-q", "-b", "something-else")

    again = worktrees.ensure("s7")

    assert git(again, "symbolic-ref", "HEAD").strip() == "refs/heads/feature/story-s7"
    assert (again / "f.txt").read_text() == "f\n"


def test_ensure_many_creates_six_worktrees_two_at_a_time(repo: Path) -> None:
    active = 0
    peak = 0
    guard = threading.Lock()

    class Counting(Worktrees):
        def ensure(self, story_id: str) -> Path:
            nonlocal active, peak
            with guard:
                active += 1
                peak = max(peak, active)
            try:
                time.sleep(0.02)
                return super().ensure(story_id)
            finally:
                with guard:
                    active -= 1

    stories = [f"p{i}" for i in range(6)]
    results = Counting(repo, "main").ensure_many(stories, parallelism=2)

    assert list(results) == stories
    for story, result in results.items():
        assert isinstance(result, Path), result
        assert git(result, "symbolic-ref", "HEAD").strip() == f"refs/heads/feature/story-{story}"
        assert (result / "a.txt").exists()
    assert peak == 2
    assert len(registered_worktrees(repo)) == 7


def test_ensure_many_reports_one_failure_without_stopping_the_others(
    repo: Path, worktrees: Worktrees
) -> None:
    # The user has one story's branch checked out themselves: git refuses a second checkout.
    git(repo, "checkout", "-q", "-b", "feature/story-busy")

    results = worktrees.ensure_many(["ok1", "busy", "ok2"], parallelism=2)

    assert isinstance(results["ok1"], Path) and isinstance(results["ok2"], Path)
    error = results["busy"]
    assert isinstance(error, GitError)
    assert "git worktree add" in str(error)
    assert "already checked out" in str(error)
    assert not worktrees.path_for("busy").exists()


def test_status_reports_dirty_paths_and_commits_ahead(worktrees: Worktrees) -> None:
    path = story_with_commit(worktrees, "st", {"one.txt": "1\n"})
    commit(path, {"two.txt": "2\n"})
    write(path, {"a.txt": "changed\n", "new/dir/untracked.txt": "u\n"})

    status = worktrees.status("st")

    assert status.dirty is True
    assert sorted(status.dirty_paths) == ["a.txt", "new/dir/untracked.txt"]
    assert status.commits_ahead == 2
    assert status.head == sha(path, "HEAD")


def test_status_of_a_clean_fresh_worktree(worktrees: Worktrees, repo: Path) -> None:
    worktrees.ensure("fresh")

    status = worktrees.status("fresh")

    assert (status.dirty, status.dirty_paths, status.commits_ahead) == (False, [], 0)
    assert status.head == sha(repo, "main")


def test_status_of_a_missing_worktree_is_a_clear_error(worktrees: Worktrees) -> None:
    with pytest.raises(GitError, match="no usable worktree"):
        worktrees.status("never")


def test_remove_deletes_the_worktree_and_optionally_the_branch(
    repo: Path, worktrees: Worktrees
) -> None:
    path = story_with_commit(worktrees, "rm", {"f.txt": "f\n"})
    write(path, {"dirty.txt": "unsaved\n"})

    worktrees.remove("rm")

    assert not path.exists()
    assert str(path) not in registered_worktrees(repo)
    assert git(repo, "branch", "--list", "feature/story-rm").strip()
    worktrees.remove("rm")  # already gone: fine
    worktrees.remove("rm", delete_branch=True)
    assert git(repo, "branch", "--list", "feature/story-rm").strip() == ""


def test_a_missing_base_branch_names_the_command_and_gits_error(repo: Path) -> None:
    with pytest.raises(GitError) as info:
        Worktrees(repo, "no-such-branch").ensure("x")

    message = str(info.value)
    assert "git worktree add" in message
    assert "no-such-branch" in message
    assert info.value.returncode not in (None, 0)


HOSTILE_IDS = ["../x", "a b", "-rf", "a/b", "tab\there", "nl\nx", "esc\x1b", "", "..", "x" * 65]


@pytest.mark.parametrize("story_id", HOSTILE_IDS)
def test_hostile_story_ids_are_refused_before_git_runs(
    story_id: str, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worktrees = Worktrees(repo, "main")
    merges = MergeWorkspaces(repo, "main")
    branches_before = git(repo, "branch", "--list")

    def no_git(*args: object, **kwargs: object) -> object:
        raise AssertionError("git ran for a hostile story id")

    monkeypatch.setattr(git_base.subprocess, "run", no_git)
    calls = [
        lambda: worktrees.ensure(story_id),
        lambda: worktrees.ensure_many(["good", story_id], parallelism=2),
        lambda: worktrees.remove(story_id, delete_branch=True),
        lambda: worktrees.status(story_id),
        lambda: worktrees.path_for(story_id),
        lambda: merges.prepare(story_id),
        lambda: merges.squash_merge(story_id, "msg"),
        lambda: merges.finish_resolution(story_id),
        lambda: merges.rebase_onto_base(story_id),
        lambda: merges.remove(story_id),
    ]
    for call in calls:
        with pytest.raises(InvalidStoryId):
            call()
    monkeypatch.undo()

    assert not (repo / ".storyline").exists()
    assert git(repo, "branch", "--list") == branches_before


# ------------------------------------------------------------------------- squash merges


def test_clean_squash_merge_lands_exactly_one_commit_on_base(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    wt = story_with_commit(worktrees, "m1", {"feature.txt": "feature\n"}, "first")
    commit(wt, {"feature.txt": "feature v2\n"}, "second")
    old_main = commit(repo, {"other.txt": "meanwhile\n"}, "someone else")

    result = merges.squash_merge("m1", "story m1: add feature")

    assert result.outcome == "merged"
    assert result.base_sha == old_main
    assert result.commit_sha is not None
    assert sha(repo, "main") == old_main  # nothing lands before the compare-and-swap
    assert merges.advance_base(result.base_sha, result.commit_sha) is True

    assert sha(repo, "main") == result.commit_sha
    assert git(repo, "rev-list", "--count", f"{old_main}..main").strip() == "1"
    assert git(repo, "log", "-1", "--format=%s|%ae|%P").strip() == (
        f"story m1: add feature|{STORYLINE_EMAIL}|{old_main}"
    )
    # Both sides' content, in the user's checkout too, which stays clean.
    assert (repo / "feature.txt").read_text() == "feature v2\n"
    assert (repo / "other.txt").read_text() == "meanwhile\n"
    assert user_status(repo) == ""


def test_advance_base_when_base_is_not_checked_out_anywhere(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    git(repo, "checkout", "-q", "--detach")
    story_with_commit(worktrees, "m2", {"f.txt": "f\n"})

    result = merges.squash_merge("m2", "m2")
    assert result.outcome == "merged" and result.commit_sha

    assert merges.advance_base(result.base_sha, result.commit_sha) is True
    assert sha(repo, "refs/heads/main") == result.commit_sha
    assert merges.advance_base(result.base_sha, result.commit_sha) is False  # stale old


def test_conflict_names_the_file_and_keeps_the_workspace_conflicted(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "c1", {"a.txt": "one\nstory\n"})
    base = commit(repo, {"a.txt": "one\nmain\n"})

    result = merges.squash_merge("c1", "c1")

    assert result.outcome == "conflict"
    assert result.conflicts == ["a.txt"]
    assert result.conflict_lines == ["CONFLICT (content): Merge conflict in a.txt"]
    assert "CONFLICT (content)" in result.output
    assert result.base_sha == base and result.commit_sha is None
    workspace = merges.path_for("c1")
    assert "<<<<<<<" in (workspace / "a.txt").read_text()
    assert merges.started_base("c1") == base
    assert sha(repo, "main") == base


def test_modify_delete_conflict_is_reported(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "c0", {"a.txt": None})
    commit(repo, {"a.txt": "one\nchanged on main\n"})

    result = merges.squash_merge("c0", "c0")

    assert result.outcome == "conflict"
    assert result.conflicts == ["a.txt"]
    assert len(result.conflict_lines) == 1
    assert result.conflict_lines[0].startswith("CONFLICT (modify/delete): a.txt deleted")


def test_a_conflicted_story_keeps_its_workspace_while_another_merges(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "stuck", {"a.txt": "one\nstory\n"})
    story_with_commit(worktrees, "free", {"free.txt": "free\n"})
    base = commit(repo, {"a.txt": "one\nmain\n"})

    stuck = merges.squash_merge("stuck", "stuck")
    free = merges.squash_merge("free", "free")
    assert (stuck.outcome, free.outcome) == ("conflict", "merged")
    assert free.commit_sha and merges.advance_base(free.base_sha, free.commit_sha)

    assert "<<<<<<<" in (merges.path_for("stuck") / "a.txt").read_text()
    assert merges.started_base("stuck") == base
    assert (repo / "free.txt").exists()


def test_mergemaster_resolution_is_accepted_and_lands(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "c2", {"a.txt": "one\nstory\n"})
    base = commit(repo, {"a.txt": "one\nmain\n"})
    merges.squash_merge("c2", "c2")
    workspace = merges.path_for("c2")

    write(workspace, {"a.txt": "one\nmain\nstory\n"})
    git(workspace, "add", "a.txt")
    git(workspace, "commit", "-q", "-m", "resolve c2")

    resolved = merges.finish_resolution("c2")
    assert resolved == sha(workspace, "HEAD")
    started = merges.started_base("c2")
    assert started == base
    assert merges.advance_base(started, resolved) is True
    assert (repo / "a.txt").read_text() == "one\nmain\nstory\n"
    assert user_status(repo) == ""


def test_finish_resolution_refuses_unfinished_work(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "c3", {"a.txt": "one\nstory\n"})
    commit(repo, {"a.txt": "one\nmain\n"})
    merges.squash_merge("c3", "c3")
    workspace = merges.path_for("c3")

    with pytest.raises(GitError, match=r"unresolved conflicts remain .*a\.txt"):
        merges.finish_resolution("c3")

    write(workspace, {"a.txt": "one\nboth\n"})
    git(workspace, "add", "a.txt")
    with pytest.raises(GitError, match="uncommitted changes remain"):
        merges.finish_resolution("c3")

    git(workspace, "reset", "-q", "--hard")
    git(workspace, "clean", "-fdq")
    with pytest.raises(GitError, match="nothing was committed"):
        merges.finish_resolution("c3")


def test_finish_resolution_refuses_committed_conflict_markers(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "c4", {"a.txt": "one\nstory\n"})
    commit(repo, {"a.txt": "one\nmain\n"})
    merges.squash_merge("c4", "c4")
    workspace = merges.path_for("c4")
    git(workspace, "add", "a.txt")  # markers and all
    git(workspace, "commit", "-q", "-m", "lazy")

    with pytest.raises(GitError, match=r"conflict markers: a\.txt:\d+"):
        merges.finish_resolution("c4")


def test_finish_resolution_refuses_more_than_one_commit(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "c5", {"a.txt": "one\nstory\n"})
    commit(repo, {"a.txt": "one\nmain\n"})
    merges.squash_merge("c5", "c5")
    workspace = merges.path_for("c5")
    commit(workspace, {"a.txt": "one\nresolved\n"}, "resolve")
    commit(workspace, {"extra.txt": "e\n"}, "extra")

    with pytest.raises(GitError, match="exactly one commit"):
        merges.finish_resolution("c5")


def test_no_commits_for_a_branch_without_commits(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    worktrees.ensure("empty")
    before = sha(repo, "main")

    result = merges.squash_merge("empty", "empty")

    assert result == SquashResult(
        "no_commits", before, output="feature/story-empty has no commits that main lacks"
    )
    assert sha(repo, "main") == before


def test_no_commits_when_the_change_is_already_on_base(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "dup", {"same.txt": "same\n"})
    before = commit(repo, {"same.txt": "same\n"}, "landed by hand")

    result = merges.squash_merge("dup", "dup")

    assert result.outcome == "no_commits"
    assert result.commit_sha is None
    assert sha(repo, "main") == before
    workspace = merges.path_for("dup")
    assert sha(workspace, "HEAD") == before
    assert git(workspace, "status", "--porcelain") == ""


def test_squash_merge_of_a_missing_branch_is_other(merges: MergeWorkspaces) -> None:
    result = merges.squash_merge("ghost", "ghost")

    assert result.outcome == "other"
    assert "feature/story-ghost does not exist" in result.output


def test_cas_refuses_when_base_moved_and_rebase_then_merges(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "r1", {"story.txt": "story\n"})
    result = merges.squash_merge("r1", "r1: story")
    assert result.outcome == "merged" and result.commit_sha
    someone = commit(repo, {"someone.txt": "someone\n"}, "someone else's commit")

    assert merges.advance_base(result.base_sha, result.commit_sha) is False
    assert sha(repo, "main") == someone  # their commit is not lost
    assert not (repo / "story.txt").exists()

    rebased = merges.rebase_onto_base("r1")
    assert rebased.outcome == "merged" and rebased.commit_sha
    assert rebased.base_sha == someone
    assert merges.started_base("r1") == someone
    assert merges.advance_base(rebased.base_sha, rebased.commit_sha) is True
    assert (repo / "story.txt").read_text() == "story\n"
    assert (repo / "someone.txt").read_text() == "someone\n"
    assert git(repo, "log", "-1", "--format=%s").strip() == "r1: story"
    assert git(repo, "rev-list", "--count", f"{result.base_sha}..main").strip() == "2"
    assert user_status(repo) == ""


def test_rebase_onto_a_conflicting_base_reports_conflict(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "r2", {"a.txt": "one\nstory\n"})
    result = merges.squash_merge("r2", "r2")
    assert result.outcome == "merged"
    moved = commit(repo, {"a.txt": "one\nmain\n"})

    rebased = merges.rebase_onto_base("r2")

    assert rebased.outcome == "conflict"
    assert rebased.conflicts == ["a.txt"]
    assert rebased.base_sha == moved
    assert any(line.startswith("CONFLICT") for line in rebased.conflict_lines)
    assert merges.started_base("r2") == moved


def test_advance_carries_unrelated_local_changes_in_the_users_checkout(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "d1", {"story.txt": "s\n"})
    result = merges.squash_merge("d1", "d1")
    write(repo, {"README.md": "my local edit\n"})
    assert result.commit_sha

    assert merges.advance_base(result.base_sha, result.commit_sha) is True
    assert (repo / "README.md").read_text() == "my local edit\n"
    assert (repo / "story.txt").exists()
    assert user_status(repo) == " M README.md\n"


def test_advance_refuses_when_the_users_local_changes_overlap(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "d2", {"a.txt": "one\nstory\n"})
    result = merges.squash_merge("d2", "d2")
    write(repo, {"a.txt": "my local edit\n"})
    assert result.commit_sha

    with pytest.raises(GitError, match="has local changes"):
        merges.advance_base(result.base_sha, result.commit_sha)
    assert sha(repo, "main") == result.base_sha
    assert (repo / "a.txt").read_text() == "my local edit\n"


def test_advance_refuses_a_move_that_would_lose_commits(
    repo: Path, merges: MergeWorkspaces
) -> None:
    git(repo, "checkout", "-q", "-b", "side")
    unrelated = commit(repo, {"u.txt": "u\n"})
    git(repo, "checkout", "-q", "main")
    tip = commit(repo, {"main.txt": "m\n"})

    with pytest.raises(GitError, match="would be lost"):
        merges.advance_base(tip, unrelated)
    for bogus in ("-rf", "HEAD", "main", "abc"):
        with pytest.raises(GitError, match="full lower-case commit sha"):
            merges.advance_base(tip, bogus)
    assert sha(repo, "main") == tip


def test_prepare_after_a_crash_mid_merge_gives_a_clean_workspace(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    story_with_commit(worktrees, "k1", {"a.txt": "one\nstory\n"})
    commit(repo, {"a.txt": "one\nmain\n"})
    workspace = merges.prepare("k1")
    # A real merge stopped half-way (MERGE_HEAD, markers) plus debris from a killed agent.
    git(workspace, "merge", "--no-ff", "feature/story-k1", check=False)
    assert (admin_dir(workspace) / "MERGE_HEAD").exists()
    write(workspace, {"debris.txt": "x\n", "build/out.o": "o"})
    (admin_dir(workspace) / "index.lock").write_text("")
    tip = commit(repo, {"later.txt": "later\n"})

    again = merges.prepare("k1")

    assert again == workspace
    assert git(again, "status", "--porcelain", "--ignored") == ""
    assert not (admin_dir(again) / "MERGE_HEAD").exists()
    assert sha(again, "HEAD") == tip
    assert "<<<<<<<" not in (again / "a.txt").read_text()
    assert merges.started_base("k1") is None


def test_prepare_recreates_a_deleted_or_bogus_workspace(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    workspace = merges.prepare("k2")
    git(repo, "worktree", "lock", str(workspace))
    shutil.rmtree(workspace)
    assert merges.prepare("k2") == workspace
    assert (workspace / "a.txt").exists()

    merges.remove("k2")
    write(workspace, {"not-a-worktree.txt": "?"})
    assert merges.prepare("k2") == workspace
    assert not (workspace / "not-a-worktree.txt").exists()
    assert git(workspace, "status", "--porcelain", "--ignored") == ""
    assert registered_worktrees(repo).count(str(workspace)) == 1


def test_squash_merge_restarts_cleanly_from_a_conflicted_workspace(
    repo: Path, worktrees: Worktrees, merges: MergeWorkspaces
) -> None:
    wt = story_with_commit(worktrees, "k3", {"a.txt": "one\nstory\n"})
    commit(repo, {"a.txt": "one\nmain\n"})
    assert merges.squash_merge("k3", "k3").outcome == "conflict"
    # The coder fixes the conflict on the branch itself; the next merge must start afresh.
    git(wt, "merge", "-q", "main", check=False)
    commit(wt, {"a.txt": "one\nmain\nstory\n"}, "merge main")

    result = merges.squash_merge("k3", "k3")

    assert result.outcome == "merged"
    assert result.commit_sha
    assert merges.advance_base(result.base_sha, result.commit_sha)
    assert (repo / "a.txt").read_text() == "one\nmain\nstory\n"


def test_remove_and_head_of_merge_workspaces(repo: Path, merges: MergeWorkspaces) -> None:
    workspace = merges.prepare("h1")
    assert merges.head("h1") == sha(repo, "main")

    merges.remove("h1")
    merges.remove("h1")

    assert not workspace.exists()
    assert str(workspace) not in registered_worktrees(repo)
    with pytest.raises(GitError, match="no usable merge workspace"):
        merges.head("h1")
    assert merges.started_base("h1") is None


def test_git_env_ignores_an_inherited_git_dir(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = init_repo(tmp_path / "other", {"o.txt": "o\n"})
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))

    path = Worktrees(repo, "main").ensure("env")

    assert (path / "a.txt").exists()
    assert not (other / ".storyline").exists()


def test_parallel_creation_never_trips_over_a_half_registered_entry(repo: Path) -> None:
    # Stress check for a race seen once in CI: `git worktree unlock` of one entry read
    # another entry's admin directory while it was being registered ("failed to read
    # .git/worktrees/x/commondir"). The timing is rare: this does not reproduce it on demand.
    stories = [f"p{n}" for n in range(16)]
    results = Worktrees(repo, "main").ensure_many(stories, parallelism=8)
    failures = {sid: r for sid, r in results.items() if isinstance(r, GitError)}
    assert failures == {}
    assert sorted(
        Path(p).name for p in registered_worktrees(repo) if "/.storyline/worktrees/" in p
    ) == sorted(stories)
