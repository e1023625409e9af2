"""The interview and the evaluations over HTTP, on a real server over each database: a
planner's questions answered with ``POST /epics/{id}/answers`` (every refusal changing
nothing), and ``GET /epics/{id}/evaluations`` after an evolution and a discarded one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from domain.config import TokenConfig
from domain.epic_commands import EpicPolicy
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
from tests.api.test_serve import database_url
from tests.epics.test_epics_cli import storyline

EPIC = {
    "name": "Pretty printer",
    "goal": "Print files prettily.",
    "acceptance_criteria": ["prints the sample", "handles empty files"],
}
QUESTIONS = ["Which output format?", "Should colours be optional?"]
RUNNER = "runner:test"
PLAN = {
    "subtasks": [
        {
            "name": "printer",
            "description": "Print the result.",
            "acceptance_criteria": ["prints the sample"],
            "footprint": ["src/print.py"],
        }
    ]
}


@pytest.fixture
def live(database: Database, tmp_path: Path) -> Iterator[LiveServer]:
    from projections import ReadModels

    service = make_service(database, tmp_path)
    read_models = ReadModels(database)
    tokens = [TokenConfig(**t) for t in TOKENS]  # type: ignore[arg-type]
    server = start_server(service, read_models, tokens=tokens)
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            read_models.close()
            service.close()


def _epics(live: LiveServer, **policy: Any) -> EpicService:
    return EpicService(live.service.app, EpicPolicy(**policy))


def _create(client: httpx.Client, **overrides: Any) -> str:
    response = client.post("/epics", json={**EPIC, **overrides})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _awaiting_answers(live: LiveServer, epic_id: str) -> None:
    """A planner started and asked (over HTTP, with its own token) instead of planning."""
    epics = _epics(live)
    epics.transition(epic_id, "spawn_planner", actor=RUNNER, data={"agent": "p", "runtime": "cli"})
    epics.transition(epic_id, "planner_started", actor=RUNNER, data={"attempt": 1, "pid": 4242})
    planner = live.client(AgentTokens(live.service.app).issue(epic_id, 1, AgentRole.PLANNER))
    asked = planner.post(
        f"/epics/{epic_id}/transitions",
        json={"event": "ask_questions", "data": {"attempt": 1, "questions": QUESTIONS}},
    )
    assert asked.status_code == 200, asked.text
    assert asked.json()["stage"] == "awaiting_answers"


def test_answers_resume_planning(live: LiveServer) -> None:
    bob, carol = live.client(WRITE_TOKEN), live.client(READ_TOKEN)
    eid = _create(bob)
    _awaiting_answers(live, eid)

    waiting = carol.get(f"/epics/{eid}").json()
    assert waiting["stage"] == "awaiting_answers"
    assert waiting["questions"] == QUESTIONS
    assert "answer_questions" in waiting["legal_events"]
    [asked] = waiting["interview"]
    assert (asked["round"], asked["attempt"], asked["questions"]) == (1, 1, QUESTIONS)
    assert asked["asked_by"].startswith("agent:") and asked["answers"] is None

    key = {"Idempotency-Key": "answers-1"}
    body = {"answers": ["Markdown", "yes,\nwith --no-colour"], "reason": "from the design doc"}
    answered = bob.post(f"/epics/{eid}/answers", json=body, headers=key)
    assert answered.status_code == 200, answered.text
    view = answered.json()
    assert view["stage"] == "planning" and view["questions"] is None
    assert view["version"] == waiting["version"] + 1 and isinstance(view["position"], int)
    [round_one] = view["interview"]
    assert round_one["answers"] == ["Markdown", "yes,\nwith --no-colour"]
    assert round_one["answered_by"] == "user:bob" and round_one["answered_at"]
    last = carol.get(f"/epics/{eid}/history").json()["events"][-1]
    assert (last["type"], last["actor"], last["reason"]) == (
        "QuestionsAnswered",
        "user:bob",
        "from the design doc",
    )
    assert (last["from_stage"], last["to_stage"]) == ("awaiting_answers", "planning")

    # The same key again: the same answer, rebuilt, nothing written twice.
    head = live.service.app.max_position()
    again = bob.post(f"/epics/{eid}/answers", json=body, headers=key)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == view
    assert live.service.app.max_position() == head
    # A new key: the epic no longer awaits answers, and says what it does allow.
    refused = bob.post(f"/epics/{eid}/answers", json=body)
    details = assert_error(refused, 409, "illegal_transition")
    assert details["stage"] == "planning" and details["event"] == "answer_questions"
    assert details["legal_events"] == view["legal_events"]
    assert live.service.app.max_position() == head


REFUSALS: list[tuple[dict[str, Any], int, str]] = [
    ({"answers": ["only one"]}, 422, "answer each of the 2 question(s)"),
    ({"answers": ["a", "b", "c"]}, 422, "answer each of the 2 question(s)"),
    ({"answers": ["Markdown", "   "]}, 422, "must not be blank"),
    ({"answers": ["Mark\x00down", "yes"]}, 422, "control character (0x00)"),
    ({"answers": ["a\x1b[31m", "yes"]}, 422, "control character (0x1b)"),
    ({"answers": ["x" * 10_001, "yes"]}, 422, "at most 10000 characters"),
    ({"answers": [str(i) for i in range(11)]}, 422, "at most 10 items"),
    ({"answers": []}, 422, "at least 1 item"),
    ({"answers": "Markdown"}, 422, "valid list"),
    ({"answers": [1, 2]}, 422, "valid string"),
    ({"answers": None}, 422, "valid list"),
    ({}, 422, "answers"),
    ({"answers": ["a", "b"], "stage": "planning"}, 422, "stage"),
    ({"answers": ["a", "b"], "reason": "nul\x00"}, 422, "reason"),
    ({"answers": ["a", "b"], "expected_version": -1}, 422, "expected_version"),
    ({"answers": ["a", "b"], "expected_version": "three"}, 422, "expected_version"),
    ({"answers": ["a", "b"], "expected_version": 1}, 409, "version"),
]


def test_refused_answers_change_nothing(live: LiveServer) -> None:
    """One server and one waiting epic for every case (a server per case is slow): each
    refusal is checked to leave the log and the epic as they were."""
    bob = live.client(WRITE_TOKEN)
    eid = _create(bob)
    _awaiting_answers(live, eid)
    before = bob.get(f"/epics/{eid}").json()
    head = live.service.app.max_position()
    for body, status, needle in REFUSALS:
        response = bob.post(f"/epics/{eid}/answers", json=body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert needle in error["message"] or needle in str(error["details"]), (body, error)
        assert live.service.app.max_position() == head, body
        assert bob.get(f"/epics/{eid}").json() == before, body
    # Still waiting, and still answerable.
    answered = bob.post(f"/epics/{eid}/answers", json={"answers": ["a", "b"]})
    assert answered.json()["stage"] == "planning"


def test_who_may_answer(live: LiveServer) -> None:
    bob, alice = live.client(WRITE_TOKEN), live.client(ADMIN_TOKEN)
    eid = _create(bob)
    _awaiting_answers(live, eid)
    head = live.service.app.max_position()
    body = {"answers": ["Markdown", "yes"]}
    tokens = AgentTokens(live.service.app)
    # The planner does not answer its own questions; readers and strangers answer nothing.
    for client, status, code in (
        (live.client(tokens.issue(eid, 1, AgentRole.PLANNER)), 403, "forbidden"),
        (live.client(tokens.issue(eid, 1, AgentRole.EVALUATOR)), 403, "forbidden"),
        (live.client(READ_TOKEN), 403, "forbidden"),
        (live.client(), 401, "unauthorized"),
        (live.client("no-such-token-here-0123"), 401, "invalid_token"),
    ):
        assert_error(client.post(f"/epics/{eid}/answers", json=body), status, code)
    details = assert_error(alice.post("/epics/epic-99/answers", json=body), 404, "epic_not_found")
    assert details == {"epic_id": "epic-99"}
    for hostile in ("1", "epic-01", "epic-1%00", "..%2Fepic-1"):
        response = alice.post(f"/epics/{hostile}/answers", json=body)
        assert response.status_code in (404, 422), (hostile, response.text)
        if response.status_code == 422:
            assert_error(response, 422, "invalid_epic_id")
    assert live.service.app.max_position() == head
    assert alice.post(f"/epics/{eid}/answers", json=body).json()["stage"] == "planning"


def _plan_and_integrate(live: LiveServer, epics: EpicService, eid: str, n: int, tip: str) -> None:
    """Planner attempt ``n`` plans one story; the round runs; its union passes into
    evaluation at ``tip``."""
    epics.transition(eid, "spawn_planner", actor=RUNNER, data={"agent": "p", "runtime": "cli"})
    epics.transition(eid, "planner_started", actor=RUNNER, data={"attempt": n, "pid": 100 + n})
    epics.transition(eid, "submit_plan", actor=f"agent:planner-{eid}-{n}", data={"plan": PLAN})
    epics.transition(
        eid, "planner_exited", actor=RUNNER, data={"attempt": n, "outcome": "completed"}
    )
    epic = epics.get(eid)
    epics.farm_out(
        eid,
        actor=RUNNER,
        mode=RunMode.PARALLEL,
        stories=[NewStory(f"{eid}-s{n}", f"printer {n}", "Print.", ["prints"])],
        fork_point="f0f0f0f0",
        integration_tip="f0f0f0f0",
        expected_version=epic.version,
    )
    epics.transition(eid, "start_integration", actor=RUNNER, data={"commit": tip})
    epics.transition(
        eid,
        "judge_union",
        actor=RUNNER,
        data={"commit": tip, "tree": "ee" * 20, "passed": True, "evaluate": True},
    )


def _evaluate(epics: EpicService, eid: str, attempt: int, *scores: float) -> None:
    epics.transition(eid, "spawn_evaluator", actor=RUNNER, data={"agent": "e", "runtime": "cli"})
    epics.transition(
        eid, "evaluator_started", actor=RUNNER, data={"attempt": attempt, "pid": 200 + attempt}
    )
    criteria = [
        {"criterion": i, "met": s >= 0.8, "score": s, "evidence": f"make check: case {i}"}
        for i, s in enumerate(scores)
    ]
    epics.transition(
        eid,
        "submit_evaluation",
        actor=f"agent:evaluator-{eid}-{attempt}",
        data={"attempt": attempt, "criteria": criteria, "summary": f"round {attempt}"},
    )
    epics.transition(
        eid,
        "evaluator_exited",
        actor=RUNNER,
        data={"attempt": attempt, "outcome": "completed", "cost_usd": 0.25, "tokens_in": 10},
    )
    epics.transition(eid, "conclude_evaluation", actor=RUNNER)


def test_evaluations_evolution_and_a_discarded_one(live: LiveServer) -> None:
    bob, carol = live.client(WRITE_TOKEN), live.client(READ_TOKEN)
    eid = _create(bob, review=True)
    other = _create(bob, review=False)
    assert carol.get(f"/epics/{other}").json()["review"] is False
    epics = _epics(live, max_evolutions=1)
    first, second = "a1" * 20, "b2" * 20

    none_yet = carol.get(f"/epics/{eid}/evaluations")
    assert none_yet.status_code == 200, none_yet.text
    assert none_yet.json() == {
        "epic_id": eid,
        "stage": "planning",
        "review": True,
        "evolution": 0,
        "evaluations": [],
        "evolutions": [],
        "discarded": [],
        "best": None,
        "final": None,
    }

    _plan_and_integrate(live, epics, eid, 1, first)
    _evaluate(epics, eid, 1, 0.9, 0.5)  # a gap: evolution 1 starts
    evolving = carol.get(f"/epics/{eid}/evaluations").json()
    assert evolving["stage"] == "planning" and evolving["evolution"] == 1
    [evaluation] = evolving["evaluations"]
    assert (evaluation["evolution"], evaluation["commit"], evaluation["score"]) == (0, first, 0.7)
    assert evaluation["all_met"] is False and evaluation["summary"] == "round 1"
    assert evaluation["criteria"][1] == {
        "criterion": 1,
        "text": EPIC["acceptance_criteria"][1],
        "met": False,
        "score": 0.5,
        "evidence": "make check: case 1",
    }
    [evolution] = evolving["evolutions"]
    assert (evolution["evolution"], evolution["from_commit"]) == (1, first)
    assert [g["criterion"] for g in evolution["gaps"]] == [1]

    _plan_and_integrate(live, epics, eid, 2, second)
    _evaluate(epics, eid, 2, 0.6, 0.4)  # worse, and the last evolution allowed
    done = carol.get(f"/epics/{eid}/evaluations").json()
    assert done["stage"] == "merging"
    assert [(e["evolution"], e["score"]) for e in done["evaluations"]] == [(0, 0.7), (1, 0.5)]
    assert done["discarded"] == [
        {"evolution": 1, "score": 0.5, "commit": second, "kept_evolution": 0, "kept_commit": first}
    ]
    assert done["best"] == {"evolution": 0, "score": 0.7, "commit": first, "attempt": 1}
    assert done["final"] == {
        "passed": False,
        "score": 0.7,
        "best_evolution": 0,
        "commit": first,
        "max_reached": True,
        "evolutions": 1,
    }

    # The epic's own view carries the same, and what the evaluator cost.
    view = carol.get(f"/epics/{eid}").json()
    for key in ("evaluations", "evolutions", "discarded", "best", "evolution"):
        assert view[key] == done[key], key
    assert view["evaluation_final"] == done["final"]
    assert view["integration_commit"] == first
    assert view["running_evaluator"] is None
    assert view["evaluator"]["attempts"] == 2 and view["evaluator"]["pending_verdict"] is None
    assert view["evaluator"]["cost_usd"] == view["ledger"]["evaluator_cost_usd"] == 0.5
    assert view["evaluator"]["tokens_in"] == 20

    # An agent reads only its own epic; an unknown one is a 404, a malformed id a 422.
    evaluator = live.client(AgentTokens(live.service.app).issue(eid, 3, AgentRole.EVALUATOR))
    assert evaluator.get(f"/epics/{eid}/evaluations").status_code == 200
    assert_error(evaluator.get(f"/epics/{other}/evaluations"), 403, "forbidden")
    assert_error(carol.get("/epics/epic-77/evaluations"), 404, "epic_not_found")
    assert_error(carol.get("/epics/77/evaluations"), 422, "invalid_epic_id")


def test_answer_and_show_on_the_command_line(live: LiveServer, database: Database) -> None:
    """``storyline epic show`` shows the waiting questions, ``epic answer`` answers them
    (with ``--url`` as the token's person, locally as ``--actor``), and ``show`` and
    ``evaluations`` show the interview, the evolutions and the final score."""
    bob = live.client(WRITE_TOKEN)
    remote = ["--url", live.url]
    writer, reader = {"STORYLINE_TOKEN": WRITE_TOKEN}, {"STORYLINE_TOKEN": READ_TOKEN}
    eid = _create(bob)
    _awaiting_answers(live, eid)

    shown = storyline("epic", "show", eid, *remote, env=reader).stdout
    assert "waiting for answers (2 question(s)" in shown, shown
    assert f'storyline epic answer {eid} "answer 1"' in shown, shown
    assert f"question 1: {QUESTIONS[0]}" in shown and f"question 2: {QUESTIONS[1]}" in shown
    short = storyline("epic", "answer", eid, "Markdown", *remote, env=writer, check=False)
    assert short.returncode == 1 and "answer each of the 2 question(s)" in short.stderr
    assert short.stderr.count("\n") == 1
    answered = storyline(
        "epic", "answer", eid, "Markdown", "yes", "-r", "agreed", *remote, env=writer
    ).stdout
    assert f"epic {eid}: answered 2 question(s) -> planning" in answered, answered
    last = bob.get(f"/epics/{eid}/history").json()["events"][-1]
    assert (last["type"], last["actor"], last["reason"]) == (
        "QuestionsAnswered",
        "user:bob",
        "agreed",
    )

    # Locally: the same checks before anything is written, then the answer as --actor.
    where = ["--project", str(live.service.project), "--database-url", database_url(database)]
    second = _create(bob)
    _awaiting_answers(live, second)
    head = live.service.app.max_position()
    hostile = storyline("epic", "answer", second, "a\x1b[2J", "b", *where, check=False)
    assert hostile.returncode == 1 and "control character (0x1b)" in hostile.stderr
    assert live.service.app.max_position() == head
    view = json.loads(
        storyline(
            "epic", "answer", second, "HTML", "no", "--actor", "user:dana", "--json", *where
        ).stdout
    )
    assert view["stage"] == "planning"
    assert view["interview"][0]["answers"] == ["HTML", "no"]
    assert view["interview"][0]["answered_by"] == "user:dana"

    # The interview stays in the view; the evaluations show once there are some.
    epics = _epics(live, max_evolutions=1)
    # The planner that asked ends; the next one plans with the answers.
    epics.transition(
        eid, "planner_exited", actor=RUNNER, data={"attempt": 1, "outcome": "completed"}
    )
    _plan_and_integrate(live, epics, eid, 2, "a1" * 20)
    _evaluate(epics, eid, 1, 0.9, 0.5)
    _plan_and_integrate(live, epics, eid, 3, "b2" * 20)
    _evaluate(epics, eid, 2, 0.6, 0.4)
    shown = storyline("epic", "show", eid, *where).stdout
    for text in (
        f"interview 1.1 Q: {QUESTIONS[0]}",
        "interview 1.1 A: Markdown",
        "evaluation 1: evolution 0, score 0.70 at a1a1a1a1a1a1, unmet #1",
        "evolution 1: after score 0.70 (best 0.70), from a1a1a1a1a1a1; gaps: #1 handles empty",
        "discarded evolution 1: score 0.50 < evolution 0's; kept a1a1a1a1a1a1",
        "evaluation final: not passed, score 0.70 (evolution 0 of 1), max_reached: yes",
    ):
        assert text in shown, shown
    evaluations = json.loads(
        storyline("epic", "evaluations", eid, "--json", *remote, env=reader).stdout
    )
    assert evaluations == bob.get(f"/epics/{eid}/evaluations").json()
