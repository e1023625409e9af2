"""A runner's clone and the shared git remote it was cloned from (scale-out, issue #18).

Several worker runners, each on its own machine with its own clone, share one remote (a bare
repository or any git URL). The remote is the truth for every branch storyline moves; a
clone's branches follow it:

- :meth:`GitRemote.sync_branch` / :meth:`~GitRemote.adopt_branch`: the local branch made
  equal to the remote's (a checked-out branch is moved with ``git reset --keep`` in its
  checkout, so its index and files follow instead of showing the change reversed).
- :meth:`GitRemote.push_branch`: a feature branch pushed with ``--force-with-lease`` against
  the remote sha this clone last saw; :class:`RemoteMoved` when another worker pushed since.
- :meth:`GitRemote.push_cas`: compare-and-swap of a remote branch (the base branch, an
  epic's integration branch): True when it moved, False when it was not at the expected
  commit. A refusal is never taken at git's word alone: after any failed push the branch is
  fetched, and the answer is what the remote now holds.

Every network command runs with a timeout and ``GIT_TERMINAL_PROMPT=0`` (from
:func:`runners.git_base.git_env`), so a URL that wants credentials fails instead of hanging.
Fetches, pushes and the local moves that follow them are serialised per clone (thread lock
plus ``flock``, :func:`runners.git_base.repo_lock` "remote"), so two threads can never move a
local branch backwards to an older remote view.

Lock order: "base" before "remote"; nothing here takes "base".
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from domain.ids import validate_branch_name
from runners.git_base import (
    GitError,
    GitResult,
    check_object_name,
    common_dir,
    remove_tree,
    repo_lock,
    run_git,
    worktrees_holding,
)

log = logging.getLogger(__name__)

NETWORK_TIMEOUT_SECS = 300.0
"""Longest a fetch, ls-remote or push may take."""
CLONE_TIMEOUT_SECS = 1800.0
"""Longest the first clone may take (a big repository over a slow link)."""

_NULL_SHA = "0" * 40
_LOCK = "remote"


class RemoteError(GitError):
    """The remote could not be reached or refused something, or a clone is not the one
    expected (another URL, not a repository)."""


class RemoteMoved(RemoteError):
    """A compare-and-swap push was refused: the remote ref is not what this clone expected
    (another worker pushed since this clone last looked)."""


def _check_url(url: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise RemoteError("a git remote URL must be a non-empty string")
    if url.startswith("-"):
        raise RemoteError(f"refusing a git remote URL that starts with '-': {url!r}")
    if any(ord(c) < 0x20 or c == "\x7f" for c in url):
        raise RemoteError(f"a git remote URL must not contain control characters: {url!r}")
    return url


def _check_remote_name(name: str) -> str:
    try:
        validate_branch_name(name)
    except ValueError as exc:
        raise RemoteError(f"not a valid git remote name: {name!r}") from exc
    if "/" in name:
        raise RemoteError(f"not a valid git remote name: {name!r}")
    return name


def _check_branch(branch: str) -> str:
    try:
        return validate_branch_name(branch)
    except ValueError as exc:
        raise GitError(str(exc)) from exc


def _local_path(url: str) -> Path | None:
    """The directory a URL names when it is a local path (or file://), else None."""
    if url.startswith("file://"):
        text = url[len("file://") :]
    elif "://" in url:
        return None
    elif ":" in url.split("/", 1)[0]:
        return None  # scp-like host:path
    else:
        text = url
    return Path(text).expanduser().resolve()


def same_url(configured: str, url: str) -> bool:
    """Whether a clone's configured remote URL is ``url`` (local paths compared resolved:
    git stores the absolute path of a relative one)."""
    if configured == url:
        return True
    a, b = _local_path(configured), _local_path(url)
    return a is not None and b is not None and a == b


def _detail(res: GitResult) -> str:
    text = (res.stderr.strip() or res.stdout.strip() or "(no output)").splitlines()
    return " / ".join(line.strip() for line in text[-6:] if line.strip())


class GitRemote:
    """A local clone (the runner's repository) and the shared remote it was cloned from."""

    timeout: float = NETWORK_TIMEOUT_SECS

    def __init__(self, repo: Path, url: str, name: str = "origin") -> None:
        self.repo = Path(repo).resolve()
        self.url = _check_url(url)
        self.name = _check_remote_name(name)
        self._common: Path | None = None

    def __repr__(self) -> str:
        return f"GitRemote(repo={str(self.repo)!r}, url={self.url!r}, name={self.name!r})"

    # ------------------------------------------------------------------------- the clone

    @classmethod
    def open_clone(cls, url: str, directory: Path, name: str = "origin") -> GitRemote:
        """Clone ``url`` into ``directory`` unless it already holds that clone.

        An existing, non-empty directory must be a git repository (its own top level) whose
        remote ``name`` has exactly this URL; anything else is a :class:`RemoteError` (a clone
        is never silently re-pointed). A failed clone raises :class:`RemoteError` naming the
        URL and leaves no half-made directory behind.
        """
        url = _check_url(url)
        name = _check_remote_name(name)
        directory = Path(directory).expanduser().absolute()
        if directory.exists() and not directory.is_dir():
            raise RemoteError(f"clone directory {directory} exists and is not a directory")
        if directory.is_dir() and any(directory.iterdir()):
            cls._check_existing(url, directory, name)
            return cls(directory, url, name)
        cls._clone(url, directory, name)
        return cls(directory, url, name)

    @staticmethod
    def _check_existing(url: str, directory: Path, name: str) -> None:
        top = run_git(
            ["rev-parse", "--show-toplevel"], directory, check=False, ceiling=directory.parent
        )
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != directory.resolve():
            raise RemoteError(
                f"clone directory {directory} is not empty and is not a git repository; "
                f"give an empty or missing directory to clone {url} into"
            )
        got = run_git(["config", "--get", f"remote.{name}.url"], directory, check=False)
        configured = got.stdout.strip()
        if got.returncode != 0 or not configured:
            raise RemoteError(
                f"the repository at {directory} has no remote {name!r}; it is not a clone of "
                f"{url} (storyline will not re-point it)"
            )
        if not same_url(configured, url):
            raise RemoteError(
                f"the repository at {directory} is a clone of {configured}, not of {url}; "
                "storyline will not re-point it: give another directory"
            )

    @staticmethod
    def _clone(url: str, directory: Path, name: str) -> None:
        existed = directory.is_dir()
        parent = directory.parent
        parent.mkdir(parents=True, exist_ok=True)
        # A new directory is cloned beside it and renamed into place, so a crash mid-clone
        # leaves only the scratch name (removed by the next attempt). An existing empty one
        # (perhaps a mount point, which cannot be renamed over) is cloned into directly.
        target = directory if existed else parent / f".{directory.name}.storyline-clone"
        if not existed:
            remove_tree(target)
        res = run_git(
            ["clone", "--quiet", "--no-recurse-submodules", "--origin", name, "--", url,
             str(target)],
            parent,
            check=False,
            timeout=CLONE_TIMEOUT_SECS,
        )  # fmt: skip
        if res.returncode != 0:
            with contextlib.suppress(GitError, OSError):
                if existed:
                    for child in list(directory.iterdir()):
                        remove_tree(child)
                else:
                    remove_tree(target)
            raise RemoteError(
                f"cannot clone {url} into {directory}: {_detail(res)}",
                command=["git", *res.args],
                returncode=res.returncode,
                stderr=res.stderr.strip(),
            )
        if not existed:
            os.replace(target, directory)

    # ---------------------------------------------------------------------------- reading

    def tracking_ref(self, branch: str) -> str:
        return f"refs/remotes/{self.name}/{_check_branch(branch)}"

    def remote_sha(self, branch: str) -> str | None:
        """The remote's ``branch`` as this clone last saw it (after a fetch or a push)."""
        return self._sha(self.tracking_ref(branch))

    def local_sha(self, branch: str) -> str | None:
        return self._sha(f"refs/heads/{_check_branch(branch)}")

    # ------------------------------------------------------------------------ fetching

    def fetch(self, *branches: str) -> None:
        """Bring ``refs/remotes/<name>/<b>`` up to date for each branch; a branch the
        remote lacks is not an error (its remote-tracking ref is deleted)."""
        names = list(dict.fromkeys(_check_branch(b) for b in branches))
        if not names:
            return
        with self._locked():
            self._fetch(names)

    def sync_branch(self, branch: str) -> str | None:
        """Fetch ``branch`` and make the local branch equal the remote's (created if
        missing; a checked-out one is moved in its checkout with ``git reset --keep``).
        Returns the sha, or None when the remote has no such branch (local left alone)."""
        return self.sync_branches(branch)[branch]

    def sync_branches(self, *branches: str) -> dict[str, str | None]:
        """:meth:`sync_branch` for several branches with one round trip."""
        names = list(dict.fromkeys(_check_branch(b) for b in branches))
        with self._locked():
            self._fetch(names)
            found: dict[str, str | None] = {}
            for name in names:
                sha = self.remote_sha(name)
                if sha is not None:
                    self._move_local(name, sha)
                found[name] = sha
            return found

    def adopt_branch(self, branch: str) -> str | None:
        """The remote's ``branch`` is the truth: local := remote (forced), or the local
        branch is deleted when the remote has none. Returns the remote sha or None.

        The caller has removed any worktree that had the branch checked out (one that still
        has it is moved with ``reset --keep``; deleting a checked-out branch is refused).
        """
        name = _check_branch(branch)
        with self._locked():
            self._fetch([name])
            sha = self.remote_sha(name)
            if sha is None:
                self._delete_local(name)
            else:
                self._move_local(name, sha)
            return sha

    # ------------------------------------------------------------------------- pushing

    def push_branch(self, branch: str) -> str:
        """Push the local ``branch`` with a lease on the remote sha this clone last saw
        (none seen: the remote branch must not exist); returns the pushed sha.

        :class:`RemoteMoved` when the remote branch is not what this clone last saw
        (another worker pushed since). Pushing a branch the remote already holds is a no-op.
        """
        name = _check_branch(branch)
        with self._locked():
            local = self.local_sha(name)
            if local is None:
                raise GitError(f"branch {name} does not exist in {self.repo}; nothing to push")
            seen = self.remote_sha(name)
            if self._push_cas(name, seen, local):
                return local
            now = self.remote_sha(name)
            raise RemoteMoved(
                f"{name} on {self.url} moved since this clone last saw it (expected "
                f"{seen or 'no branch'}, it is at {now or 'no branch'}): another worker "
                "pushed it; adopt the remote's branch before pushing again"
            )

    def push_cas(
        self, branch: str, expected_old: str | None, new_sha: str, *, follow: bool = False
    ) -> bool:
        """Compare-and-swap the remote ``branch`` from ``expected_old`` (None: must not
        exist) to ``new_sha``.

        True when the remote branch is now ``new_sha`` (the remote-tracking ref is updated);
        False when it was not at ``expected_old`` (the remote-tracking ref then shows what it
        is). Any other failure (network, a hook refusing) raises :class:`RemoteError`.

        ``follow``: the local branch is then moved to the remote's sha too (under the same
        lock, so it cannot go backwards). A failure of that local move after a successful
        push is logged, not raised: the remote moved, and the next sync moves the local.
        """
        name = _check_branch(branch)
        check_object_name(new_sha, "new_sha")
        if expected_old is not None:
            check_object_name(expected_old, "expected_old")
        with self._locked():
            moved = self._push_cas(name, expected_old, new_sha)
            if follow:
                now = self.remote_sha(name)
                if now is not None:
                    try:
                        self._move_local(name, now)
                    except GitError as exc:
                        if not moved:
                            raise
                        log.warning("%s moved on %s, but not locally: %s", name, self.url, exc)
            return moved

    # ------------------------------------------------------------------------- private

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._common is None:
            self._common = common_dir(self.repo)
        with repo_lock(self._common, _LOCK):
            yield

    def _sha(self, ref: str) -> str | None:
        res = run_git(
            ["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], self.repo, check=False
        )
        return res.stdout.strip() if res.returncode == 0 else None

    def _net(self, args: Sequence[str]) -> GitResult:
        try:
            return run_git(args, self.repo, check=False, timeout=self.timeout)
        except RemoteError:
            raise
        except GitError as exc:  # a timeout or no git binary
            raise RemoteError(f"{exc.message} (remote {self.url})", command=exc.command) from exc

    def _fail(self, res: GitResult, what: str) -> RemoteError:
        return RemoteError(
            f"{what} on {self.url} failed (exit {res.returncode}): {_detail(res)}",
            command=["git", *res.args],
            returncode=res.returncode,
            stderr=res.stderr.strip(),
        )

    def _ls_remote(self, names: Sequence[str]) -> dict[str, str]:
        refs = [f"refs/heads/{n}" for n in names]
        res = self._net(["ls-remote", "--heads", self.name, *refs])
        if res.returncode != 0:
            raise self._fail(res, f"reading {', '.join(names)}")
        wanted = set(refs)
        found: dict[str, str] = {}
        for line in res.stdout.splitlines():
            sha, _, ref = line.partition("\t")
            if ref in wanted:
                found[ref[len("refs/heads/") :]] = sha
        return found

    def _fetch(self, names: Sequence[str]) -> None:
        # ls-remote first: fetching a refspec whose source is missing is an error, and most
        # of the time every branch is already where this clone last saw it (no fetch at all).
        if not names:
            return
        res: GitResult | None = None
        for _attempt in range(3):
            present = self._ls_remote(names)
            stale: list[str] = []
            for name in names:
                tracking = self.tracking_ref(name)
                current = self._sha(tracking)
                if name not in present:
                    if current is not None:
                        run_git(["update-ref", "-d", tracking], self.repo)
                elif current != present[name]:
                    stale.append(name)
            if not stale:
                return
            specs = [f"+refs/heads/{n}:{self.tracking_ref(n)}" for n in stale]
            res = self._net(
                ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                 "--no-recurse-submodules", self.name, *specs]
            )  # fmt: skip
            if res.returncode == 0:
                return
            if "couldn't find remote ref" not in res.stderr:
                raise self._fail(res, f"fetching {', '.join(stale)}")
            # Deleted between ls-remote and fetch: look again.
        assert res is not None
        raise self._fail(res, f"fetching {', '.join(names)}")

    def _push_cas(self, name: str, expected_old: str | None, new_sha: str) -> bool:
        ref = f"refs/heads/{name}"
        lease = f"--force-with-lease={ref}:{expected_old or ''}"
        res = self._net(
            ["push", "--porcelain", "--quiet", "--no-verify", "--no-recurse-submodules", lease,
             self.name, f"{new_sha}:{ref}"]
        )  # fmt: skip
        if res.returncode == 0:
            run_git(
                ["update-ref", "-m", "storyline: pushed", self.tracking_ref(name), new_sha],
                self.repo,
            )
            return True
        # Refused (stale lease, a lost race inside the remote, a hook) or not delivered at all:
        # what the remote holds now decides.
        try:
            self._fetch([name])
        except RemoteError as exc:
            raise self._fail(res, f"pushing {name}") from exc
        now = self.remote_sha(name)
        if now == new_sha:
            return True
        if now != expected_old:
            log.info(
                "compare-and-swap of %s on %s lost: expected %s, it is at %s",
                name, self.url, expected_old or "no branch", now or "no branch",
            )  # fmt: skip
            return False
        raise self._fail(res, f"pushing {new_sha} to {name}")

    def _move_local(self, name: str, sha: str) -> None:
        """Local ``refs/heads/<name>`` := ``sha``. Caller holds the lock."""
        ref = f"refs/heads/{name}"
        old = self._sha(ref)
        if old == sha:
            return
        if old is not None:
            behind = run_git(["merge-base", "--is-ancestor", old, sha], self.repo, check=False)
            if behind.returncode == 1:
                # The remote is the truth; the local commits stay reachable from the reflog.
                log.warning(
                    "%s in %s had commits the remote lacks: moved from %s to the remote's %s",
                    name, self.repo, old, sha,
                )  # fmt: skip
        holders = worktrees_holding(self.repo, ref)
        if not holders:
            run_git(
                ["update-ref", "-m", f"storyline: sync {name} from {self.name}", ref, sha,
                 old or _NULL_SHA],
                self.repo,
            )  # fmt: skip
            return
        checkout = holders[0]
        # reset --keep moves the branch with its checkout's index and files (a bare
        # update-ref would leave the change showing reversed as staged), and refuses
        # rather than overwrite local changes to the files that differ.
        res = run_git(
            ["reset", "--keep", "--quiet", sha], checkout, check=False, ceiling=checkout.parent
        )
        if res.returncode != 0:
            raise RemoteError(
                f"cannot move {name} to the remote's {sha} in its checkout {checkout}: "
                f"{_detail(res)}",
                command=["git", *res.args],
                returncode=res.returncode,
                stderr=res.stderr.strip(),
            )

    def _delete_local(self, name: str) -> None:
        ref = f"refs/heads/{name}"
        old = self._sha(ref)
        if old is None:
            return
        holders = worktrees_holding(self.repo, ref)
        if holders:
            raise RemoteError(
                f"{name} is checked out at {holders[0]}; it cannot follow the remote (which "
                "has no such branch) until that worktree is removed"
            )
        run_git(["update-ref", "-m", "storyline: gone from remote", "-d", ref, old], self.repo)
