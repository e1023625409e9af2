"""The hunk check against real repositories: what a resolution keeps and what it drops.

Each test builds M (the common start), a story branch S and a base B from it, and a
resolution commit R on top of B holding the files the test chooses, then asks which hunks
of M..S and M..B R does not reflect.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from runners.git_base import GitError
from runners.hunk_check import check_resolution, merge_base_of
from tests.pipeline_support import git

APP = "import os\n\n\ndef add(a, b):\n    return a + b\n"
BASE_FN = "\n\ndef helper():\n    return 'base helper'\n"
STORY_FN = "\n\ndef shout(text):\n    return text.upper()\n"


@dataclass
class Merge:
    repo: Path
    m: str
    s: str
    b: str

    def resolve(self, files: dict[str, str | bytes | None]) -> str:
        """A commit on top of B with ``files`` written (None deletes), as a mergemaster's."""
        git(self.repo, "checkout", "-q", "--detach", self.b)
        write(self.repo, files)
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "--allow-empty", "-m", "resolution")
        return git(self.repo, "rev-parse", "HEAD")

    def check(self, resolution: str, declared: list[dict[str, str]] | None = None):  # type: ignore[no-untyped-def]
        return check_resolution(
            self.repo,
            merge_base=merge_base_of(self.repo, self.s, self.b),
            story=self.s,
            base=self.b,
            resolution=resolution,
            declared=declared or [],
        )

    def header(self, side: str, path: str) -> list[str]:
        tip = self.s if side == "story" else self.b
        out = git(self.repo, "diff", "-U0", self.m, tip, "--", path)
        return [ln.split(" @@")[0] + " @@" for ln in out.splitlines() if ln.startswith("@@")]


def write(repo: Path, files: dict[str, str | bytes | None]) -> None:
    for name, content in files.items():
        target = repo / name
        if content is None:
            target.unlink(missing_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)


def branches(
    tmp: Path,
    start: dict[str, str | bytes | None],
    story: dict[str, str | bytes | None],
    base: dict[str, str | bytes | None],
    *,
    story_renames: dict[str, str] | None = None,
) -> Merge:
    repo = tmp / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, start)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "start")
    m = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "-b", "feature/story-1")
    for old, new in (story_renames or {}).items():
        git(repo, "mv", old, new)
    write(repo, story)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "story")
    s = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "main")
    write(repo, base)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    b = git(repo, "rev-parse", "HEAD")
    return Merge(repo, m, s, b)


def test_story_only_changes_kept_pass(tmp_path: Path) -> None:
    merge = branches(
        tmp_path,
        {"app.py": APP, "notes.txt": "one\n"},
        {"app.py": APP + STORY_FN},
        {"notes.txt": "one\ntwo\n"},
    )
    report = merge.check(merge.resolve({"app.py": APP + STORY_FN}))
    assert report.ok and report.lost == [] and report.unchecked == []


def test_dropping_the_bases_new_function_is_lost_with_its_hunk(tmp_path: Path) -> None:
    merge = branches(
        tmp_path, {"app.py": APP}, {"app.py": APP + STORY_FN}, {"app.py": APP + BASE_FN}
    )
    # "Take the story's side" of the conflict at the end of app.py.
    report = merge.check(merge.resolve({"app.py": APP + STORY_FN}))
    assert not report.ok
    [lost] = report.lost
    assert (lost.file, lost.side) == ("app.py", "base")
    assert [lost.hunk] == merge.header("base", "app.py")
    assert lost.lines == ["def helper():", "    return 'base helper'"]
    assert report.files() == ["app.py"]
    assert "app.py (base) @@" in report.details() and "def helper():" in report.details()


def test_dropping_the_storys_function_is_lost_on_the_story_side(tmp_path: Path) -> None:
    merge = branches(
        tmp_path, {"app.py": APP}, {"app.py": APP + STORY_FN}, {"app.py": APP + BASE_FN}
    )
    report = merge.check(merge.resolve({"app.py": APP + BASE_FN}))
    assert [(h.side, h.lines) for h in report.lost] == [
        ("story", ["def shout(text):", "    return text.upper()"])
    ]


def test_both_sides_kept_pass_in_either_order_and_interleaved(tmp_path: Path) -> None:
    start = "".join(f"line {i}\n" for i in range(1, 11))
    story = start.replace("line 2\n", "line 2 by the story\n") + STORY_FN
    base = start.replace("line 8\n", "line 8 by the base\n") + BASE_FN
    merge = branches(tmp_path, {"f.py": start}, {"f.py": story}, {"f.py": base})
    both = start.replace("line 2\n", "line 2 by the story\n").replace(
        "line 8\n", "line 8 by the base\n"
    )
    assert merge.check(merge.resolve({"f.py": both + STORY_FN + BASE_FN})).ok
    assert merge.check(merge.resolve({"f.py": both + BASE_FN + STORY_FN})).ok
    # The two functions' lines interleaved: order is not judged, presence is.
    mixed = both + "\n\ndef helper():\ndef shout(text):\n    return 'base helper'\n"
    assert merge.check(merge.resolve({"f.py": mixed + "    return text.upper()\n"})).ok


def test_a_line_the_story_removed_coming_back_is_lost(tmp_path: Path) -> None:
    start = "DEBUG = True\nNAME = 'app'\n"
    merge = branches(
        tmp_path,
        {"cfg.py": start},
        {"cfg.py": "NAME = 'app'\n"},
        {"cfg.py": start + "PORT = 80\n"},
    )
    report = merge.check(merge.resolve({"cfg.py": start + "PORT = 80\n"}))
    [lost] = report.lost
    assert (lost.side, lost.lines) == ("story", ["DEBUG = True"])
    assert [lost.hunk] == merge.header("story", "cfg.py")
    # Removed as the story meant: nothing lost.
    assert merge.check(merge.resolve({"cfg.py": "NAME = 'app'\nPORT = 80\n"})).ok


def test_both_sides_removing_or_adding_the_same_line_need_it_once(tmp_path: Path) -> None:
    start = "a = 1\nb = 2\nc = 3\n"
    merge = branches(
        tmp_path,
        {"x.py": start},
        {"x.py": "a = 1\nc = 3\nd = 4\n"},
        {"x.py": "a = 1\nc = 3\nd = 4\n"},
    )
    assert merge.check(merge.resolve({"x.py": "a = 1\nc = 3\nd = 4\n"})).ok
    assert [h.side for h in merge.check(merge.resolve({"x.py": "a = 1\nc = 3\n"})).lost] == [
        "story",
        "base",
    ]


def test_blank_lines_and_trailing_spaces_do_not_count(tmp_path: Path) -> None:
    merge = branches(
        tmp_path,
        {"t.txt": "alpha\n"},
        {"t.txt": "alpha\n\n\nbeta   \n"},
        {"t.txt": "alpha\n\ngamma\n"},
    )
    assert merge.check(merge.resolve({"t.txt": "alpha\nbeta\ngamma\n"})).ok


def test_a_file_one_side_deleted_kept_by_the_resolution_is_lost(tmp_path: Path) -> None:
    merge = branches(
        tmp_path,
        {"old.py": "x = 1\ny = 2\n", "app.py": APP},
        {"old.py": None},
        {"app.py": APP + BASE_FN},
    )
    report = merge.check(merge.resolve({"app.py": APP + BASE_FN}))
    assert [(h.file, h.side, h.lines) for h in report.lost] == [
        ("old.py", "story", ["x = 1", "y = 2"])
    ]


def test_binary_and_renamed_files_are_reported_not_guessed(tmp_path: Path) -> None:
    merge = branches(
        tmp_path,
        {"logo.png": b"\x89PNG\x00\x01", "util.py": "def f():\n    return 1\n", "app.py": APP},
        {"logo.png": b"\x89PNG\x00\x02\x03", "app.py": APP + STORY_FN},
        {"util.py": "def f():\n    return 2\n"},
        story_renames={"util.py": "helpers.py"},
    )
    # The resolution keeps the old logo and drops the base's edit of the renamed file.
    resolved = merge.resolve({"app.py": APP + STORY_FN, "logo.png": b"\x89PNG\x00\x01"})
    report = merge.check(resolved)
    assert report.ok  # nothing judged lost: those files are not judged at all
    unchecked = {(u.file, u.side, u.why.split(":")[0]) for u in report.unchecked}
    assert ("logo.png", "story", "binary") in unchecked
    assert ("util.py", "story", "renamed") in unchecked
    assert ("helpers.py", "story", "renamed") in unchecked
    assert any(u.file == "util.py" and u.side == "base" for u in report.unchecked)
    assert "logo.png (story): binary" in report.details()


def test_a_declared_hunk_is_let_go_and_only_that_one(tmp_path: Path) -> None:
    merge = branches(
        tmp_path,
        {"app.py": APP, "b.py": "b = 1\n"},
        {"app.py": APP + STORY_FN},
        {"app.py": APP + BASE_FN, "b.py": "b = 2\n"},
    )
    resolved = merge.resolve({"app.py": APP + STORY_FN, "b.py": "b = 1\n"})
    first = merge.check(resolved)
    assert {(h.file, h.side) for h in first.lost} == {("app.py", "base"), ("b.py", "base")}
    app_hunk = next(h for h in first.lost if h.file == "app.py")
    declared = [{"file": "app.py", "side": "base", "hunk": app_hunk.hunk, "reason": "obsolete"}]
    second = merge.check(resolved, declared)
    assert [(h.file, h.side) for h in second.lost] == [("b.py", "base")]
    # The same header on the other side, or another file, declares nothing.
    wrong = [{"file": "app.py", "side": "story", "hunk": app_hunk.hunk}]
    assert len(merge.check(resolved, wrong).lost) == 2


def test_a_real_conflicted_squash_resolved_with_theirs_drops_the_base(tmp_path: Path) -> None:
    merge = branches(
        tmp_path, {"app.py": APP}, {"app.py": APP + STORY_FN}, {"app.py": APP + BASE_FN}
    )
    git(merge.repo, "checkout", "-q", "--detach", merge.b)
    squash = subprocess.run(
        ["git", "merge", "--squash", merge.s], cwd=merge.repo, capture_output=True, check=False
    )
    assert squash.returncode != 0  # a real conflict
    git(merge.repo, "checkout", "--theirs", "app.py")
    git(merge.repo, "add", "app.py")
    git(merge.repo, "commit", "-q", "-m", "resolved")
    report = merge.check(git(merge.repo, "rev-parse", "HEAD"))
    assert [(h.side, h.hunk) for h in report.lost] == [("base", merge.header("base", "app.py")[0])]


def test_refuses_names_that_are_not_full_shas(tmp_path: Path) -> None:
    merge = branches(tmp_path, {"a": "1\n"}, {"a": "2\n"}, {"b": "3\n"})
    with pytest.raises(GitError, match="full lower-case commit sha"):
        check_resolution(
            merge.repo, merge_base="HEAD", story=merge.s, base=merge.b, resolution=merge.b
        )
