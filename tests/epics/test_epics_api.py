"""The epics' HTTP API on a real uvicorn server over each database: create, list, show (now
and as of), history, the person and planner transitions with their token rules, idempotency,
hostile input, and epics on /board and /metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from domain.config import TokenConfig
from domain.epic_events import RunMode
from domain.stages import AgentRole
from service.agent_tokens import AgentTokens
from service.epics import EpicService, NewStory
from service.settings import Database
from tests.api.conftest import (
    ADMIN_TOKEN,
    READ_TOKEN,
    TOKENS,
    WRITE_TOKEN,
    LiveServer,
    assert_error,
    make_service,
    start_server,
)

EPIC = {
    "name": "Pretty printer",
    "goal": "Read a file and print it prettily.",
    "acceptance_criteria": ["the CLI prints the sample prettily"],
    "max_budget_usd": 5.0,
}
PLAN = {
    "subtasks": [
        {
            "name": "parser",
            "description": "Parse the input format.",
            "acceptance_criteria": ["parses the sample"],
            "footprint": ["src/parse.py"],
        },
        {
            "name": "printer",
            "description": "Print the result.",
            "acceptance_criteria": ["prints the sample"],
            "footprint": ["src/print.py"],
        },
        {
            "name": "cli",
            "description": "Wire both into the CLI.",
            "acceptance_criteria": ["cli runs"],
            "depends_on": ["parser", "printer"],
            "footprint": ["src/cli.py"],
        },
    ],
    "rationale": "parser and printer are independent",
}
# parser and printer may run at once, and parser's directory holds printer's file.
BAD_PLAN = {
    "subtasks": [
        {**PLAN["subtasks"][0], "footprint": ["src/"]},  # type: ignore[dict-item]
        *PLAN["subtasks"][1:],  # type: ignore[misc]
    ]
}

Serve = Callable[..., LiveServer]


@pytest.fixture
def serve(database: Database, tmp_path: Path) -> Iterator[Serve]:
    """Servers over ``database``; ``auth=True`` configures the three person tokens."""
    from projections import ReadModels

    started: list[tuple[LiveServer, Any]] = []

    def start(auth: bool = True) -> LiveServer:
        service = make_service(database, tmp_path)
        read_models = ReadModels(database)
        tokens = [TokenConfig(**t) for t in TOKENS] if auth else []  # type: ignore[arg-type]
        live = start_server(service, read_models, tokens=tokens)
        started.append((live, read_models))
        return live

    yield start
    for live, read_models in reversed(started):
        try:
            live.stop()
        finally:
            read_models.close()
            live.service.close()


def create(client: httpx.Client, **overrides: Any) -> dict[str, Any]:
    response = client.post("/epics", json={**EPIC, **overrides})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def move(client: httpx.Client, epic_id: str, event: str, **body: Any) -> httpx.Response:
    return client.post(f"/epics/{epic_id}/transitions", json={"event": event, **body})


def planner(live: LiveServer, epic_id: str) -> httpx.Client:
    return live.client(AgentTokens(live.service.app).issue(epic_id, 1, AgentRole.PLANNER))


def head(live: LiveServer) -> int:
    return live.service.app.max_position()


def test_create_list_show_and_history(serve: Serve) -> None:
    live = serve()
    bob, carol = live.client(WRITE_TOKEN), live.client(READ_TOKEN)
    response = bob.post("/epics", json=EPIC)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == "/epics/epic-1"
    epic = response.json()
    assert epic["id"] == "epic-1" and epic["version"] == 1
    assert (epic["name"], epic["goal"]) == (EPIC["name"], EPIC["goal"])
    assert epic["acceptance_criteria"] == EPIC["acceptance_criteria"]
    assert epic["stage"] == "planning" and "submit_plan" in epic["legal_events"]
    assert epic["integration_branch"] == "epic/epic-1"
    assert epic["stories"] == [] and epic["plan"] is None and epic["mode"] is None
    assert epic["ledger"] == {
        "tokens_in": 0,
        "tokens_out": 0,
        "cost_usd": 0.0,
        "planner_cost_usd": 0.0,
        "stories_cost_usd": 0.0,
        "evaluator_cost_usd": 0.0,
        "max_budget_usd": 5.0,
    }
    assert isinstance(epic["position"], int) and epic["as_of"] is None
    second = create(bob, name="Second", max_budget_usd=None)
    assert second["id"] == "epic-2" and second["ledger"]["max_budget_usd"] is None

    listed = carol.get("/epics").json()["epics"]
    assert [(e["id"], e["name"], e["stage"]) for e in listed] == [
        ("epic-1", "Pretty printer", "planning"),
        ("epic-2", "Second", "planning"),
    ]
    assert listed[0]["stories_total"] == listed[0]["stories_done"] == 0
    assert listed[0]["cost_usd"] == 0.0 and listed[0]["mode"] is None

    shown = carol.get("/epics/epic-1").json()
    assert shown == {**epic, "position": None}

    history = carol.get("/epics/epic-1/history").json()
    assert history["epic_id"] == "epic-1"
    [created] = history["events"]
    assert (created["type"], created["actor"], created["to_stage"]) == (
        "EpicCreated",
        "user:bob",
        "planning",
    )
    assert created["position"] == epic["position"]
    assert (
        carol.get("/epics/epic-1/history", params={"after": created["position"]}).json()["events"]
        == []
    )

    # A read token creates nothing; no token at all is a 401.
    assert_error(carol.post("/epics", json=EPIC), 403, "forbidden")
    assert_error(live.client().get("/epics"), 401, "unauthorized")
    assert len(carol.get("/epics").json()["epics"]) == 2


@pytest.mark.parametrize(
    "body",
    [
        {k: v for k, v in EPIC.items() if k != "goal"},
        {**EPIC, "goal": "   "},
        {**EPIC, "name": ""},
        {**EPIC, "name": "a\x1bb"},
        {**EPIC, "name": "two\nlines"},
        {**EPIC, "acceptance_criteria": []},
        {**EPIC, "acceptance_criteria": [" \n"]},
        {**EPIC, "acceptance_criteria": "one criterion"},
        {**EPIC, "max_budget_usd": 0},
        {**EPIC, "max_budget_usd": -1},
        {**EPIC, "max_budget_usd": 10_000_000},
        {**EPIC, "max_budget_usd": "five"},
        {**EPIC, "reason": "nul\x00"},
        {**EPIC, "stage": "done"},
        {**EPIC, "goal": "g" * 20_001},
    ],
)
def test_bad_bodies_are_422_and_create_nothing(serve: Serve, body: dict[str, Any]) -> None:
    live = serve()
    bob = live.client(WRITE_TOKEN)
    before = head(live)
    response = bob.post("/epics", json=body)
    assert response.status_code == 422, response.text
    assert_error(response, 422, response.json()["error"]["code"])
    assert head(live) == before
    assert bob.get("/epics").json()["epics"] == []


def test_malformed_json_and_nan_are_422(serve: Serve) -> None:
    live = serve()
    bob = live.client(WRITE_TOKEN)
    headers = {"content-type": "application/json"}
    assert_error(bob.post("/epics", content=b"{", headers=headers), 422, "malformed_json")
    nan = b'{"name": "n", "goal": "g", "acceptance_criteria": ["c"], "max_budget_usd": NaN}'
    assert bob.post("/epics", content=nan, headers=headers).status_code == 422
    assert head(live) == 0


HOSTILE = [
    "1",
    "epic-0",
    "epic-01",
    "EPIC-1",
    "epic-1.2",
    "epic-" + "9" * 19,
    "..%2F..%2Fetc%2Fpasswd",
    "epic-1%0A",
    "epic-1%00",
    "epic-1%20",
    "%C3%A9pic-1",
]


def test_hostile_epic_ids_are_refused_without_touching_anything(serve: Serve) -> None:
    live = serve()
    alice = live.client(ADMIN_TOKEN)
    create(alice)
    before = head(live)
    for raw in HOSTILE:
        for method, path, body in (
            ("GET", f"/epics/{raw}", None),
            ("GET", f"/epics/{raw}/history", None),
            ("POST", f"/epics/{raw}/transitions", {"event": "block", "reason": "x"}),
        ):
            response = alice.request(method, path, json=body, headers={"Idempotency-Key": raw})
            assert response.status_code in (404, 422), (raw, path, response.text)
            if response.status_code == 422:
                assert_error(response, 422, "invalid_epic_id")
    for method, path, body in (
        ("GET", "/epics/epic-424242", None),
        ("GET", "/epics/epic-424242/history", None),
        ("POST", "/epics/epic-424242/transitions", {"event": "block", "reason": "x"}),
    ):
        details = assert_error(alice.request(method, path, json=body), 404, "epic_not_found")
        assert details == {"epic_id": "epic-424242"}
    assert head(live) == before
    assert alice.get("/epics/epic-1").json()["version"] == 1
    # A story id is not an epic id, and an epic is not a story.
    assert_error(alice.get("/epics/1"), 422, "invalid_epic_id")
    assert alice.get("/stories/epic-1").status_code == 404


def test_create_is_idempotent_per_key(serve: Serve) -> None:
    live = serve()
    bob = live.client(WRITE_TOKEN)
    key = {"Idempotency-Key": "epic-create-1"}
    first = bob.post("/epics", json=EPIC, headers=key)
    again = bob.post("/epics", json=EPIC, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert [e["id"] for e in bob.get("/epics").json()["epics"]] == ["epic-1"]
    other = bob.post("/epics", json={**EPIC, "name": "Other"}, headers=key)
    assert_error(other, 422, "idempotency_key_reused")
    # Keys are per actor: the same key from another person is a new epic.
    assert live.client(ADMIN_TOKEN).post("/epics", json=EPIC, headers=key).json()["id"] == (
        "epic-2"
    )


def test_lost_answers_are_rebuilt_not_run_again(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer's write fails after the commit: a retry rebuilds the very same answer
    from the log (the epic as of the command), a refused plan included."""
    live = serve()
    bob = live.client(WRITE_TOKEN)

    def lost(*_: object) -> None:
        raise OSError("killed before the answer was stored")

    monkeypatch.setattr(live.state.idempotency, "complete", lost)
    created = bob.post("/epics", json=EPIC, headers={"Idempotency-Key": "k1"})
    assert created.status_code == 201
    eid = created.json()["id"]
    plan = planner(live, eid)
    refused = plan.post(
        f"/epics/{eid}/transitions",
        json={"event": "submit_plan", "data": {"plan": BAD_PLAN}},
        headers={"Idempotency-Key": "k2"},
    )
    assert refused.status_code == 200 and refused.json()["accepted"] is False
    before = head(live)
    monkeypatch.undo()

    again = bob.post("/epics", json=EPIC, headers={"Idempotency-Key": "k1"})
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == created.json()
    refused_again = plan.post(
        f"/epics/{eid}/transitions",
        json={"event": "submit_plan", "data": {"plan": BAD_PLAN}},
        headers={"Idempotency-Key": "k2"},
    )
    assert refused_again.headers["idempotent-replayed"] == "true"
    assert refused_again.json() == refused.json()
    assert head(live) == before
    assert live.client(READ_TOKEN).get(f"/epics/{eid}").json()["planner"]["failed_attempts"] == 1


def test_people_block_unblock_and_fail_with_reasons(serve: Serve) -> None:
    live = serve()
    bob, alice, carol = (
        live.client(WRITE_TOKEN),
        live.client(ADMIN_TOKEN),
        live.client(READ_TOKEN),
    )
    eid = create(bob)["id"]
    before = head(live)
    assert_error(move(bob, eid, "block"), 422, "invalid_command")
    assert_error(move(bob, eid, "block", reason="  "), 422, "invalid_command")
    assert head(live) == before

    blocked = move(bob, eid, "block", reason="waiting for the API design", expected_version=1)
    assert blocked.status_code == 200, blocked.text
    body = blocked.json()
    assert (body["stage"], body["blocked_reason"], body["blocked_from"]) == (
        "blocked",
        "waiting for the API design",
        "planning",
    )
    assert body["legal_events"] == [
        "planner_exited",
        "evaluator_exited",
        "fail",
        "unblock",
        "add_note",
    ]

    details = assert_error(move(bob, eid, "block", reason="again"), 409, "illegal_transition")
    assert details["epic_id"] == eid and details["stage"] == "blocked"
    assert details["legal_events"] == body["legal_events"]
    stale = move(bob, eid, "unblock", reason="x", expected_version=1)
    assert assert_error(stale, 409, "version_conflict")["current_version"] == 2

    back = move(alice, eid, "unblock", reason="design agreed", data={"max_budget_usd": 8.5})
    assert back.status_code == 200, back.text
    assert back.json()["stage"] == "planning" and back.json()["max_budget_usd"] == 8.5
    assert move(bob, eid, "add_note", reason="the parser is the risky part").status_code == 200

    # What people may not send: the runners' and the planner's events, or anything with a
    # read token. An unknown name is the domain's 422 with the names it knows.
    for event, data in (
        ("submit_plan", {"plan": PLAN}),
        ("farm_out", {}),
        ("spawn_planner", {"agent": "p", "runtime": "cli"}),
        ("judge_union", {"commit": "a" * 40, "tree": "b" * 40, "passed": True}),
        ("land", {"merge_commit": "a" * 40, "base_branch": "main"}),
    ):
        assert_error(move(alice, eid, event, data=data), 403, "forbidden")
    assert_error(move(carol, eid, "block", reason="x"), 403, "forbidden")
    assert_error(move(bob, eid, "explode"), 422, "unknown_event")

    failed = move(bob, eid, "fail", reason="the goal was dropped")
    assert failed.json()["stage"] == "failed"
    assert failed.json()["failed_reason"] == "the goal was dropped"
    history = carol.get(f"/epics/{eid}/history").json()["events"]
    assert [(e["type"], e["actor"], e["reason"]) for e in history] == [
        ("EpicCreated", "user:bob", None),
        ("EpicBlocked", "user:bob", "waiting for the API design"),
        ("EpicUnblocked", "user:alice", "design agreed"),
        ("EpicNoteAdded", "user:bob", "the parser is the risky part"),
        ("EpicFailed", "user:bob", "the goal was dropped"),
    ]
    assert history[2]["data"] == {"max_budget_usd": 8.5}


def test_a_planner_token_plans_its_own_epic_only(serve: Serve) -> None:
    live = serve()
    bob = live.client(WRITE_TOKEN)
    eid, other = create(bob)["id"], create(bob, name="Other")["id"]
    plan = planner(live, eid)
    actor = f"agent:planner-{eid}-1"

    assert plan.get(f"/epics/{eid}").status_code == 200
    assert plan.get(f"/epics/{eid}/history").status_code == 200
    assert_error(plan.get(f"/epics/{other}"), 403, "forbidden")
    assert_error(plan.get(f"/epics/{other}/history"), 403, "forbidden")
    assert_error(plan.get("/epics"), 403, "forbidden")
    assert_error(plan.get("/stories"), 403, "forbidden")
    assert_error(plan.post("/epics", json=EPIC), 403, "forbidden")
    assert_error(move(plan, other, "submit_plan", data={"plan": PLAN}), 403, "forbidden")
    assert_error(move(plan, eid, "block", reason="x"), 403, "forbidden")
    assert_error(move(plan, eid, "farm_out"), 403, "forbidden")

    refused = move(plan, eid, "submit_plan", data={"plan": BAD_PLAN})
    assert refused.status_code == 200, refused.text
    answer = refused.json()
    assert answer["accepted"] is False
    assert len(answer["problems"]) == 1, answer["problems"]
    assert "'parser' and 'printer' may run at the same time" in answer["problems"][0]
    assert answer["plan_problems"] == answer["problems"]
    assert answer["planner"]["failed_attempts"] == 1 and answer["plan"] is None
    assert answer["stage"] == "planning"
    # Not even a plan: a string. Recorded as a refusal too, with the reason.
    shapeless = move(plan, eid, "submit_plan", data={"plan": "just do it"}).json()
    assert shapeless["accepted"] is False and shapeless["problems"]
    assert shapeless["planner"]["failed_attempts"] == 2

    accepted = move(plan, eid, "submit_plan", data={"plan": PLAN}).json()
    assert accepted["accepted"] is True and accepted["problems"] == []
    assert [s["name"] for s in accepted["plan"]["subtasks"]] == ["parser", "printer", "cli"]
    assert accepted["plan_problems"] == [] and accepted["single_session_reason"] is None
    again = move(plan, eid, "submit_plan", data={"plan": PLAN})
    assert "already accepted" in assert_error(again, 409, "illegal_transition")["why"]
    assert move(plan, eid, "add_note", reason="cli last: it needs both").status_code == 200

    # The other epic is untouched.
    assert bob.get(f"/epics/{other}").json()["version"] == 1
    history = bob.get(f"/epics/{eid}/history").json()["events"]
    assert [(e["type"], e["actor"]) for e in history[1:]] == [
        ("PlanRejected", actor),
        ("PlanRejected", actor),
        ("PlanAccepted", actor),
        ("EpicNoteAdded", actor),
    ]
    assert history[1]["data"]["problems"] == answer["problems"]


def _farm_out(live: LiveServer, eid: str) -> list[str]:
    epics = EpicService(live.service.app)
    epics.transition(eid, "submit_plan", actor="agent:planner", data={"plan": PLAN})
    stories = [
        NewStory(f"{eid}.{i + 1}", s["name"], s["description"], s["acceptance_criteria"])
        for i, s in enumerate(PLAN["subtasks"])  # type: ignore[arg-type]
    ]
    epics.farm_out(
        eid,
        actor="runner:epic",
        mode=RunMode.PARALLEL,
        stories=stories,
        fork_point="a" * 40,
        integration_tip="a" * 40,
        expected_version=epics.get(eid).version,
    )
    return [s.story_id for s in stories]


def test_stories_of_the_epic_and_as_of(serve: Serve) -> None:
    live = serve()
    bob = live.client(WRITE_TOKEN)
    eid = create(bob)["id"]
    blocked = move(bob, eid, "block", reason="wait").json()
    at_block = blocked["position"]
    move(bob, eid, "unblock", reason="go")
    sids = _farm_out(live, eid)
    app = live.service.app
    app.transition(sids[0], "start_coding", actor="runner:test")

    now = bob.get(f"/epics/{eid}").json()
    assert now["stage"] == "running" and now["mode"] == "parallel" and now["round"] == 1
    assert [(s["id"], s["name"], s["stage"]) for s in now["stories"]] == [
        (sids[0], "parser", "coding"),
        (sids[1], "printer", "backlog"),
        (sids[2], "cli", "backlog"),
    ]
    assert all(s["current_round"] and not s["implicated"] for s in now["stories"])
    assert now["fork_point"] == "a" * 40
    listed = bob.get("/epics").json()["epics"][0]
    assert (listed["stories_total"], listed["stories_done"], listed["mode"]) == (3, 0, "parallel")

    then = bob.get(f"/epics/{eid}", params={"as_of": str(at_block)}).json()
    assert then["stage"] == "blocked" and then["as_of"] == str(at_block)
    assert then["stories"] == [] and then["version"] == 2
    moment = bob.get(f"/epics/{eid}/history").json()["events"][1]["timestamp"]
    assert bob.get(f"/epics/{eid}", params={"as_of": moment}).json()["stage"] == "blocked"
    # As of the round's commit (the epic's event and its stories' creation, one
    # transaction), before the first story moved: every story in the backlog.
    farmed = next(e.position for e in EpicService(app).history(eid) if e.type == "StoriesFarmedOut")
    at_farm = bob.get(f"/epics/{eid}", params={"as_of": str(farmed)}).json()
    assert at_farm["stage"] == "running"
    assert [s["stage"] for s in at_farm["stories"]] == ["backlog"] * 3

    assert_error(bob.get(f"/epics/{eid}", params={"as_of": "yesterday"}), 422, "invalid_as_of")
    assert_error(bob.get(f"/epics/{eid}", params={"as_of": "0"}), 404, "epic_not_found")
    for edge in ("999999999999999999", "9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00"):
        response = bob.get(f"/epics/{eid}", params={"as_of": edge})
        assert response.status_code in (200, 404), (edge, response.text)


def test_board_and_metrics_show_epics(serve: Serve) -> None:
    live = serve()
    bob = live.client(WRITE_TOKEN)
    first = create(bob)["id"]
    second = create(bob, name="Blocked one")["id"]
    move(bob, second, "block", reason="later")
    _farm_out(live, first)

    board = bob.get("/board").json()
    assert set(board) == {"stages", "epics"}
    assert board["epics"] == [
        {
            "id": first,
            "name": EPIC["name"],
            "stage": "running",
            "mode": "parallel",
            "stories_done": 0,
            "stories_total": 3,
        },
        {
            "id": second,
            "name": "Blocked one",
            "stage": "blocked",
            "mode": None,
            "stories_done": 0,
            "stories_total": 0,
        },
    ]
    metrics = bob.get("/metrics").text
    assert 'storyline_epics{stage="running"} 1' in metrics
    assert 'storyline_epics{stage="blocked"} 1' in metrics
    assert 'storyline_epics{stage="done"} 0' in metrics


def test_without_tokens_the_local_admin_is_still_a_person(serve: Serve) -> None:
    """No configured tokens: requests act as user:local (admin), who still cannot send the
    runners' or the planner's events; a planner token presented is still honoured."""
    live = serve(auth=False)
    anyone = live.client()
    eid = create(anyone)["id"]
    assert_error(move(anyone, eid, "submit_plan", data={"plan": PLAN}), 403, "forbidden")
    assert move(anyone, eid, "block", reason="x").json()["stage"] == "blocked"
    move(anyone, eid, "unblock", reason="y")
    accepted = move(planner(live, eid), eid, "submit_plan", data={"plan": PLAN}).json()
    assert accepted["accepted"] is True
    history = anyone.get(f"/epics/{eid}/history").json()["events"]
    assert [e["actor"] for e in history] == [
        "user:local",
        "user:local",
        "user:local",
        f"agent:planner-{eid}-1",
    ]
