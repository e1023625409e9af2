"""Merge workspaces: where a story's feature branch is squash-merged onto the base branch.

Each story gets its own detached worktree, ``<repo>/.storyline/merge/<id>``, so a story whose
merge stopped on conflicts keeps its workspace (a mergemaster agent resolves there) while
other stories keep merging in theirs. The base branch only moves through
:meth:`MergeWorkspaces.advance_base`, a compare-and-swap that never drops a commit.

API::

    MergeWorkspaces(repo: Path, base_branch: str, root: Path | None = None,
                    remote: GitRemote | None = None)
        .path_for(story_id: str) -> Path
        .prepare(story_id: str) -> Path              # clean, detached at the base tip
        .reset(story_id: str) -> Path                # same, for crash recovery call sites
        .squash_merge(story_id: str, message: str) -> SquashResult
        .started_base(story_id: str) -> str | None   # base sha the last merge started from
        .finish_resolution(story_id: str) -> str     # checks a mergemaster's commit
        .advance_base(expected_old: str, new_sha: str) -> bool
        .rebase_onto_base(story_id: str) -> SquashResult
        .head(story_id: str) -> str
        .remove(story_id: str) -> None

    SquashResult(outcome: "merged" | "conflict" | "no_commits" | "other", base_sha: str,
                 commit_sha: str | None, conflicts: list[str], conflict_lines: list[str],
                 output: str)

Typical flow: ``squash_merge`` -> run the merge gates in ``path_for(story)`` -> ``advance_base
(result.base_sha, result.commit_sha)``; when that returns False someone moved the base, so
``rebase_onto_base`` and try again. On "conflict" the workspace is left conflicted; after the
mergemaster committed, ``finish_resolution`` returns the commit to gate and advance to, with
``started_base`` as the expected old base.

The base sha a merge started from is kept in ``storyline-merge-base`` inside the workspace's
own git admin directory, so it survives a restart and disappears with the workspace.
All commits are made as ``storyline <storyline@localhost>`` with hooks and signing off.

With a ``remote`` (:class:`runners.remote.GitRemote`, scale-out) the remote's base branch is
the one that counts: a workspace prepared at the base tip (and a rebase onto it) first syncs
the local base from the remote, a squash merge first makes the local feature branch the
remote's (the pushed commit is what lands), and :meth:`MergeWorkspaces.advance_base` is a
compare-and-swap push to the remote before the local branch follows. The remote base only
ever moves from the commit a merge was built and gated on; a second or stale merger gets
False, never a lost commit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from domain.ids import feature_branch, validate_story_id
from runners.git_base import (
    GitError,
    GitResult,
    WorkspaceSet,
    check_object_name,
    command_failed,
    create_worktree,
    parse_status_z,
    probe_worktree,
    purge_worktree,
    repo_lock,
    run_git,
    worktrees_holding,
)

log = logging.getLogger(__name__)

MergeOutcome = Literal["merged", "conflict", "no_commits", "other"]

_BASE_FILE = "storyline-merge-base"
# Any of these in a workspace's admin dir means git is half-way through something; cheaper
# and safer to rebuild the workspace than to unwind each kind.
_UNFINISHED_STATE = ("rebase-merge", "rebase-apply", "sequencer", "BISECT_START")
_PENDING_HEADS = ("MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD")


def _is_block_marker(line: str) -> bool:
    head, rest = line[:7], line[7:]
    return head in ("<<<<<<<", ">>>>>>>") and (not rest or rest[0] in " \t")


@dataclass(frozen=True)
class SquashResult:
    outcome: MergeOutcome
    base_sha: str
    commit_sha: str | None = None
    conflicts: list[str] = field(default_factory=list)
    conflict_lines: list[str] = field(default_factory=list)
    output: str = ""


class MergeWorkspaces(WorkspaceSet):
    """Squash-merges stories in per-story workspaces and advances the base branch."""

    default_subdir = "merge"

    # ----------------------------------------------------------------------- workspaces

    def prepare(self, story_id: str) -> Path:
        """Return the story's workspace, clean and detached at the current base tip.

        Any earlier state is discarded: an interrupted merge, conflict markers, untracked
        or ignored files, a missing directory, a stale registration.
        """
        sid = validate_story_id(story_id)
        with self._story_lock(sid):
            return self._prepare(sid)

    def reset(self, story_id: str) -> Path:
        """Discard whatever a crashed merge or mergemaster left; same result as prepare()."""
        return self.prepare(story_id)

    def remove(self, story_id: str) -> None:
        """Delete the workspace and its registration. Missing is fine."""
        sid = validate_story_id(story_id)
        with self._story_lock(sid):
            common = self._common_dir()
            with repo_lock(common):
                purge_worktree(self.root / sid, common)

    def head(self, story_id: str) -> str:
        sid = validate_story_id(story_id)
        path, _admin = self._usable(sid)
        return self._git(path, "rev-parse", "HEAD").stdout.strip()

    def started_base(self, story_id: str) -> str | None:
        """The base sha the story's last squash merge (or rebase) started from."""
        sid = validate_story_id(story_id)
        probe = probe_worktree(self.root / sid, self._common_dir())
        if probe.problem is not None or probe.admin_dir is None:
            return None
        return self._read_base(probe.admin_dir)

    # ---------------------------------------------------------------------------- merging

    def squash_merge(self, story_id: str, message: str, onto: str | None = None) -> SquashResult:
        """Squash ``feature/story-<id>`` onto the current base tip in the story's workspace
        (or onto the commit ``onto``: the speculative merge queue stacks a story on the
        squash commit of the story ahead of it, which is not on base yet).

        "merged": one new commit on top of ``base_sha`` (``commit_sha``), not yet on base.
        "conflict": the workspace is left conflicted for a mergemaster.
        "no_commits": the branch brings nothing base lacks; nothing is committed.
        "other": git failed for another reason (``output`` says why); workspace is clean.
        """
        sid = validate_story_id(story_id)
        branch = feature_branch(sid)
        if not message.strip():
            raise ValueError("a squash commit needs a non-empty message")
        if onto is not None:
            check_object_name(onto, "onto")
        with self._story_lock(sid):
            if self.remote is not None:
                # The pushed branch is what the worker gated and what lands, whatever this
                # clone had locally.
                self.remote.sync_branch(branch)
            path = self._prepare(sid, onto)
            base_sha = self._git(path, "rev-parse", "HEAD").stdout.strip()
            self._write_base(path, base_sha)
            branch_sha = self._ref_sha(f"refs/heads/{branch}")
            if branch_sha is None:
                return SquashResult("other", base_sha, output=f"branch {branch} does not exist")
            ahead = run_git(
                ["rev-list", "--count", f"{base_sha}..{branch_sha}"], self.repo
            ).stdout.strip()
            if ahead == "0":
                return SquashResult(
                    "no_commits",
                    base_sha,
                    output=f"{branch} has no commits that {self.base_branch} lacks",
                )
            # The sha, not the name: an agent still committing on the branch cannot change what
            # was counted as ahead above.
            merge = self._git(path, "merge", "--squash", "--no-stat", branch_sha, check=False)
            if merge.returncode != 0:
                return self._stopped(path, merge, base_sha, restore=base_sha)
            return self._commit_staged(path, base_sha, merge, ["-F", "-"], message)

    def rebase_onto_base(self, story_id: str) -> SquashResult:
        """Re-apply the workspace's merge commit onto the current base tip (cherry-pick).

        For when :meth:`advance_base` returned False because the base moved after the merge
        started. The workspace must hold exactly one commit on top of :meth:`started_base`,
        as after a "merged" squash or a finished resolution.
        """
        sid = validate_story_id(story_id)
        with self._story_lock(sid):
            path, admin = self._usable(sid)
            old_base = self._read_base(admin)
            if old_base is None:
                raise GitError(f"no merge was started in the workspace of story {sid!r}")
            commit = self._check_one_commit(path, admin, old_base)
            self.sync_base()
            tip = self._base_tip()
            if tip == old_base:
                return SquashResult(
                    "merged", old_base, commit, output=f"{self.base_branch} has not moved"
                )
            self._git(path, "reset", "--hard", "--quiet", tip)
            self._write_base(path, tip)
            pick = self._git(path, "cherry-pick", "--no-commit", commit, check=False)
            if pick.returncode != 0:
                result = self._stopped(path, pick, tip, restore=commit)
                if result.outcome == "other":
                    # Back to where we were, so a retry or a person can pick it up again.
                    self._write_base(path, old_base)
                    return SquashResult("other", old_base, commit, output=result.output)
                return result
            return self._commit_staged(path, tip, pick, ["-C", commit], None)

    def finish_resolution(self, story_id: str, message: str | None = None) -> str:
        """Check a mergemaster's work in the conflicted workspace and return its commit.

        Accepted only when nothing is unmerged or uncommitted, no git operation is in
        progress, no conflict marker was committed, and HEAD is exactly one non-empty commit
        whose parent is the recorded start base. With ``message`` the commit is reworded to
        it (the base then reads like any other squash merge; the author stays the agent).
        """
        sid = validate_story_id(story_id)
        with self._story_lock(sid):
            path, admin = self._usable(sid)
            base = self._read_base(admin)
            if base is None:
                raise GitError(f"no merge was started in the workspace of story {sid!r}")
            head = self._check_one_commit(path, admin, base)
            if message is None:
                return head
            self._git(path, "commit", "--amend", "--quiet", "--no-verify", "-F", "-", stdin=message)
            return self._git(path, "rev-parse", "HEAD").stdout.strip()

    def advance_base(self, expected_old: str, new_sha: str) -> bool:
        """Move the base branch from ``expected_old`` to ``new_sha``; False if it had moved.

        ``new_sha`` must descend from ``expected_old`` (a fast-forward), so no commit on the
        base can be lost. Where the base branch is checked out (usually the user's main
        checkout) it is moved with ``git merge --ff-only`` there, which updates that
        checkout's files and index along with the branch and carries over local changes that
        do not touch the merged files. A bare ``update-ref`` is never used on a checked-out
        branch: it would leave that checkout's index at the old commit, showing the merge
        reversed as staged changes. When local changes do overlap, GitError says so and the
        base stays put. Elsewhere ``git update-ref <ref> <new> <old>`` is an atomic CAS.

        With a remote the CAS is a push to the remote (``--force-with-lease`` on
        ``expected_old``, after the fast-forward check here); on False the local base is
        synced to the remote's, on True it follows to ``new_sha``.
        """
        check_object_name(expected_old, "expected_old")
        check_object_name(new_sha, "new_sha")
        if self._ref_sha(new_sha) != new_sha:
            raise GitError(f"commit {new_sha} does not exist in {self.repo}")
        common = self._common_dir()
        if self.remote is not None:
            with repo_lock(common, "base"):
                return self._advance_remote(expected_old, new_sha)
        with repo_lock(common, "base"):
            if self._base_tip() != expected_old:
                return False
            if new_sha == expected_old:
                return True
            self._require_fast_forward(expected_old, new_sha)
            holders = worktrees_holding(self.repo, self.base_ref)
            if not holders:
                cas = run_git(
                    [
                        "update-ref",
                        "-m",
                        f"storyline: advance {self.base_branch}",
                        self.base_ref,
                        new_sha,
                        expected_old,
                    ],
                    self.repo,
                    check=False,
                )
                if cas.returncode == 0:
                    return True
                if self._base_tip() != expected_old:
                    return False
                raise command_failed(cas, self.repo, f"advancing {self.base_branch}")
            checkout = holders[0]
            ff = run_git(
                ["merge", "--ff-only", "--no-stat", "--quiet", new_sha],
                checkout,
                check=False,
                ceiling=checkout.parent,
            )
            if ff.returncode == 0:
                return True
            if self._base_tip() != expected_old:
                return False
            dirty = self._tracked_changes(checkout)
            if dirty:
                raise GitError(
                    f"cannot advance {self.base_branch}: its checkout at {checkout} has local "
                    f"changes ({', '.join(dirty[:10])}) that the merge would overwrite or that "
                    f"block it; commit or stash them. git said: {ff.output.strip()}",
                    command=ff.args,
                    returncode=ff.returncode,
                    stderr=ff.stderr.strip(),
                )
            raise command_failed(ff, checkout, f"advancing {self.base_branch}")

    # ---------------------------------------------------------------------------- private

    def _advance_remote(self, expected_old: str, new_sha: str) -> bool:
        assert self.remote is not None
        if new_sha != expected_old:
            self._require_fast_forward(expected_old, new_sha)
        # The remote moves first, and only from expected_old; the local base then follows
        # whatever the remote holds (new_sha on a win, the winner's commit on a loss).
        return self.remote.push_cas(self.base_branch, expected_old, new_sha, follow=True)

    def _require_fast_forward(self, expected_old: str, new_sha: str) -> None:
        ancestor = run_git(
            ["merge-base", "--is-ancestor", expected_old, new_sha], self.repo, check=False
        )
        if ancestor.returncode == 1:
            raise GitError(
                f"refusing to move {self.base_branch} to {new_sha}: it does not descend from "
                f"{expected_old}, so commits on {self.base_branch} would be lost"
            )
        if ancestor.returncode != 0:
            raise command_failed(ancestor, self.repo)

    def _git(
        self, path: Path, *args: str, check: bool = True, stdin: str | None = None
    ) -> GitResult:
        return run_git(args, path, check=check, input_text=stdin, ceiling=path.parent)

    def _usable(self, sid: str) -> tuple[Path, Path]:
        path = self.root / sid
        probe = probe_worktree(path, self._common_dir())
        if probe.problem is not None or probe.admin_dir is None:
            raise GitError(
                f"story {sid!r} has no usable merge workspace at {path}: {probe.problem}"
            )
        return path, probe.admin_dir

    def _prepare(self, sid: str, onto: str | None = None) -> Path:
        path = self.root / sid
        if onto is None:
            self.sync_base()
        tip = self._base_tip() if onto is None else onto
        common = self._common_dir()
        probe = probe_worktree(path, common)
        if probe.problem is None and probe.admin_dir is not None:
            admin = probe.admin_dir
            unfinished = [n for n in _UNFINISHED_STATE if (admin / n).exists()]
            if unfinished:
                log.warning("story %s: rebuilding merge workspace left in %s", sid, unfinished)
            else:
                try:
                    self._clean_to(path, admin, tip)
                    return path
                except GitError as exc:
                    log.warning("story %s: rebuilding merge workspace: %s", sid, exc)
        elif probe.exists:
            log.warning("story %s: rebuilding merge workspace: %s", sid, probe.problem)
        create_worktree(self.repo, common, path, ["--detach", str(path), tip])
        return path

    def _clean_to(self, path: Path, admin: Path, tip: str) -> None:
        # --detach first so that no branch a mergemaster may have checked out gets moved.
        self._git(path, "checkout", "--quiet", "--detach", "--force", tip)
        self._git(path, "reset", "--hard", "--quiet", tip)
        self._git(path, "clean", "-ffdxq")
        (admin / _BASE_FILE).unlink(missing_ok=True)
        leftovers = [n for n in (*_PENDING_HEADS, *_UNFINISHED_STATE) if (admin / n).exists()]
        status = self._git(
            path, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--ignored"
        )
        head = self._git(path, "rev-parse", "HEAD").stdout.strip()
        if leftovers or status.stdout or head != tip:
            raise GitError(
                f"workspace {path} is still not clean after reset "
                f"(state: {leftovers}, status: {parse_status_z(status.stdout)[:5]})"
            )

    def _stopped(self, path: Path, res: GitResult, base_sha: str, restore: str) -> SquashResult:
        """Classify a merge or cherry-pick that exited non-zero."""
        output = res.output
        conflicts = self._unmerged(path)
        if conflicts:
            lines = [ln.strip() for ln in output.splitlines() if ln.startswith("CONFLICT")]
            return SquashResult(
                "conflict", base_sha, conflicts=conflicts, conflict_lines=lines, output=output
            )
        # Not a conflict (e.g. git refused outright): nothing for a mergemaster to resolve.
        self._git(path, "reset", "--hard", "--quiet", restore)
        self._git(path, "clean", "-ffdq")
        return SquashResult("other", base_sha, output=output)

    def _commit_staged(
        self,
        path: Path,
        base_sha: str,
        applied: GitResult,
        commit_args: list[str],
        message: str | None,
    ) -> SquashResult:
        staged = self._git(path, "diff", "--cached", "--quiet", check=False)
        if staged.returncode == 0:
            # The branch's changes are already on base: an empty squash is not a merge.
            self._git(path, "reset", "--hard", "--quiet", base_sha)
            return SquashResult(
                "no_commits",
                base_sha,
                output=(
                    applied.output + "\nnothing to commit: the changes are already on "
                    f"{self.base_branch}"
                ).strip(),
            )
        if staged.returncode != 1:
            raise command_failed(staged, path)
        commit = self._git(path, "commit", "--quiet", "--no-verify", *commit_args, stdin=message)
        sha = self._git(path, "rev-parse", "HEAD").stdout.strip()
        return SquashResult("merged", base_sha, sha, output=applied.output + commit.output)

    def _unmerged(self, path: Path) -> list[str]:
        out = self._git(path, "ls-files", "--unmerged", "-z").stdout
        paths: list[str] = []
        for rec in out.split("\0"):
            _, tab, name = rec.partition("\t")
            if tab and name not in paths:
                paths.append(name)
        return paths

    def _tracked_changes(self, path: Path) -> list[str]:
        out = run_git(
            ["status", "--porcelain=v1", "-z", "--untracked-files=no"],
            path,
            ceiling=path.parent,
            env={"GIT_OPTIONAL_LOCKS": "0"},
        ).stdout
        return parse_status_z(out)

    def _check_one_commit(self, path: Path, admin: Path, base: str) -> str:
        on = self._git(path, "symbolic-ref", "-q", "HEAD", check=False).stdout.strip()
        if on == self.base_ref:
            # The base may move only through advance_base's compare-and-swap.
            raise GitError(
                f"{self.base_branch} is checked out in {path}: the resolution must be committed "
                "on the detached HEAD the merge left, not on the base branch"
            )
        pending = [n for n in (*_PENDING_HEADS, *_UNFINISHED_STATE) if (admin / n).exists()]
        if pending:
            raise GitError(f"a git operation is still in progress in {path} ({', '.join(pending)})")
        unmerged = self._unmerged(path)
        if unmerged:
            raise GitError(f"unresolved conflicts remain in {path}: {', '.join(unmerged)}")
        status = self._git(path, "status", "--porcelain=v1", "-z", "--untracked-files=all")
        dirty = parse_status_z(status.stdout)
        if dirty:
            raise GitError(f"uncommitted changes remain in {path}: {', '.join(dirty[:20])}")
        parents = self._git(path, "rev-list", "--parents", "-n", "1", "HEAD").stdout.split()
        head, parent_shas = parents[0], parents[1:]
        if head == base:
            raise GitError(f"nothing was committed in {path} on top of the merge base {base}")
        if parent_shas != [base]:
            raise GitError(
                f"HEAD {head} in {path} must be exactly one commit on top of the merge base "
                f"{base}; its parents are {', '.join(parent_shas) or 'none'}"
            )
        markers = self._committed_markers(path, base)
        if markers:
            raise GitError(
                f"the commit in {path} still contains conflict markers: {', '.join(markers)}"
            )
        trees = self._git(path, "rev-parse", f"{base}^{{tree}}", "HEAD^{tree}").stdout.split()
        if len(trees) == 2 and trees[0] == trees[1]:
            raise GitError(f"the commit in {path} changes nothing compared with {base}")
        return head

    def _committed_markers(self, path: Path, base: str) -> list[str]:
        # `git diff --check` also flags bare "=======" lines (common in reStructuredText) as
        # markers; only lines that open or close a conflict block count here.
        res = self._git(path, "diff", "--check", "--no-color", base, "HEAD", check=False)
        suffix = ": leftover conflict marker"
        blobs: dict[str, list[str]] = {}
        found: list[str] = []
        for line in res.stdout.splitlines():
            if not line.endswith(suffix):
                continue
            name, _, number = line[: -len(suffix)].rpartition(":")
            if not number.isdigit():
                continue
            if name not in blobs:
                shown = self._git(path, "show", f"HEAD:{name}", check=False)
                blobs[name] = shown.stdout.splitlines() if shown.returncode == 0 else []
            lines = blobs[name]
            index = int(number) - 1
            if 0 <= index < len(lines) and _is_block_marker(lines[index]):
                found.append(f"{name}:{number}")
        return found

    def _write_base(self, path: Path, sha: str) -> None:
        admin = Path(self._git(path, "rev-parse", "--absolute-git-dir").stdout.strip())
        tmp = admin / f"{_BASE_FILE}.tmp"
        tmp.write_text(sha + "\n", encoding="ascii")
        # Atomic, so a kill mid-write leaves the old value rather than a torn sha.
        os.replace(tmp, admin / _BASE_FILE)

    @staticmethod
    def _read_base(admin: Path) -> str | None:
        try:
            sha = (admin / _BASE_FILE).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        try:
            return check_object_name(sha, "recorded merge base")
        except GitError:
            return None
