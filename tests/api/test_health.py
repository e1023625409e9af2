"""/healthz states and the shape of unexpected failures (500 without internals)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from eventsourcing.persistence import ConnectionUnavailableError

from api.client import StorylineClient
from tests.api.conftest import LiveServer, ServerFactory, assert_error


class FaultyReadModels:
    """The real read models, with one projection reported failed and one query broken."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def status(self) -> list[Any]:
        statuses = self.inner.status()
        statuses[0] = dataclasses.replace(statuses[0], error="KeyError: 'boom'")
        return statuses

    def merge_queue(self) -> list[Any]:
        raise RuntimeError("password=hunter2 at /srv/secret/path")


def test_healthz_ok_degraded_unavailable(
    serve_api: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    live: LiveServer = serve_api()
    client = live.client()
    ok = client.get("/healthz")
    assert ok.status_code == 200
    body = ok.json()
    assert body["status"] == "ok"
    assert body["database"]["kind"] == live.service.db.kind
    assert "password" not in body["database"]["location"]

    live.state.read_models = FaultyReadModels(live.read_models)
    degraded = client.get("/healthz")
    assert degraded.status_code == 200  # alive: commands and story reads still work
    body = degraded.json()
    assert body["status"] == "degraded"
    assert body["caught_up"] is False
    assert any(p["error"] for p in body["projections"])

    def unreachable() -> int:
        raise ConnectionError("connection refused")

    monkeypatch.setattr(live.service.app, "max_position", unreachable)
    down = client.get("/healthz")
    assert down.status_code == 503
    assert down.json()["status"] == "unavailable"
    assert down.json()["database"]["ok"] is False


def test_unexpected_errors_are_500_without_internals(serve_api: ServerFactory) -> None:
    live: LiveServer = serve_api()
    live.state.read_models = FaultyReadModels(live.read_models)
    response = live.client().get("/merge-queue")
    assert_error(response, 500, "internal_error")
    assert "hunter2" not in response.text and "secret" not in response.text
    assert "Traceback" not in response.text


class Recorder:
    """A background component that records its lifecycle."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")

    def status(self) -> dict[str, Any]:
        return {"name": "runners", "running": "stop" not in self.calls, "error": None}


def test_components_follow_the_server_and_report_health(serve_api: ServerFactory) -> None:
    from api.cli_serve import _status_dicts

    component = Recorder()
    live: LiveServer = serve_api(
        components=[component], runner_status=lambda: _status_dicts(component.status())
    )
    assert component.calls == ["start"]
    body = live.client().get("/healthz").json()
    assert body["runners"] == [{"name": "runners", "running": True, "error": None}]
    assert body["status"] == "ok"
    component.calls.append("stop")  # as if the supervisor died
    assert live.client().get("/healthz").json()["status"] == "degraded"
    live.stop()
    assert component.calls == ["start", "stop", "stop"]


def test_a_busy_or_unreachable_database_is_503_and_the_request_can_be_resent(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the library raises when it cannot get the database (the pool's writer slot
    still busy after its timeout on SQLite, a lost connection): nothing was committed, so
    the answer says to retry, and a retry with the same key runs the command."""
    app = live.service.app
    create = app.create_story
    failures = [ConnectionUnavailableError("timed out waiting for a writer connection")]

    def busy_once(**kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return create(**kwargs)

    monkeypatch.setattr(app, "create_story", busy_once)
    client = live.client()
    body = {"name": "n", "acceptance_criteria": ["a"]}
    busy = client.post("/stories", json=body, headers={"Idempotency-Key": "busy"})
    assert_error(busy, 503, "database_unavailable")
    assert busy.headers["retry-after"] == "1"
    assert "writer connection" not in busy.text  # no internals
    retried = client.post("/stories", json=body, headers={"Idempotency-Key": "busy"})
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers  # it ran: the first never committed

    # The Python client resends a 503 by itself, with the same key.
    failures.append(ConnectionUnavailableError("timed out waiting for a writer connection"))
    with StorylineClient(live.url) as storyline:
        story = storyline.create_story(name="again", acceptance_criteria=["a"])
    assert story["name"] == "again" and not failures
