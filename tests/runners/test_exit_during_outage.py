"""An agent that exits while the database is away still has its exit recorded.

The runner's store is PostgreSQL behind a loopback relay that can drop every connection and
refuse new ones for a while (what a PostgreSQL restart or a network blip looks like). The
event store gives up on a command after about 5 s (``service.recorder``): an exit recorded
in that window used to kill the agent's watcher thread, and the story stayed "running" in
that runner until it restarted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from pathlib import Path

import pytest

from domain.stages import Stage
from service.settings import Database
from tests.pipeline_support import make_config, make_repo, running_pipeline

pytestmark = pytest.mark.slow

FIX = [{"write": "app.py", "content": "def add(a, b):\n    return a + b\n"}, {"commit": "fix add"}]


class Outage:
    """Relays a loopback port to PostgreSQL; ``begin()`` drops every connection and
    refuses new ones until ``end()``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.down = False
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def begin(self) -> None:
        self.down = True
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self.sockets.clear()

    def end(self) -> None:
        self.down = False

    def close(self) -> None:
        self.begin()
        self.listener.close()


def test_an_exit_during_a_database_outage_is_recorded_when_it_ends(
    tmp_path: Path, pg_database: Database
) -> None:
    outage = Outage((pg_database.host, pg_database.port))
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
            outage.begin()
            # The agent finishes (about 2 s) and exits while the database stays away for
            # longer than the event store's retry budget.
            time.sleep(12)
            outage.end()
            story = pipeline.wait_stage("s1", Stage.MERGE, Stage.DONE, timeout=120)
            exits = [e for e in pipeline.app.history("s1") if e.type == "AgentExited"]
            assert len(exits) == 1 and exits[0].data["outcome"] == "completed", exits
            assert story.running_agent is None
    finally:
        outage.close()
