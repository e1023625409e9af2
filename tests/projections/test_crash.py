"""Kill -9 the projection worker again and again while a writer commits: nothing is lost or doubled.

A real worker process (``python -m projections.worker``) follows the log in small batches;
the test SIGKILLs it at random moments, restarts it, and finally lets it catch up and stop
with SIGTERM. Then every event must be in the history exactly once, the board must equal the
aggregates, and every projection must equal a from-scratch replay (``check``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from projections import ProjectionRunner, ReadModels
from projections.tables import agent_runs, story_history
from projections.workload import drive_app
from service.application import StorylineApplication
from service.settings import Database
from tests.projections.conftest import database_url

KILLS = 5


def start_worker(project: Path, db: Database) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "projections.worker",
            "--project",
            str(project),
            "--database-url",
            database_url(db),
            "--batch-size",
            "3",
            "--poll-interval",
            "0.05",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_sigkilled_worker_applies_every_event_exactly_once(
    database: Database,
    app: StorylineApplication,
    read_models: ReadModels,
    tmp_path: Path,
) -> None:
    rng = random.Random(42)
    writing = threading.Event()
    writing.set()
    ids: list[str] = []

    def write() -> None:
        # Round after round of fresh stories, so the log keeps growing until told to stop.
        seed = 43
        while writing.is_set():
            ids.extend(
                drive_app(
                    app,
                    random.Random(seed),
                    stories=10,
                    steps=200,
                    # A steady few hundred commits a second: enough to keep the worker
                    # busy, few enough to verify quickly.
                    on_commit=lambda _position: time.sleep(0.002),
                    should_stop=lambda: not writing.is_set(),
                )
            )
            seed += 1

    writer = threading.Thread(target=write)
    writer.start()
    progress: list[int] = []
    try:
        for _ in range(KILLS):
            worker = start_worker(tmp_path, database)
            # Let it get going (imports, first batches), then kill it mid-flight.
            deadline = time.monotonic() + 20
            before = min(read_models.positions().values())
            while min(read_models.positions().values()) == before:
                assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
                assert time.monotonic() < deadline, "the worker made no progress"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(10)
            assert worker.returncode == -signal.SIGKILL
            progress.append(min(read_models.positions().values()))
    finally:
        writing.clear()
        writer.join(60)

    head = app.max_position()
    assert (progress == sorted(progress) and progress[-1] < head) or progress[-1] <= head
    worker = start_worker(tmp_path, database)
    try:
        assert read_models.wait_for(head, timeout=60), read_models.status()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)
    assert worker.returncode == 0, worker.stderr.read() if worker.stderr else ""

    # Exactly once: one history row per event, with the event's own content.
    logged = app.events_after(0, limit=head + 1)
    with read_models.engine.connect() as conn:
        positions: list[int] = list(
            conn.scalars(select(story_history.c.position).order_by(story_history.c.position))
        )
        runs = conn.execute(select(agent_runs)).all()
    assert positions == [e.position for e in logged]
    history: list[dict[str, object]] = []
    while len(history) < len(logged):
        after = int(str(history[-1]["position"])) if history else 0
        page = read_models.history(after=after, limit=5000)
        assert page
        history.extend(page)
    assert history == [e.as_json() for e in logged]
    assert len(runs) == sum(1 for e in logged if e.type == "AgentSpawnRequested")

    # Counters double-count if any event were applied twice: compare with the aggregates.
    for story_id in ids:
        row = read_models.board_row(story_id)
        snapshot = app.get_story(story_id).snapshot()
        assert row is not None
        for key in ("version", "stage", "tokens_in", "tokens_out", "cost_usd", "retry_count"):
            assert row[key] == snapshot[key], (story_id, key)
    assert sum(read_models.metrics()["stories_per_stage"].values()) == len(ids)

    # And every projection equals a replay from scratch.
    checker = ProjectionRunner(database)
    try:
        assert checker.check() == {}
    finally:
        checker.close()
    assert all(not s.failed and s.lag == 0 for s in read_models.status())
