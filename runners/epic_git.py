"""The git side of an epic: its integration branch, scratch candidates, union gates, landing.

An epic's stories merge (squash, CAS) into ``refs/heads/epic/<id>``; each landed story is one
first-parent commit there. This module gives the epic runner the primitives around that
branch; it keeps no state of its own beyond the repository (the runner records events):

- :meth:`EpicGit.ensure_integration_branch`, :meth:`~EpicGit.integration_tip`,
  :meth:`~EpicGit.squash_commits`: the branch and the story commits on it.
- :meth:`EpicGit.build_candidate` / :meth:`~EpicGit.checkout_scratch`: a detached scratch
  worktree at a commit, optionally with a subset of the story commits cherry-picked on top
  (blame probes such as leave-one-out, or the rebuild of the branch from the clean stories).
- :meth:`EpicGit.run_union_gates`: the ``[epic] union_gates`` in such a worktree, tracked by a
  pid file so a gate a crashed runner left running is killed by the next run.
- :meth:`EpicGit.reset_integration`: compare-and-swap of the integration branch (it may move
  backwards: a rebuild from the clean stories drops the implicated ones).
- :meth:`EpicGit.squash_for_landing`, :meth:`~EpicGit.rebase_landing`,
  :meth:`~EpicGit.finish_landing_resolution`, :meth:`~EpicGit.advance_base`: the epic's
  changes since its fork point as one commit on the current base tip, in a merge workspace
  that works like a story's (:class:`~runners.merge_workspace.MergeWorkspaces`), then the
  same CAS of the base branch.
- :meth:`EpicGit.remove_scratch`: every worktree of the epic, gone.

Layout: ``<repo>/.storyline/epics/<epic>/scratch/<name>`` (candidates) and
``<repo>/.storyline/epics/<epic>/land`` (the landing workspace), excluded from the user's
``git status`` like the other storyline worktrees. Epic ids go through
:func:`domain.ids.validate_epic_id` and scratch names through
:func:`domain.ids.validate_story_id` before any path or ref is built from them.

With a remote (:class:`runners.remote.GitRemote`, scale-out) the integration branch lives on
the remote too: it is created there by compare-and-swap (an existing remote branch is adopted),
moved there first by :meth:`EpicGit.reset_integration` (the local branch follows), read from
it by :meth:`EpicGit.integration_tip`; the base branch is synced before it is read, and
landing is the same compare-and-swap push as a story's.

Restart safety: a scratch worktree found half-way through a git operation (a cherry-pick,
merge or rebase in progress) or unregistered, locked or broken is removed and created again;
a merely dirty one is hard-reset and cleaned, and rebuilt if it is still not clean.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from domain.config import GatesConfig
from domain.ids import integration_branch, validate_epic_id, validate_story_id
from runners.gates import GateRun, kill_leftover, run_gates
from runners.git_base import (
    GitError,
    WorkspaceSet,
    check_object_name,
    command_failed,
    create_worktree,
    probe_worktree,
    purge_worktree,
    remove_tree,
    repo_lock,
    run_git,
    worktrees_holding,
)
from runners.merge_workspace import (
    _PENDING_HEADS,
    _UNFINISHED_STATE,
    MergeWorkspaces,
    SquashResult,
)

if TYPE_CHECKING:
    from runners.remote import GitRemote

log = logging.getLogger(__name__)

LANDING = "land"
"""Name of an epic's landing workspace (``.storyline/epics/<epic>/land``)."""

_NULL_SHA = "0" * 40


@dataclass(frozen=True)
class Candidate:
    """A scratch build: ``onto`` plus some story commits, cherry-picked in order.

    ``ok``: every commit applied; ``commit``/``tree`` name the result, checked out at
    ``path``. Otherwise ``conflict_with`` is the commit that did not apply (``conflicts``
    its paths) and the worktree is back, clean, at ``onto``.
    """

    ok: bool
    commit: str | None
    tree: str | None
    conflict_with: str | None
    output: str
    path: Path
    conflicts: list[str] = field(default_factory=list)


class _EpicWorkspaces(MergeWorkspaces):
    """Detached worktrees under one directory of an epic.

    A :class:`MergeWorkspaces` so the landing workspace gets the story merge machinery as is
    (recorded start base, rebase after a lost CAS, checks of a mergemaster's resolution).
    """

    def prepare_at(self, name: str, commit: str) -> Path:
        """Return worktree ``name`` clean and detached at ``commit``, rebuilding if needed."""
        sid = validate_story_id(name)
        with self._story_lock(sid):
            return self._prepare_at(sid, commit)

    def pick_onto(self, name: str, onto: str, picks: list[str]) -> Candidate:
        """Cherry-pick ``picks`` in order onto ``onto`` in worktree ``name``."""
        sid = validate_story_id(name)
        with self._story_lock(sid):
            path = self._prepare_at(sid, onto)
            outputs: list[str] = []
            for sha in picks:
                args = ["cherry-pick", "--keep-redundant-commits"]
                if len(self._parents(sha)) > 1:
                    args += ["-m", "1"]  # a merge on the branch: its first-parent changes
                pick = self._git(path, *args, sha, check=False)
                outputs.append(pick.output.strip())
                if pick.returncode == 0:
                    continue
                conflicts = self._unmerged(path)
                self._git(path, "cherry-pick", "--abort", check=False)
                # Back to a clean `onto`, so the worktree is usable whatever comes next.
                self._git(path, "reset", "--hard", "--quiet", onto)
                self._git(path, "clean", "-ffdxq")
                text = "\n".join(o for o in outputs if o)
                if not conflicts:
                    raise GitError(
                        f"cherry-picking {sha} onto {onto} in {path} failed without a "
                        f"conflict: {text or '(no output)'}"
                    )
                return Candidate(False, None, None, sha, text, path, conflicts)
            commit, tree = self._git(path, "rev-parse", "HEAD", "HEAD^{tree}").stdout.split()
            return Candidate(True, commit, tree, None, "\n".join(o for o in outputs if o), path)

    def _prepare_at(self, sid: str, commit: str) -> Path:
        path = self.root / sid
        common = self._common_dir()
        probe = probe_worktree(path, common)
        if probe.problem is None and probe.admin_dir is not None:
            admin = probe.admin_dir
            halfway = [n for n in (*_UNFINISHED_STATE, *_PENDING_HEADS) if (admin / n).exists()]
            if halfway:
                log.warning("rebuilding scratch worktree %s left in %s", path, halfway)
            else:
                try:
                    self._clean_to(path, admin, commit)
                    return path
                except GitError as exc:
                    log.warning("rebuilding scratch worktree %s: %s", path, exc)
        elif probe.exists:
            log.warning("rebuilding scratch worktree %s: %s", path, probe.problem)
        create_worktree(self.repo, common, path, ["--detach", str(path), commit])
        return path

    def _parents(self, sha: str) -> list[str]:
        return run_git(["rev-list", "--parents", "-n", "1", sha], self.repo).stdout.split()[1:]

    def squash_range(
        self, name: str, fork_point: str, tip: str, branch: str, message: str
    ) -> SquashResult:
        """Squash ``fork_point..tip`` onto the current base tip in workspace ``name``.

        The result's outcomes mean what :meth:`MergeWorkspaces.squash_merge`'s do.
        """
        sid = validate_story_id(name)
        with self._story_lock(sid):
            path = self._prepare(sid)
            base_sha = self._git(path, "rev-parse", "HEAD").stdout.strip()
            self._write_base(path, base_sha)
            ahead = run_git(["rev-list", "--count", f"{fork_point}..{tip}"], self.repo)
            if ahead.stdout.strip() == "0":
                return SquashResult(
                    "no_commits", base_sha, output=f"{branch} has no commits since {fork_point}"
                )
            # A commit whose tree is the epic's and whose parent is the fork point: picking it
            # is a three-way merge with the fork point as base, i.e. exactly the epic's own
            # changes, whatever the base or the branch did in between.
            squashed = run_git(
                ["commit-tree", f"{tip}^{{tree}}", "-p", fork_point, "-F", "-"],
                self.repo,
                input_text=message,
            ).stdout.strip()
            pick = self._git(path, "cherry-pick", "--no-commit", squashed, check=False)
            if pick.returncode != 0:
                return self._stopped(path, pick, base_sha, restore=base_sha)
            return self._commit_staged(path, base_sha, pick, ["-F", "-"], message)


class EpicGit(WorkspaceSet):
    """Git primitives of the epics of one repository (see the module docstring)."""

    default_subdir = "epics"

    def __init__(
        self,
        repo: Path,
        base_branch: str,
        root: Path | None = None,
        remote: GitRemote | None = None,
    ) -> None:
        super().__init__(repo, base_branch, root, remote)
        self._base = MergeWorkspaces(self.repo, self.base_branch, remote=remote)
        self._sets: dict[tuple[str, str], _EpicWorkspaces] = {}
        self._sets_guard = threading.Lock()

    # ---------------------------------------------------------------- integration branch

    def epic_dir(self, epic_id: str) -> Path:
        return self.root / validate_epic_id(epic_id)

    def path_for(self, story_id: str) -> Path:
        # The inherited meaning (a story's directory) has no place here: one per epic.
        return self.epic_dir(story_id)

    def integration_ref(self, epic_id: str) -> str:
        return f"refs/heads/{integration_branch(epic_id)}"

    def ensure_integration_branch(self, epic_id: str, at: str | None = None) -> str:
        """Create ``epic/<id>`` at ``at`` (default: the base tip) unless it exists; return
        its tip. Idempotent: an existing branch is left where it is.

        With a remote, the remote decides: a branch it has is adopted (the local one made
        equal); otherwise the branch (the local one if this clone has it, else a new one) is
        created on the remote by compare-and-swap from "no branch", and a concurrent creator
        that got there first is adopted instead. The remote is written before the local ref,
        so a crash in between is repaired by the next call.
        """
        if self.remote is not None:
            return self._ensure_remote_integration(epic_id, at)
        ref = self.integration_ref(epic_id)
        existing = self._ref_sha(ref)
        if existing is not None:
            return existing
        start = self._base_tip() if at is None else self._commit(at, "at")
        # The all-zero old value makes the creation a CAS: a concurrent creator wins cleanly.
        made = run_git(
            ["update-ref", "-m", f"storyline: create {ref}", ref, start, _NULL_SHA],
            self.repo,
            check=False,
        )
        if made.returncode != 0:
            existing = self._ref_sha(ref)
            if existing is None:
                raise command_failed(made, self.repo, f"creating {integration_branch(epic_id)}")
            return existing
        return start

    def integration_tip(self, epic_id: str) -> str | None:
        if self.remote is not None:
            self.remote.sync_branch(integration_branch(epic_id))
        return self._ref_sha(self.integration_ref(epic_id))

    def fork_point(self, epic_id: str) -> str:
        """Where the integration branch left the base branch (their merge base)."""
        tip = self._require_tip(epic_id)
        self.sync_base()
        res = run_git(["merge-base", self._base_tip(), tip], self.repo, check=False)
        if res.returncode != 0:
            raise GitError(
                f"{integration_branch(epic_id)} shares no history with {self.base_branch}"
            )
        return res.stdout.strip()

    def squash_commits(self, epic_id: str, since: str) -> list[str]:
        """First-parent commits on ``epic/<id>`` after ``since``, oldest first.

        Each is one landed story (stories merge into the branch as squash commits).
        """
        tip = self._require_tip(epic_id)
        since = self._commit(since, "since")
        self._require_ancestor(since, tip, f"{since} is not on {integration_branch(epic_id)}")
        out = run_git(
            ["rev-list", "--first-parent", "--reverse", f"{since}..{tip}"], self.repo
        ).stdout
        return out.split()

    def reset_integration(self, epic_id: str, expected_old: str, new_sha: str) -> bool:
        """Move ``epic/<id>`` from ``expected_old`` to ``new_sha``; False if it was elsewhere.

        Unlike the base branch, the integration branch may move backwards: rebuilding it from
        the clean stories drops the implicated ones on purpose.

        With a remote the compare-and-swap is a push to the remote (``expected_old`` as the
        lease); the local branch then follows the remote (the winner's tip on False).
        """
        ref = self.integration_ref(epic_id)
        check_object_name(expected_old, "expected_old")
        new_sha = self._commit(new_sha, "new_sha")
        if self.remote is not None:
            with repo_lock(self._common_dir(), "base"):
                self._refuse_checked_out(epic_id)
                return self.remote.push_cas(
                    integration_branch(epic_id), expected_old, new_sha, follow=True
                )
        with repo_lock(self._common_dir(), "base"):
            if self._ref_sha(ref) != expected_old:
                return False
            if new_sha == expected_old:
                return True
            self._refuse_checked_out(epic_id)
            cas = run_git(
                ["update-ref", "-m", f"storyline: rebuild {ref}", ref, new_sha, expected_old],
                self.repo,
                check=False,
            )
            if cas.returncode == 0:
                return True
            if self._ref_sha(ref) != expected_old:
                return False
            raise command_failed(cas, self.repo, f"moving {integration_branch(epic_id)}")

    # ------------------------------------------------------------------------- scratch

    def scratch_path(self, epic_id: str, name: str) -> Path:
        return self._scratch(epic_id).path_for(name)

    def checkout_scratch(self, epic_id: str, name: str, commit: str) -> Path:
        """A clean detached scratch worktree at ``commit``."""
        scratch = self._scratch(epic_id)
        return scratch.prepare_at(name, self._commit(commit, "commit"))

    def build_candidate(self, epic_id: str, name: str, onto: str, commits: list[str]) -> Candidate:
        """Cherry-pick ``commits`` in order onto ``onto`` in scratch worktree ``name``."""
        scratch = self._scratch(epic_id)
        onto = self._commit(onto, "onto")
        picks = [self._commit(c, "a candidate commit") for c in commits]
        return scratch.pick_onto(name, onto, picks)

    def run_union_gates(self, gates: GatesConfig, path: Path, epic_id: str) -> GateRun:
        """Run the union gates in ``path`` (a scratch worktree of the epic)."""
        return run_gates(
            gates.commands,
            path,
            timeout_secs=gates.timeout_secs,
            pidfile=self.union_gate_pidfile(epic_id),
        )

    def union_gate_pidfile(self, epic_id: str) -> Path:
        return self.repo / ".storyline" / "run" / f"union-gate-{validate_epic_id(epic_id)}.pid"

    def kill_leftover_union_gate(self, epic_id: str) -> bool:
        """Kill a union gate a crashed runner left running (run_union_gates does it too)."""
        return kill_leftover(self.union_gate_pidfile(epic_id))

    def remove_scratch(self, epic_id: str) -> None:
        """Remove every scratch and landing worktree of the epic, with its registration."""
        top = self.epic_dir(epic_id)
        common = self._common_dir()
        with repo_lock(common):
            paths = {p for p in (top / "scratch").glob("*")} | {top / LANDING}
            paths |= self._registered_under(common, top)
            for path in sorted(paths):
                purge_worktree(path, common)
            remove_tree(top)

    # ------------------------------------------------------------------------- landing

    def landing_path(self, epic_id: str) -> Path:
        return self._landing(epic_id).path_for(LANDING)

    def squash_for_landing(
        self, epic_id: str, fork_point: str, message: str, *, tip: str | None = None
    ) -> SquashResult:
        """The epic's changes since ``fork_point`` as one commit on the current base tip.

        ``tip``: the integration commit to land (default: the branch's tip); it must be on
        the integration branch. An evaluated epic lands its best integration, which need
        not be the tip.

        Outcomes as for a story's squash merge: "merged" (``commit_sha`` on ``base_sha``,
        not yet on the base; run the merge gates in :meth:`landing_path`, then
        :meth:`advance_base`), "conflict" (the landing workspace is left conflicted, paths
        in ``conflicts``), "no_commits", "other".
        """
        if not message.strip():
            raise ValueError("a squash commit needs a non-empty message")
        branch_tip = self._require_tip(epic_id)
        if tip is None:
            tip = branch_tip
        else:
            tip = self._commit(tip, "tip")
            self._require_ancestor(
                tip, branch_tip, f"{tip} is not on {integration_branch(epic_id)}"
            )
        fork_point = self._commit(fork_point, "fork_point")
        branch = integration_branch(epic_id)
        self._require_ancestor(fork_point, tip, f"{fork_point} is not on {branch}")
        return self._landing(epic_id).squash_range(LANDING, fork_point, tip, branch, message)

    def rebase_landing(self, epic_id: str) -> SquashResult:
        """Re-apply the landing commit onto the current base tip (after a lost CAS)."""
        return self._landing(epic_id).rebase_onto_base(LANDING)

    def finish_landing_resolution(self, epic_id: str, message: str | None = None) -> str:
        """Check a mergemaster's resolution in the landing workspace; return its commit."""
        return self._landing(epic_id).finish_resolution(LANDING, message)

    def landing_started_base(self, epic_id: str) -> str | None:
        return self._landing(epic_id).started_base(LANDING)

    def landed_commit(self, epic_id: str) -> str | None:
        """The landing workspace's commit if it already reached the base branch.

        After a crash between the CAS and recording it, this tells the runner that the epic
        landed (so it is not squashed onto the base a second time).
        """
        landing = self._landing(epic_id)
        base = landing.started_base(LANDING)
        if base is None:
            return None
        try:
            head = landing.head(LANDING)
        except GitError:
            return None
        if head == base:
            return None
        self.sync_base()
        reached = run_git(
            ["merge-base", "--is-ancestor", head, self._base_tip()], self.repo, check=False
        )
        return head if reached.returncode == 0 else None

    def advance_base(self, expected_old: str, new_sha: str) -> bool:
        """Compare-and-swap of the base branch; see :meth:`MergeWorkspaces.advance_base`."""
        return self._base.advance_base(expected_old, new_sha)

    # ------------------------------------------------------------------------- private

    def _ensure_remote_integration(self, epic_id: str, at: str | None) -> str:
        assert self.remote is not None
        branch = integration_branch(epic_id)
        if at is not None:
            at = self._commit(at, "at")
        with repo_lock(self._common_dir(), "base"):
            adopted = self.remote.sync_branches(branch, self.base_branch)[branch]
            if adopted is not None:
                return adopted
            start = self._ref_sha(self.integration_ref(epic_id))
            if start is None:
                start = self._base_tip() if at is None else at
            self.remote.push_cas(branch, None, start, follow=True)
            tip = self.remote.remote_sha(branch)
            if tip is None:  # pragma: no cover - push_cas True or False leaves it there
                raise GitError(f"{branch} is still missing on {self.remote.url}")
            return tip

    def _refuse_checked_out(self, epic_id: str) -> None:
        holders = worktrees_holding(self.repo, self.integration_ref(epic_id))
        if holders:
            # update-ref would leave that checkout's index at the old commit.
            raise GitError(
                f"{integration_branch(epic_id)} is checked out at {holders[0]}; storyline "
                "will not move a branch under someone's checkout"
            )

    def _scratch(self, epic_id: str) -> _EpicWorkspaces:
        return self._set(epic_id, "scratch")

    def _landing(self, epic_id: str) -> _EpicWorkspaces:
        return self._set(epic_id, "")

    def _set(self, epic_id: str, sub: str) -> _EpicWorkspaces:
        eid = validate_epic_id(epic_id)
        with self._sets_guard:
            found = self._sets.get((eid, sub))
            if found is None:
                root = self.root / eid / sub if sub else self.root / eid
                found = _EpicWorkspaces(self.repo, self.base_branch, root, self.remote)
                self._sets[(eid, sub)] = found
            return found

    def _require_tip(self, epic_id: str) -> str:
        tip = self.integration_tip(epic_id)
        if tip is None:
            raise GitError(f"{integration_branch(epic_id)} does not exist in {self.repo}")
        return tip

    def _commit(self, sha: str, what: str) -> str:
        check_object_name(sha, what)
        if self._ref_sha(sha) != sha:
            raise GitError(f"{what} {sha} is not a commit in {self.repo}")
        return sha

    def _require_ancestor(self, old: str, new: str, message: str) -> None:
        res = run_git(["merge-base", "--is-ancestor", old, new], self.repo, check=False)
        if res.returncode == 1:
            raise GitError(message)
        if res.returncode != 0:
            raise command_failed(res, self.repo)

    @staticmethod
    def _registered_under(common: Path, top: Path) -> set[Path]:
        # Registrations whose directory is already gone (a crash mid-removal) still name it.
        found: set[Path] = set()
        try:
            admins = list((common / "worktrees").iterdir())
        except FileNotFoundError:
            return found
        for admin in admins:
            try:
                text = (admin / "gitdir").read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                continue
            dotgit = Path(text)
            if dotgit.name == ".git" and dotgit.parent.is_relative_to(top):
                found.add(dotgit.parent)
        return found
