"""``storyline mcp`` for an epic's planner asking questions and its evaluator submitting a
verdict, through the SDK's stdio client against a real ``storyline serve`` on each backend.
The attempt comes from the agent's environment (``STORYLINE_ATTEMPT``); the runner's side
(spawns, the union verdict) is recorded directly, as a runner would."""

from __future__ import annotations

from typing import Any

import anyio

from domain.epic_events import RunMode
from domain.stages import AgentRole
from service.agent_tokens import AgentTokens
from service.epics import EpicService, NewStory
from tests.mcp.conftest import Server, agent_env, call, mcp_session

RUNNER = "runner:test"


def new_epic(server: Server) -> str:
    with server.admin() as admin:
        response = admin.post(
            "/epics",
            json={
                "name": "Pretty printer",
                "goal": "Print a file prettily.",
                "acceptance_criteria": ["prints the sample", "has a --width flag"],
            },
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


def env_for(server: Server, eid: str, role: AgentRole, attempt: int = 1) -> dict[str, str]:
    token = AgentTokens(server.app).issue(eid, attempt, role)
    return {**agent_env(server, eid, token), "STORYLINE_ATTEMPT": str(attempt)}


def test_a_planner_asks_questions_and_the_next_prompt_has_the_answers(server: Server) -> None:
    eid = new_epic(server)
    epics = EpicService(server.app)
    epics.transition(eid, "spawn_planner", actor=RUNNER, data={"agent": "p", "runtime": "cli"})
    epics.transition(eid, "planner_started", actor=RUNNER, data={"attempt": 1, "pid": 4242})
    env = env_for(server, eid, AgentRole.PLANNER)
    no_attempt = {k: v for k, v in env.items() if k != "STORYLINE_ATTEMPT"}

    async def unknown_attempt() -> tuple[bool, Any]:
        async with mcp_session(no_attempt) as s:
            return await call(s, "ask_questions", questions=["Which format?"])

    async def asking() -> dict[str, Any]:
        async with mcp_session(env) as s:
            return {
                "asked": await call(s, "ask_questions", questions=["Which format?", "Width?"]),
                "again": await call(s, "ask_questions", questions=["More?"]),
            }

    error, text = anyio.run(unknown_attempt)
    assert error and "STORYLINE_ATTEMPT" in text
    got = anyio.run(asking)
    error, asked = got["asked"]
    assert not error, asked
    assert asked["stage"] == "awaiting_answers"
    assert asked["questions"] == ["Which format?", "Width?"]
    error, again = got["again"]
    assert error and "illegal_transition" in again  # the epic waits for answers now
    epic = epics.get(eid)
    assert epic.interview[0]["asked_by"] == f"agent:planner-{eid}-1"

    with server.admin() as admin:
        answered = admin.post(
            f"/epics/{eid}/transitions",
            json={"event": "answer_questions", "data": {"answers": ["Markdown", "80"]}},
        )
        assert answered.status_code == 200, answered.text

    async def prompt() -> str:
        async with mcp_session(env) as s:
            shown = await s.get_prompt("planner")
            text: str = shown.messages[0].content.text  # type: ignore[union-attr]
            return text

    text = anyio.run(prompt)
    for expected in ("Q: Which format?", "A: Markdown", "Q: Width?", "A: 80", "ask_questions"):
        assert expected in text, expected


def test_an_evaluator_submits_one_verdict_for_its_attempt(server: Server) -> None:
    eid = new_epic(server)
    epics = EpicService(server.app)
    epics.transition(eid, "spawn_planner", actor=RUNNER, data={"agent": "p", "runtime": "cli"})
    plan = {
        "subtasks": [
            {
                "name": n,
                "description": n,
                "acceptance_criteria": [f"{n} works"],
                "footprint": [f"{n}.py"],
            }
            for n in ("a", "b")
        ]
    }
    epics.transition(eid, "submit_plan", actor=RUNNER, data={"plan": plan})
    epics.transition(eid, "planner_exited", actor=RUNNER, data={"attempt": 1, "outcome": "lost"})
    epic = epics.get(eid)
    epics.farm_out(
        eid,
        actor=RUNNER,
        mode=RunMode.PARALLEL,
        stories=[NewStory(f"{eid}.{i}", n, n, [f"{n} works"]) for i, n in ((1, "a"), (2, "b"))],
        fork_point="f0f0f0f0",
        integration_tip="f0f0f0f0",
        expected_version=epic.version,
    )
    epics.transition(eid, "start_integration", actor=RUNNER, data={"commit": "aaaa0000"})
    union = {"commit": "aaaa0000", "tree": "bbbb0000", "passed": True, "evaluate": True}
    epics.transition(eid, "judge_union", actor=RUNNER, data=union)
    epics.transition(eid, "spawn_evaluator", actor=RUNNER, data={"agent": "e", "runtime": "cli"})
    env = env_for(server, eid, AgentRole.EVALUATOR)
    criteria = [
        {"criterion": 0, "met": True, "score": 1.0, "evidence": "tests/test_print.py passes"},
        {"criterion": 1, "met": False, "score": 0.2, "evidence": "cli.py has no --width"},
    ]

    async def evaluating() -> dict[str, Any]:
        async with mcp_session(env) as s:
            return {
                "tools": {t.name for t in (await s.list_tools()).tools},
                "prompt": (await s.get_prompt("epic_evaluator")).messages[0].content.text,  # type: ignore[union-attr]
                "skipped": await call(s, "submit_evaluation", criteria=criteria[:1]),
                "verdict": await call(s, "submit_evaluation", criteria=criteria, summary="half"),
                "again": await call(s, "submit_evaluation", criteria=criteria),
            }

    got = anyio.run(evaluating)
    assert {"submit_evaluation", "ask_questions", "get_epic"} <= got["tools"]
    assert "0. prints the sample" in got["prompt"] and "1. has a --width flag" in got["prompt"]
    error, skipped = got["skipped"]
    assert error and "missing: 1" in skipped  # every criterion needs a judgement
    error, verdict = got["verdict"]
    assert not error, verdict
    assert verdict["score"] == 0.6 and verdict["all_met"] is False
    error, again = got["again"]
    assert error and "already gave its verdict" in again
    epic = epics.get(eid)
    assert epic.pending_evaluation == 1 and len(epic.evaluations) == 1
    assert epic.evaluations[0]["criteria"][1]["evidence"] == "cli.py has no --width"
