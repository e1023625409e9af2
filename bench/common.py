"""What every benchmark row shares: settings, scratch databases, client processes, results,
the table and the ``BENCHMARKS.md`` section writer."""

from __future__ import annotations

import contextlib
import importlib
import math
import multiprocessing
import os
import platform
import queue
import re
import sqlite3
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg

from service import migrations
from service.settings import Database, parse_database_url

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG_ADMIN_URL = os.environ.get(
    "STORYLINE_BENCH_PG_URL",
    os.environ.get("STORYLINE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
)
BACKENDS = ("postgres", "sqlite")


@dataclass(frozen=True)
class Settings:
    """One run's knobs; ``quick`` shrinks every duration and sample count."""

    quick: bool
    pg_admin_url: str
    sqlite: bool
    workdir: Path
    duration: float
    warmup: float

    @classmethod
    def make(cls, *, quick: bool, pg_admin_url: str, sqlite: bool, workdir: Path) -> Settings:
        return cls(
            quick=quick,
            pg_admin_url=pg_admin_url,
            sqlite=sqlite,
            workdir=workdir,
            duration=2.0 if quick else 5.0,
            warmup=0.5 if quick else 1.5,
        )

    @property
    def backends(self) -> tuple[str, ...]:
        return BACKENDS if self.sqlite else ("postgres",)


@dataclass
class Measurement:
    """One line of the table. ``key`` names it for the ratios (e.g. ``"3/postgres/4"``)."""

    row: str
    label: str
    backend: str
    clients: int | None
    value: float | None
    unit: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    note: str = ""
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.row}/{self.backend}/{self.clients or '-'}"


def pending(row: str, label: str, why: str, backend: str = "postgres") -> Measurement:
    return Measurement(row, label, backend, None, None, "", note=why, status="pending")


def failed(row: str, label: str, exc: BaseException, backend: str = "postgres") -> Measurement:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return Measurement(row, label, backend, None, None, "", note=text, status="error")


# ---------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100): an observed value, never interpolated."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> float:
    return seconds * 1000.0


# ---------------------------------------------------------------------------- databases


def _pg_db_for(admin_url: str, name: str) -> Database:
    admin = parse_database_url(admin_url)
    return Database(
        kind="postgres",
        host=admin.host,
        port=admin.port,
        user=admin.user,
        password=admin.password,
        dbname=name,
    )


def conninfo(db: Database) -> str:
    return db.url


@contextlib.contextmanager
def scratch_database(
    settings: Settings, backend: str, *, migrate: bool = True
) -> Iterator[Database]:
    """A new, uniquely named database (PostgreSQL) or file (SQLite), removed afterwards."""
    if backend == "sqlite":
        path = settings.workdir / f"bench-{uuid.uuid4().hex[:10]}.db"
        db = Database(kind="sqlite", sqlite_path=path)
        if migrate:
            migrations.upgrade(db)
        try:
            yield db
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    name = f"sl_bench_main_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(settings.pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db = _pg_db_for(settings.pg_admin_url, name)
    try:
        if migrate:
            migrations.upgrade(db)
        yield db
    finally:
        with psycopg.connect(settings.pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------------------- client processes


@dataclass
class ClientResult:
    ops: int
    seconds: float
    latencies: list[float]
    refused: int = 0
    error: str | None = None


@dataclass
class Throughput:
    clients: int
    ops: int
    seconds: float
    latencies: list[float]
    refused: int

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        return ms(percentile(self.latencies, 50))

    @property
    def p99_ms(self) -> float:
        return ms(percentile(self.latencies, 99))


class Refused(Exception):
    """Raised by an operation that ran but committed nothing (counted, not timed as an op)."""


def _client_main(
    factory: str,
    kwargs: dict[str, Any],
    index: int,
    ready: Any,
    start: Any,
    results: Any,
) -> None:
    """Entry point of one client process: set up, report ready, run between the marks."""
    try:
        module_name, func_name = factory.split(":")
        make_op: Callable[..., Any] = getattr(importlib.import_module(module_name), func_name)
        made = make_op(index=index, **kwargs)
        op, close = made if isinstance(made, tuple) else (made, None)
        ready.put(index)
        warm_until, stop_at = start.get(timeout=600)
        while time.monotonic() < warm_until:
            with contextlib.suppress(Refused):
                op()
        latencies: list[float] = []
        refused = 0
        began = time.monotonic()
        now = began
        while now < stop_at:
            try:
                op()
            except Refused:
                refused += 1
                now = time.monotonic()
                continue
            after = time.monotonic()
            latencies.append(after - now)
            now = after
        elapsed = now - began
        if close is not None:
            close()
        results.put((index, ClientResult(len(latencies), elapsed, latencies, refused)))
    except BaseException as exc:
        ready.put(index)
        results.put((index, ClientResult(0, 0.0, [], error=traceback.format_exc()[-2000:])))
        if not isinstance(exc, Exception):
            raise


def run_clients(factory: str, clients: int, settings: Settings, **kwargs: Any) -> Throughput:
    """Run ``clients`` processes of ``factory`` (``"module:function"``) side by side.

    The factory builds the client's state (its own connections, its own stories) and returns
    an operation (or ``(operation, close)``); the operation is called in a loop for the
    warm-up and then for ``settings.duration`` seconds, all clients over the same window
    (CLOCK_MONOTONIC is shared by processes on Linux). Processes rather than threads so
    the client side of a 4-client row is not serialised on one GIL.
    """
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    results = ctx.Queue()
    starts = [ctx.Queue() for _ in range(clients)]
    procs = [
        ctx.Process(
            target=_client_main,
            args=(factory, kwargs, i, ready, starts[i], results),
            daemon=True,
        )
        for i in range(clients)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in range(clients):
            ready.get(timeout=600)
        warm_until = time.monotonic() + 0.05 + settings.warmup
        stop_at = warm_until + settings.duration
        for q in starts:
            q.put((warm_until, stop_at))
        collected: dict[int, ClientResult] = {}
        deadline = stop_at + 300
        while len(collected) < clients:
            try:
                index, result = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{factory}: clients did not report") from None
            collected[index] = result
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    errors = [r.error for r in collected.values() if r.error]
    if errors:
        raise RuntimeError(f"{factory} client failed:\n{errors[0]}")
    latencies = [x for r in collected.values() for x in r.latencies]
    return Throughput(
        clients=clients,
        ops=len(latencies),
        # Every client ran over the same window; the longest run is the window.
        seconds=max(r.seconds for r in collected.values()),
        latencies=latencies,
        refused=sum(r.refused for r in collected.values()),
    )


# ---------------------------------------------------------------------------- environment


def _meminfo_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def environment(settings: Settings) -> dict[str, str]:
    pg = "unreachable"
    pg_settings = ""
    with (
        contextlib.suppress(Exception),
        psycopg.connect(settings.pg_admin_url, autocommit=True, connect_timeout=5) as conn,
    ):
        pg = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        rows = conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('synchronous_commit', 'fsync', 'shared_buffers', 'wal_sync_method')"
        ).fetchall()
        pg_settings = ", ".join(f"{name}={value}" for name, value in rows)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": (
            f"{os.cpu_count()} cores ({_cpu_model()}), {_meminfo_mb() / 1024:.1f} GiB memory, "
            f"{platform.system()} {platform.release()}"
        ),
        "versions": (
            f"Python {platform.python_version()}, PostgreSQL {pg} ({pg_settings}), "
            f"SQLite {sqlite3.sqlite_version}, eventsourcing {_version('eventsourcing')}, "
            f"psycopg {_version('psycopg')}, pydantic {_version('pydantic')}, "
            f"fastapi {_version('fastapi')}, uvicorn {_version('uvicorn')}, "
            f"orjson {_version('orjson')}"
        ),
    }


# ---------------------------------------------------------------------------- BENCHMARKS.md


def replace_section(path: Path, heading: str, body: str) -> None:
    """Rewrite the ``## heading`` section of ``path`` in place (append it when missing).

    The other engineers own the other sections; only this one is touched.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"## {heading}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1)
        text = text.rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text, encoding="utf-8")


def tempdir(prefix: str = "storyline-bench-") -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=prefix)
