"""``storyline mcp`` for an epic: the planner's tools and prompt, through the SDK's stdio
client, against a real ``storyline serve`` on each backend. An invalid plan comes back as
data the planner can act on (and is recorded); a valid one is accepted; the scope is the
planner's own epic, whatever the MCP server or the token is pointed at."""

from __future__ import annotations

from typing import Any

import anyio

from domain.stages import AgentRole
from tests.mcp.conftest import Server, agent_env, call, mcp_session

PLANNER_TOOLS = {"get_epic", "submit_plan", "ask_questions", "submit_evaluation", "add_note"}
GOAL = "Read a file and print it prettily."


def subtask(name: str, footprint: list[str], depends_on: list[str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"Build the {name}.",
        "acceptance_criteria": [f"the {name} works"],
        "depends_on": depends_on or [],
        "footprint": footprint,
    }


GOOD = {
    "subtasks": [
        subtask("parser", ["src/parse.py"]),
        subtask("printer", ["src/print.py"]),
        subtask("cli", ["src/cli.py"], ["parser", "printer"]),
    ],
    "rationale": "parser and printer are independent; the cli needs both",
}
# parser and printer may run at once and both touch src/util.py; cli waits for a ghost.
BAD = {
    "subtasks": [
        subtask("parser", ["src/parse.py", "src/util.py"]),
        subtask("printer", ["src/print.py", "src/util.py"]),
        subtask("cli", ["src/cli.py"], ["parser", "lexer"]),
    ]
}


def new_epic(server: Server, name: str = "Pretty printer") -> str:
    with server.admin() as admin:
        response = admin.post(
            "/epics",
            json={"name": name, "goal": GOAL, "acceptance_criteria": ["prints the sample"]},
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


def history(server: Server, epic_id: str) -> list[dict[str, Any]]:
    with server.admin() as admin:
        return list(admin.get(f"/epics/{epic_id}/history").json()["events"])


def test_a_planner_submits_an_invalid_then_a_valid_plan(server: Server) -> None:
    eid = new_epic(server)
    env = agent_env(server, eid, server.agent_token(eid, AgentRole.PLANNER))

    async def scenario() -> dict[str, Any]:
        async with mcp_session(env) as s:
            got: dict[str, Any] = {
                "tools": {t.name for t in (await s.list_tools()).tools},
                "prompts": {p.name for p in (await s.list_prompts()).prompts},
                "epic": await call(s, "get_epic"),
                "bad": await call(s, "submit_plan", plan=BAD),
            }
            got["after_bad"] = await call(s, "get_epic")
            got["prompt"] = await s.get_prompt("planner")
            got["good"] = await call(s, "submit_plan", plan=GOOD)
            got["again"] = await call(s, "submit_plan", plan=GOOD)
            got["note"] = await call(s, "add_note", text="cli last: it needs both")
            return got

    got = anyio.run(scenario)
    assert got["tools"] == PLANNER_TOOLS
    assert "planner" in got["prompts"]
    error, epic = got["epic"]
    assert not error, epic
    assert (epic["id"], epic["goal"], epic["stage"]) == (eid, GOAL, "planning")
    assert epic["acceptance_criteria"] == ["prints the sample"]
    assert epic["last_plan_problems"] == [] and epic["plan"] is None

    error, bad = got["bad"]
    assert not error, bad  # a refused plan is an answer, not a tool error
    assert bad["accepted"] is False and bad["stage"] == "planning"
    assert bad["problems"] == ["subtask 'cli' depends on 'lexer', which the plan lacks"]
    assert bad["failed_plan_attempts"] == 1
    error, after_bad = got["after_bad"]
    assert after_bad["last_plan_problems"] == bad["problems"]
    prompt = got["prompt"].messages[0].content.text
    for text in (GOAL, "prints the sample", "which the plan lacks", "footprint", "submit_plan"):
        assert text in prompt, text

    error, good = got["good"]
    assert not error, good
    assert good["accepted"] is True and good["problems"] == []
    assert good["single_session_reason"] is None
    error, again = got["again"]
    assert error and "illegal_transition: " in again and "already accepted" in again
    error, note = got["note"]
    assert not error and note["event"] == "add_note"

    actor = f"agent:planner-{eid}-1"
    assert [(e["type"], e["actor"]) for e in history(server, eid)] == [
        ("EpicCreated", "user:admin"),
        ("PlanRejected", actor),
        ("PlanAccepted", actor),
        ("EpicNoteAdded", actor),
    ]
    with server.admin() as admin:
        shown = admin.get(f"/epics/{eid}").json()
    assert [s["name"] for s in shown["plan"]["subtasks"]] == ["parser", "printer", "cli"]


def test_overlapping_footprints_and_a_malformed_plan(server: Server) -> None:
    eid = new_epic(server)
    env = agent_env(server, eid, server.agent_token(eid, AgentRole.PLANNER))
    overlapping = {"subtasks": [*BAD["subtasks"][:2], subtask("cli", ["src/cli.py"], ["parser"])]}
    shapeless = {"subtasks": [{"name": "x"}]}  # no description, no criteria

    async def scenario() -> dict[str, Any]:
        async with mcp_session(env) as s:
            return {
                "overlap": await call(s, "submit_plan", plan=overlapping),
                "extra": await call(s, "submit_plan", plan={**GOOD, "deadline": "friday"}),
                "shapeless": await call(s, "submit_plan", plan=shapeless),
            }

    got = anyio.run(scenario)
    error, overlap = got["overlap"]
    assert not error and overlap["accepted"] is False
    [problem] = overlap["problems"]
    assert "'parser' and 'printer' may run at the same time" in problem
    assert "src/util.py" in problem
    # A key the plan does not have is the epic's problem to report (and it is recorded).
    error, extra = got["extra"]
    assert not error and extra["accepted"] is False
    assert any("deadline" in p for p in extra["problems"]), extra
    # Missing required fields fail the tool's own input schema: an error the model reads,
    # nothing recorded.
    error, text = got["shapeless"]
    assert error and "description" in text
    assert [e["type"] for e in history(server, eid)] == [
        "EpicCreated",
        "PlanRejected",
        "PlanRejected",
    ]


def test_the_scope_is_the_planners_own_epic(server: Server) -> None:
    mine, other = new_epic(server, "Mine"), new_epic(server, "Other")
    mine_token = server.agent_token(mine, AgentRole.PLANNER)

    async def scenario() -> dict[str, Any]:
        # An MCP server pointed at another epic with this planner's token: the API refuses.
        async with mcp_session(agent_env(server, other, mine_token)) as s:
            return {
                "read": await call(s, "get_epic"),
                "plan": await call(s, "submit_plan", plan=GOOD),
                "note": await call(s, "add_note", text="hello"),
            }

    got = anyio.run(scenario)
    for name in ("read", "plan", "note"):
        error, text = got[name]
        assert error and "forbidden: " in text, (name, text)
    assert [e["type"] for e in history(server, other)] == ["EpicCreated"]
    assert [e["type"] for e in history(server, mine)] == ["EpicCreated"]

    # A story's MCP server offers no planner tools.
    async def story_side() -> set[str]:
        async with mcp_session(agent_env(server, "7", None)) as s:
            return {t.name for t in (await s.list_tools()).tools}

    story_tools = anyio.run(story_side)
    assert "get_story" in story_tools
    assert {"get_epic", "submit_plan"}.isdisjoint(story_tools)
