"""Support for the speculative merge queue's tests: stories put straight into the merge
queue on feature branches made with git plumbing, and a real merge-gate process that
sleeps briefly, can wait for another story's gate to start (proof that gates overlap),
and fails on any tree holding a ``BROKEN-*`` file."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.application import StorylineApplication
from tests.pipeline_support import GIT_ID, git

ACTOR = "user:test"

GATE = r"""
import json, pathlib, sys, time
cwd = pathlib.Path.cwd()
out = pathlib.Path(sys.argv[1])
settings = json.loads((out / "gate.json").read_text())
mine = sorted(int(p.stem[1:]) for p in cwd.glob("s*.txt") if p.stem[1:].isdigit())
top = mine[-1] if mine else 0
with (out / "gate-runs.log").open("a") as log:
    log.write(f"{top}\n")
(out / f"started-{top}").write_text("")
wait_for = settings.get("wait", {}).get(str(top))
if wait_for is not None and not (out / f"barrier-{top}").exists():
    deadline = time.monotonic() + 30
    while not (out / f"started-{wait_for}").exists():
        if time.monotonic() > deadline:
            print(f"gate of s{top}: s{wait_for}'s gate never started while this one ran")
            sys.exit(3)
        time.sleep(0.02)
    (out / f"barrier-{top}").write_text("")
hold = settings.get("hold", {}).get(str(top))
if hold is not None:
    while not (out / hold).exists():
        time.sleep(0.02)
time.sleep(settings.get("sleep", 0.2))
broken = sorted(p.name for p in cwd.glob("BROKEN-*"))
if broken:
    print("integration suite: 1 failed:", ", ".join(broken))
    sys.exit(1)
print("integration suite: ok")
"""


def write_gate(tmp: Path, **settings: Any) -> list[str]:
    """The merge gate's argv; ``settings``: ``sleep``, ``wait`` {top: other}, ``hold``."""
    out = tmp / "gate-out"
    out.mkdir(exist_ok=True)
    (out / "gate.json").write_text(json.dumps(settings))
    script = tmp / "gate.py"
    script.write_text(GATE)
    return [sys.executable, str(script), str(out)]


def gate_runs(tmp: Path) -> list[int]:
    path = tmp / "gate-out" / "gate-runs.log"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def branch_with(repo: Path, story_id: str, files: dict[str, str]) -> str:
    """``feature/story-<id>``: one commit on main's tip writing ``files`` (plumbing: no
    checkout is touched)."""
    index = repo / ".git" / f"index-{story_id}"
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}

    def run(*args: str, stdin: str | None = None) -> str:
        return subprocess.run(
            ["git", *GIT_ID, *args],
            cwd=repo,
            env=env,
            input=stdin,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    run("read-tree", "main")
    for name, content in files.items():
        blob = run("hash-object", "-w", "--stdin", stdin=content)
        run("update-index", "--add", "--cacheinfo", f"100644,{blob},{name}")
    tree = run("write-tree")
    commit = run("commit-tree", tree, "-p", "main", "-m", f"work on {story_id}")
    run("update-ref", f"refs/heads/feature/story-{story_id}", commit)
    index.unlink(missing_ok=True)
    return commit


def queue(app: StorylineApplication, repo: Path, story_id: str, files: dict[str, str]) -> None:
    """A story with its branch, walked through coding and gates into the merge queue."""
    branch = f"feature/story-{story_id}"
    branch_with(repo, story_id, files)
    app.create_story(
        story_id=story_id,
        name=f"story {story_id}",
        description="d",
        acceptance_criteria=["it merges"],
        depends_on=[],
        actor=ACTOR,
    )
    steps: list[tuple[str, dict[str, Any]]] = [
        ("start_coding", {}),
        (
            "worktree_ready",
            {"path": str(repo / ".storyline" / "none" / story_id), "branch": branch},
        ),
        ("spawn_agent", {"role": "coder", "agent": "coder", "runtime": "cli"}),
        ("agent_started", {"role": "coder", "attempt": 1, "pid": 99}),
        ("agent_exited", {"role": "coder", "attempt": 1, "outcome": "completed"}),
        ("start_gates", {"commits_ahead": 1}),
        ("gates_passed", {"feature_branch": branch, "commits_ahead": 1}),
    ]
    for event, data in steps:
        app.transition(story_id, event, actor=ACTOR, data=data)


def landed(repo: Path) -> list[str]:
    """Subjects of the commits on main after ``initial``, oldest first."""
    subjects = git(repo, "log", "--reverse", "--format=%s", "main").splitlines()
    return subjects[1:]


def base_trees(repo: Path) -> list[str]:
    """The tree of every commit on main after ``initial``, oldest first."""
    lines = git(repo, "log", "--reverse", "--format=%T", "main").splitlines()
    return lines[1:]


def passed_merge_trees(app: StorylineApplication, story_ids: list[str]) -> set[str]:
    return {
        str(e.data["tree"])
        for sid in story_ids
        for e in app.history(sid)
        if e.type == "GateVerdictRecorded"
        and e.data.get("phase") == "merge_gates"
        and e.data.get("passed")
    }


def base_only_moved_forward(repo: Path) -> bool:
    """Every position main's reflog recorded descends from the one before it."""
    shas = git(repo, "reflog", "show", "--format=%H", "refs/heads/main").splitlines()
    shas.reverse()
    for old, new in itertools.pairwise(shas):
        check = subprocess.run(
            ["git", "merge-base", "--is-ancestor", old, new], cwd=repo, capture_output=True
        )
        if check.returncode != 0:
            return False
    return True
