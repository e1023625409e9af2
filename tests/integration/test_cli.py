"""The ``storyline`` command line as a user runs it: a real subprocess on a real project."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Database

STORYLINE = [sys.executable, "-m", "api.cli"]


def run(
    project: Path, *args: str, db: Database | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    if db is not None and db.kind == "postgres":
        env["STORYLINE_DATABASE_URL"] = f"postgresql://{db.user}@{db.host}:{db.port}/{db.dbname}"
    proc = subprocess.run(
        [*STORYLINE, *args, "--project", str(project)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"storyline {args} failed: {proc.stderr}")
    return proc


def test_story_flow_and_errors(tmp_path: Path, database: Database) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    assert "wrote" in run(project, "init").stdout
    assert (project / "storyline.toml").exists()
    assert ".storyline/" in (project / ".git/info/exclude").read_text()
    again = run(project, "init", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr

    added = json.loads(
        run(
            project, "story", "add", "Login page", "-c", "shows a form", "--json", db=database
        ).stdout
    )
    assert added["id"] == "1" and added["stage"] == "backlog"
    run(project, "story", "add", "Logout", "-c", "ends session", "--depends-on", "1", db=database)

    refused = run(project, "story", "move", "2", "start_coding", db=database, check=False)
    assert refused.returncode == 1
    assert (
        refused.stderr.count("\n") == 1 and "unfinished dependencies: 1 (backlog)" in refused.stderr
    )

    moved = json.loads(
        run(
            project,
            "story",
            "move",
            "1",
            "start_coding",
            "--expected-version",
            "1",
            "--json",
            db=database,
        ).stdout
    )
    assert moved["stage"] == "coding" and moved["version"] == 2
    stale = run(
        project,
        "story",
        "move",
        "1",
        "block",
        "-r",
        "x",
        "--expected-version",
        "1",
        db=database,
        check=False,
    )
    assert stale.returncode == 1 and "version 2" in stale.stderr

    run(
        project,
        "story",
        "move",
        "1",
        "block",
        "--reason",
        "waiting on infra",
        "--actor",
        "user:ops",
        db=database,
    )
    history = json.loads(run(project, "story", "history", "1", "--json", db=database).stdout)
    assert [e["type"] for e in history] == ["StoryCreated", "CodingStarted", "StoryBlocked"]
    assert history[-1]["actor"] == "user:ops" and history[-1]["reason"] == "waiting on infra"

    back_then = json.loads(
        run(
            project,
            "story",
            "show",
            "1",
            "--as-of",
            str(history[1]["position"]),
            "--json",
            db=database,
        ).stdout
    )
    assert back_then["stage"] == "coding"
    listed = json.loads(run(project, "story", "list", "--json", db=database).stdout)
    assert [(s["id"], s["stage"]) for s in listed] == [("1", "blocked"), ("2", "backlog")]
    human = run(project, "story", "show", "1", db=database).stdout
    assert "blocked" in human and "waiting on infra" in human

    hostile = run(project, "story", "show", "../../etc/passwd", db=database, check=False)
    assert hostile.returncode == 1 and "invalid story id" in hostile.stderr
    bad_data = run(
        project, "story", "move", "1", "unblock", "--data", "[1]", db=database, check=False
    )
    assert bad_data.returncode == 2 and "JSON object" in bad_data.stderr


def test_bad_config_is_an_error_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "storyline.toml").write_text("max_coders = 0\n[gates]\ncomands = []\n")
    proc = run(tmp_path, "story", "list", check=False)
    assert proc.returncode == 2
    assert "max_coders" in proc.stderr and "unknown key 'gates.comands'" in proc.stderr
    assert not (tmp_path / ".storyline" / "storyline.db").exists()


@pytest.mark.postgres
def test_postgres_needs_db_upgrade_first(tmp_path: Path) -> None:
    from tests.conftest import create_pg_database, drop_pg_database

    db = create_pg_database()
    try:
        proc = run(tmp_path, "story", "list", db=db, check=False)
        assert proc.returncode == 2 and "storyline db upgrade" in proc.stderr
        upgraded = run(tmp_path, "db", "upgrade", db=db)
        assert "revision" in upgraded.stdout
        assert run(tmp_path, "story", "list", "--json", db=db).stdout.strip() == "[]"
    finally:
        drop_pg_database(db)
