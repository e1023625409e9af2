"""Worker runners (scale-out) as the API shows them: ``GET /workers``, the ``workers`` block
of ``/healthz``, the worker families of ``/metrics`` and ``storyline workers``, over real
HTTP on each database. Rows are written as worker runners write them (``Workers.heartbeat``,
``StoryLeases.claim``, the story's ``claim`` command)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from typer.testing import CliRunner

from api.cli import main_app
from api.schemas import HealthOut, WorkersOut
from service.application import StorylineApplication
from service.workers import StoryLeases, Workers
from tests.api.conftest import READ_TOKEN, LiveServer, assert_error

HOSTILE = 'evil"id\nwith\\slash'
HOSTILE_LABEL = 'evil\\"id\\nwith\\\\slash'
"""The hostile worker id as a Prometheus label value (quote, newline, backslash escaped)."""


def coding_story(app: StorylineApplication, name: str = "Scale out") -> str:
    sid = app.create_story(
        name=name, description="d", acceptance_criteria=["ok"], actor="user:t"
    ).story.id
    app.transition(sid, "start_coding", actor="user:t")
    return sid


def some_workers(app: StorylineApplication) -> str:
    """Two alive workers (one with a hostile id), one stale, one stopped; ``w-alive`` holds
    a story (a live lease and the claim in its log), the hostile one a lease only. Returns
    the story's id."""
    workers = Workers(app)
    workers.heartbeat(
        "w-stale",
        role="worker",
        capacity=4,
        held=2,
        merger=False,
        remote="https://bot:s3cret@git.example/r.git",
        ttl_secs=0.05,
    )
    workers.heartbeat(
        "w-stopped", role="worker", capacity=8, held=0, merger=False, remote="r", ttl_secs=30
    )
    workers.stopped("w-stopped")
    workers.heartbeat(
        "w-alive", role="all", capacity=2, held=1, merger=True, remote="file:///r", ttl_secs=30
    )
    workers.heartbeat(HOSTILE, role="worker", capacity=3, held=1, merger=False, remote=None)
    sid = coding_story(app)
    claim = StoryLeases(app, "w-alive", ttl_secs=30).claim(sid)
    assert claim is not None
    app.transition(
        sid, "claim", actor="runner:w-alive", data={"worker": "w-alive", "generation": 1}
    )
    assert StoryLeases(app, HOSTILE, ttl_secs=30).claim("other-story") is not None
    time.sleep(0.3)  # w-stale's lease time (0.05 s) passes
    return sid


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, for every sample line of a Prometheus text body."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        found[key] = float(value)
    return found


def test_no_workers_on_a_single_machine(live: LiveServer) -> None:
    client = live.client()
    body = client.get("/workers").json()
    assert body == {
        "workers": [],
        "leases": [],
        "alive": 0,
        "stale": 0,
        "capacity": 0,
        "held": 0,
    }
    health = client.get("/healthz").json()
    assert health["status"] == "ok"
    assert health["workers"] == {"alive": 0, "stale": 0, "list": []}
    found = samples(client.get("/metrics").text)
    for state in ("alive", "stale", "stopped"):
        assert found[f'storyline_workers{{state="{state}"}}'] == 0
    assert found["storyline_story_leases"] == 0
    assert not [key for key in found if key.startswith("storyline_worker_")]


def test_workers_leases_health_and_metrics(live_auth: LiveServer) -> None:
    app = live_auth.service.app
    sid = some_workers(app)
    reader = live_auth.client(READ_TOKEN)

    assert_error(live_auth.client().get("/workers"), 401, "unauthorized")
    response = reader.get("/workers")
    assert response.status_code == 200, response.text
    body = response.json()
    WorkersOut.model_validate(body)
    rows = {w["worker_id"]: w for w in body["workers"]}
    assert list(rows) == sorted(rows)
    assert set(rows) == {"w-alive", "w-stale", "w-stopped", HOSTILE}
    alive = rows["w-alive"]
    assert alive["alive"] and not alive["stopped"] and alive["merger"]
    assert (alive["role"], alive["capacity"], alive["held"], alive["remote"]) == (
        "all",
        2,
        1,
        "file:///r",
    )
    assert 0 <= alive["heartbeat_age_secs"] < 30
    assert rows["w-stale"]["alive"] is False and rows["w-stale"]["stopped"] is False
    # A password in the remote's URL is not shown to readers.
    assert rows["w-stale"]["remote"] == "https://git.example/r.git"
    assert "s3cret" not in response.text
    assert rows["w-stale"]["heartbeat_age_secs"] > rows["w-stale"]["ttl_secs"] == 0.05
    assert rows["w-stopped"]["stopped"] is True and rows["w-stopped"]["alive"] is False
    assert (body["alive"], body["stale"], body["capacity"], body["held"]) == (2, 1, 5, 2)
    leases = {lease["story_id"]: lease for lease in body["leases"]}
    assert set(leases) == {sid, "other-story"}
    assert (leases[sid]["holder"], leases[sid]["generation"]) == ("w-alive", 1)
    assert leases["other-story"]["holder"] == HOSTILE
    assert 0 < leases[sid]["expires_in_secs"] <= 30

    # The story's own JSON carries the claim its log records.
    story = reader.get(f"/stories/{sid}").json()
    assert (story["holder"], story["holder_generation"], story["gated_commit"]) == (
        "w-alive",
        1,
        None,
    )

    health = reader.get("/healthz")
    assert health.status_code == 200
    block = HealthOut.model_validate(health.json()).workers
    assert block is not None
    assert health.json()["status"] == "ok"  # a stale worker alone does not degrade it
    assert (block.alive, block.stale) == (2, 1)
    assert {w.worker_id for w in block.list} == set(rows)
    assert block.note and "not make the status degraded" in block.note
    assert "s3cret" not in health.text

    text = reader.get("/metrics").text
    found = samples(text)
    assert found['storyline_workers{state="alive"}'] == 2
    assert found['storyline_workers{state="stale"}'] == 1
    assert found['storyline_workers{state="stopped"}'] == 1
    assert found["storyline_story_leases"] == 2
    assert found['storyline_worker_capacity{worker="w-alive"}'] == 2
    assert found['storyline_worker_stories_held{worker="w-stale"}'] == 2
    assert found['storyline_worker_capacity{worker="w-stopped"}'] == 8
    assert found[f'storyline_worker_capacity{{worker="{HOSTILE_LABEL}"}}'] == 3
    assert 0 <= found['storyline_worker_heartbeat_age_seconds{worker="w-alive"}'] < 30
    assert found['storyline_worker_heartbeat_age_seconds{worker="w-stale"}'] > 0.05
    # Escaped: the hostile id's newline does not start a sample line of its own.
    assert not [line for line in text.splitlines() if line.startswith("with")]
    assert all(
        re.fullmatch(r'storyline_\w+(\{\w+="(?:[^"\\\n]|\\.)*"\})? \S+', line)
        for line in text.splitlines()
        if line.startswith("storyline_worker") or line.startswith("storyline_story_leases")
    )


def test_a_failed_registry_read_does_not_fail_the_health_check(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Workers) -> Any:
        raise RuntimeError("relation storyline_workers does not exist")

    monkeypatch.setattr(Workers, "rows", broken)
    health = live.client().get("/healthz")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok"
    assert body["workers"] == {"alive": 0, "stale": 0, "list": [], "error": "RuntimeError"}
    assert "does not exist" not in health.text


def test_the_workers_command(live_auth: LiveServer) -> None:
    some_workers(live_auth.service.app)
    invoke = CliRunner().invoke
    remote = ["--url", live_auth.url, "--token", READ_TOKEN]
    listed = invoke(main_app, ["workers", "--json", *remote])
    assert listed.exit_code == 0, listed.output
    body = json.loads(listed.output)
    assert {w["worker_id"] for w in body["workers"]} == {
        "w-alive",
        "w-stale",
        "w-stopped",
        HOSTILE,
    }
    assert (body["alive"], body["stale"]) == (2, 1)
    table = invoke(main_app, ["workers", *remote])
    assert table.exit_code == 0, table.output
    assert "w-alive" in table.output and "stale" in table.output
    assert "2 alive, 1 stale; capacity 5, holding 2" in table.output
    refused = invoke(main_app, ["workers", "--url", live_auth.url, "--token", "wrong-token-x"])
    assert refused.exit_code == 1


def test_the_workers_command_on_the_local_store(live: LiveServer) -> None:
    invoke = CliRunner().invoke
    args = ["--project", str(live.service.project), "--database-url", live.service.db.url]
    empty = invoke(main_app, ["workers", *args])
    assert empty.exit_code == 0, empty.output
    assert "no worker runners" in empty.output
    Workers(live.service.app).heartbeat(
        "w-local", role="worker", capacity=2, held=0, merger=False, remote="r"
    )
    listed = invoke(main_app, ["workers", "--json", *args])
    assert listed.exit_code == 0, listed.output
    assert [w["worker_id"] for w in json.loads(listed.output)["workers"]] == ["w-local"]
