"""Live following equals a from-scratch rebuild, row by row, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
import threading

from projections import PROJECTION_NAMES, ProjectionRunner, ReadModels
from projections.state import ALL_STAGES, SHARED_SNAPSHOT_KEYS
from projections.workload import drive_app
from service.application import StorylineApplication
from service.settings import Database
from tests.projections.conftest import dump_projection_tables


def test_live_following_equals_a_rebuild_row_by_row(
    app: StorylineApplication, runner: ProjectionRunner, read_models: ReadModels
) -> None:
    runner.start()
    ids = drive_app(app, random.Random(7), stories=30, steps=700)
    head = app.max_position()
    assert read_models.wait_for(head, timeout=30)
    runner.stop()

    # The workload is only evidence if it went through every stage.
    to_stages = {e["to_stage"] for e in read_models.history(limit=10_000)}
    assert to_stages == set(ALL_STAGES)

    live = dump_projection_tables(read_models)
    assert len(live["story_history"]) == head
    assert runner.check() == {}

    replayed = runner.rebuild()
    assert replayed == head
    assert dump_projection_tables(read_models) == live
    assert all(s.position == head and s.lag == 0 for s in read_models.status())

    # The board agrees with the aggregates on every shared field.
    for story_id in ids:
        snapshot = app.get_story(story_id).snapshot()
        row = read_models.board_row(story_id)
        assert row is not None
        for key in SHARED_SNAPSHOT_KEYS:
            if key in ("created_on", "modified_on"):
                continue
            assert row[key] == snapshot[key], (story_id, key)
        assert row["last_change"] == snapshot["modified_on"]
        assert row["created_at"] == snapshot["created_on"]


def test_incremental_batches_equal_one_big_rebuild(
    database: Database, app: StorylineApplication, read_models: ReadModels
) -> None:
    drive_app(app, random.Random(3), stories=15, steps=300)
    # One event per transaction: the most incremental following there is.
    one_by_one = ProjectionRunner(database, app, batch_size=1)
    try:
        one_by_one.run_once()
        live = dump_projection_tables(read_models)
    finally:
        one_by_one.close()
    whole = ProjectionRunner(database, app, rebuild_batch_size=100_000)
    try:
        whole.rebuild()
        assert dump_projection_tables(read_models) == live
        assert whole.check() == {}
    finally:
        whole.close()


def test_rebuild_of_one_projection_leaves_the_others_alone(
    app: StorylineApplication, runner: ProjectionRunner, read_models: ReadModels
) -> None:
    drive_app(app, random.Random(11), stories=8, steps=150)
    runner.run_once()
    before = {s.name: s.position for s in read_models.status()}
    seen: list[tuple[int, int]] = []
    assert runner.rebuild("board", progress=lambda done, total: seen.append((done, total))) > 0
    assert seen[0] == (0, app.max_position())
    assert seen[-1] == (app.max_position(), app.max_position())
    assert {s.name: s.position for s in read_models.status()} == before
    assert runner.check("board") == {}
    assert set(PROJECTION_NAMES) >= {"board", "history", "agent_runs", "merge_queue", "metrics"}


def test_check_reads_one_snapshot_while_writers_and_followers_go_on(
    database: Database, app: StorylineApplication, runner: ProjectionRunner
) -> None:
    """A check replays into TEMP tables inside one read snapshot: on SQLite that takes no
    write lock, so writers and the follower carry on, and it reports no false differences
    however far they get meanwhile."""
    drive_app(app, random.Random(31), stories=8, steps=200)
    runner.run_once()
    runner.start()
    errors: list[BaseException] = []
    writing = threading.Event()
    writing.set()

    def write() -> None:
        seed = 100
        try:
            while writing.is_set():
                drive_app(app, random.Random(seed), stories=3, steps=40)
                seed += 1
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    checker = ProjectionRunner(database)
    try:
        for _ in range(3):
            assert checker.check() == {}
    finally:
        writing.clear()
        writer.join(60)
        checker.close()
        runner.stop()
    assert errors == []
    runner.run_once()
    assert runner.check() == {}
