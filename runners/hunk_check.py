"""Did a conflict resolution keep both sides? A line-count check of a resolution commit.

Given the merge base M of a story's branch tip S and the base commit B its merge started
from, and the resolution commit R a mergemaster made on top of B, every hunk of ``M..S``
(side ``story``) and of ``M..B`` (side ``base``) must still be reflected in R. Positions
move during a merge, so the check counts lines instead of matching places: per file, for
each line (``rstrip``-ed, blank lines skipped) with counts ``cM``/``cR`` in M's and R's
file and nets ``sN``/``bN`` (added minus removed) on the story and base sides,

- a line the story added (``sN > 0``) is lost when ``cR < cM + sN + min(0, bN)``;
- a line it removed (``sN < 0``) is lost when ``cR > cM + sN + max(0, bN)``;

and the same with the sides swapped. The other side's removals (additions) lower (raise)
what is expected, so two sides editing around each other, interleaved in any order, pass.
Lost lines are reported under the hunk of ``git diff -U0`` they came from (its
``@@ -a,b +c,d @@`` header, without the function context git adds after it).

Binary files, renames, copies, type changes and submodules cannot be judged line by line:
they are listed as unchecked, never guessed. Hunks a mergemaster declared dropped
(``declared``: file, side and header) do not count on their side: they are neither
reported nor expected in R.

API::

    check_resolution(repo, *, merge_base, story, base, resolution, declared=()) -> HunkReport
    merge_base_of(repo, a, b) -> str
    HunkReport(lost: list[LostHunk], unchecked: list[Unchecked]).ok / .details() / .files()
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from runners.git_base import (
    GitError,
    GitResult,
    check_object_name,
    command_failed,
    git_env,
    run_git,
)

Side = Literal["story", "base"]
SIDES: tuple[Side, Side] = ("story", "base")

MAX_LINES_PER_HUNK = 200
MAX_LINE_CHARS = 4096
MAX_HUNKS = 1000
"""The bounds of ``MergeFailed.lost_hunks`` (``domain.commands.LostHunk``)."""
SHOWN_LINES_PER_HUNK = 20
"""Lines per hunk in the human-readable details (the structured list keeps up to 200)."""

_HUNK = re.compile(r"^(@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@)")
_SUBMODULE = "160000"
_NULL_SHA = re.compile(r"^0+$")


@dataclass(frozen=True)
class LostHunk:
    file: str
    side: Side
    hunk: str
    lines: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "side": self.side, "hunk": self.hunk, "lines": self.lines}


@dataclass(frozen=True)
class Unchecked:
    file: str
    side: Side
    why: str

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "side": self.side, "why": self.why}


@dataclass(frozen=True)
class HunkReport:
    lost: list[LostHunk] = field(default_factory=list)
    unchecked: list[Unchecked] = field(default_factory=list)
    truncated: int = 0
    """Lost hunks left out of ``lost`` to stay within the event's bounds."""

    @property
    def ok(self) -> bool:
        return not self.lost

    def files(self) -> list[str]:
        """The files with lost hunks, in report order."""
        return list(dict.fromkeys(h.file for h in self.lost))

    def details(self) -> str:
        """What a person (and the next mergemaster) reads: each lost hunk and its lines."""
        parts: list[str] = []
        if self.lost:
            parts.append(
                "The resolution drops lines one side changed, and no drop was declared. "
                "Missing hunks (side story: the story's branch; side base: what the base "
                "gained since the story branched):"
            )
            for hunk in self.lost:
                parts.append(f"- {hunk.file} ({hunk.side}) {hunk.hunk}:")
                shown = hunk.lines[:SHOWN_LINES_PER_HUNK]
                parts.extend(f"    {line}" for line in shown)
                if len(hunk.lines) > len(shown):
                    parts.append(f"    ... and {len(hunk.lines) - len(shown)} more lines")
            if self.truncated:
                parts.append(f"- ... and {self.truncated} more hunks")
        if self.unchecked:
            parts.append("Not checked (binary, renamed or not a regular file):")
            parts.extend(f"- {u.file} ({u.side}): {u.why}" for u in self.unchecked)
        return "\n".join(parts)


@dataclass
class _Hunk:
    header: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Change:
    status: str
    old_blob: str
    new_blob: str
    old_mode: str
    new_mode: str


def merge_base_of(repo: Path, a: str, b: str) -> str:
    """The best common ancestor of two commits (GitError when they share none)."""
    out = run_git(["merge-base", a, b], repo, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise GitError(f"{a} and {b} have no common ancestor: the resolution cannot be checked")
    return out.stdout.split()[0]


def check_resolution(
    repo: Path,
    *,
    merge_base: str,
    story: str,
    base: str,
    resolution: str,
    declared: Iterable[Mapping[str, Any]] = (),
) -> HunkReport:
    """Every hunk of either side that ``resolution`` does not reflect (see the module doc)."""
    for value, what in (
        (merge_base, "merge base"),
        (story, "story tip"),
        (base, "base commit"),
        (resolution, "resolution commit"),
    ):
        check_object_name(value, what)
    dropped = {(str(d.get("file")), str(d.get("side")), str(d.get("hunk"))) for d in declared}
    tips: dict[Side, str] = {"story": story, "base": base}
    changes = {side: _raw_diff(repo, merge_base, tips[side], renames=True) for side in SIDES}
    in_resolution = _raw_diff(repo, merge_base, resolution, renames=False)

    unchecked: list[Unchecked] = []
    skip: set[str] = set()
    for side in SIDES:
        for path, why in _uncheckable(repo, merge_base, tips[side], changes[side]):
            unchecked.append(Unchecked(path, side, why))
            skip.add(path)
    # A file the other side renamed or made binary cannot be judged on this side either.
    reported = {(u.file, u.side) for u in unchecked}
    for side in SIDES:
        unchecked.extend(
            Unchecked(path, side, "renamed, binary or not a regular file on the other side")
            for path in changes[side]
            if path in skip and (path, side) not in reported
        )

    todo: dict[Side, list[str]] = {"story": [], "base": []}
    for side in SIDES:
        other = changes["base" if side == "story" else "story"]
        for path, change in changes[side].items():
            if path in skip:
                continue
            result_blob = in_resolution[path].new_blob if path in in_resolution else change.old_blob
            if path not in other and result_blob == change.new_blob:
                continue  # only this side changed the file and R has it exactly: nothing lost
            todo[side].append(path)

    hunks: dict[tuple[Side, str], list[_Hunk]] = {}
    for side in SIDES:
        for path in todo[side]:
            hunks[(side, path)] = _hunks(repo, merge_base, tips[side], path)
    # The other side's nets are needed wherever both sides changed a file.
    for side in SIDES:
        other_side: Side = "base" if side == "story" else "story"
        for path in todo[side]:
            if path in changes[other_side] and (other_side, path) not in hunks:
                hunks[(other_side, path)] = _hunks(repo, merge_base, tips[other_side], path)

    files = sorted({p for side in SIDES for p in todo[side]})
    blobs: dict[str, str] = {}
    for path in files:
        any_change = changes["story"].get(path) or changes["base"][path]
        blobs[f"M:{path}"] = any_change.old_blob
        blobs[f"R:{path}"] = (
            in_resolution[path].new_blob if path in in_resolution else any_change.old_blob
        )
    texts = _read_blobs(repo, set(blobs.values()))

    lost: list[LostHunk] = []
    for path in files:
        counts_m = _counts(texts.get(blobs[f"M:{path}"], ""))
        counts_r = _counts(texts.get(blobs[f"R:{path}"], ""))
        for side in SIDES:
            if path not in todo[side]:
                continue
            other_side = "base" if side == "story" else "story"
            own = [h for h in hunks[(side, path)] if (path, side, h.header) not in dropped]
            lost.extend(
                _lost_in_file(
                    path,
                    side,
                    own,
                    _net(hunks.get((other_side, path), [])),
                    counts_m,
                    counts_r,
                )
            )
    truncated = max(0, len(lost) - MAX_HUNKS)
    return HunkReport(lost[:MAX_HUNKS], unchecked, truncated)


# ---------------------------------------------------------------------------- line counting


def _key(line: str) -> str | None:
    bare = line.rstrip()
    return bare if bare.strip() else None


def _counts(text: str) -> Counter[str]:
    return Counter(k for k in map(_key, text.splitlines()) if k is not None)


def _net(hunks: list[_Hunk]) -> Counter[str]:
    net: Counter[str] = Counter()
    for hunk in hunks:
        for line in hunk.added:
            if (k := _key(line)) is not None:
                net[k] += 1
        for line in hunk.removed:
            if (k := _key(line)) is not None:
                net[k] -= 1
    return net


def _lost_in_file(
    path: str,
    side: Side,
    own: list[_Hunk],
    other_net: Counter[str],
    counts_m: Counter[str],
    counts_r: Counter[str],
) -> list[LostHunk]:
    net = _net(own)
    missing: set[str] = set()  # added lines R lacks
    surviving: set[str] = set()  # removed lines R still has
    for line, n in net.items():
        other = other_net.get(line, 0)
        if n > 0 and counts_r[line] < counts_m[line] + n + min(0, other):
            missing.add(line)
        elif n < 0 and counts_r[line] > counts_m[line] + n + max(0, other):
            surviving.add(line)
    found: list[LostHunk] = []
    for hunk in own:
        lines: list[str] = []
        for raw, wanted in ((hunk.removed, surviving), (hunk.added, missing)):
            for line in raw:
                key = _key(line)
                if key is not None and key in wanted and key not in lines:
                    lines.append(key)
        if lines:
            found.append(
                LostHunk(
                    path,
                    side,
                    hunk.header,
                    # No NUL: no read model could store it (git calls such files binary,
                    # but only looks at their first 8000 bytes).
                    [
                        ln[:MAX_LINE_CHARS].replace("\x00", "\ufffd")
                        for ln in lines[:MAX_LINES_PER_HUNK]
                    ],
                )
            )
    return found


# ---------------------------------------------------------------------------- git plumbing


def _raw_diff(repo: Path, old: str, new: str, *, renames: bool) -> dict[str, _Change]:
    """``git diff --raw`` between two commits: path -> change (a rename under both paths)."""
    args = ["diff", "--raw", "-z", "--no-abbrev", "--no-ext-diff", "--no-textconv"]
    args.append("--find-renames" if renames else "--no-renames")
    fields = run_git([*args, old, new, "--"], repo).stdout.split("\0")
    found: dict[str, _Change] = {}
    i = 0
    while i < len(fields) and fields[i]:
        meta = fields[i].lstrip(":").split()
        status = meta[4]
        paths = fields[i + 1 : i + (3 if status[0] in "RC" else 2)]
        i += 1 + len(paths)
        change = _Change(status[0], meta[2], meta[3], meta[0], meta[1])
        for path in paths:
            found[path] = change
    return found


def _uncheckable(
    repo: Path, old: str, new: str, changes: dict[str, _Change]
) -> list[tuple[str, str]]:
    """The changed paths a line count cannot judge, and why."""
    found: list[tuple[str, str]] = []
    binary = _binary_paths(repo, old, new)
    for path, change in changes.items():
        if change.status == "R":
            found.append((path, "renamed: not checked line by line"))
        elif change.status == "C":
            found.append((path, "copied: not checked line by line"))
        elif change.status == "T":
            found.append((path, "its type changed (file, symlink or submodule)"))
        elif _SUBMODULE in (change.old_mode, change.new_mode):
            found.append((path, "a submodule"))
        elif path in binary:
            found.append((path, "binary"))
    return found


def _binary_paths(repo: Path, old: str, new: str) -> set[str]:
    # numstat honours .gitattributes (``-diff``, ``binary``) the way git's own merge does.
    args = ["diff", "--numstat", "-z", "--no-renames", "--no-ext-diff", "--no-textconv"]
    fields = run_git([*args, old, new, "--"], repo).stdout.split("\0")
    return {
        record.split("\t", 2)[2]
        for record in fields
        if record.startswith("-\t-\t") and record.count("\t") >= 2
    }


def _hunks(repo: Path, old: str, new: str, path: str) -> list[_Hunk]:
    """The ``-U0`` hunks of one file between two commits."""
    out = run_git(
        [
            "--literal-pathspecs",
            "diff",
            "-U0",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            "--no-renames",
            "--src-prefix=a/",
            "--dst-prefix=b/",
            old,
            new,
            "--",
            path,
        ],
        repo,
    ).stdout
    hunks: list[_Hunk] = []
    for line in out.split("\n"):
        match = _HUNK.match(line)
        if match:
            hunks.append(_Hunk(match.group(1)))
        elif hunks and line.startswith("+"):
            hunks[-1].added.append(line[1:])
        elif hunks and line.startswith("-"):
            hunks[-1].removed.append(line[1:])
    return hunks


def _read_blobs(repo: Path, shas: set[str]) -> dict[str, str]:
    """Blob contents by sha (one ``cat-file --batch``); the null sha reads as empty."""
    wanted = sorted(s for s in shas if not _NULL_SHA.match(s))
    if not wanted:
        return {}
    argv = ["git", "cat-file", "--batch"]
    proc = subprocess.run(
        argv,
        cwd=repo,
        env=git_env(),
        input=("\n".join(wanted) + "\n").encode("ascii"),
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace")
        raise command_failed(GitResult(tuple(argv[1:]), proc.returncode, "", stderr), repo)
    texts: dict[str, str] = {}
    data = proc.stdout
    pos = 0
    for sha in wanted:
        end = data.index(b"\n", pos)
        header = data[pos:end].decode("ascii", "replace").split()
        pos = end + 1
        if len(header) != 3 or header[1] == "missing":
            raise GitError(f"object {sha} is missing from {repo}")
        size = int(header[2])
        texts[header[0]] = data[pos : pos + size].decode("utf-8", "replace")
        pos += size + 1
    return texts
