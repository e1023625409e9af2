"""``storyline mcp`` for a story in review: the evaluator's ``submit_review`` tool and prompt,
through the MCP SDK's stdio client against a real ``storyline serve`` on each backend."""

from __future__ import annotations

from typing import Any

import anyio

from domain.stages import AgentRole
from service.application import StorylineApplication
from tests.mcp.conftest import Server, agent_env, call, mcp_session
from tests.mcp.conftest import server as server  # the fixture, for this package too

CRITERIA = ["prints the greeting", "documents the flag in README.md"]


def in_review_with_an_evaluator(app: StorylineApplication, sid: str) -> None:
    """A story whose gates passed into review and whose evaluator attempt 1 runs."""
    app.create_story(
        story_id=sid,
        name="greeting",
        description="Print the greeting.",
        acceptance_criteria=CRITERIA,
        actor="user:admin",
    )

    def send(event: str, actor: str, data: dict[str, Any] | None = None) -> None:
        app.transition(sid, event, actor=actor, data=data)

    send("start_coding", "user:admin")
    send(
        "worktree_ready", "runner:coder", {"path": f"/tmp/{sid}", "branch": f"feature/story-{sid}"}
    )
    agent = {"agent": "a", "runtime": "claude-code"}
    send("spawn_agent", "runner:coder", {"role": "coder", **agent})
    send("agent_started", "runner:coder", {"role": "coder", "attempt": 1, "pid": 4242})
    send("agent_exited", "runner:coder", {"role": "coder", "attempt": 1, "outcome": "completed"})
    send("start_gates", "runner:gates", {"commits_ahead": 1})
    data = {"feature_branch": f"feature/story-{sid}", "commits_ahead": 1, "review": True}
    send("gates_passed", "runner:gates", data)
    send("spawn_agent", "runner:evaluator", {"role": "evaluator", **agent})
    send("agent_started", "runner:evaluator", {"role": "evaluator", "attempt": 1, "pid": 4343})


def judgement(criterion: int, met: bool = True, score: float = 0.9) -> dict[str, Any]:
    return {"criterion": criterion, "met": met, "score": score, "evidence": "main.py:3 prints it"}


def test_an_evaluator_submits_its_verdict_through_mcp(server: Server) -> None:
    sid = "r1"
    in_review_with_an_evaluator(server.app, sid)
    token = server.agent_token(sid, AgentRole.EVALUATOR)
    env = {**agent_env(server, sid, token), "STORYLINE_ATTEMPT": "1"}

    async def scenario() -> dict[str, Any]:
        async with mcp_session(env) as s:
            got: dict[str, Any] = {
                "tools": {t.name for t in (await s.list_tools()).tools},
                "prompt": await s.get_prompt("evaluator"),
                # Malformed: a score over 1; incomplete: criterion 1 not judged.
                "malformed": await call(
                    s, "submit_review", criteria=[judgement(0, score=1.5), judgement(1)]
                ),
                "incomplete": await call(s, "submit_review", criteria=[judgement(0)]),
                "unknown": await call(
                    s, "submit_review", criteria=[judgement(0), judgement(1), judgement(2)]
                ),
            }
            got["before"] = await call(s, "get_story")
            got["good"] = await call(
                s,
                "submit_review",
                criteria=[judgement(1, met=False, score=0.3), judgement(0)],
                summary="the flag is undocumented",
            )
            got["again"] = await call(s, "submit_review", criteria=[judgement(0), judgement(1)])
            return got

    got = anyio.run(scenario)
    assert "submit_review" in got["tools"]
    prompt = got["prompt"].messages[0].content.text
    for text in ("0. prints the greeting", "1. documents the flag", "submit_review", "git diff"):
        assert text in prompt, text

    error, malformed = got["malformed"]
    assert error and "score" in malformed and "1" in malformed
    error, incomplete = got["incomplete"]
    assert error and "validation_error" in incomplete
    assert "every criterion needs a judgement; missing: 1" in incomplete
    error, unknown = got["unknown"]
    assert error and "criterion 2 does not exist" in unknown
    error, before = got["before"]
    assert not error and before["pending_review"] is None and before["reviews"] == []

    error, good = got["good"]
    assert not error, good
    assert good["attempt"] == 1 and good["recorded"] is True and good["stage"] == "review"
    assert good["all_met"] is False and good["score"] == 0.6
    error, again = got["again"]
    assert error and "already gave its verdict" in again

    history = server.app.history(sid)
    (verdict,) = [e for e in history if e.type == "ReviewSubmitted"]
    assert verdict.actor == f"agent:evaluator-{sid}-1"
    assert [(c["criterion"], c["met"]) for c in verdict.data["criteria"]] == [(0, True), (1, False)]
    assert verdict.data["criteria"][1]["text"] == CRITERIA[1]
    assert verdict.data["summary"] == "the flag is undocumented"


def test_only_an_evaluator_token_may_submit_a_review(server: Server) -> None:
    sid = "r2"
    in_review_with_an_evaluator(server.app, sid)
    # A coder's token for the same story (the attempt number matches the evaluator's).
    token = server.agent_token(sid, AgentRole.CODER)
    env = {**agent_env(server, sid, token), "STORYLINE_ATTEMPT": "1"}

    async def scenario() -> tuple[bool, Any]:
        async with mcp_session(env) as s:
            return await call(s, "submit_review", criteria=[judgement(0), judgement(1)])

    error, answer = anyio.run(scenario)
    assert error and "forbidden: agent:coder-r2-1" in answer
    assert not [e for e in server.app.history(sid) if e.type == "ReviewSubmitted"]
