"""Fixtures for the agent runtime tests: real git repositories and scripted-agent configs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from domain.config import AgentConfig, FixupCaps
from runners.agents import SpawnSpec, StoryText

GIT_ENV_ARGS = ["-c", "user.name=Test", "-c", "user.email=test@example.invalid"]


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", *GIT_ENV_ARGS, "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"git {args} failed: {proc.stderr}")
    return proc.stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository on ``main`` with one commit."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("hello\n", encoding="utf-8")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class Scripted:
    """Writes a script for the scripted agent and builds the AgentConfig that runs it."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "agent"
        self.dir.mkdir(exist_ok=True)
        self.script = self.dir / "script.json"
        self.record = self.dir / "calls.jsonl"

    def config(self, script: dict[str, Any], **overrides: Any) -> AgentConfig:
        self.script.write_text(json.dumps(script), encoding="utf-8")
        args = [
            "-m",
            "runners.scripted_agent",
            "--script",
            str(self.script),
            "--record",
            str(self.record),
            "-p",
            "{{prompt}}",
            "--output-format",
            "stream-json",
            "--verbose",
        ]
        fields: dict[str, Any] = {"name": "scripted", "command": sys.executable, "args": args}
        fields.update(overrides)
        return AgentConfig(**fields)

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.record)


@pytest.fixture
def scripted(tmp_path: Path) -> Scripted:
    return Scripted(tmp_path)


SpecFactory = Callable[..., SpawnSpec]


@pytest.fixture
def make_spec(tmp_path: Path) -> SpecFactory:
    def factory(agent: AgentConfig, cwd: Path, **overrides: Any) -> SpawnSpec:
        story_id = overrides.pop("story_id", "42")
        attempt = overrides.pop("attempt", 1)
        fields: dict[str, Any] = {
            "story_id": story_id,
            "attempt": attempt,
            "role": "coder",
            "agent": agent,
            "cwd": cwd,
            "base_branch": "main",
            "story": StoryText(
                name="Add a greeting",
                description="Write greeting.txt.",
                acceptance_criteria=("greeting.txt exists", "it says hello"),
            ),
            "log_path": tmp_path / "logs" / f"{story_id}-{attempt}.log",
            "inactivity_timeout_secs": 60.0,
            "fixup_caps": FixupCaps(),
            "env": {
                "STORYLINE_URL": "http://127.0.0.1:9",
                "STORYLINE_STORY_ID": story_id,
                "STORYLINE_ATTEMPT": str(attempt),
                "STORYLINE_TOKEN": "tok-scoped-secret-0123456789",
            },
        }
        fields.update(overrides)
        return SpawnSpec(**fields)

    return factory
