"""/healthz while PostgreSQL is unreachable: it answers promptly with the database down
(issue 12 item 10), without stopping the shared server. A loopback TCP relay stands
between the app and PostgreSQL and then plays dead: it stops relaying on open connections
and accepts new ones without ever answering (a host that is gone), or refuses them (a
closed port)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Database
from tests.api.conftest import LiveServer, make_service, start_server
from tests.pg_relay import Relay


@pytest.fixture
def relayed(pg_database: Database, tmp_path: Path) -> Iterator[tuple[LiveServer, Relay]]:
    relay = Relay((pg_database.host, pg_database.port))
    through = dataclasses.replace(pg_database, port=relay.port)
    from projections import ReadModels

    service = make_service(through, tmp_path)
    read_models = ReadModels(through)
    live = start_server(service, read_models, tokens=[], health_timeout=0.5)
    try:
        yield live, relay
    finally:
        relay.close()  # first: it frees any thread still waiting on the dead connections
        try:
            live.stop()
        finally:
            read_models.close()
            service.close()


def assert_down(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["database"]["ok"] is False and body["database"]["kind"] == "postgres"
    assert body["database"]["error"]
    assert body["caught_up"] is False


def test_healthz_answers_with_the_database_down_while_its_host_is_gone(
    relayed: tuple[LiveServer, Relay],
) -> None:
    live, relay = relayed
    client = live.client()
    assert client.get("/healthz").json()["status"] == "ok"
    relay.play_dead()
    # The client's own timeout is far above the server's health_timeout (0.5 s): without
    # the bound the check waits on a connection that never answers and this times out.
    for _ in range(3):  # repeated probes share the one check in flight
        assert_down(client.get("/healthz", timeout=20))
    relay.revive()
    deadline = time.monotonic() + 30
    while client.get("/healthz", timeout=20).status_code != 200:
        assert time.monotonic() < deadline, "health did not recover"
        time.sleep(0.1)


def test_healthz_answers_with_the_database_down_when_its_port_is_closed(
    relayed: tuple[LiveServer, Relay],
) -> None:
    live, relay = relayed
    client = live.client()
    assert client.get("/healthz").status_code == 200
    relay.refuse()
    assert_down(client.get("/healthz", timeout=20))


# The read models (SQLAlchemy) and the log reader (psycopg's pool). Story reads and commands
# go through the event store's pool, which retries for long before it gives up (a pool
# matter); its failure takes the same handler.
DATABASE_PATHS = ["/stories", "/board", "/merge-queue", "/agents/runs", "/events"]


def test_requests_while_the_database_is_away_are_503_with_one_log_line(
    relayed: tuple[LiveServer, Relay], caplog: pytest.LogCaptureFixture
) -> None:
    live, relay = relayed
    client = live.client()
    assert (
        client.post("/stories", json={"name": "n", "acceptance_criteria": ["a"]}).status_code == 201
    )
    relay.refuse()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        answers = {path: client.get(path, timeout=60) for path in DATABASE_PATHS}
    for path, response in answers.items():
        assert response.status_code == 503, (path, response.text)
        assert response.json()["error"]["code"] == "database_unavailable", path
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()  # no traceback
        assert "\n" not in record.getMessage(), record.getMessage()
    logged = [r for r in caplog.records if r.name == "api.errors"]
    assert len(logged) == len(DATABASE_PATHS), [r.getMessage() for r in caplog.records]


def test_the_projection_follower_logs_one_line_per_failed_pass_while_the_database_is_away(
    relayed: tuple[LiveServer, Relay], caplog: pytest.LogCaptureFixture
) -> None:
    from projections import ProjectionRunner

    live, relay = relayed
    runner = ProjectionRunner(live.service.db, live.service.app, poll_interval=0.05)
    runner.start()
    try:
        with caplog.at_level(logging.WARNING, logger="projections"):
            relay.refuse()
            deadline = time.monotonic() + 60
            while not any("attempt 2" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
                time.sleep(0.05)
    finally:
        runner.stop()
    failures = [r for r in caplog.records if r.name.startswith("projections")]
    assert failures
    for record in failures:
        assert record.exc_info is None, record.getMessage()
        assert "\n" not in record.getMessage()
    assert any("database unavailable" in r.getMessage() for r in failures)


def test_story_reads_and_commands_are_answered_503_while_the_database_is_away(
    relayed: tuple[LiveServer, Relay],
) -> None:
    """The event store's pool and retries give up within a bounded time: before, with
    the database refusing connections, a story read or a command took 100 s (ten
    attempts, each waiting the pool's timeout) and this client timed out first."""
    live, relay = relayed
    client = live.client()
    created = client.post("/stories", json={"name": "n", "acceptance_criteria": ["a"]})
    assert created.status_code == 201
    sid = created.json()["id"]
    relay.refuse()
    requests = {
        "read": lambda: client.get(f"/stories/{sid}", timeout=45),
        "transition": lambda: client.post(
            f"/stories/{sid}/transitions", json={"event": "start_coding"}, timeout=45
        ),
        "create": lambda: client.post(
            "/stories", json={"name": "m", "acceptance_criteria": ["a"]}, timeout=45
        ),
    }
    for what, send in requests.items():
        started = time.monotonic()
        response = send()
        print(f"{what}: {response.status_code} in {time.monotonic() - started:.1f} s")
        assert response.status_code == 503, (what, response.text)
        assert response.json()["error"]["code"] == "database_unavailable", what
