"""Transitions per second through HTTP, beside the application layer and the INSERT limit.

One run, one fresh PostgreSQL database, the same concurrency everywhere (``--clients``):

1. the physical limit: single-row INSERT commits per second with plain psycopg into a table
   of the event store's shape (one autocommit INSERT per transition);
2. the application layer in-process: ``StorylineApplication.transition`` per command;
3. HTTP: ``POST /stories/{id}/transitions`` against ``storyline serve`` (a separate process:
   uvicorn, projections following as in production: in a child process on PostgreSQL; no
   runners), keep-alive httpx clients (threads of this process).

Each client drives its own stories through ``block``/``unblock`` with ``expected_version``
(every command is a real, guarded transition that commits one event), moving to a fresh
story every ``STEPS_PER_STORY`` transitions: a story is replayed from its events on every
command (no snapshots), so a story with hundreds of events would measure replay instead.

    .venv/bin/python bench/http_transitions.py [--transitions 2000] [--clients 4]

PostgreSQL comes from ``STORYLINE_BENCH_PG_URL`` (else ``STORYLINE_TEST_PG_URL``, else the
local server as ``postgres``); a scratch database is created and dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service import migrations  # noqa: E402
from service.application import StorylineApplication  # noqa: E402
from service.settings import Database, parse_database_url  # noqa: E402

ADMIN_URL = os.environ.get(
    "STORYLINE_BENCH_PG_URL",
    os.environ.get("STORYLINE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
)
SERVE = "import typer; from api.cli_serve import serve; typer.run(serve)"
STEPS_PER_STORY = 10


@dataclass
class Result:
    name: str
    count: int
    seconds: float
    latencies: list[float]
    cpu: dict[str, float] | None = None
    """CPU seconds spent per process during the measurement (HTTP only)."""

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def run_clients(clients: int, per_client: int, work: Callable[[int, int], None]) -> Result:
    """``work(client, i)`` for every i; wall time over all clients, latency per call."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def loop(client: int) -> None:
        barrier.wait()
        try:
            for i in range(per_client):
                started = time.perf_counter()
                work(client, i)
                latencies[client].append(time.perf_counter() - started)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    flat = [x for per in latencies for x in per]
    return Result("", len(flat), elapsed, flat)


def make_database() -> Database:
    name = f"sl_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    admin = parse_database_url(ADMIN_URL)
    db = Database(
        kind="postgres",
        host=admin.host,
        port=admin.port,
        user=admin.user,
        password=admin.password,
        dbname=name,
    )
    migrations.upgrade(db)
    return db


def drop_database(db: Database) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db.dbname}" WITH (FORCE)')


def conninfo(db: Database) -> str:
    return db.sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://")


def bench_raw_insert(db: Database, clients: int, per_client: int) -> Result:
    with psycopg.connect(conninfo(db), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE bench_raw (originator_id text NOT NULL, originator_version bigint "
            "NOT NULL, topic text, state bytea, notification_id bigserial, "
            "PRIMARY KEY (originator_id, originator_version))"
        )
    state = b'{"timestamp":"2026-01-01T00:00:00+00:00","actor":"user:local","reason":"r"}' * 3
    connections = [psycopg.connect(conninfo(db), autocommit=True) for _ in range(clients)]
    try:

        def insert(client: int, i: int) -> None:
            connections[client].execute(
                "INSERT INTO bench_raw (originator_id, originator_version, topic, state) "
                "VALUES (%s, %s, %s, %s)",
                (f"raw-{client}", i + 1, "storyline.StoryBlocked.v1", state),
                prepare=True,
            )

        result = run_clients(clients, per_client, insert)
    finally:
        for conn in connections:
            conn.close()
    result.name = "raw INSERT commit (psycopg)"
    return result


def story_id(prefix: str, client: int, i: int) -> str:
    return f"{prefix}-{client}-{i // STEPS_PER_STORY}"


def story_ids(prefix: str, clients: int, per_client: int) -> list[str]:
    return sorted({story_id(prefix, c, i) for c in range(clients) for i in range(per_client)})


def step(i: int) -> tuple[str, str | None, int]:
    """The event, its reason and the version it expects for the i-th command of a client."""
    n = i % STEPS_PER_STORY
    event, reason = ("block", "bench hold") if n % 2 == 0 else ("unblock", None)
    return event, reason, n + 1


def bench_in_process(db: Database, clients: int, per_client: int) -> Result:
    app = StorylineApplication(db, pool_size=clients + 2)
    try:
        for sid in story_ids("app", clients, per_client):
            app.create_story(
                story_id=sid,
                name=f"bench {sid}",
                description="benchmark",
                acceptance_criteria=["fast"],
                actor="user:bench",
            )

        def transition(client: int, i: int) -> None:
            event, reason, version = step(i)
            app.transition(
                story_id("app", client, i),
                event,
                actor="user:bench",
                expected_version=version,
                reason=reason,
            )

        result = run_clients(clients, per_client, transition)
    finally:
        app.close()
    result.name = "application layer, in-process"
    return result


def process_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(db: Database, project: Path, *options: str) -> Iterator[tuple[str, int]]:
    """``storyline serve --no-runners`` on a free loopback port: yields (url, pid)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SERVE,
            "--project",
            str(project),
            "--database-url",
            db.sqlalchemy_url,
            "--port",
            str(port),
            "--no-runners",
            "--log-level",
            "warning",
            *options,
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=2)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {server.communicate()[1]}") from None
                time.sleep(0.05)
        yield url, server.pid
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def bench_http(db: Database, clients: int, per_client: int, project: Path) -> Result:
    with serving(db, project) as (url, pid):
        sessions = [httpx.Client(base_url=url, timeout=30) for _ in range(clients)]
        for sid in story_ids("http", clients, per_client):
            response = sessions[0].post(
                "/stories", json={"id": sid, "name": f"bench {sid}", "acceptance_criteria": ["a"]}
            )
            response.raise_for_status()
        for session in sessions:  # open every keep-alive connection before timing
            session.get("/healthz").raise_for_status()

        def transition(client: int, i: int) -> None:
            event, reason, version = step(i)
            response = sessions[client].post(
                f"/stories/{story_id('http', client, i)}/transitions",
                json={"event": event, "expected_version": version, "reason": reason},
            )
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text}")

        server_cpu, client_cpu = process_cpu(pid), time.process_time()
        result = run_clients(clients, per_client, transition)
        result.cpu = {
            "server": process_cpu(pid) - server_cpu,
            "clients": time.process_time() - client_cpu,
        }
        for session in sessions:
            session.close()
    result.name = "HTTP POST /transitions"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transitions", type=int, default=2000, help="per measurement")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    per_client = max(2, args.transitions // args.clients)

    import tempfile

    db = make_database()
    try:
        with tempfile.TemporaryDirectory() as project:
            raw = bench_raw_insert(db, args.clients, per_client)
            app = bench_in_process(db, args.clients, per_client)
            http = bench_http(db, args.clients, per_client, Path(project))
    finally:
        drop_database(db)

    print(
        f"PostgreSQL, {args.clients} concurrent clients, {per_client * args.clients} "
        f"transitions per measurement ({os.cpu_count()} CPUs)\n"
    )
    print(f"{'measurement':34} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs raw':>7}")
    for result in (raw, app, http):
        print(
            f"{result.name:34} {result.rate:9.0f} {result.percentile(0.50):8.2f} "
            f"{result.percentile(0.99):8.2f} {result.rate / raw.rate:7.2f}"
        )
    print(f"\nHTTP / in-process: {http.rate / app.rate:.2f}")
    print(f"mean HTTP latency {statistics.fmean(http.latencies) * 1000:.2f} ms")
    if http.cpu:
        per = {k: v / http.count * 1000 for k, v in http.cpu.items()}
        print(
            f"CPU per HTTP transition: server {per['server']:.2f} ms (the API; projections follow "
            "in a child process), "
            f"clients {per['clients']:.2f} ms"
        )
    load = os.getloadavg()
    print(f"load average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
