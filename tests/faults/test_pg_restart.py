"""PostgreSQL restarted under keyed load (``pg_ctl stop -m fast`` and ``-m immediate``).

The server stays up; the database goes away and comes back. Clients may see 503s while it
is away (and resend with the same key), never a 500, and at the end every acknowledged
command is in the log exactly once. The restarts happen on a private cluster of the test's
own: the shared server other tests use is never stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.support import (
    Load,
    Server,
    migrate,
    private_cluster,
    projections_check,
    read_log,
    reconcile,
)

OUTAGES = ("fast", "immediate", "fast")
OUTAGE_SECS = 1.5
ACKS_BETWEEN_OUTAGES = 25


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_restarts_under_keyed_load_lose_and_repeat_nothing(tmp_path: Path) -> None:
    with private_cluster() as cluster:
        db = cluster.create_database()
        migrate(db, tmp_path)
        server = Server(db, tmp_path)
        server.start()
        load = Load(server.url, workers=6)
        unavailable: list[int] = []
        started = time.monotonic()
        try:
            load.start()
            for mode in OUTAGES:
                load.wait_for_acknowledged(load.acknowledged() + ACKS_BETWEEN_OUTAGES)
                before = load.answers["503 database_unavailable"]
                cluster.stop(mode)
                time.sleep(OUTAGE_SECS)
                cluster.start()
                load.wait_for_acknowledged(load.acknowledged() + ACKS_BETWEEN_OUTAGES)
                unavailable.append(load.answers["503 database_unavailable"] - before)
            load.stop()
            server.wait_caught_up()
            ledger = reconcile(load.commands, read_log(db))
            check = projections_check(server)
        finally:
            load.stop()
            server.stop()
        elapsed = time.monotonic() - started
        print(
            f"\n[faults] PostgreSQL restarts {'/'.join(OUTAGES)}: {ledger.line()} "
            f"503s per outage={unavailable} answers={dict(load.answers)} "
            f"projections_check={check.returncode} elapsed={elapsed:.1f}s"
        )
        failures = [f"{c.key} {c.kind}: {c.failure}" for c in load.commands if c.failure]
        assert not failures, failures[:10]
        assert ledger.acknowledged == ledger.commands == ledger.logged
        assert (ledger.lost, ledger.duplicated, ledger.disagreeing, ledger.foreign) == (0, 0, 0, 0)
        # The server never went away: the only failure a client may see is the 503.
        assert set(load.answers) <= {"2xx", "503 database_unavailable"}, load.answers
        assert check.returncode == 0, check.stdout + check.stderr
