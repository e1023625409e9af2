"""Row 4: storyline transitions through HTTP, and the same workload in-process (4i).

Row 4 runs ``storyline serve --no-runners`` as production does on PostgreSQL (uvicorn,
projections following in their child process) and drives it from 4 client *processes*
with the lean keep-alive client of ``bench/http_load.py``: each creates its own stories,
then sends ``block``/``unblock`` with ``expected_version`` (every request a real, guarded
transition that commits one event) for ``settings.duration`` seconds after a warm-up.
Beside it, the server's CPU per transition (``/proc``) and that of its projection child.

Row 4i is the same block/unblock workload on the application layer from 4 threads of one
process (``bench/http_transitions.py``'s ``bench_in_process``), so the HTTP overhead shows
on identical work. ``bench/http_transitions.py`` on its own still measures HTTP with httpx
clients (threads of one process), which spend about 0.7 ms of client CPU per request on
the same two cores.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

from bench.common import Measurement, Settings, pending, run_clients, scratch_database

LABEL = "storyline transitions through HTTP (uvicorn on loopback, 4 keep-alive clients)"
LABEL_IN = "the same block/unblock workload on the application layer, 4 threads, 1 process"


def _child_cpu(pid: int) -> float:
    """CPU seconds of the children of ``pid`` (the projection worker), 0 if none."""
    from bench.http_transitions import process_cpu

    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += process_cpu(int(stat.parent.name))
    return total


def run_http(settings: Settings) -> list[Measurement]:
    try:
        from bench.http_transitions import bench_in_process, process_cpu, serving
    except ImportError as exc:
        return [pending("4", LABEL, f"bench.http_transitions: {exc}")]
    clients = 4
    out: list[Measurement] = []
    with scratch_database(settings, "postgres") as db:
        with (
            tempfile.TemporaryDirectory(dir=settings.workdir) as project,
            serving(db, Path(project)) as (url, pid),
        ):
            before = (process_cpu(pid), _child_cpu(pid), time.monotonic())
            result = run_clients(
                "bench.http_load:transition_client",
                clients,
                settings,
                url=url,
                prefix=uuid.uuid4().hex[:6],
            )
            after = (process_cpu(pid), _child_cpu(pid), time.monotonic())
        # The CPU window includes the clients' set-up and warm-up: an approximation.
        requests = max(result.ops, 1)
        server_ms = (after[0] - before[0]) / requests * 1000
        child_ms = (after[1] - before[1]) / requests * 1000
        out.append(
            Measurement(
                "4",
                LABEL,
                "postgres",
                clients,
                result.rate,
                "commits/s",
                p50_ms=result.p50_ms,
                p99_ms=result.p99_ms,
                note=(
                    f"{result.ops:,} transitions; storyline serve --no-runners, lean clients "
                    f"(bench/http_load.py); CPU per transition incl. set-up: server "
                    f"{server_ms:.2f} ms, projection process {child_ms:.2f} ms"
                ),
            )
        )
    per_client = max(2, int(result.rate * settings.duration / clients))
    with scratch_database(settings, "postgres") as db:
        local = bench_in_process(db, clients, per_client)
    out.append(
        Measurement(
            "4i",
            LABEL_IN,
            "postgres",
            clients,
            local.rate,
            "commits/s",
            p50_ms=local.percentile(0.50),
            p99_ms=local.percentile(0.99),
            note=f"{local.count:,} transitions",
        )
    )
    return out
