"""Row 4 through the API engineer's ``bench/http_transitions.py`` (called, never copied).

Its workload: 4 keep-alive httpx clients (threads) each drive their own stories through
``block``/``unblock`` with ``expected_version`` (10 transitions per story) against
``storyline serve --no-runners`` in a separate process. Beside it, the same workload from 4
threads straight on the application layer in one process (``4i``), so the HTTP overhead is
visible on identical work.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import Measurement, Settings, pending, scratch_database

LABEL = "storyline transitions through HTTP (uvicorn on loopback, 4 keep-alive clients)"
LABEL_IN = "the same block/unblock workload on the application layer, 4 threads, 1 process"


def run_http(settings: Settings) -> list[Measurement]:
    try:
        from bench.http_transitions import bench_http, bench_in_process
    except ImportError as exc:
        return [pending("4", LABEL, f"bench.http_transitions: {exc}")]
    clients = 4
    per_client = 150 if settings.quick else 1500
    out: list[Measurement] = []
    with scratch_database(settings, "postgres") as db:
        with tempfile.TemporaryDirectory(dir=settings.workdir) as project:
            http = bench_http(db, clients, per_client, Path(project))
        out.append(
            Measurement(
                "4",
                LABEL,
                "postgres",
                clients,
                http.rate,
                "commits/s",
                p50_ms=http.percentile(0.50),
                p99_ms=http.percentile(0.99),
                note=f"{http.count:,} transitions; server storyline serve --no-runners",
            )
        )
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
