"""The projection follower as a child process of ``storyline serve`` (PostgreSQL).

In the server's own process the follower competes with HTTP handling for one GIL: measured
with 4 clients it held the GIL 43% of the time and capped the API at about 550
transitions/s. In a child process it runs on the other core, and lingers 20 ms after each
wake-up so bursts are applied as one batch (see ``projections.worker.DEFAULT_LINGER``).
Exactly-once does not depend on where the follower runs: every batch commits with its
tracking position, so a restarted child resumes where the last one committed.

The child learns of commits by PostgreSQL's LISTEN/NOTIFY, as any other follower does. It
gets the database location through the environment, never argv (``ps`` shows argv), and
stops by itself if this process dies (``--parent-pid``). If it exits unexpectedly it
is restarted with back-off; ``status()`` reports it for ``/healthz``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from service.settings import DATABASE_URL_ENV, Database

logger = logging.getLogger("projections.process")

MAX_BACKOFF = 30.0


class ProjectionProcess:
    """Runs ``python -m projections.worker`` for ``db`` and keeps it running."""

    def __init__(self, db: Database, *, linger: float | None = None) -> None:
        self.db = db
        self.linger = linger
        self._child: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()
        self.restarts = 0
        self.last_exit: int | None = None

    def _command(self) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "projections.worker",
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            "WARNING",
        ]
        if self.linger is not None:
            command += ["--linger", str(self.linger)]
        return command

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env[DATABASE_URL_ENV] = self.db.url
        # stderr is inherited: the worker's warnings and tracebacks land in the server's log.
        # Its own session: a Ctrl-C in the terminal reaches the server, which stops the child.
        return subprocess.Popen(
            self._command(), env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def start(self) -> None:
        with self._lock:
            if self._monitor is not None:
                return
            self._stop.clear()
            self._child = self._spawn()
            self._monitor = threading.Thread(
                target=self._watch, name="projections-process", daemon=True
            )
            self._monitor.start()

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            child = self._child
            assert child is not None
            code = child.wait()
            if self._stop.is_set():
                return
            self.last_exit = code
            logger.error(
                "projection worker exited with status %s; restarting in %.0f s", code, backoff
            )
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF)
            with self._lock:
                if self._stop.is_set():
                    return
                self._child = self._spawn()
                self.restarts += 1

    def stop(self, timeout: float = 15.0) -> None:
        with self._lock:
            self._stop.set()
            child, monitor = self._child, self._monitor
            self._monitor = None
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                # Killing mid-batch is safe: the batch's rows and position commit together.
                child.kill()
                child.wait()
        if monitor is not None:
            monitor.join(timeout)

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def status(self) -> dict[str, Any]:
        running = self.pid is not None
        out: dict[str, Any] = {
            "component": "projections",
            "mode": "process",
            "running": running,
            "pid": self.pid,
            "restarts": self.restarts,
        }
        if not running and self.last_exit is not None:
            out["error"] = f"projection worker exited with status {self.last_exit}"
        return out
