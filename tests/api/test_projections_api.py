"""Endpoints served from the projections: stories list, board, merge queue, runs, metrics."""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.conftest import LiveServer, ServerFactory, assert_error


def send(client: httpx.Client, sid: str, event: str, **data: Any) -> dict[str, Any]:
    response = client.post(
        f"/stories/{sid}/transitions", params={"wait": "true"}, json={"event": event, "data": data}
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-storyline-caught-up"] == "true"
    body: dict[str, Any] = response.json()
    return body


def create(client: httpx.Client, name: str, priority: int = 0) -> str:
    response = client.post(
        "/stories",
        params={"wait": "true"},
        json={"name": name, "acceptance_criteria": ["works"], "priority": priority},
    )
    assert response.status_code == 201, response.text
    sid: str = response.json()["id"]
    return sid


def to_merge_queue(client: httpx.Client, sid: str) -> None:
    send(client, sid, "start_coding")
    send(client, sid, "spawn_agent", agent="coder", runtime="cli", model="m1")
    send(client, sid, "agent_started", attempt=1, pid=77)
    send(
        client,
        sid,
        "agent_exited",
        attempt=1,
        outcome="completed",
        tokens_in=100,
        tokens_out=20,
        cost_usd=0.5,
    )
    send(client, sid, "start_gates", commits_ahead=1)
    send(client, sid, "gates_passed", feature_branch=f"feature/story-{sid}", commits_ahead=1)


def test_projection_endpoints(serve_api: ServerFactory) -> None:
    live: LiveServer = serve_api(projections=True)
    client = live.client()
    ids = [create(client, f"story {n}", priority=n) for n in range(5)]
    to_merge_queue(client, ids[1])
    to_merge_queue(client, ids[3])

    # /stories pages through the board by priority (highest first) with an opaque cursor.
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/stories", params=params).json()
        seen += [row["id"] for row in page["stories"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    merge_rows = client.get("/stories", params={"stage": "merge"}).json()["stories"]
    assert [r["id"] for r in merge_rows] == [ids[3], ids[1]]
    assert_error(client.get("/stories", params={"cursor": "garbage"}), 422, "invalid_cursor")
    assert_error(client.get("/stories", params={"stage": "nowhere"}), 422, "validation_error")
    assert_error(client.get("/stories", params={"limit": 0}), 422, "validation_error")

    board = client.get("/board").json()["stages"]
    assert set(board) >= {
        "backlog",
        "coding",
        "gates",
        "merge",
        "merge_failure",
        "blocked",
        "done",
        "archived",
    }
    assert sorted(r["id"] for r in board["backlog"]) == sorted([ids[0], ids[2], ids[4]])
    assert sorted(r["id"] for r in board["merge"]) == sorted([ids[1], ids[3]])

    queue = client.get("/merge-queue").json()["queue"]
    assert [q["story_id"] for q in queue] == [ids[1], ids[3]]  # order of GatesPassed

    runs = client.get("/agents/runs").json()["runs"]
    assert {r["story_id"] for r in runs} == {ids[1], ids[3]}
    mine = client.get("/agents/runs", params={"story_id": ids[1]}).json()["runs"]
    assert [(r["attempt"], r["outcome"], r["tokens_in"]) for r in mine] == [(1, "completed", 100)]
    assert_error(client.get("/agents/runs", params={"story_id": "../x"}), 422, "invalid_story_id")

    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in metrics.text
    assert "backlog" in metrics.text

    health = client.get("/healthz").json()
    assert health["status"] == "ok"
    assert health["database"]["ok"] is True
    assert {p["name"] for p in health["projections"]} >= {"board", "history"}
    assert health["caught_up"] is True
    assert health["runners"] == []


def test_board_filters_by_stage_and_caps_each_column(serve_api: ServerFactory) -> None:
    live: LiveServer = serve_api(projections=True)
    client = live.client()
    ids = [create(client, f"story {n}", priority=n) for n in range(4)]
    for sid in ids[:3]:
        send(client, sid, "start_coding")
    coding = client.get("/board", params={"stage": "coding", "limit": 2})
    assert coding.status_code == 200
    assert list(coding.json()["stages"]) == ["coding"]
    rows = coding.json()["stages"]["coding"]
    assert [r["id"] for r in rows] == [ids[2], ids[1]]  # highest priority first, capped at 2
    everything = client.get("/board", params={"stage": "coding"}).json()["stages"]["coding"]
    assert len(everything) == 3
    capped = client.get("/board", params={"limit": 1}).json()["stages"]
    assert len(capped["coding"]) == 1 and len(capped["backlog"]) == 1 and capped["done"] == []
    assert_error(client.get("/board", params={"stage": "nowhere"}), 422, "validation_error")
    assert_error(client.get("/board", params={"limit": 0}), 422, "validation_error")
