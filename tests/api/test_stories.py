"""Creating and reading stories over HTTP: now, as of a position or a time, and history."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from api.schemas import StoryOut
from domain.story import Story
from tests.api.conftest import LiveServer, assert_error, new_story


def test_story_out_covers_every_snapshot_field() -> None:
    story = Story.create(
        story_id="1",
        name="n",
        description="d",
        acceptance_criteria=["a"],
        depends_on=[],
        actor="user:x",
    )
    assert set(story.snapshot()) <= set(StoryOut.model_fields)


def test_create_then_read(live: LiveServer) -> None:
    client = live.client()
    response = client.post(
        "/stories",
        json={
            "name": "Rate limit uploads",
            "description": "429 when abused",
            "acceptance_criteria": ["429 after 10 req/s", "headers say when to retry"],
            "epic": "hardening",
            "priority": 5,
        },
    )
    assert response.status_code == 201
    created = response.json()
    assert response.headers["location"] == f"/stories/{created['id']}"
    assert created["stage"] == "backlog"
    assert created["version"] == 1
    assert created["position"] >= 1
    assert created["epic"] == "hardening"
    assert created["legal_events"] == ["start_coding", "block", "archive", "add_note"]

    named = new_story(client, id="story-a", depends_on=[created["id"]])
    assert named["id"] == "story-a"
    assert named["depends_on"] == [created["id"]]

    fetched = client.get(f"/stories/{created['id']}").json()
    assert fetched["version"] == 1
    assert fetched["name"] == "Rate limit uploads"
    assert fetched["position"] is None

    history = client.get("/stories/story-a/history").json()
    assert history["story_id"] == "story-a"
    [event] = history["events"]
    assert event["type"] == "StoryCreated"
    assert event["actor"] == "user:local"
    assert event["to_stage"] == "backlog"
    assert event["position"] == named["position"]


def test_create_refusals(live: LiveServer) -> None:
    client = live.client()
    new_story(client, id="dup")
    assert_error(
        client.post("/stories", json={"name": "x", "acceptance_criteria": ["a"], "id": "dup"}),
        409,
        "story_exists",
    )
    details = assert_error(
        client.post("/stories", json={"name": "x", "acceptance_criteria": []}),
        422,
        "validation_error",
    )
    assert details[0]["loc"] == ["body", "acceptance_criteria"]
    assert_error(
        client.post("/stories", json={"name": "x", "acceptance_criteria": ["a"], "id": "../etc"}),
        422,
        "invalid_story_id",
    )
    bell = assert_error(
        client.post("/stories", json={"name": "bell\x07", "acceptance_criteria": ["a"]}),
        422,
        "validation_error",
    )
    assert bell[0]["loc"] == ["name"]
    assert_error(
        client.post(
            "/stories", json={"name": "x", "acceptance_criteria": ["a"], "depends_on": ["missing"]}
        ),
        404,
        "story_not_found",
    )
    assert_error(
        client.post("/stories", json={"name": "x", "acceptance_criteria": ["a"], "colour": 1}),
        422,
        "validation_error",
    )
    assert_error(
        client.post("/stories", json={"name": "x" * 100_000, "acceptance_criteria": ["a"]}),
        422,
        "validation_error",
    )
    # Nothing above changed the log: only the one story exists.
    assert client.get("/events?after=0").json()["head"] == 1


def test_read_refusals(live: LiveServer) -> None:
    client = live.client()
    assert_error(client.get("/stories/42"), 404, "story_not_found")
    assert_error(client.get("/stories/42/history"), 404, "story_not_found")
    assert_error(client.get("/stories/a%20b"), 422, "invalid_story_id")
    assert_error(client.get("/stories/" + "x" * 65), 422, "invalid_story_id")
    assert_error(client.get("/stories/..%2Fetc/history"), 404, "not_found")
    assert_error(client.get("/stories/.hidden"), 422, "invalid_story_id")
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.delete("/stories"), 405, "method_not_allowed")
    assert_error(client.get("/events?limit=0"), 422, "validation_error")
    assert_error(client.get("/events?after=-1"), 422, "validation_error")


def test_as_of_position_and_time(live: LiveServer) -> None:
    client = live.client()
    created = new_story(client)
    sid = created["id"]
    time.sleep(0.01)
    between = datetime.now(UTC)
    time.sleep(0.01)
    moved = client.post(f"/stories/{sid}/transitions", json={"event": "start_coding"}).json()
    assert moved["stage"] == "coding"

    at_create = client.get(f"/stories/{sid}", params={"as_of": created["position"]}).json()
    assert at_create["stage"] == "backlog"
    assert at_create["version"] == 1
    assert at_create["as_of"] == str(created["position"])
    assert (
        client.get(f"/stories/{sid}", params={"as_of": moved["position"]}).json()["stage"]
        == "coding"
    )

    assert (
        client.get(f"/stories/{sid}", params={"as_of": between.isoformat()}).json()["stage"]
        == "backlog"
    )
    naive_utc = between.replace(tzinfo=None).isoformat()
    assert client.get(f"/stories/{sid}", params={"as_of": naive_utc}).json()["version"] == 1
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert client.get(f"/stories/{sid}", params={"as_of": later}).json()["stage"] == "coding"

    # Before the story existed it is not there; garbage is a 422, not a 500.
    assert_error(client.get(f"/stories/{sid}", params={"as_of": "0"}), 404, "story_not_found")
    before = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    assert_error(client.get(f"/stories/{sid}", params={"as_of": before}), 404, "story_not_found")
    for bad in ("yesterday", "-1", "2026-13-45", "1e9", "9" * 40):
        assert_error(client.get(f"/stories/{sid}", params={"as_of": bad}), 422, "invalid_as_of")


def test_history_and_global_log_pages(live: LiveServer) -> None:
    client = live.client()
    a = new_story(client)
    b = new_story(client)
    client.post(f"/stories/{a['id']}/transitions", json={"event": "start_coding"})
    client.post(f"/stories/{a['id']}/transitions", json={"event": "block", "reason": "waiting"})

    history = client.get(f"/stories/{a['id']}/history").json()["events"]
    assert [e["type"] for e in history] == ["StoryCreated", "CodingStarted", "StoryBlocked"]
    assert [e["version"] for e in history] == [1, 2, 3]
    blocked = history[-1]
    assert blocked["reason"] == "waiting"
    assert (blocked["from_stage"], blocked["to_stage"]) == ("coding", "blocked")
    page = client.get(
        f"/stories/{a['id']}/history", params={"after": history[0]["position"], "limit": 1}
    ).json()["events"]
    assert [e["type"] for e in page] == ["CodingStarted"]

    first = client.get("/events", params={"after": 0, "limit": 2}).json()
    assert [e["story_id"] for e in first["events"]] == [a["id"], b["id"]]
    assert first["head"] == 4
    second = client.get("/events", params={"after": first["next_after"], "limit": 10}).json()
    assert [e["type"] for e in second["events"]] == ["CodingStarted", "StoryBlocked"]
    assert second["next_after"] == 4
    empty = client.get("/events", params={"after": 4}).json()
    assert empty == {"events": [], "next_after": 4, "head": 4}
