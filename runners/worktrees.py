"""Per-story git worktrees where coding agents work.

A story ``<id>`` gets the directory ``<repo>/.storyline/worktrees/<id>`` with the branch
``feature/story-<id>`` checked out, created from the base branch. Story ids are validated
with :func:`domain.ids.validate_story_id` before git or the filesystem is touched.

API::

    Worktrees(repo: Path, base_branch: str, root: Path | None = None,
              remote: GitRemote | None = None)
        .path_for(story_id: str) -> Path
        .ensure(story_id: str) -> Path
        .ensure_many(story_ids: Iterable[str], parallelism: int) -> dict[str, Path | GitError]
        .remove(story_id: str, delete_branch: bool = False) -> None
        .status(story_id: str) -> WorktreeStatus
        .adopt(story_id: str) -> None           # the remote's feature branch wins
        .push(story_id: str) -> str             # feature branch to the remote (lease)

With a ``remote`` (:class:`runners.remote.GitRemote`, scale-out): a story whose feature
branch is not in this clone starts from the remote's feature branch if there is one (another
worker coded it), else from the remote's base tip; :meth:`Worktrees.push` pushes the branch
with a lease (:class:`runners.remote.RemoteMoved` if another worker pushed it since).

    WorktreeStatus(dirty: bool, dirty_paths: list[str], commits_ahead: int, head: str)

Crash safety: a worktree is created with ``git worktree add --no-checkout --lock`` (a
lock that says "storyline: initializing"), populated with ``git reset --hard`` and only then
unlocked. Whatever a crash leaves behind (a directory without a ``.git`` file, a registration
whose directory is gone, a worktree still locked, one on the wrong branch, metadata whose
pointers disagree) is not a usable worktree, so :meth:`Worktrees.ensure` removes it together
with its own registration and creates it again. The feature branch and its commits are kept:
a previous attempt's work lives on the branch, not in the directory.

Concurrency: only the registration step (``git worktree add --no-checkout``, and removal of
an entry) runs under a per-repository lock (thread lock plus ``flock``), because git picks
admin directory names under ``.git/worktrees`` racily; the checkout itself runs in parallel.
Operations on one story are serialised within a process; two processes must not drive the
same story at once (the runners' event log ensures that).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from domain.ids import feature_branch, validate_story_id
from runners.git_base import (
    GitError,
    WorkspaceSet,
    create_worktree,
    parse_status_z,
    probe_worktree,
    purge_worktree,
    repo_lock,
    run_git,
)

log = logging.getLogger(__name__)

# Locks git takes per worktree for the length of one command. ensure() runs before an agent
# is (re)started in the worktree, so a leftover one can only come from a killed process, and
# would make the agent's first `git commit` fail.
_STALE_WORKTREE_LOCKS = ("index.lock", "HEAD.lock")


@dataclass(frozen=True)
class WorktreeStatus:
    dirty: bool
    dirty_paths: list[str] = field(default_factory=list)
    commits_ahead: int = 0
    head: str = ""


class Worktrees(WorkspaceSet):
    """Creates, inspects and removes the coding worktrees of one repository."""

    default_subdir = "worktrees"

    # ----------------------------------------------------------------------------- public

    def ensure(self, story_id: str) -> Path:
        """Return the story's worktree, creating or repairing it as needed."""
        sid = validate_story_id(story_id)
        branch = feature_branch(sid)
        path = self.root / sid
        with self._story_lock(sid):
            common = self._common_dir()
            probe = probe_worktree(path, common)
            if probe.problem is None:
                if probe.head_ref == f"refs/heads/{branch}":
                    assert probe.admin_dir is not None
                    self._clear_stale_locks(sid, probe.admin_dir)
                    return path
                on = probe.head_ref or "a detached HEAD"
                problem = f"it has {on} checked out instead of {branch}"
            else:
                problem = probe.problem
            if probe.exists:
                log.warning("recreating worktree for story %s at %s: %s", sid, path, problem)
            if self.remote is not None and self._ref_sha(f"refs/heads/{branch}") is None:
                # A new branch here: from the remote's (another worker coded the story) if it
                # has one, else from the remote's base tip, not this clone's stale view.
                self.remote.sync_branches(self.base_branch, branch)
            if self._ref_sha(f"refs/heads/{branch}") is not None:
                # A previous attempt's branch: its commits are the story's work so far. The
                # short name (not refs/heads/...) makes git check the branch out instead of
                # detaching at its tip.
                target = [str(path), branch]
            else:
                target = ["-b", branch, "--no-track", str(path), self.base_ref]
            create_worktree(self.repo, common, path, target)
            return path

    def ensure_many(self, story_ids: Iterable[str], parallelism: int) -> dict[str, Path | GitError]:
        """Ensure several worktrees with at most ``parallelism`` at a time.

        Every id is validated first, so one hostile id refuses the whole call before any
        worktree is touched. A git failure for one story is returned in its slot and does
        not stop the others.
        """
        if parallelism < 1:
            raise ValueError(f"parallelism must be at least 1, got {parallelism}")
        ids = list(dict.fromkeys(validate_story_id(s) for s in story_ids))
        results: dict[str, Path | GitError] = {}
        if not ids:
            return results
        workers = min(parallelism, len(ids))
        with ThreadPoolExecutor(workers, thread_name_prefix="storyline-worktree") as pool:
            futures = {sid: pool.submit(self.ensure, sid) for sid in ids}
            for sid, future in futures.items():
                try:
                    results[sid] = future.result()
                except GitError as exc:
                    results[sid] = exc
                except OSError as exc:
                    results[sid] = GitError(f"creating the worktree of story {sid!r}: {exc}")
        return results

    def remove(self, story_id: str, delete_branch: bool = False) -> None:
        """Delete the story's worktree (uncommitted changes included). Missing is fine."""
        sid = validate_story_id(story_id)
        branch = feature_branch(sid)
        path = self.root / sid
        with self._story_lock(sid):
            common = self._common_dir()
            with repo_lock(common):
                purge_worktree(path, common)
            if delete_branch and self._ref_sha(f"refs/heads/{branch}") is not None:
                run_git(["branch", "-D", branch], self.repo)

    def adopt(self, story_id: str) -> None:
        """Take over a story another worker (or an earlier run) coded: the worktree is
        removed (uncommitted changes included) and, with a remote, the local feature branch
        made the remote's (deleted when the remote has none). Without a remote only the
        worktree goes."""
        sid = validate_story_id(story_id)
        branch = feature_branch(sid)
        path = self.root / sid
        with self._story_lock(sid):
            common = self._common_dir()
            with repo_lock(common):
                purge_worktree(path, common)
            if self.remote is not None:
                self.remote.adopt_branch(branch)

    def push(self, story_id: str) -> str:
        """Push the story's feature branch to the remote with a lease on the remote tip this
        clone last saw; returns the pushed sha (RemoteMoved: another worker pushed since).
        Without a remote: the local branch tip."""
        sid = validate_story_id(story_id)
        branch = feature_branch(sid)
        with self._story_lock(sid):
            if self.remote is not None:
                return self.remote.push_branch(branch)
            sha = self._ref_sha(f"refs/heads/{branch}")
            if sha is None:
                raise GitError(f"branch {branch} does not exist in {self.repo}")
            return sha

    def status(self, story_id: str) -> WorktreeStatus:
        sid = validate_story_id(story_id)
        branch = feature_branch(sid)
        path = self.root / sid
        probe = probe_worktree(path, self._common_dir())
        if probe.problem is not None:
            raise GitError(f"story {sid!r} has no usable worktree at {path}: {probe.problem}")
        # Read-only: without this, `git status` refreshes the index under index.lock and can
        # make an agent's concurrent `git add` fail.
        env = {"GIT_OPTIONAL_LOCKS": "0"}
        out = run_git(
            ["status", "--porcelain=v1", "-z", "--untracked-files=all"],
            path,
            ceiling=path.parent,
            env=env,
        ).stdout
        dirty_paths = parse_status_z(out)
        ahead = run_git(
            ["rev-list", "--count", f"{self.base_ref}..refs/heads/{branch}"],
            self.repo,
        ).stdout.strip()
        head = run_git(["rev-parse", "HEAD"], path, ceiling=path.parent).stdout.strip()
        return WorktreeStatus(
            dirty=bool(dirty_paths),
            dirty_paths=dirty_paths,
            commits_ahead=int(ahead),
            head=head,
        )

    # ---------------------------------------------------------------------------- private

    def _clear_stale_locks(self, sid: str, admin: Path) -> None:
        for name in _STALE_WORKTREE_LOCKS:
            lock = admin / name
            if lock.exists():
                log.warning("story %s: removing stale %s left by a killed git", sid, lock)
                lock.unlink(missing_ok=True)
