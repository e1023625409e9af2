"""The clone's link to the shared remote (scale-out), against real git: a bare repository as
the remote and two clones of it, as two worker machines would have.

Covers :class:`runners.remote.GitRemote` (opening clones, compare-and-swap pushes, leased
pushes of feature branches, adopting and syncing branches) and the remote mode of the
workspace classes: new stories branch from the remote's base, two mergers racing to advance
the same base (one wins, the loser rebuilds and lands on top), integration branches of epics
created and moved on the remote.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from domain.ids import feature_branch
from runners.epic_git import EpicGit
from runners.git_base import GitError
from runners.merge_workspace import MergeWorkspaces
from runners.remote import GitRemote, RemoteError, RemoteMoved
from runners.worktrees import Worktrees
from tests.runners.git_support import (
    AGENT_ENV,
    git,
    no_git_identity,  # noqa: F401 (an autouse fixture)
    sha,
)


def commit(cwd: Path, files: dict[str, str], message: str = "change") -> str:
    for name, content in files.items():
        (cwd / name).write_text(content)
    git(cwd, "add", "-A")
    git(cwd, "commit", "-q", "-m", message)
    return sha(cwd, "HEAD")


def side_commit(repo: Path, parent: str, files: dict[str, str], message: str) -> str:
    """A commit on top of ``parent`` made without touching any checkout."""
    for name, content in files.items():
        blob = subprocess.run(
            ["git", "hash-object", "-w", "--stdin"],
            cwd=repo,
            input=content,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        index = repo / ".git" / "side-index"
        env = {**os.environ, **AGENT_ENV, "GIT_INDEX_FILE": str(index)}
        subprocess.run(["git", "read-tree", parent], cwd=repo, env=env, check=True)
        subprocess.run(
            ["git", "update-index", "--add", "--cacheinfo", f"100644,{blob},{name}"],
            cwd=repo,
            env=env,
            check=True,
        )
        tree = subprocess.run(
            ["git", "write-tree"], cwd=repo, env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        index.unlink()
        parent = git(repo, "commit-tree", tree, "-p", parent, "-m", message).strip()
    return parent


def status(cwd: Path) -> str:
    return git(cwd, "status", "--porcelain", "--untracked-files=no")


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    seed = tmp_path / "seed"
    seed.mkdir()
    git(seed, "init", "-q", "-b", "main")
    commit(seed, {"README.md": "hello\n"}, "initial")
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    git(seed, "push", "-q", str(remote), "main")
    return remote


@pytest.fixture
def a(bare: Path, tmp_path: Path) -> GitRemote:
    return GitRemote.open_clone(str(bare), tmp_path / "worker-a")


@pytest.fixture
def b(bare: Path, tmp_path: Path) -> GitRemote:
    return GitRemote.open_clone(str(bare), tmp_path / "worker-b")


def on_remote(bare: Path, branch: str) -> str | None:
    out = git(bare, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False)
    return out.strip() or None


# ---------------------------------------------------------------------------- open_clone


def test_open_clone_clones_then_reopens_the_same_clone(bare: Path, tmp_path: Path) -> None:
    first = GitRemote.open_clone(str(bare), tmp_path / "w")
    assert (tmp_path / "w" / "README.md").read_text() == "hello\n"
    assert sha(first.repo, "HEAD") == on_remote(bare, "main")
    again = GitRemote.open_clone(f"file://{bare}", tmp_path / "w")  # same remote, other spelling
    assert again.repo == first.repo
    assert not list(tmp_path.glob(".w.*")), "no scratch directory is left beside the clone"


def test_open_clone_clones_into_an_existing_empty_directory(bare: Path, tmp_path: Path) -> None:
    (tmp_path / "mount").mkdir()
    remote = GitRemote.open_clone(str(bare), tmp_path / "mount")
    assert remote.remote_sha("main") == on_remote(bare, "main")


def test_open_clone_refuses_a_clone_of_another_remote(bare: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.git"
    git(tmp_path, "clone", "-q", "--bare", str(bare), str(other))
    GitRemote.open_clone(str(other), tmp_path / "w")
    with pytest.raises(RemoteError, match="not of"):
        GitRemote.open_clone(str(bare), tmp_path / "w")
    assert git(tmp_path / "w", "config", "remote.origin.url").strip() == str(other)


def test_open_clone_refuses_a_directory_that_is_not_a_repository(
    bare: Path, tmp_path: Path
) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "notes.txt").write_text("mine\n")
    with pytest.raises(RemoteError, match="not a git repository"):
        GitRemote.open_clone(str(bare), tmp_path / "w")
    assert (tmp_path / "w" / "notes.txt").read_text() == "mine\n"


def test_a_bad_url_gives_remote_error_and_leaves_no_directory(tmp_path: Path) -> None:
    url = str(tmp_path / "missing.git")
    with pytest.raises(RemoteError, match=r"missing\.git"):
        GitRemote.open_clone(url, tmp_path / "w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-gitconfig"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(RemoteError):
        GitRemote.open_clone(url, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_urls_and_names_that_git_would_read_as_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RemoteError):
        GitRemote.open_clone("--upload-pack=touch /tmp/x", tmp_path / "w")
    with pytest.raises(RemoteError):
        GitRemote(tmp_path, "/x.git", name="-o")
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------ push_cas


def test_push_cas_moves_the_remote_from_the_expected_commit(a: GitRemote, bare: Path) -> None:
    old = a.remote_sha("main")
    assert old is not None
    new = side_commit(a.repo, old, {"a.txt": "a\n"}, "from a")
    assert a.push_cas("main", old, new) is True
    assert on_remote(bare, "main") == new
    assert a.remote_sha("main") == new
    assert a.push_cas("main", old, new) is True  # already there: the state holds


def test_push_cas_loses_to_another_clone_and_then_sees_the_winner(
    a: GitRemote, b: GitRemote, bare: Path
) -> None:
    old = a.remote_sha("main")
    assert old is not None and b.remote_sha("main") == old
    won = side_commit(a.repo, old, {"a.txt": "a\n"}, "from a")
    lost = side_commit(b.repo, old, {"b.txt": "b\n"}, "from b")
    assert a.push_cas("main", old, won) is True
    assert b.push_cas("main", old, lost) is False
    assert on_remote(bare, "main") == won
    assert b.remote_sha("main") == won


def test_push_cas_from_nothing_creates_and_refuses_when_it_exists(
    a: GitRemote, b: GitRemote, bare: Path
) -> None:
    base = a.remote_sha("main")
    assert base is not None
    first = side_commit(a.repo, base, {"x": "1\n"}, "x")
    assert a.push_cas("topic", None, first) is True
    assert on_remote(bare, "topic") == first
    second = side_commit(b.repo, base, {"y": "2\n"}, "y")
    assert b.push_cas("topic", None, second) is False
    assert on_remote(bare, "topic") == first
    assert b.remote_sha("topic") == first


def test_push_cas_refused_by_a_hook_is_a_remote_error(a: GitRemote, bare: Path) -> None:
    hook = bare / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'no pushes today' >&2\nexit 1\n")
    hook.chmod(0o755)
    old = a.remote_sha("main")
    assert old is not None
    new = side_commit(a.repo, old, {"a.txt": "a\n"}, "from a")
    with pytest.raises(RemoteError, match="no pushes today"):
        a.push_cas("main", old, new)
    assert on_remote(bare, "main") == old


# ---------------------------------------------------------------- feature branches


def test_push_branch_is_refused_when_another_clone_pushed_since(
    a: GitRemote, b: GitRemote, bare: Path
) -> None:
    branch = feature_branch("s1")
    base = a.remote_sha("main")
    assert base is not None
    first = side_commit(a.repo, base, {"f.txt": "1\n"}, "work 1")
    git(a.repo, "branch", branch, first)
    assert a.push_branch(branch) == first
    assert a.push_branch(branch) == first  # idempotent
    assert b.adopt_branch(branch) == first
    taken_over = side_commit(b.repo, first, {"f.txt": "2\n"}, "work 2 by b")
    git(b.repo, "branch", "-f", branch, taken_over)
    assert b.push_branch(branch) == taken_over
    # a still believes the remote is at `first`: its push must not overwrite b's work.
    stale = side_commit(a.repo, first, {"f.txt": "3\n"}, "late work by a")
    git(a.repo, "branch", "-f", branch, stale)
    with pytest.raises(RemoteMoved):
        a.push_branch(branch)
    assert on_remote(bare, branch) == taken_over
    assert a.remote_sha(branch) == taken_over


def test_a_new_branch_is_refused_when_another_clone_created_it_first(
    a: GitRemote, b: GitRemote
) -> None:
    branch = feature_branch("s2")
    base = a.remote_sha("main")
    assert base is not None
    git(a.repo, "branch", branch, side_commit(a.repo, base, {"f": "a\n"}, "a"))
    git(b.repo, "branch", branch, side_commit(b.repo, base, {"f": "b\n"}, "b"))
    a.push_branch(branch)
    with pytest.raises(RemoteMoved):
        b.push_branch(branch)


def test_adopt_branch_takes_the_remote_tip_or_deletes_the_local_branch(
    a: GitRemote, b: GitRemote, bare: Path
) -> None:
    branch = feature_branch("s3")
    base = a.remote_sha("main")
    assert base is not None
    pushed = side_commit(a.repo, base, {"f": "pushed\n"}, "pushed")
    git(a.repo, "branch", branch, pushed)
    a.push_branch(branch)
    git(b.repo, "branch", branch, side_commit(b.repo, base, {"f": "mine\n"}, "local only"))
    assert b.adopt_branch(branch) == pushed
    assert sha(b.repo, f"refs/heads/{branch}") == pushed
    git(bare, "branch", "-D", branch)
    assert b.adopt_branch(branch) is None
    assert git(b.repo, "branch", "--list", branch) == ""
    assert b.remote_sha(branch) is None  # the stale remote-tracking ref went too
    b.fetch(branch, "no-such-branch")  # missing remote branches are not an error


def test_sync_branch_moves_the_checked_out_base_with_its_files(a: GitRemote, b: GitRemote) -> None:
    old = a.remote_sha("main")
    assert old is not None
    new = side_commit(a.repo, old, {"README.md": "hello again\n"}, "readme")
    assert a.push_cas("main", old, new)
    assert b.sync_branch("main") == new
    assert sha(b.repo, "HEAD") == new
    assert (b.repo / "README.md").read_text() == "hello again\n"
    assert status(b.repo) == ""  # not the change reversed as staged changes
    assert b.sync_branch("no-such-branch") is None


# ------------------------------------------------------------------ workspace classes


def test_a_new_story_branches_from_the_remote_base(a: GitRemote, b: GitRemote) -> None:
    old = a.remote_sha("main")
    assert old is not None
    news = side_commit(a.repo, old, {"news.txt": "from a\n"}, "news")
    assert a.push_cas("main", old, news)
    worktrees = Worktrees(b.repo, "main", remote=b)
    path = worktrees.ensure("s1")
    assert (path / "news.txt").read_text() == "from a\n"
    assert status(b.repo) == ""
    # Coded here, pushed, then taken over by the other worker from the remote branch.
    commit(path, {"work.txt": "done\n"}, "story work")
    pushed = worktrees.push("s1")
    other = Worktrees(a.repo, "main", remote=a)
    assert (other.ensure("s1") / "work.txt").read_text() == "done\n"
    other.adopt("s1")
    assert not other.path_for("s1").exists()
    assert sha(a.repo, f"refs/heads/{feature_branch('s1')}") == pushed
    assert Worktrees(a.repo, "main").push("s1") == pushed  # without a remote: the local tip


def test_without_a_remote_nothing_touches_the_remote(a: GitRemote, bare: Path) -> None:
    before = git(bare, "for-each-ref")
    worktrees = Worktrees(a.repo, "main")
    assert worktrees.remote is None and worktrees.on_branch("dev").remote is None
    commit(worktrees.ensure("s1"), {"w": "1\n"}, "w")
    merges = MergeWorkspaces(a.repo, "main")
    result = merges.squash_merge("s1", "Story s1")
    assert result.commit_sha is not None
    assert merges.advance_base(result.base_sha, result.commit_sha)
    assert git(bare, "for-each-ref") == before


def test_two_mergers_race_for_the_base_and_the_loser_lands_after_a_rebuild(
    a: GitRemote, b: GitRemote, bare: Path
) -> None:
    start = on_remote(bare, "main")
    for remote, story, name in ((a, "s1", "one.txt"), (b, "s2", "two.txt")):
        worktrees = Worktrees(remote.repo, "main", remote=remote)
        commit(worktrees.ensure(story), {name: f"{story}\n"}, f"work on {story}")
        worktrees.push(story)
    # Each merger lands the story the other worker coded: the pushed branch is what lands.
    mergers = {"s2": MergeWorkspaces(a.repo, "main", remote=a)}
    mergers["s1"] = MergeWorkspaces(b.repo, "main", remote=b)
    results = {s: m.squash_merge(s, f"Story {s}") for s, m in mergers.items()}
    assert {r.outcome for r in results.values()} == {"merged"}
    assert {r.base_sha for r in results.values()} == {start}

    barrier = threading.Barrier(2)
    moved: dict[str, bool] = {}

    def advance(story: str) -> None:
        result = results[story]
        assert result.commit_sha is not None
        barrier.wait()
        moved[story] = mergers[story].advance_base(result.base_sha, result.commit_sha)

    threads = [threading.Thread(target=advance, args=(s,)) for s in mergers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(moved.values()) == [False, True]
    winner = next(s for s, ok in moved.items() if ok)
    loser = next(s for s, ok in moved.items() if not ok)
    assert on_remote(bare, "main") == results[winner].commit_sha
    # The loser's clone now shows the winner's commit, checkout included.
    loser_repo = mergers[loser].repo
    assert sha(loser_repo, "refs/heads/main") == results[winner].commit_sha
    assert status(loser_repo) == ""

    mergers[loser].prepare(loser)
    again = mergers[loser].squash_merge(loser, f"Story {loser}")
    assert again.outcome == "merged" and again.base_sha == results[winner].commit_sha
    assert again.commit_sha is not None
    assert mergers[loser].advance_base(again.base_sha, again.commit_sha) is True
    log = git(bare, "log", "--first-parent", "--format=%s", "main").splitlines()
    assert log == [f"Story {loser}", f"Story {winner}", "initial"]
    # A stale merger (the winner's clone has not seen the second landing) gets False.
    assert mergers[winner].advance_base(start or "", results[winner].commit_sha or "") is False
    assert sha(mergers[winner].repo, "refs/heads/main") == again.commit_sha


def test_an_epic_integration_branch_lives_on_the_remote(
    a: GitRemote, b: GitRemote, bare: Path
) -> None:
    base = on_remote(bare, "main")
    epics_a = EpicGit(a.repo, "main", remote=a)
    epics_b = EpicGit(b.repo, "main", remote=b)
    tip = epics_a.ensure_integration_branch("epic-1")
    assert tip == base and on_remote(bare, "epic/epic-1") == base
    other = side_commit(b.repo, tip, {"elsewhere": "x\n"}, "not the start")
    assert epics_b.ensure_integration_branch("epic-1", at=other) == base  # adopted
    assert sha(b.repo, "refs/heads/epic/epic-1") == base

    moved = side_commit(b.repo, base or "", {"e.txt": "epic\n"}, "story in epic")
    assert epics_b.reset_integration("epic-1", base or "", moved) is True
    assert on_remote(bare, "epic/epic-1") == moved
    stale = side_commit(a.repo, base or "", {"e.txt": "late\n"}, "stale")
    assert epics_a.reset_integration("epic-1", base or "", stale) is False
    assert sha(a.repo, "refs/heads/epic/epic-1") == moved
    assert epics_a.integration_tip("epic-1") == moved

    # A story of the epic merges into the integration branch by the same remote CAS.
    worktrees = Worktrees(a.repo, "main", remote=a).on_branch("epic/epic-1")
    assert worktrees.remote is a
    commit(worktrees.ensure("s9"), {"s9.txt": "nine\n"}, "s9")
    worktrees.push("s9")
    merges = MergeWorkspaces(b.repo, "main", remote=b).on_branch("epic/epic-1")
    result = merges.squash_merge("s9", "Story s9")
    assert result.base_sha == moved and result.commit_sha is not None
    assert merges.advance_base(result.base_sha, result.commit_sha)
    assert on_remote(bare, "epic/epic-1") == result.commit_sha
    assert on_remote(bare, "main") == base


def test_a_remote_for_another_repository_is_refused(a: GitRemote, b: GitRemote) -> None:
    with pytest.raises(ValueError):
        Worktrees(a.repo, "main", remote=b)
    with pytest.raises(GitError):
        a.push_branch("no-such-branch")
