"""Shared by the git-layer tests: git run as a person or an agent would (its own identity),
with the global and system git config switched off so that storyline's own commits prove
they need no configured identity. A test module takes the switch-off by importing
``no_git_identity`` (an autouse fixture)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

AGENT_ENV = {
    "GIT_AUTHOR_NAME": "Test Agent",
    "GIT_AUTHOR_EMAIL": "agent@example.com",
    "GIT_COMMITTER_NAME": "Test Agent",
    "GIT_COMMITTER_EMAIL": "agent@example.com",
}


@pytest.fixture(autouse=True)
def no_git_identity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in (*AGENT_ENV, "EMAIL", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(name, raising=False)


def git(cwd: Path, *args: str, check: bool = True) -> str:
    """Run git as a person or an agent would (with their own identity)."""
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **AGENT_ENV, "LC_ALL": "C"},
        capture_output=True,
        text=True,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}{proc.stdout}")
    return proc.stdout


def sha(cwd: Path, rev: str) -> str:
    return git(cwd, "rev-parse", "--verify", rev).strip()
