"""Idempotency-Key: replay, refusal of a reused key, scoping per actor, durability."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from domain.config import TokenConfig
from tests.api.conftest import (
    ADMIN_TOKEN,
    TOKENS,
    WRITE_TOKEN,
    LiveServer,
    ServerFactory,
    assert_error,
    new_story,
)

BODY = {"name": "Idempotent", "acceptance_criteria": ["once"]}


def test_same_key_same_body_replays_the_first_answer(live: LiveServer) -> None:
    client = live.client()
    first = client.post("/stories", json=BODY, headers={"Idempotency-Key": "create-1"})
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    again = client.post("/stories", json=BODY, headers={"Idempotency-Key": "create-1"})
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    # Key order in the JSON does not make it a different request.
    reordered = {"acceptance_criteria": ["once"], "name": "Idempotent"}
    assert (
        client.post("/stories", json=reordered, headers={"Idempotency-Key": "create-1"}).json()[
            "id"
        ]
        == first.json()["id"]
    )

    sid = first.json()["id"]
    url = f"/stories/{sid}/transitions"
    move = {"event": "start_coding", "expected_version": 1}
    moved = client.post(url, json=move, headers={"Idempotency-Key": "move-1"})
    replay = client.post(url, json=move, headers={"Idempotency-Key": "move-1"})
    assert moved.status_code == replay.status_code == 200
    assert replay.json() == moved.json()
    # A refusal is an answer too: replayed, not re-evaluated.
    stale = client.post(url, json=move, headers={"Idempotency-Key": "move-2"})
    assert_error(stale, 409, "version_conflict")
    assert client.post(url, json=move, headers={"Idempotency-Key": "move-2"}).json() == stale.json()

    history = client.get(f"/stories/{sid}/history").json()["events"]
    assert [e["type"] for e in history] == ["StoryCreated", "CodingStarted"]
    assert client.get("/events").json()["head"] == moved.json()["position"]


def test_same_key_different_body_is_422(live: LiveServer) -> None:
    client = live.client()
    assert client.post("/stories", json=BODY, headers={"Idempotency-Key": "k"}).status_code == 201
    other = {**BODY, "name": "Something else"}
    details = assert_error(
        client.post("/stories", json=other, headers={"Idempotency-Key": "k"}),
        422,
        "idempotency_key_reused",
    )
    assert details == {"idempotency_key": "k"}
    # The same key on another endpoint is another request as well.
    sid = client.get("/events").json()["events"][0]["story_id"]
    assert_error(
        client.post(
            f"/stories/{sid}/transitions",
            json={"event": "start_coding"},
            headers={"Idempotency-Key": "k"},
        ),
        422,
        "idempotency_key_reused",
    )
    for bad in ("", "x" * 201, "spaces in key"):
        assert_error(
            client.post("/stories", json=BODY, headers={"Idempotency-Key": bad}),
            422,
            "invalid_idempotency_key",
        )
    assert client.get("/events").json()["head"] == 1


def test_keys_are_scoped_per_actor(serve_api: ServerFactory) -> None:
    live = serve_api(tokens=[TokenConfig(**t) for t in TOKENS])  # type: ignore[arg-type]
    alice = live.client(ADMIN_TOKEN)
    bob = live.client(WRITE_TOKEN)
    a = alice.post("/stories", json=BODY, headers={"Idempotency-Key": "shared"})
    b = bob.post("/stories", json=BODY, headers={"Idempotency-Key": "shared"})
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]
    # Bob's different body under Alice's key is not a conflict: keys never cross actors.
    c = bob.post("/stories", json={**BODY, "name": "bob"}, headers={"Idempotency-Key": "other"})
    assert c.status_code == 201


def test_keys_survive_a_restart(serve_api: ServerFactory) -> None:
    first = serve_api()
    answer = first.client().post("/stories", json=BODY, headers={"Idempotency-Key": "durable"})
    assert answer.status_code == 201
    first.stop()

    second = serve_api()  # a new process: new application, same database
    replay = second.client().post("/stories", json=BODY, headers={"Idempotency-Key": "durable"})
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == answer.json()
    assert second.client().get("/events").json()["head"] == answer.json()["position"]


def test_concurrent_requests_with_one_key_run_once(live: LiveServer) -> None:
    sid = new_story(live.client())["id"]
    url = f"{live.url}/stories/{sid}/transitions"

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as http:
            return list(
                await asyncio.gather(
                    *(
                        http.post(
                            url,
                            json={"event": "start_coding"},
                            headers={"Idempotency-Key": "burst"},
                        )
                        for _ in range(10)
                    )
                )
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 10
    assert len({r.json()["position"] for r in responses}) == 1
    assert sum(1 for r in responses if "idempotent-replayed" not in r.headers) == 1
    history = live.client().get(f"/stories/{sid}/history").json()["events"]
    assert [e["type"] for e in history] == ["StoryCreated", "CodingStarted"]


def test_an_answer_lost_after_the_commit_is_rebuilt_not_run_again(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies between the event's commit and storing the answer (injected: the
    answer's write fails). The event's own transaction marked the key, so a retry rebuilds
    the first answer: no second story, no second event."""
    store = live.state.idempotency
    client = live.client()

    def lost(*_: object) -> None:
        raise OSError("killed before the answer was stored")

    monkeypatch.setattr(store, "complete", lost)
    created = client.post("/stories", json=BODY, headers={"Idempotency-Key": "lost-1"})
    assert created.status_code == 201  # the first caller still got its answer
    sid = created.json()["id"]
    moved = client.post(
        f"/stories/{sid}/transitions",
        json={"event": "start_coding"},  # no expected_version: running twice would be refused
        headers={"Idempotency-Key": "lost-2"},
    )
    assert moved.status_code == 200
    head = client.get("/events").json()["head"]
    monkeypatch.undo()

    # No need to wait for the lease: the key says the command committed.
    again = client.post("/stories", json=BODY, headers={"Idempotency-Key": "lost-1"})
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == created.json()
    moved_again = client.post(
        f"/stories/{sid}/transitions",
        json={"event": "start_coding"},
        headers={"Idempotency-Key": "lost-2"},
    )
    assert moved_again.status_code == 200
    assert moved_again.headers["idempotent-replayed"] == "true"
    assert moved_again.json() == moved.json()

    log = client.get("/events").json()
    assert log["head"] == head
    assert [(e["story_id"], e["type"]) for e in log["events"]] == [
        (sid, "StoryCreated"),
        (sid, "CodingStarted"),
    ]
    # The rebuilt answer is stored: the next retry is a plain replay.
    third = client.post("/stories", json=BODY, headers={"Idempotency-Key": "lost-1"})
    assert third.json() == created.json()


def test_a_claim_whose_command_never_committed_runs_after_the_lease(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies before the commit (injected: the command fails after the claim in
    a way that leaves the key claimed): after the lease the retry runs the command."""
    store = live.state.idempotency
    client = live.client()

    def killed(**_: object) -> None:
        raise RuntimeError("killed before the commit")

    monkeypatch.setattr(store, "release", lambda *_: None)  # as if killed: nothing cleans up
    monkeypatch.setattr(live.service.app, "create_story", killed)
    # Its own connection, closed after the answer: uvicorn drops a connection whose request
    # raised, which a keep-alive client may see as a reset instead of the 500.
    failed = client.post(
        "/stories", json=BODY, headers={"Idempotency-Key": "never", "Connection": "close"}
    )
    assert_error(failed, 500, "internal_error")
    monkeypatch.undo()
    store.lease_secs = 0.0
    retried = client.post("/stories", json=BODY, headers={"Idempotency-Key": "never"})
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers
    log = client.get("/events").json()["events"]
    assert [(e["story_id"], e["type"]) for e in log] == [(retried.json()["id"], "StoryCreated")]
