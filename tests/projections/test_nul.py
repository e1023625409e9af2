"""A NUL in the log cannot stop a read model: gate output and old logs project and rebuild.

PostgreSQL's text and jsonb cannot hold U+0000. The log keeps it (JSON bytes); every read
model stores U+FFFD in its place, on both backends, so both give the same rows.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from projections import ProjectionRunner, ReadModels
from projections.engine import NUL_REPLACEMENT
from runners.gates import run_gates
from service.application import StorylineApplication
from service.settings import Database
from tests.projections.test_history_paths import insert_raw

NUL_GATE = [sys.executable, "-c", "import sys; sys.stdout.write('a\\0b'); sys.exit(1)"]


def _to_gates(app: StorylineApplication, story_id: str) -> None:
    actor = "runner:coder"
    app.transition(story_id, "start_coding", actor=actor)
    app.transition(story_id, "spawn_agent", actor=actor, data={"agent": "coder", "runtime": "cli"})
    app.transition(story_id, "agent_started", actor=actor, data={"attempt": 1, "pid": 4242})
    app.transition(
        story_id, "agent_exited", actor=actor, data={"attempt": 1, "outcome": "completed"}
    )
    app.transition(story_id, "start_gates", actor="runner:gates", data={"commits_ahead": 1})


def _all_caught_up(read_models: ReadModels, head: int) -> None:
    statuses = read_models.status()
    assert [(s.name, s.error) for s in statuses if s.failed] == []
    assert all(s.position == head for s in statuses), statuses


def test_gate_output_with_a_nul_reaches_board_and_history(
    database: Database,
    app: StorylineApplication,
    runner: ProjectionRunner,
    read_models: ReadModels,
    tmp_path: Path,
) -> None:
    story = app.create_story(name="s", description="d", acceptance_criteria=["a"], actor="u:x")
    sid = story.story.id
    _to_gates(app, sid)
    gate = run_gates([NUL_GATE], tmp_path, timeout_secs=60)
    assert not gate.passed and "a\x00b" in gate.output  # the real gate wrote a NUL
    app.transition(sid, "gates_failed", actor="runner:gates", data={"output": gate.output})
    later = app.create_story(name="later", description="d", acceptance_criteria=["a"], actor="u:x")

    runner.run_once()
    _all_caught_up(read_models, app.max_position())
    [failed] = [e for e in read_models.history(sid) if e["type"] == "GatesFailed"]
    assert f"a{NUL_REPLACEMENT}b" in failed["data"]["output"]
    assert "\x00" not in failed["data"]["output"]
    row = read_models.board_row(sid)
    assert row is not None and (row["stage"], row["retry_count"]) == ("coding", 1)
    assert read_models.board_row(later.story.id) is not None
    # The log itself keeps the output whole.
    [logged] = [e for e in app.history(sid) if e.type == "GatesFailed"]
    assert "a\x00b" in logged.data["output"]

    assert runner.check() == {}
    runner.rebuild()
    _all_caught_up(read_models, app.max_position())
    assert runner.check() == {}


def test_an_old_log_with_nuls_everywhere_projects_and_rebuilds(
    database: Database,
    app: StorylineApplication,
    runner: ProjectionRunner,
    read_models: ReadModels,
) -> None:
    # Written straight into the event store, as a storyline before NUL was refused did.
    created: dict[str, Any] = {
        "timestamp": "2030-01-01T00:00:00.000001Z",
        "actor": "user:\x00old",
        "reason": "x\x00y",
        "from_stage": None,
        "to_stage": "backlog",
        "originator_topic": "storyline.Story.v1",
        "name": "old\x00name",
        "description": "d\x00",
        "acceptance_criteria": ["c\x00"],
        "depends_on": [],
        "epic": "e\x00",
        "priority": 0,
        # The text "\u0000" (a backslash, then u0000) is not a NUL and must stay as it is.
        "\x00key": "literal \\u0000 and \\\x00",
    }
    insert_raw(database, app, "old", 1, "storyline.StoryCreated.v1", created)
    blocked = {
        "timestamp": "2030-01-01T00:00:01.000001Z",
        "actor": "user:old",
        "reason": "\x00",
        "from_stage": "backlog",
        "to_stage": "blocked",
        "originator_topic": "storyline.Story.v1",
        "blocked_from": "backlog",
    }
    insert_raw(database, app, "old", 2, "storyline.StoryBlocked.v1", blocked)
    after = app.create_story(name="after", description="d", acceptance_criteria=["a"], actor="u:x")

    runner.run_once()
    head = app.max_position()
    _all_caught_up(read_models, head)
    row = read_models.board_row("old")
    assert row is not None
    assert (row["name"], row["stage"], row["epic"], row["blocked_reason"]) == (
        f"old{NUL_REPLACEMENT}name",
        "blocked",
        f"e{NUL_REPLACEMENT}",
        NUL_REPLACEMENT,
    )
    first = read_models.history("old")[0]
    assert (first["actor"], first["reason"]) == (
        f"user:{NUL_REPLACEMENT}old",
        f"x{NUL_REPLACEMENT}y",
    )
    assert first["data"][f"{NUL_REPLACEMENT}key"] == f"literal \\u0000 and \\{NUL_REPLACEMENT}"
    assert first["data"]["acceptance_criteria"] == [f"c{NUL_REPLACEMENT}"]
    assert read_models.board_row(after.story.id) is not None
    assert runner.check() == {}

    runner.rebuild()
    _all_caught_up(read_models, head)
    assert read_models.history("old")[0] == first
    assert runner.check() == {}
