"""PostgreSQL restarted under keyed load (``pg_ctl stop -m fast`` and ``-m immediate``).

The server stays up; the database goes away and comes back. Clients may see 503s while it
is away (and resend with the same key), never a 500, and at the end every acknowledged
command is in the log exactly once. The restarts happen on a private cluster of the test's
own: the shared server other tests use is never stopped.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from api.client import ClientError, StorylineClient
from domain.config import StorylineConfig
from runners.supervisor import Supervisor
from service import migrations
from service.application import StorylineApplication
from service.container import Service
from service.pg_pool import ConnectionPool
from tests.faults.support import (
    Load,
    PrivateCluster,
    Server,
    migrate,
    projections_check,
    read_log,
    reconcile,
)

OUTAGES = ("fast", "immediate", "fast")
OUTAGE_SECS = 1.5
ACKS_BETWEEN_OUTAGES = 25


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_restarts_under_keyed_load_lose_and_repeat_nothing(
    pg_cluster: PrivateCluster, tmp_path: Path
) -> None:
    db = pg_cluster.create_database()
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
            pg_cluster.stop(mode)
            time.sleep(OUTAGE_SECS)
            pg_cluster.start()
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


def _count_503s(call: object) -> int:
    """Run ``call`` until it answers, resending after a 503 (as a client does); the 503s."""
    unavailable = 0
    while True:
        try:
            call()  # type: ignore[operator]
        except ClientError as exc:
            assert exc.code == "database_unavailable" and unavailable < 20, exc
            unavailable += 1
            continue
        return unavailable


@pytest.mark.slow
@pytest.mark.postgres
def test_after_a_restart_stale_pooled_connections_cost_at_most_one_503(
    pg_cluster: PrivateCluster, tmp_path: Path
) -> None:
    db = pg_cluster.create_database()
    migrate(db, tmp_path)
    server = Server(db, tmp_path)
    server.start()
    try:
        with StorylineClient(server.url, retries=0) as client:
            story = client.create_story(name="pooled", acceptance_criteria=["a"])
            story_id, version = story["id"], story["version"]
            client.transition(story_id, "start_coding")
            version += 1

            # Every pooled connection has served a request: all of them go stale below.
            def reads() -> None:
                for _ in range(20):
                    client.get_story(story_id)
                    client.history(story_id)

            readers = [threading.Thread(target=reads) for _ in range(8)]
            for thread in readers:
                thread.start()
            for thread in readers:
                thread.join()
            clients = [StorylineClient(server.url, retries=0) for _ in range(8)]

            pg_cluster.stop("fast")
            pg_cluster.start()

            seen: Counter[str] = Counter()
            lock = threading.Lock()

            # Clients that were waiting for the database arrive together.
            def arrive(number: int) -> None:
                created = _count_503s(
                    lambda: clients[number].create_story(
                        name=f"after {number}",
                        acceptance_criteria=["a"],
                        idempotency_key=f"c{number}",
                    )
                )
                read = _count_503s(lambda: clients[number].get_story(story_id))
                with lock:
                    seen["burst create"] += created
                    seen["burst story"] += read

            burst = [threading.Thread(target=arrive, args=(n,)) for n in range(8)]
            for thread in burst:
                thread.start()
            for thread in burst:
                thread.join()
            for step in range(10):
                event = "block" if step % 2 == 0 else "unblock"
                seen["story"] += _count_503s(lambda: client.get_story(story_id))
                seen["history"] += _count_503s(lambda: client.history(story_id))
                seen["transition"] += _count_503s(
                    lambda event=event, key=f"pool-{step}", expected=version: client.transition(
                        story_id, event, reason="r", expected_version=expected, idempotency_key=key
                    )
                )
                version += 1
                health = httpx.get(f"{server.url}/healthz", timeout=30)
                seen["healthz"] += health.status_code == 503
            final = client.get_story(story_id)
    finally:
        server.stop()
    unavailable = sum(seen.values())
    print(f"\n[faults] 503s after a PostgreSQL restart, 40 requests on one server: {dict(seen)}")
    assert final["version"] == version
    assert unavailable <= 1


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_the_pool_replaces_what_a_restart_killed_and_pings_only_then(
    pg_cluster: PrivateCluster, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = pg_cluster.create_database()
    migrations.upgrade(db)
    app = StorylineApplication(db)
    try:
        pool = app.recorder.datastore.pool  # type: ignore[attr-defined]
        assert pool._check.__qualname__ == "check_if_spoken_to.<locals>.check"
        pings: list[object] = []
        ping = ConnectionPool.check_connection
        monkeypatch.setattr(
            ConnectionPool, "check_connection", staticmethod(lambda c: (pings.append(c), ping(c)))
        )

        # Several connections in the pool, each used and idle again.
        def use() -> None:
            with app.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
                conn.execute("SELECT pg_sleep(0.05)")

        users = [threading.Thread(target=use) for _ in range(6)]
        for thread in users:
            thread.start()
        for thread in users:
            thread.join()
        for _ in range(20):
            app.max_position()
        assert pings == []  # a healthy idle connection costs no round trip

        pg_cluster.stop(mode)
        pg_cluster.start()
        for _ in range(20):
            assert app.max_position() == 0  # no caller sees a dead connection
        assert pings  # the dead connection was pinged, and the others swept with it
        assert pool.get_stats()["connections_lost"] >= 5
    finally:
        app.close()


@pytest.mark.postgres
def test_the_runner_reads_the_log_across_a_restart(
    pg_cluster: PrivateCluster, tmp_path: Path
) -> None:
    db = pg_cluster.create_database()
    migrations.upgrade(db)
    app = StorylineApplication(db)
    service = Service(project=tmp_path, db=db, config=StorylineConfig(), app=app)
    supervisor = Supervisor(service)  # not started: only its log reader is used here
    try:
        app.create_story(name="before", description="", acceptance_criteria=["a"], actor="user:t")
        assert supervisor.index.catch_up(app) == {"1"}
        pg_cluster.stop("fast")
        pg_cluster.start()
        app.create_story(name="after", description="", acceptance_criteria=["a"], actor="user:t")
        assert supervisor.index.catch_up(app) == {"2"}  # no stale connection in the way
    finally:
        supervisor.stop()
        app.close()
