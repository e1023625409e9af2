"""Shared plumbing for the git layer: running git, errors, locks and worktree housekeeping.

Everything in :mod:`runners.worktrees` and :mod:`runners.merge_workspace` goes through
:func:`run_git`. It runs the ``git`` binary with an argv list (never a shell) because the
operations we need (``worktree add``, ``merge --squash``, ``cherry-pick``, ``update-ref`` with
an old value) are porcelain commands that gitpython only forwards to the same binary; calling
it directly gives one place for the environment, identity, timeouts and error text.

Needs git >= 2.36 (``git worktree list -z``, ``git worktree add --lock --reason``).

Public names:

- :class:`GitError`: a git command failed; the message names the command and git's stderr.
- :class:`GitResult`: the outcome of one git invocation (``returncode``, ``stdout``,
  ``stderr``, ``output``).
- :func:`run_git`: run one git command.
- :data:`STORYLINE_NAME`, :data:`STORYLINE_EMAIL`: the identity every commit storyline makes
  is recorded under.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

try:  # pragma: no cover - exercised only where fcntl is missing
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from domain.ids import validate_branch_name, validate_story_id

if TYPE_CHECKING:
    from runners.remote import GitRemote

log = logging.getLogger(__name__)

INIT_LOCK_REASON = "storyline: initializing"

STORYLINE_NAME = "storyline"
STORYLINE_EMAIL = "storyline@localhost"
DEFAULT_TIMEOUT_SECS = 600.0
_STDERR_SHOWN = 2000

# Variables git itself treats as repository-local (`git rev-parse --local-env-vars`). If the
# service is started from inside a git hook or another tool, an inherited GIT_DIR or
# GIT_INDEX_FILE would silently redirect every command to the wrong repository.
_LOCAL_ENV_VARS = (
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_CONFIG",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_OBJECT_DIRECTORY",
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_IMPLICIT_WORK_TREE",
    "GIT_GRAFT_FILE",
    "GIT_INDEX_FILE",
    "GIT_NO_REPLACE_OBJECTS",
    "GIT_REPLACE_REF_BASE",
    "GIT_PREFIX",
    "GIT_INTERNAL_SUPER_PREFIX",
    "GIT_SHALLOW_FILE",
    "GIT_COMMON_DIR",
    "GIT_CEILING_DIRECTORIES",
)

# Per-invocation settings, so results never depend on the user's global config: hooks are
# off because storyline's own commits are gated by the merge gates, not by whatever hook the
# repository installs for humans (and a hook must not block a crash recovery); signing would
# prompt for a passphrase; quoted paths would break parsing.
_CONFIG = (
    "-c", f"core.hooksPath={os.devnull}",
    "-c", "commit.gpgSign=false",
    "-c", "core.quotePath=false",
    "-c", "advice.detachedHead=false",
    "-c", "gc.auto=0",
)  # fmt: skip

_OBJECT_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


class GitError(Exception):
    """A git command failed, or the repository is not in a state the operation accepts.

    ``command`` is the git command line (empty when the error is a state check rather than a
    failed command), ``returncode`` its exit status and ``stderr`` git's trimmed stderr.
    """

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.command = list(command)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class GitResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together, the way a person would have seen them."""
        if self.stdout and self.stderr:
            sep = "" if self.stdout.endswith("\n") else "\n"
            return f"{self.stdout}{sep}{self.stderr}"
        return self.stdout or self.stderr


def _trim(text: str) -> str:
    text = text.strip()
    if len(text) > _STDERR_SHOWN:
        # The tail carries the actual "fatal:" line; the head is usually progress noise.
        text = "..." + text[-_STDERR_SHOWN:]
    return text


def _display(args: Sequence[str]) -> str:
    return "git " + " ".join(args)


def git_env(extra: Mapping[str, str] | None = None, ceiling: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LOCAL_ENV_VARS}
    env.update(
        {
            # git's messages (CONFLICT lines, "would be overwritten") are parsed and shown.
            "LC_ALL": "C",
            "LANGUAGE": "C",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_EDITOR": "true",
            "GIT_AUTHOR_NAME": STORYLINE_NAME,
            "GIT_AUTHOR_EMAIL": STORYLINE_EMAIL,
            "GIT_COMMITTER_NAME": STORYLINE_NAME,
            "GIT_COMMITTER_EMAIL": STORYLINE_EMAIL,
        }
    )
    if ceiling is not None:
        # Worktrees live inside the user's repository: without a ceiling, a command run in a
        # half-deleted worktree would walk up and act on the user's checkout instead.
        env["GIT_CEILING_DIRECTORIES"] = str(ceiling)
    if extra:
        env.update(extra)
    return env


def run_git(
    args: Sequence[str],
    cwd: Path,
    *,
    check: bool = True,
    input_text: str | None = None,
    ceiling: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECS,
) -> GitResult:
    """Run ``git <args>`` in ``cwd`` and return its result.

    With ``check`` a non-zero exit raises :class:`GitError`. A timeout or a missing git
    binary always raises :class:`GitError`.
    """
    argv = ["git", *_CONFIG, *args]
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=git_env(env, ceiling),
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise GitError(
            f"`{_display(args)}` timed out after {timeout:g} s in {cwd}", command=argv
        ) from exc
    except OSError as exc:
        raise GitError(f"could not run `{_display(args)}` in {cwd}: {exc}", command=argv) from exc
    result = GitResult(tuple(args), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise command_failed(result, cwd)
    return result


def command_failed(result: GitResult, cwd: Path, what: str = "") -> GitError:
    detail = _trim(result.stderr) or _trim(result.stdout) or "(no output)"
    prefix = f"{what}: " if what else ""
    return GitError(
        f"{prefix}`{_display(result.args)}` failed (exit {result.returncode}) in {cwd}: {detail}",
        command=["git", *result.args],
        returncode=result.returncode,
        stderr=_trim(result.stderr),
    )


def check_object_name(value: str, what: str) -> str:
    """Accept only full hexadecimal object names where a caller hands us a sha.

    They end up in argv positions where a value starting with ``-`` would be read as an
    option, and an abbreviated or symbolic name could resolve to something else later.
    """
    if not isinstance(value, str) or not _OBJECT_NAME.fullmatch(value):
        raise GitError(f"{what} must be a full lower-case commit sha, got {value!r}")
    return value


# --------------------------------------------------------------------------- repository info


def common_dir(repo: Path) -> Path:
    """The repository's shared git directory (``.git`` of the main worktree)."""
    out = run_git(["rev-parse", "--git-common-dir"], repo).stdout.strip()
    path = Path(out)
    return (path if path.is_absolute() else repo / path).resolve()


def ensure_excluded(common: Path, pattern: str = "/.storyline/") -> None:
    """Keep storyline's own directory out of the user's ``git status``.

    Written to ``info/exclude`` (local, never committed) rather than ``.gitignore`` so the
    user's tracked files stay untouched; otherwise every worktree under ``.storyline`` would
    make the user's checkout look dirty.
    """
    exclude = common / "info" / "exclude"
    try:
        existing = exclude.read_text(encoding="utf-8")
    except FileNotFoundError:
        existing = ""
    if pattern in (line.strip() for line in existing.splitlines()):
        return
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with exclude.open("a", encoding="utf-8") as fh:
        if existing and not existing.endswith("\n"):
            fh.write("\n")
        fh.write(f"{pattern}\n")


# --------------------------------------------------------------------------------- locking

_thread_locks: dict[Path, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def repo_lock(common: Path, name: str = "worktrees") -> Iterator[None]:
    """Serialise one kind of change to a repository (``name``: "worktrees" or "base").

    "worktrees": git picks a worktree's admin directory name with a stat-then-mkdir, and
    registering and removing entries are not atomic with each other, so two concurrent
    ``git worktree add`` (ours in a thread pool, or another storyline process) can collide.
    Only that short registration step runs under this lock; checkouts happen outside it.
    "base": advancing the base branch in the user's checkout takes its index.lock, and a
    second advance racing it would fail on that lock instead of losing the compare-and-swap.

    A thread lock covers threads; ``flock`` on a file in the git dir covers other processes
    on the same machine.
    """
    with _thread_locks_guard:
        lock = _thread_locks.setdefault(common / name, threading.Lock())
    with lock:
        if fcntl is None:  # pragma: no cover
            yield
            return
        with (common / f"storyline-{name}.lock").open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------- worktree inspection


@dataclass(frozen=True)
class WorktreeProbe:
    """What is on disk at a worktree path. ``problem`` is None for a usable worktree."""

    path: Path
    exists: bool
    problem: str | None
    admin_dir: Path | None = None
    head_ref: str | None = None  # "refs/heads/..." or None when detached


def _read_gitdir_file(dotgit: Path) -> Path | None:
    try:
        text = dotgit.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("gitdir:"):
        return None
    target = Path(text[len("gitdir:") :].strip())
    return (target if target.is_absolute() else dotgit.parent / target).resolve()


def probe_worktree(path: Path, common: Path) -> WorktreeProbe:
    """Check that ``path`` is a complete, unlocked linked worktree of the repository at
    ``common``, with both directions of git's bookkeeping pointing at each other."""
    if not path.exists() and not path.is_symlink():
        return WorktreeProbe(path, False, "missing")
    if path.is_symlink() or not path.is_dir():
        return WorktreeProbe(path, True, "not a directory")
    dotgit = path / ".git"
    if not dotgit.is_file():
        return WorktreeProbe(path, True, "directory has no .git file (not a worktree)")
    admin = _read_gitdir_file(dotgit)
    if admin is None or not admin.is_dir():
        return WorktreeProbe(path, True, "its .git file points at missing git metadata")
    if admin.parent != common / "worktrees":
        return WorktreeProbe(path, True, f"its .git file points outside this repository: {admin}")
    back = _read_gitdir_file_raw(admin / "gitdir")
    if back is None or back != dotgit.resolve():
        return WorktreeProbe(path, True, "git's metadata for it is stale (gitdir mismatch)", admin)
    if (admin / "locked").exists():
        reason = (admin / "locked").read_text(encoding="utf-8", errors="replace").strip()
        return WorktreeProbe(path, True, f"worktree is locked ({reason or 'no reason'})", admin)
    head = run_git(["symbolic-ref", "-q", "HEAD"], path, check=False, ceiling=path.parent)
    if head.returncode not in (0, 1):
        return WorktreeProbe(path, True, f"git cannot read it: {_trim(head.stderr)}", admin)
    top = run_git(["rev-parse", "--show-toplevel"], path, check=False, ceiling=path.parent)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != path.resolve():
        return WorktreeProbe(path, True, "git does not see it as a worktree root", admin)
    head_ref = head.stdout.strip() if head.returncode == 0 else None
    return WorktreeProbe(path, True, None, admin, head_ref)


def _read_gitdir_file_raw(file: Path) -> Path | None:
    # The admin side stores a bare path (no "gitdir:" prefix).
    try:
        text = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text:
        return None
    target = Path(text)
    return (target if target.is_absolute() else file.parent / target).resolve()


def admin_dirs_for(path: Path, common: Path) -> list[Path]:
    """Every ``<common>/worktrees/*`` entry that claims ``path`` as its worktree."""
    wanted = (path / ".git").resolve()
    found: list[Path] = []
    try:
        entries = list((common / "worktrees").iterdir())
    except FileNotFoundError:
        return found
    for admin in entries:
        if admin.is_dir() and _read_gitdir_file_raw(admin / "gitdir") == wanted:
            found.append(admin)
    linked = _read_gitdir_file(path / ".git") if (path / ".git").is_file() else None
    # The worktree's own pointer may name an admin dir whose back-pointer was lost.
    if (
        linked is not None
        and linked.parent == common / "worktrees"
        and linked.is_dir()
        and linked not in found
    ):
        found.append(linked)
    return found


def _rmtree_onerror(func: Callable[..., object], target: str, _exc: object) -> None:
    # Read-only files (packed objects, tool caches) would otherwise stop the removal halfway.
    with contextlib.suppress(OSError):
        os.chmod(target, stat.S_IWRITE | stat.S_IREAD | stat.S_IEXEC)
        parent = os.path.dirname(target)
        os.chmod(parent, stat.S_IWRITE | stat.S_IREAD | stat.S_IEXEC)
    with contextlib.suppress(FileNotFoundError):
        func(target)


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=_rmtree_onerror)
        else:
            shutil.rmtree(path, onerror=_rmtree_onerror)
    if path.exists() or path.is_symlink():
        raise GitError(f"could not remove {path}: something keeps recreating or holding it")


def purge_worktree(path: Path, common: Path) -> None:
    """Remove a worktree directory and only its own registration. Caller holds repo_lock.

    Deliberately not ``git worktree prune``: prune also drops the user's own worktrees whose
    directories are merely unavailable (an unmounted disk), and skips locked entries, which
    is exactly what a crash during ``git worktree add`` leaves behind.
    """
    admins = admin_dirs_for(path, common)
    remove_tree(path)
    for admin in admins:
        remove_tree(admin)


def worktrees_holding(repo: Path, ref: str) -> list[Path]:
    """Paths of existing worktrees that have ``ref`` checked out (the main one included)."""
    # Listing reads every admin directory: not while another entry is being registered.
    with repo_lock(common_dir(repo)):
        out = run_git(["worktree", "list", "--porcelain", "-z"], repo).stdout
    holders: list[Path] = []
    for block in out.split("\0\0"):
        fields = [f for f in block.split("\0") if f]
        if not fields:
            continue
        attrs: dict[str, str] = {}
        for field in fields:
            key, _, value = field.partition(" ")
            attrs[key] = value
        if "prunable" in attrs or "bare" in attrs or attrs.get("branch") != ref:
            continue
        where = Path(attrs["worktree"])
        if where.is_dir():
            holders.append(where)
    return holders


def parse_status_z(out: str) -> list[str]:
    """Paths from ``git status --porcelain=v1 -z`` (renames report the new path)."""
    paths: list[str] = []
    records = out.split("\0")
    i = 0
    while i < len(records):
        rec = records[i]
        i += 1
        if len(rec) < 4:
            continue
        xy, name = rec[:2], rec[3:]
        paths.append(name)
        if "R" in xy or "C" in xy:
            i += 1  # the next record is the rename's source path
    return paths


def create_worktree(repo: Path, common: Path, path: Path, target: Sequence[str]) -> None:
    """Register and populate a worktree at ``path``; ``target`` ends ``git worktree add``.

    Registration runs ``--no-checkout --lock`` under :func:`repo_lock` (fast); the checkout
    runs outside it, and the lock git keeps on the entry until we unlock it marks the
    worktree as half-made should we be killed in between.
    """
    with repo_lock(common):
        ensure_excluded(common)
        purge_worktree(path, common)
        path.parent.mkdir(parents=True, exist_ok=True)
        run_git(
            ["worktree", "add", "--no-checkout", "--lock", "--reason", INIT_LOCK_REASON, *target],
            repo,
        )
    try:
        run_git(["reset", "--hard", "--quiet"], path, ceiling=path.parent)
        # `worktree unlock` reads every entry's admin directory; one being registered at
        # this moment by another thread is half-written ("failed to read .../commondir").
        with repo_lock(common):
            run_git(["worktree", "unlock", str(path)], repo)
    except GitError:
        with repo_lock(common):
            purge_worktree(path, common)
        raise


class WorkspaceSet:
    """What :class:`~runners.worktrees.Worktrees` and
    :class:`~runners.merge_workspace.MergeWorkspaces` share: one directory per story under
    ``root``, a repository, a base branch, and per-story serialisation.

    ``remote``: the shared remote this repository is a clone of (scale-out). With it, the
    base branch is synced from the remote before it is read, and moves on the remote first
    (each subclass says where). None: everything is local, as on a single machine.
    """

    default_subdir = ""

    def __init__(
        self,
        repo: Path,
        base_branch: str,
        root: Path | None = None,
        remote: GitRemote | None = None,
    ) -> None:
        self.repo = Path(repo).resolve()
        self.base_branch = validate_branch_name(base_branch)
        if remote is not None and remote.repo != self.repo:
            raise ValueError(f"remote {remote!r} is not for the repository {self.repo}")
        self.remote = remote
        default_root = self.repo / ".storyline" / self.default_subdir
        self.root = (Path(root) if root is not None else default_root).resolve()
        self._common: Path | None = None
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._siblings: dict[str, Self] = {}

    def path_for(self, story_id: str) -> Path:
        return self.root / validate_story_id(story_id)

    def on_branch(self, branch: str | None) -> Self:
        """The same set of workspaces (same root, same per-story locks) working against
        ``branch`` instead of the base branch; None is the base branch itself.

        For stories that merge into another branch (an epic's integration branch): paths are
        per story, so every branch can share one root. Cached, so each story keeps one lock.
        """
        if branch is None or branch == self.base_branch:
            return self
        with self._locks_guard:
            sibling = self._siblings.get(branch)
            if sibling is None:
                sibling = type(self)(self.repo, branch, root=self.root, remote=self.remote)
                # Shared, so a story is serialised whichever branch object drives it.
                sibling._locks = self._locks
                sibling._locks_guard = self._locks_guard
                sibling._common = self._common
                self._siblings[branch] = sibling
            return sibling

    def base_exists(self) -> bool:
        return self.sync_base() is not None

    def sync_base(self) -> str | None:
        """The local base tip (None: no such branch), first synced from the remote if any
        (a branch the remote lacks is left as it is locally)."""
        if self.remote is not None:
            self.remote.sync_branch(self.base_branch)
        return self._ref_sha(self.base_ref)

    @property
    def base_ref(self) -> str:
        return f"refs/heads/{self.base_branch}"

    def _common_dir(self) -> Path:
        if self._common is None:
            self._common = common_dir(self.repo)
        return self._common

    def _story_lock(self, sid: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(sid, threading.Lock())

    def _ref_sha(self, ref: str) -> str | None:
        res = run_git(
            ["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], self.repo, check=False
        )
        return res.stdout.strip() if res.returncode == 0 else None

    def _base_tip(self) -> str:
        sha = self._ref_sha(self.base_ref)
        if sha is None:
            raise GitError(f"base branch {self.base_branch!r} does not exist in {self.repo}")
        return sha


MAX_PROMPT_DIFF_BYTES = 60_000
"""The diff an evaluator's prompt shows, at most: the prompt travels in one argv element,
which Linux caps at 128 KiB, and a bigger diff is better read with git than from a prompt."""


def cut_diff(diff: str, full_command: str, limit: int = MAX_PROMPT_DIFF_BYTES) -> str:
    """``diff`` cut to its first ``limit`` UTF-8 bytes, with a note naming ``full_command``
    (the git command that shows it all). The head is kept: the stat and the first files say
    what the change is about."""
    data = diff.encode("utf-8", "replace")
    if len(data) <= limit:
        return diff
    shown = data[:limit].decode("utf-8", "ignore")
    return (
        f"{shown}\n[... diff cut: {limit} of {len(data)} bytes shown; run "
        f"`{full_command}` in your working directory for the rest ...]"
    )
