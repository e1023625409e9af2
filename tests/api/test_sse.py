"""GET /events/stream: live events, resume after Last-Event-ID, no gap, no duplicate."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson

from api.client import parse_sse
from tests.api.conftest import LiveServer, assert_error, new_story


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def messages(response: httpx.Response) -> Iterator[dict[str, str]]:
    return parse_sse(response.iter_lines())


def all_positions(client: httpx.Client) -> list[int]:
    positions: list[int] = []
    after = 0
    while True:
        page = client.get("/events", params={"after": after, "limit": 1000}).json()
        positions += [e["position"] for e in page["events"]]
        if not page["events"]:
            return positions
        after = page["next_after"]


def churn(url: str, story_ids: list[str], rounds: int) -> None:
    """Block and unblock stories from several threads: concurrent commits."""

    def work(sid: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(rounds):
                assert (
                    http.post(
                        f"/stories/{sid}/transitions", json={"event": "block", "reason": "r"}
                    ).status_code
                    == 200
                )
                assert (
                    http.post(f"/stories/{sid}/transitions", json={"event": "unblock"}).status_code
                    == 200
                )

    threads = [threading.Thread(target=work, args=(sid,)) for sid in story_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_reconnect_with_last_event_id_gets_every_later_event_once(live: LiveServer) -> None:
    client = live.client()
    stories = [new_story(client)["id"] for _ in range(3)]
    timeout = httpx.Timeout(30.0)

    received: list[dict[str, str]] = []
    with client.stream("GET", "/events/stream", params={"after": 0}, timeout=timeout) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for message in messages(response):
            received.append(message)
            if len(received) == 2:
                break  # the client goes away mid-stream
    assert [m["event"] for m in received] == ["StoryCreated", "StoryCreated"]
    first = orjson.loads(received[0]["data"])
    assert first["position"] == int(received[0]["id"])
    assert first["story_id"] == stories[0]
    # The server notices the disconnect and drops the stream: nothing is left subscribed.
    assert wait_until(lambda: live.state.notifier.subscriber_count == 0)

    last_id = int(received[-1]["id"])
    churn(live.url, stories, rounds=3)  # written while nobody listens

    writer = threading.Thread(target=churn, args=(live.url, stories, 4))
    resumed: list[int] = []
    with client.stream(
        "GET", "/events/stream", headers={"Last-Event-ID": str(last_id)}, timeout=timeout
    ) as response:
        writer.start()  # and more while the resumed stream is live
        expected_total = 1 + 3 * 2 * 3 + 3 * 2 * 4  # the third creation, then the churn
        for message in messages(response):
            data = orjson.loads(message["data"])
            assert int(message["id"]) == data["position"]
            assert message["event"] == data["type"]
            resumed.append(data["position"])
            if len(resumed) == expected_total:
                break
    writer.join()

    expected = [p for p in all_positions(client) if p > last_id]
    assert resumed == expected  # every later event, in order, exactly once
    assert wait_until(lambda: live.state.notifier.subscriber_count == 0)


def test_stream_starts_live_by_default_and_sends_heartbeats(serve_api: Any) -> None:
    live = serve_api(heartbeat_interval=0.05, poll_interval=0.05)
    client = live.client()
    new_story(client)  # before the stream: not sent without ?after=

    seen: list[str] = []
    with client.stream("GET", "/events/stream", timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("retry:")
        heartbeat = next(line for line in lines if line.startswith(":"))
        assert heartbeat == ": keepalive"
        created = new_story(client)
        for message in parse_sse(lines):
            seen.append(message["id"])
            break
    assert seen == [str(created["position"])]


def test_stream_refusals(live: LiveServer) -> None:
    client = live.client()
    assert_error(
        client.get("/events/stream", headers={"Last-Event-ID": "abc"}), 422, "invalid_last_event_id"
    )
    assert_error(client.get("/events/stream", params={"after": -5}), 422, "validation_error")
