"""``projections check`` tells the truth about failed and lagging projections, and an
operator can move a failed projection past its event without losing anything.

The poison is real: a StoryBlocked event without ``blocked_from`` (as a hand-written or
foreign log might hold) makes the board projection fail; the other projections take it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from typer.testing import CliRunner

from api.cli_projections import app as cli
from projections import ProjectionRunner, ReadModels, render_prometheus
from projections.workload import drive_app
from service.application import StorylineApplication
from service.settings import Database
from tests.projections.test_cli import args
from tests.projections.test_history_paths import insert_raw

invoke = CliRunner().invoke
ALL_CLEAR = {n: [] for n in ("board", "history", "agent_runs", "merge_queue", "metrics")}


def _poison(database: Database, app: StorylineApplication) -> int:
    """Append an event the board cannot apply; returns its position."""
    story = app.create_story(name="p", description="d", acceptance_criteria=["a"], actor="u:x")
    payload = {
        "timestamp": "2030-01-01T00:00:00.000001Z",
        "actor": "user:hand",
        "reason": "written by hand",
        "from_stage": "backlog",
        "to_stage": "blocked",
        "originator_topic": "storyline.Story.v1",
    }
    insert_raw(database, app, story.story.id, 2, "storyline.StoryBlocked.v1", payload)
    return app.max_position()


def _check(tmp_path: Path, database: Database, *extra: str) -> tuple[int, dict[str, list[str]]]:
    result = invoke(cli, args("check", tmp_path, database, "--json", *extra))
    return result.exit_code, json.loads(result.output)


def test_check_fails_for_a_behind_and_for_a_failed_projection(
    database: Database, app: StorylineApplication, runner: ProjectionRunner, tmp_path: Path
) -> None:
    drive_app(app, random.Random(5), stories=4, steps=60)
    runner.run_once()
    assert _check(tmp_path, database) == (0, ALL_CLEAR)

    # Behind: commits the projections have not applied (no follower runs here).
    caught_up = app.max_position()
    app.create_story(name="new", description="d", acceptance_criteria=["a"], actor="u:x")
    head = app.max_position()
    code, found = _check(tmp_path, database, "--wait", "0.2")
    assert code == 1
    assert found == {n: [f"behind: position {caught_up}, head {head}"] for n in ALL_CLEAR}
    plain = invoke(cli, args("check", tmp_path, database, "--wait", "0"))
    assert plain.exit_code == 1 and "BEHIND board" in plain.output
    runner.run_once()
    assert _check(tmp_path, database) == (0, ALL_CLEAR)

    # Failed: the board stops before the poisoned event, the others pass it.
    at = _poison(database, app)
    runner.run_once()
    code, found = _check(tmp_path, database)
    assert code == 1
    [board] = found.pop("board")
    assert board.startswith(f"failed at position {at} (position {at - 1}, head {at}): KeyError")
    assert found == {n: [] for n in ALL_CLEAR if n != "board"}
    plain = invoke(cli, args("check", tmp_path, database, "board"))
    assert plain.exit_code == 1 and "FAILED board" in plain.output


def test_a_live_follower_is_given_time_to_catch_up(
    database: Database, app: StorylineApplication, runner: ProjectionRunner, tmp_path: Path
) -> None:
    runner.start()
    try:
        drive_app(app, random.Random(6), stories=3, steps=40)
        assert _check(tmp_path, database, "--wait", "30") == (0, ALL_CLEAR)
    finally:
        runner.stop()


def test_skip_moves_a_failed_projection_past_its_event_and_every_replay_leaves_it_out(
    database: Database,
    app: StorylineApplication,
    runner: ProjectionRunner,
    read_models: ReadModels,
    tmp_path: Path,
) -> None:
    drive_app(app, random.Random(7), stories=3, steps=40)
    at = _poison(database, app)
    later = app.create_story(name="later", description="d", acceptance_criteria=["a"], actor="u:x")
    runner.run_once()
    board = {s.name: s for s in read_models.status()}["board"]
    assert (board.failed, board.position, board.error_position) == (True, at - 1, at)
    assert read_models.board_row(later.story.id) is None  # stuck before it

    def skip(*extra: str) -> tuple[int, str]:
        result = invoke(cli, args("skip", tmp_path, database, *extra))
        return result.exit_code, result.output

    # Refusals change nothing: not the failing event, a projection that has not failed, no
    # reason, an unknown projection.
    code, output = skip("board", "--position", str(at + 1), "--reason", "r")
    assert code == 1 and f"it failed at position {at}" in output
    code, output = skip("history", "--position", str(at), "--reason", "r")
    assert code == 1 and "it has not failed" in output
    assert skip("board", "--position", str(at), "--reason", " ")[0] == 1
    assert skip("nope", "--position", str(at), "--reason", "r")[0] == 2
    assert {s.name: s for s in read_models.status()}["board"] == board

    code, output = skip(
        "board", "--position", str(at), "--reason", "hand-written event", "--actor", "ops:kim"
    )
    assert code == 0, output
    status = {s.name: s for s in read_models.status()}
    assert (status["board"].failed, status["board"].skipped) == (False, 1)
    assert all(s.skipped == 0 for n, s in status.items() if n != "board")
    assert 'storyline_projection_skipped_events{projection="board"} 1' in render_prometheus(
        read_models.metrics(), read_models.status()
    )
    [recorded] = runner.skips("board")
    assert (recorded["position"], recorded["reason"], recorded["actor"]) == (
        at,
        "hand-written event",
        "ops:kim",
    )
    assert recorded["error"].startswith("KeyError")

    # The runner, still in its failure back-off, takes the move up at once and goes on.
    runner.run_once()
    assert all(s.lag == 0 and not s.failed for s in read_models.status())
    assert read_models.board_row(later.story.id) is not None
    # The event is still in the log and in the history; the board leaves it out.
    assert len(read_models.history(recorded_story(app, at))) == 2
    assert _check(tmp_path, database) == (0, ALL_CLEAR)

    rebuilt = invoke(cli, args("rebuild", tmp_path, database, "--json"))
    assert rebuilt.exit_code == 0, rebuilt.output
    assert _check(tmp_path, database) == (0, ALL_CLEAR)
    assert {s.name: s.skipped for s in read_models.status()}["board"] == 1


def recorded_story(app: StorylineApplication, position: int) -> str:
    [event] = app.events_after(position - 1, limit=1)
    return event.story_id
