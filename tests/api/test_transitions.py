"""POST /stories/{id}/transitions: every event of the state machine, every refusal, races."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from domain.transitions import EVENT_NAMES
from tests.api.conftest import LiveServer, ServerFactory, assert_error, new_story

CODER = {"agent": "coder", "runtime": "cli"}
MERGEMASTER = {"role": "mergemaster", "agent": "mergemaster", "runtime": "cli"}


class Driver:
    """Sends transitions with the version it last saw, as a careful client would."""

    def __init__(self, client: httpx.Client, story: dict[str, Any]) -> None:
        self.client = client
        self.story = story
        self.sent: list[str] = []

    def send(self, event: str, reason: str | None = None, **data: Any) -> dict[str, Any]:
        response = self.client.post(
            f"/stories/{self.story['id']}/transitions",
            json={
                "event": event,
                "expected_version": self.story["version"],
                "reason": reason,
                "data": data,
            },
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert body["version"] == self.story["version"] + 1
        assert body["position"] > self.story.get("position", 0)
        self.story = body
        self.sent.append(event)
        return body

    def code_until_gates(self, attempt: int) -> None:
        self.send("spawn_agent", **CODER)
        self.send("agent_started", attempt=attempt, pid=4242)
        self.send(
            "agent_exited",
            attempt=attempt,
            outcome="completed",
            session_id="s-1",
            tokens_in=10,
            tokens_out=5,
            cost_usd=0.25,
        )
        self.send("start_gates", commits_ahead=1)

    def mergemaster_run(self, attempt: int) -> None:
        self.send("spawn_agent", **MERGEMASTER)
        self.send("agent_started", role="mergemaster", attempt=attempt, pid=4343)
        self.send("agent_exited", role="mergemaster", attempt=attempt, outcome="completed")


def test_drives_every_event_of_the_state_machine(live: LiveServer) -> None:
    client = live.client()
    d = Driver(client, new_story(client))
    assert d.send("start_coding")["stage"] == "coding"
    d.send("worktree_ready", path="/tmp/wt/1", branch="feature/story-1")
    d.send("spawn_agent", **CODER)
    d.send("agent_started", attempt=1, pid=4242)
    d.send("agent_exited", attempt=1, outcome="completed")
    opened = d.send(
        "provider_breaker_opened",
        provider="coder",
        consecutive_failures=3,
        open_until="2026-01-01T00:00:10+00:00",
        opened_times=1,
    )
    assert (opened["stage"], opened["last_event"]) == ("coding", "AgentExited")
    d.send("provider_breaker_closed", provider="coder")
    claimed = d.send("claim", worker="host-a:7:ab12", generation=1)
    assert (claimed["holder"], claimed["last_event"]) == ("host-a:7:ab12", "AgentExited")
    d.send("uncommitted_changes_found", paths=["src/app.py"])
    assert d.send("start_gates", commits_ahead=1)["stage"] == "gates"
    gate = {"phase": "gates", "gate": "pytest -q", "tree": "ab12", "fingerprint": "cd34"}
    verdict = d.send("record_gate_verdict", **gate, passed=False, output="1 failed")
    assert (verdict["stage"], verdict["last_event"]) == ("gates", "GatesStarted")
    d.send(
        "flaky_gate_detected",
        **gate,
        outputs=["ok", "1 failed"],
        verdicts=[True, False],
        action="recorded",
        reason="passed then failed on one tree",
    )
    failed = d.send("gates_failed", output="1 failed, 3 passed")
    assert (failed["stage"], failed["retry_count"]) == ("coding", 1)
    assert failed["last_gate_output"] == "1 failed, 3 passed"
    d.code_until_gates(attempt=2)
    passed = d.send("gates_passed", feature_branch="feature/story-1", commits_ahead=2)
    assert (passed["stage"], passed["in_merge_queue"]) == ("merge", True)
    d.send("start_merge", base_sha="abc123")
    conflict = d.send("merge_failed", kind="conflict_detected", conflicts=["src/app.py"])
    d.send(
        "declare_dropped_hunk",
        file="src/app.py",
        side="base",
        hunk="@@ -3,0 +4,2 @@",
        reason="the story replaces that helper",
    )
    assert (conflict["stage"], conflict["merge_failure_kind"]) == (
        "merge_failure",
        "conflict_detected",
    )
    d.mergemaster_run(attempt=1)
    assert d.send("merge_resolved", reason="resolved in workspace")["resolved_pending"] is True
    d.send("start_merge")
    d.send("merge_failed", kind="gates_failed", details="would reformat app.py")
    fixup = d.send("request_fixup", reason="formatter")
    assert (fixup["stage"], fixup["fixup_pending"]) == ("coding", True)
    assert d.send("block", reason="needs a decision")["stage"] == "blocked"
    assert d.send("unblock")["stage"] == "coding"
    assert d.send("demote", reason="later")["stage"] == "backlog"
    d.send("start_coding")
    d.code_until_gates(attempt=3)
    in_review = d.send(
        "gates_passed", feature_branch="feature/story-1", commits_ahead=2, review=True
    )
    assert (in_review["stage"], in_review["in_merge_queue"]) == ("review", False)
    d.send("spawn_agent", role="evaluator", agent="evaluator", runtime="cli")
    d.send("agent_started", role="evaluator", attempt=1, pid=4444)
    judged = [
        {"criterion": i, "met": True, "score": 0.9, "evidence": f"test_{i} passes"}
        for i in range(len(d.story["acceptance_criteria"]))
    ]
    assert d.send("submit_review", attempt=1, criteria=judged)["pending_review"] == 1
    d.send("agent_exited", role="evaluator", attempt=1, outcome="completed")
    reviewed = d.send("conclude_review")
    assert (reviewed["stage"], reviewed["in_merge_queue"]) == ("merge", True)
    assert reviewed["reviews"][0]["passed"] is True
    d.send("start_merge")
    d.send("merge_failed", kind="conflict_detected", conflicts=["README.md"])
    assert d.send("merge_gave_up", reason="cannot reconcile")["final"] is True
    assert d.send("requeue_merge", reason="operator retries")["stage"] == "merge"
    # The speculative merge queue: a stacked build, its progress, and a dropped build.
    stacked = d.send("start_merge", base_sha="ab" * 20, ahead=["7"], speculative_base="cd" * 20)
    assert stacked["speculation"]["ahead"] == ["7"]
    assert d.send("update_speculation", state="gating", commit="ef" * 20)["merging"] is True
    assert d.send("restart_speculation", reason="story 7 was ejected")["in_merge_queue"] is True
    d.send("start_merge")
    done = d.send("merge_succeeded", merge_commit="f00dfeed", base_branch="main")
    assert (done["stage"], done["merge_commit"]) == ("done", "f00dfeed")
    assert d.send("archive")["stage"] == "archived"
    assert d.send("add_note", reason="archived: kept for the record")["stage"] == "archived"

    assert set(d.sent) == set(EVENT_NAMES)
    history = client.get(f"/stories/{d.story['id']}/history").json()["events"]
    assert len(history) == len(d.sent) + 1
    assert all(e["actor"] == "user:local" for e in history)
    assert history[-1]["type"] == "NoteAdded"


def test_refusals_change_nothing(live: LiveServer) -> None:
    client = live.client()
    story = new_story(client)
    sid = story["id"]
    url = f"/stories/{sid}/transitions"

    details = assert_error(
        client.post(
            url,
            json={"event": "merge_succeeded", "data": {"merge_commit": "x", "base_branch": "main"}},
        ),
        409,
        "illegal_transition",
    )
    assert details["stage"] == "backlog"
    assert details["legal_events"] == ["start_coding", "block", "archive", "add_note"]

    details = assert_error(
        client.post(url, json={"event": "start_coding", "expected_version": 7}),
        409,
        "version_conflict",
    )
    assert (details["expected_version"], details["current_version"]) == (7, 1)

    details = assert_error(client.post(url, json={"event": "fly"}), 422, "unknown_event")
    assert "start_coding" in details["known_events"]
    assert_error(client.post(url, json={"event": "block"}), 422, "invalid_command")
    assert_error(
        client.post(url, json={"event": "start_coding", "data": {"x": 1}}), 422, "invalid_command"
    )
    assert_error(client.post(url, json={"expected_version": 1}), 422, "validation_error")
    assert_error(
        client.post(url, json={"event": "start_coding", "expected_version": "one"}),
        422,
        "validation_error",
    )
    assert_error(client.post(url, json=["start_coding"]), 422, "validation_error")
    assert_error(
        client.post(url, json={"event": "start_coding", "data": []}), 422, "validation_error"
    )
    headers = {"content-type": "application/json"}
    assert_error(client.post(url, content=b'{"event": ', headers=headers), 422, "malformed_json")
    assert_error(client.post(url, content=b"\xff\xfe", headers=headers), 422, "malformed_json")
    assert_error(client.post(url, content=b"[" * 50_000, headers=headers), 422, "malformed_json")
    assert_error(
        client.post(
            url,
            content=b"event=start_coding",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        422,
        "validation_error",
    )

    assert_error(
        client.post("/stories/404/transitions", json={"event": "start_coding"}),
        404,
        "story_not_found",
    )
    assert_error(
        client.post("/stories/bad%00id/transitions", json={"event": "start_coding"}),
        422,
        "invalid_story_id",
    )

    dependant = new_story(client, depends_on=[sid])
    details = assert_error(
        client.post(f"/stories/{dependant['id']}/transitions", json={"event": "start_coding"}),
        409,
        "dependencies_not_done",
    )
    assert details["unfinished_dependencies"] == {sid: "backlog"}

    after = client.get(f"/stories/{sid}").json()
    assert (after["version"], after["stage"]) == (1, "backlog")
    assert client.get("/events").json()["head"] == dependant["position"]


def test_oversize_bodies_are_413(live: LiveServer) -> None:
    client = live.client()
    sid = new_story(client)["id"]
    limit = live.service.config.server.max_body_bytes
    big = b'{"event": "block", "reason": "' + b"x" * limit + b'"}'
    url = f"/stories/{sid}/transitions"
    details = assert_error(
        client.post(url, content=big, headers={"content-type": "application/json"}),
        413,
        "body_too_large",
    )
    assert details == {"max_bytes": limit}

    def chunks() -> Any:
        yield big[: limit // 2]
        yield big[limit // 2 :]

    # A chunked body carries no Content-Length: it is counted as it arrives.
    assert_error(
        client.post(url, content=chunks(), headers={"content-type": "application/json"}),
        413,
        "body_too_large",
    )
    small_chunked = iter([b'{"event": "block", ', b'"reason": "chunked"}'])
    response = client.post(url, content=small_chunked, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["blocked_reason"] == "chunked"
    assert_error(
        client.post(
            "/stories",
            content=b"[" + b"1," * limit + b"1]",
            headers={"content-type": "application/json"},
        ),
        413,
        "body_too_large",
    )
    assert client.get(f"/stories/{sid}").json()["version"] == 2


def test_twenty_clients_race_one_wins(live: LiveServer) -> None:
    client = live.client()
    story = new_story(client)
    url = f"{live.url}/stories/{story['id']}/transitions"

    async def race() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            return list(
                await asyncio.gather(
                    *(
                        http.post(url, json={"event": "start_coding", "expected_version": 1})
                        for _ in range(20)
                    )
                )
            )

    responses = asyncio.run(race())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * 19, [r.text for r in responses if r.status_code != 409]
    for response in responses:
        if response.status_code == 409:
            details = assert_error(response, 409, "version_conflict")
            assert details["expected_version"] == 1
            assert details["current_version"] == 2
    history = client.get(f"/stories/{story['id']}/history").json()["events"]
    assert [e["type"] for e in history] == ["StoryCreated", "CodingStarted"]


def test_wait_for_projections(serve_api: ServerFactory) -> None:
    live = serve_api(projections=True)
    client = live.client()
    response = client.post(
        "/stories", params={"wait": "true"}, json={"name": "x", "acceptance_criteria": ["a"]}
    )
    assert response.status_code == 201
    assert response.headers["x-storyline-caught-up"] == "true"
    sid = response.json()["id"]
    moved = client.post(
        f"/stories/{sid}/transitions", params={"wait": "true"}, json={"event": "start_coding"}
    )
    assert moved.headers["x-storyline-caught-up"] == "true"
    # Read-your-writes on the board projection: the story is listed in its new stage.
    listed = client.get("/stories", params={"stage": "coding"}).json()["stories"]
    assert [row["id"] for row in listed] == [sid]
