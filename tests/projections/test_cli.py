"""``storyline projections status | rebuild | check`` on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import random
from pathlib import Path

from sqlalchemy import update
from typer.testing import CliRunner

from api.cli_projections import app as cli
from projections import ProjectionRunner, ReadModels
from projections.tables import board, projection_positions
from projections.workload import drive_app
from service.application import StorylineApplication
from service.settings import Database
from tests.projections.conftest import database_url

invoke = CliRunner().invoke


def args(command: str, tmp_path: Path, db: Database, *extra: str) -> list[str]:
    return [command, *extra, "--project", str(tmp_path), "--database-url", database_url(db)]


def test_status_rebuild_and_check(
    database: Database,
    app: StorylineApplication,
    runner: ProjectionRunner,
    read_models: ReadModels,
    tmp_path: Path,
) -> None:
    drive_app(app, random.Random(21), stories=5, steps=100)
    runner.run_once()
    head = app.max_position()

    result = invoke(cli, args("status", tmp_path, database, "--json"))
    assert result.exit_code == 0, result.output
    statuses = json.loads(result.output)
    assert [s["name"] for s in statuses] == [
        "board",
        "history",
        "agent_runs",
        "merge_queue",
        "metrics",
    ]
    assert all((s["position"], s["lag"], s["state"]) == (head, 0, "ok") for s in statuses)
    table = invoke(cli, args("status", tmp_path, database))
    assert table.exit_code == 0 and "history" in table.output

    result = invoke(cli, args("rebuild", tmp_path, database, "history", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["projections"], summary["events"], summary["error"]) == (
        ["history"],
        head,
        None,
    )
    with_bar = invoke(cli, args("rebuild", tmp_path, database))
    assert with_bar.exit_code == 0 and f"rebuilt all projections: {head} events" in with_bar.output

    result = invoke(cli, args("check", tmp_path, database, "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "board": [],
        "history": [],
        "agent_runs": [],
        "merge_queue": [],
        "metrics": [],
    }

    # Corrupt one row: check names it and fails; a rebuild of that projection repairs it.
    story_id = app.story_ids()[0]
    with read_models.engine.begin() as conn:
        conn.execute(update(board).where(board.c.story_id == story_id).values(retry_count=99))
    result = invoke(cli, args("check", tmp_path, database, "board", "--json"))
    assert result.exit_code == 1
    (difference,) = json.loads(result.output)["board"]
    assert story_id in difference and "retry_count: live=99" in difference
    plain = invoke(cli, args("check", tmp_path, database, "board"))
    assert plain.exit_code == 1 and "DIFF board" in plain.output
    assert invoke(cli, args("rebuild", tmp_path, database, "board", "--json")).exit_code == 0
    assert invoke(cli, args("check", tmp_path, database)).exit_code == 0


def test_failed_projections_and_bad_input_give_non_zero_exits(
    database: Database, read_models: ReadModels, runner: ProjectionRunner, tmp_path: Path
) -> None:
    runner.run_once()
    with read_models.engine.begin() as conn:
        conn.execute(
            update(projection_positions)
            .where(projection_positions.c.name == "metrics")
            .values(error="RuntimeError: [bad] thing", error_position=7)
        )
    result = invoke(cli, args("status", tmp_path, database))
    assert result.exit_code == 1
    assert "failed at 7" in result.output and "[bad] thing" in result.output

    unknown = invoke(cli, args("rebuild", tmp_path, database, "nope"))
    assert unknown.exit_code == 2 and "unknown projection" in unknown.output
    assert invoke(cli, args("check", tmp_path, database, "nope")).exit_code == 2
    broken = invoke(cli, ["status", "--project", str(tmp_path), "--database-url", "mysql://x/y"])
    assert broken.exit_code == 2 and "error" in broken.output
