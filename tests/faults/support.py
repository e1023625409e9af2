"""Shared parts of the fault-injection suite.

* :class:`Server`: ``storyline serve`` (the real subprocess, started by the helper of
  ``tests/api/test_serve.py``) on a fixed port, so it can be SIGKILLed and started again
  where the clients expect it.
* :class:`Load`: client threads sending keyed creates and transitions through the project's
  own client (``api.client``), resending a command with the same ``Idempotency-Key`` after a
  dropped connection, a 503 or a key still in use, as a real client does. Each command's key
  is also its event's ``reason``, so the log alone says which command an event belongs to.
* :func:`reconcile`: the ledger comparing what the clients were told with the log.
* :class:`PrivateCluster`: a PostgreSQL cluster of the test's own (initdb, pg_ctl) that a
  test may stop and start; the shared server on 5432 is never touched.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from api.client import ClientError, StorylineClient
from service.application import StorylineApplication
from service.events_log import LoggedEvent
from service.settings import Database
from tests.api.test_serve import database_url, free_port, run_serve, wait_until_up
from tests.conftest import REQUIRE_PG

REPO = Path(__file__).resolve().parents[2]
STORYLINE = [sys.executable, "-m", "api.cli"]


def storyline_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``storyline ARGS`` as a user runs it (no inherited ``STORYLINE_*`` settings)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    environment.update(env or {})
    return subprocess.run(
        [*STORYLINE, *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        cwd=REPO,
    )


# ---------------------------------------------------------------------------------- serve


class Server:
    """``storyline serve --no-runners`` on one port for its whole life, across restarts."""

    def __init__(self, db: Database, project: Path, *options: str) -> None:
        self.db = db
        self.project = project
        self.options = options
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None
        self.starts = 0
        self.kills = 0
        self.start_secs: list[float] = []  # how long each start took until /healthz answered
        # The tail of every incarnation's output, for a failing test's message.
        self.log: collections.deque[str] = collections.deque(maxlen=400)

    def start(self) -> None:
        args = (
            "--project",
            str(self.project),
            "--database-url",
            database_url(self.db),
            "--port",
            str(self.port),
            "--no-runners",
            "--log-level",
            "warning",
            *self.options,
        )
        began = time.monotonic()
        deadline = began + 60
        while True:
            process = run_serve(*args)
            try:
                wait_until_up(process, self.url)
                break
            except AssertionError:
                # A killed predecessor's projection child may hold the port for a moment.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.process = process
        self.starts += 1
        self.start_secs.append(round(time.monotonic() - began, 1))
        # Drain both pipes: a server logging tracebacks during an outage would otherwise
        # fill the pipe and block, which is not the fault under test.
        for stream in (process.stdout, process.stderr):
            threading.Thread(target=self._drain, args=(stream,), daemon=True).start()

    def _drain(self, stream: Any) -> None:
        for line in stream:
            self.log.append(line.rstrip("\n"))

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.kills += 1

    def stop(self) -> int:
        """SIGINT (a clean shutdown); the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=30)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(list(self.log)[-lines:])

    def wait_caught_up(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body: dict[str, Any] = httpx.get(f"{self.url}/healthz", timeout=10).json()
            if body["caught_up"]:
                return body
            assert time.monotonic() < deadline, f"projections never caught up: {body}"
            time.sleep(0.2)


# ----------------------------------------------------------------------------------- load


RESEND = {"unreachable", "database_unavailable", "idempotency_key_in_use"}
"""Answers after which a real client sends the same command again with the same key."""


@dataclass
class Command:
    key: str
    kind: str  # "create" or the transition's event name
    story_id: str | None
    answer: dict[str, Any] | None = None  # the acknowledged (2xx) body
    failure: str | None = None  # the final error, when no 2xx ever came
    sends: int = 0
    secs: float = 0.0  # from the first send to the final answer


@dataclass
class Load:
    """``workers`` client threads sending keyed commands to ``url`` until :meth:`stop`.

    Each worker drives its own stories (create, ``start_coding``, then ``block``/``unblock``
    pairs), naming the version it last saw, so a command applied twice shows up as a second
    event with the same reason or as a false ``409``. ``resend_for`` bounds one command's
    resends (a server that stays away fails the test instead of hanging it).
    """

    url: str
    workers: int = 6
    transitions_per_story: int = 7
    resend_for: float = 90.0
    commands: list[Command] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)  # every answer, by status/code
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def start(self) -> None:
        for number in range(self.workers):
            thread = threading.Thread(target=self._worker, args=(number,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 180) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "a client never finished"

    def acknowledged(self) -> int:
        with self._lock:
            return sum(1 for c in self.commands if c.answer is not None)

    def wait_for_acknowledged(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.acknowledged() < count:
            assert time.monotonic() < deadline, f"load stalled at {self.acknowledged()} acks"
            time.sleep(0.02)

    def _worker(self, number: int) -> None:
        client = StorylineClient(self.url, retries=0, timeout=30)
        try:
            while not self._stop.is_set():
                self._drive_one_story(client, number)
        finally:
            client.close()

    def _drive_one_story(self, client: StorylineClient, number: int) -> None:
        key = f"{self._run}-w{number}-{uuid.uuid4().hex[:10]}"
        created = self._send(
            Command(key, "create", None),
            lambda: client.create_story(
                name=key, acceptance_criteria=["survives faults"], reason=key, idempotency_key=key
            ),
        )
        if created is None:
            return
        story_id, version = str(created["id"]), int(created["version"])
        events = ["start_coding"] + ["block", "unblock"] * self.transitions_per_story
        for event in events[: self.transitions_per_story]:
            if self._stop.is_set():
                return
            key = f"{self._run}-w{number}-{uuid.uuid4().hex[:10]}"
            answer = self._send(
                Command(key, event, story_id),
                lambda event=event, key=key, version=version: client.transition(
                    story_id, event, expected_version=version, reason=key, idempotency_key=key
                ),
            )
            if answer is None:
                return
            version = int(answer["version"])

    def _send(self, command: Command, call: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        with self._lock:
            self.commands.append(command)
        began = time.monotonic()
        while True:
            command.sends += 1
            try:
                answer = call()
            except ClientError as exc:
                self._tally(f"{exc.status} {exc.code}")
                command.secs = time.monotonic() - began
                if exc.code in RESEND and command.secs < self.resend_for:
                    time.sleep(random.uniform(0.05, 0.2))
                    continue
                command.failure = f"{exc.status} {exc.code}: {exc.message}"
                return None
            self._tally("2xx")
            command.secs = time.monotonic() - began
            command.answer = answer
            return answer

    def _tally(self, outcome: str) -> None:
        with self._lock:
            self.answers[outcome] += 1


# --------------------------------------------------------------------------------- ledger


def read_log(db: Database) -> list[LoggedEvent]:
    app = StorylineApplication(db)
    try:
        events: list[LoggedEvent] = []
        while batch := app.events_after(events[-1].position if events else 0, limit=1000):
            events.extend(batch)
        return events
    finally:
        app.close()


@dataclass(frozen=True)
class Ledger:
    commands: int
    acknowledged: int
    unresolved: int  # no 2xx answer in the end (a final error, or resends ran out)
    logged: int  # events that belong to a command of the load
    lost: int  # acknowledged, but no event in the log
    duplicated: int  # events beyond the first for one command
    disagreeing: int  # acknowledged answer that names another story/version/position
    unacknowledged_logged: int  # in the log though the client never got a 2xx
    foreign: int  # events in the log no command of the load asked for

    def line(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.__dict__.items())


def reconcile(commands: list[Command], events: list[LoggedEvent]) -> Ledger:
    by_key: dict[str, list[LoggedEvent]] = collections.defaultdict(list)
    keys = {c.key for c in commands}
    foreign = 0
    for event in events:
        if event.reason in keys:
            by_key[event.reason].append(event)
        else:
            foreign += 1
    lost = duplicated = disagreeing = unacknowledged_logged = 0
    for command in commands:
        logged = by_key.get(command.key, [])
        duplicated += max(0, len(logged) - 1)
        if command.answer is None:
            unacknowledged_logged += bool(logged)
            continue
        if not logged:
            lost += 1
            continue
        first = logged[0]
        answer = command.answer
        told = (str(answer["id"]), int(answer["version"]), answer.get("position"))
        if told != (first.story_id, first.version, first.position):
            disagreeing += 1
    return Ledger(
        commands=len(commands),
        acknowledged=sum(1 for c in commands if c.answer is not None),
        unresolved=sum(1 for c in commands if c.answer is None),
        logged=sum(len(v) for v in by_key.values()),
        lost=lost,
        duplicated=duplicated,
        disagreeing=disagreeing,
        unacknowledged_logged=unacknowledged_logged,
        foreign=foreign,
    )


def projections_check(server: Server) -> subprocess.CompletedProcess[str]:
    return storyline_cli(
        "projections",
        "check",
        "--project",
        str(server.project),
        "--database-url",
        database_url(server.db),
    )


# ------------------------------------------------------------------------ private cluster


def _postgres_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    found = candidates[0] if candidates else shutil.which("initdb")
    return Path(found).resolve().parent if found else None


class PrivateCluster:
    """A PostgreSQL cluster in a temporary directory on a free port, trust auth on loopback.

    As root it runs as the ``postgres`` OS user (``runuser``), as PostgreSQL refuses root.
    Durability settings are those of a crash of the server process (``fsync=off`` loses
    nothing there: committed WAL is in the kernel's page cache when the client is told).
    """

    def __init__(self) -> None:
        bindir = _postgres_bindir()
        as_root = os.geteuid() == 0
        missing = (
            "initdb not found"
            if bindir is None
            else "runuser or the postgres OS user not found"
            if as_root and not (shutil.which("runuser") and _has_user("postgres"))
            else None
        )
        if missing:
            if REQUIRE_PG:
                pytest.fail(f"a private PostgreSQL cluster is required here: {missing}")
            pytest.skip(f"no private PostgreSQL cluster: {missing}")
        assert bindir is not None
        self.bindir = bindir
        self.prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        self.dir = Path(tempfile.mkdtemp(prefix="storyline-pg-"))
        if as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E",
            "UTF8",
        )  # fmt: skip
        self.start()

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.prefix, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.dir,
        )
        if result.returncode != 0:
            raise AssertionError(f"{tool} {args} failed: {result.stdout}{result.stderr}")
        return result

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"),
                  "-w", "-t", "60", "start")  # fmt: skip

    def running(self) -> bool:
        result = subprocess.run(
            [*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
            capture_output=True,
            timeout=60,
            cwd=self.dir,
        )
        return result.returncode == 0

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def stop(self, mode: str) -> None:
        """``pg_ctl stop -m fast`` (disconnects clients, checkpoints) or ``immediate``
        (the postmaster and its backends quit at once; recovery runs at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create_database(self) -> Database:
        name = f"storyline_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return Database(kind="postgres", host="127.0.0.1", port=self.port, user="postgres",
                        password="", dbname=name)  # fmt: skip

    def destroy(self) -> None:
        with contextlib.suppress(AssertionError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def migrate(db: Database, project: Path) -> None:
    """``storyline db upgrade`` with ``STORYLINE_DATABASE_URL``, as the README says."""
    upgraded = storyline_cli(
        "db", "upgrade", "--project", str(project), env={"STORYLINE_DATABASE_URL": db.url}
    )
    assert upgraded.returncode == 0, upgraded.stderr
