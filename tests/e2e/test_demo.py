"""The main job end to end: ``storyline demo`` through the public CLI, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Database

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def storyline(
    *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def test_demo_runs_the_whole_pipeline(tmp_path: Path, database: Database) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    env["COLUMNS"] = "160"
    if database.kind == "postgres":
        env["STORYLINE_DATABASE_URL"] = database.url
    project = tmp_path / "calc"
    run = storyline("demo", "--dir", str(project), "--keep", env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "replay check: every projection rebuilt from the log equals the live one" in run.stdout
    assert "audit trail of story 'subtract'" in run.stdout

    board = json.loads(
        storyline("story", "list", "--json", "--project", str(project), env=env).stdout
    )
    stages = {row["id"]: row["stage"] for row in board}
    assert stages == {
        "add": "done",
        "subtract": "done",
        "multiply": "done",
        "banner-en": "done",
        "banner-fr": "done",
        "divide": "blocked",
    }

    subjects = subprocess.run(
        ["git", "log", "--format=%s", "main"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert subjects[-1] == "calc: initial project"
    merged = sorted(s.rsplit("(story ", 1)[1].rstrip(")") for s in subjects[:-1])
    assert merged == ["add", "banner-en", "banner-fr", "multiply", "subtract"]
    assert (project / "calc" / "subtract.py").read_text().strip().endswith("return a - b")

    history = json.loads(
        storyline(
            "story", "history", "subtract", "--json", "--project", str(project), env=env
        ).stdout
    )
    types = [e["type"] for e in history]
    assert types.count("GatesFailed") == 1 and types[-1] == "MergeSucceeded"
    spawns = [e for e in history if e["type"] == "AgentSpawnRequested"]
    assert not any("quality gates failed" in a for a in spawns[0]["data"]["argv"])
    assert any("AssertionError" in a for a in spawns[1]["data"]["argv"])

    fr = json.loads(
        storyline(
            "story", "history", "banner-fr", "--json", "--project", str(project), env=env
        ).stdout
    )
    kinds = [e["data"].get("kind") for e in fr if e["type"] == "MergeFailed"]
    assert kinds == ["conflict_detected"]
    requeued = next(e for e in fr if e["type"] == "MergeRequeued")
    assert requeued["actor"].startswith("agent:mergemaster-banner-fr-")

    divide = json.loads(
        storyline("story", "show", "divide", "--json", "--project", str(project), env=env).stdout
    )
    assert "retries exhausted" in divide["blocked_reason"]
    assert list((project / ".storyline" / "logs" / "subtract").glob("coder-*.log"))
