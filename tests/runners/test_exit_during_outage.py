"""An agent that exits while the database is away still has its exit recorded.

The runner's store is PostgreSQL behind a loopback relay that can drop every connection and
refuse new ones for a while (what a PostgreSQL restart or a network blip looks like). The
event store gives up on a command after about 5 s (``service.recorder``): an exit recorded
in that window used to kill the agent's watcher thread, and the story stayed "running" in
that runner until it restarted.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from domain.stages import Stage
from service.settings import Database
from tests.pg_relay import Relay
from tests.pipeline_support import make_config, make_repo, running_pipeline

pytestmark = pytest.mark.slow

FIX = [{"write": "app.py", "content": "def add(a, b):\n    return a + b\n"}, {"commit": "fix add"}]


def test_an_exit_during_a_database_outage_is_recorded_when_it_ends(
    tmp_path: Path, pg_database: Database
) -> None:
    outage = Relay((pg_database.host, pg_database.port))
    through = dataclasses.replace(pg_database, port=outage.port)
    repo = make_repo(tmp_path / "repo")
    started = tmp_path / "agent-started"
    script = {"s1": [{"write": str(started), "content": "x"}, {"sleep": 2, "interval": 0.2}, *FIX]}
    config = make_config(tmp_path, script)
    try:
        with running_pipeline(repo, through, config) as pipeline:
            pipeline.add("s1")
            pipeline.start("s1")
            deadline = time.monotonic() + 60
            while not started.exists():
                assert time.monotonic() < deadline, "the agent never started"
                time.sleep(0.05)
            outage.interrupt()
            # The agent finishes (about 2 s) and exits while the database stays away for
            # longer than the event store's retry budget.
            time.sleep(12)
            outage.resume()
            story = pipeline.wait_stage("s1", Stage.MERGE, Stage.DONE, timeout=120)
            exits = [e for e in pipeline.app.history("s1") if e.type == "AgentExited"]
            assert len(exits) == 1 and exits[0].data["outcome"] == "completed", exits
            assert story.running_agent is None
    finally:
        outage.close()
