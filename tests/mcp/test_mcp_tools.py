"""Every ``storyline mcp`` tool and prompt, through the SDK's stdio client, against a real
``storyline serve`` on each backend: answers, scoping refusals, bad input, missing stories,
and notes reaching the history and the read models."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import anyio

from domain.stages import AgentRole
from projections import ReadModels
from service.application import StorylineApplication
from tests.mcp.conftest import ROOT, Server, agent_env, call, mcp_session

TOOLS = {
    "get_story",
    "story_history",
    "gate_output",
    "report_merge_resolved",
    "report_merge_gave_up",
    "add_note",
}
GATE_OUTPUT = "collected 3 items\n" + "." * 5_000 + "\nFAILED tests/test_app.py::test_add - 3 != 4"


def create(app: StorylineApplication, name: str) -> str:
    story = app.create_story(
        name=name, description="d", acceptance_criteria=["works"], actor="user:t"
    ).story
    return str(story.id)


def send(app: StorylineApplication, sid: str, event: str, **data: Any) -> None:
    app.transition(sid, event, actor="runner:test", reason=data.pop("reason", None), data=data)


def code_run(app: StorylineApplication, sid: str, attempt: int) -> None:
    send(app, sid, "spawn_agent", role="coder", agent="coder", runtime="cli")
    send(app, sid, "agent_started", role="coder", attempt=attempt, pid=4242)
    send(app, sid, "agent_exited", role="coder", attempt=attempt, outcome="completed")
    send(app, sid, "start_gates", commits_ahead=1)


def failed_gates(app: StorylineApplication, name: str) -> str:
    sid = create(app, name)
    send(app, sid, "start_coding")
    code_run(app, sid, 1)
    send(app, sid, "gates_failed", output=GATE_OUTPUT)
    return sid


def conflicted(app: StorylineApplication, name: str) -> str:
    sid = create(app, name)
    send(app, sid, "start_coding")
    code_run(app, sid, 1)
    send(app, sid, "gates_passed", feature_branch=f"feature/story-{sid}", commits_ahead=1)
    send(app, sid, "start_merge", base_sha="abc")
    send(
        app,
        sid,
        "merge_failed",
        kind="conflict_detected",
        details="CONFLICT (content): Merge conflict in app.py",
        conflicts=["app.py"],
    )
    return sid


def run(scenario: Any) -> Any:
    return anyio.run(scenario)


def test_tools_prompts_and_reads_of_the_own_story(server: Server) -> None:
    sid = failed_gates(server.app, "reads")
    env = agent_env(server, sid, server.agent_token(sid, AgentRole.CODER))

    async def scenario() -> dict[str, Any]:
        async with mcp_session(env) as s:
            tools = {t.name for t in (await s.list_tools()).tools}
            prompts = {p.name for p in (await s.list_prompts()).prompts}
            return {
                "tools": tools,
                "prompts": prompts,
                "story": await call(s, "get_story"),
                "same": await call(s, "get_story", story_id=sid),
                "history": await call(s, "story_history", limit=2),
                "gates": await call(s, "gate_output"),
                "gates_tail": await call(s, "gate_output", max_chars=100),
                "coder": await s.get_prompt("coder"),
            }

    got = run(scenario)
    assert got["tools"] >= TOOLS
    assert got["prompts"] >= {"coder", "mergemaster"}
    error, story = got["story"]
    assert not error and story["id"] == sid and story["stage"] == "coding"
    assert got["same"] == got["story"]
    error, history = got["history"]
    assert not error
    assert history["total"] == len(server.app.history(sid))
    assert [e["type"] for e in history["events"]] == ["GatesStarted", "GatesFailed"]
    error, gates = got["gates"]
    assert not error and gates["retry_count"] == 1
    assert gates["last_gate_output"] == GATE_OUTPUT
    error, tail = got["gates_tail"]
    assert not error
    assert tail["last_gate_output"].endswith("FAILED tests/test_app.py::test_add - 3 != 4")
    assert "characters cut" in tail["last_gate_output"]
    text = got["coder"].messages[0].content.text
    assert "gate_output" in text and "add_note" in text and "retry 1" in text


def test_add_note_reaches_the_log_history_and_read_models(server: Server) -> None:
    sid = failed_gates(server.app, "notes")
    before = server.app.get_story(sid)
    env = agent_env(server, sid, server.agent_token(sid, AgentRole.CODER))

    async def scenario() -> tuple[bool, Any]:
        async with mcp_session(env) as s:
            return await call(s, "add_note", text="the clock makes test_add flaky;\nfrozen it")

    error, answer = run(scenario)
    assert not error, answer
    assert answer["stage"] == "coding" and answer["version"] == before.version + 1
    note = server.app.history(sid)[-1]
    assert (note.type, note.actor) == ("NoteAdded", f"agent:coder-{sid}-1")
    assert note.reason == "the clock makes test_add flaky;\nfrozen it"
    after = server.app.get_story(sid)
    assert (after.stage, after.last_event, after.retry_count) == (
        before.stage,
        before.last_event,
        before.retry_count,
    )

    with server.admin() as admin:
        shown = admin.get(f"/stories/{sid}/history").json()["events"][-1]
        assert (shown["type"], shown["actor"], shown["reason"]) == (
            "NoteAdded",
            f"agent:coder-{sid}-1",
            note.reason,
        )
    with ReadModels(server.app.db) as read_models:
        deadline = time.monotonic() + 30
        while not [e for e in read_models.history(sid) if e["type"] == "NoteAdded"]:
            assert time.monotonic() < deadline, "the history projection never showed the note"
            time.sleep(0.1)
        projected = [e for e in read_models.history(sid) if e["type"] == "NoteAdded"]
        assert [(e["actor"], e["reason"]) for e in projected] == [(note.actor, note.reason)]
        row = read_models.board_row(sid)
        assert row is not None
        assert (row["version"], row["last_event"]) == (after.version, "GatesFailed")


def test_a_token_for_one_story_cannot_touch_another_nor_a_missing_one(server: Server) -> None:
    mine = failed_gates(server.app, "mine")
    other = conflicted(server.app, "other")
    token = server.agent_token(mine, AgentRole.MERGEMASTER)
    other_version = server.app.get_story(other).version

    async def scenario() -> dict[str, Any]:
        results: dict[str, Any] = {}
        async with mcp_session(agent_env(server, mine, token)) as s:
            results["read"] = await call(s, "get_story", story_id=other)
            results["history"] = await call(s, "story_history", story_id=other)
            results["gates"] = await call(s, "gate_output", story_id=other)
        # A misconfigured (or lying) environment: the server refuses the token elsewhere.
        async with mcp_session(agent_env(server, other, token)) as s:
            results["lying_read"] = await call(s, "get_story")
            results["lying_note"] = await call(s, "add_note", text="not mine")
            results["lying_verdict"] = await call(s, "report_merge_resolved", summary="x")
        async with mcp_session(agent_env(server, other, None)) as s:
            results["no_token"] = await call(s, "add_note", text="anonymous")
        missing = agent_env(server, "404", server.agent_token("404", AgentRole.CODER))
        async with mcp_session(missing) as s:
            results["missing"] = [
                await call(s, "get_story"),
                await call(s, "story_history"),
                await call(s, "add_note", text="hello?"),
            ]
        return results

    results = run(scenario)
    for key in ("read", "history", "gates"):
        error, text = results[key]
        assert error and f"forbidden: this MCP server serves story {mine} only" in text, key
    for key in ("lying_read", "lying_note", "lying_verdict"):
        error, text = results[key]
        assert error and "forbidden" in text and "Traceback" not in text, (key, text)
    error, text = results["no_token"]
    assert error and "unauthorized" in text
    assert server.app.get_story(other).version == other_version
    for error, text in results["missing"]:
        assert error and "story_not_found" in text, text


BAD_INPUT: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("add_note", {"text": ""}, ("text",)),
    ("add_note", {"text": "x" * 10_001}, ("text",)),
    ("add_note", {}, ("text",)),
    ("add_note", {"text": "a\x00b"}, ("NUL", "control character")),
    ("story_history", {"limit": 0}, ("limit",)),
    ("gate_output", {"max_chars": "lots"}, ("max_chars",)),
    ("report_merge_gave_up", {"reason": ""}, ("reason",)),
    ("report_merge_resolved", {"summary": 42}, ("summary",)),
    ("get_story", {"story_id": "../../etc"}, ("forbidden",)),
    ("no_such_tool", {}, ("no_such_tool",)),
]


def test_bad_input_is_a_clear_error_and_changes_nothing(server: Server) -> None:
    sid = conflicted(server.app, "bad input")
    version = server.app.get_story(sid).version
    env = agent_env(server, sid, server.agent_token(sid))

    async def scenario() -> list[tuple[bool, Any]]:
        async with mcp_session(env) as s:
            return [await call(s, tool, **arguments) for tool, arguments, _ in BAD_INPUT]

    for (tool, arguments, needles), (error, text) in zip(BAD_INPUT, run(scenario), strict=True):
        assert error, (tool, arguments, text)
        assert any(n in text for n in needles), (tool, arguments, text)
        assert "Traceback" not in text
    assert server.app.get_story(sid).version == version


def test_the_mergemaster_reports_its_verdicts_through_the_tools(server: Server) -> None:
    resolved = conflicted(server.app, "resolved")
    gave_up = conflicted(server.app, "gave up")

    async def scenario() -> dict[str, Any]:
        results: dict[str, Any] = {}
        env = agent_env(server, resolved, server.agent_token(resolved))
        async with mcp_session(env) as s:
            results["prompt"] = await s.get_prompt("mergemaster")
            results["resolved"] = await call(
                s, "report_merge_resolved", summary="kept both greetings"
            )
            results["again"] = await call(s, "report_merge_resolved", summary="twice")
        env = agent_env(server, gave_up, server.agent_token(gave_up))
        async with mcp_session(env) as s:
            results["gave_up"] = await call(
                s, "report_merge_gave_up", reason="both sides rewrote add()"
            )
        return results

    results = run(scenario)
    text = results["prompt"].messages[0].content.text
    assert "detached HEAD" in text and "- app.py" in text
    assert "report_merge_resolved" in text and "report_merge_gave_up" in text

    error, answer = results["resolved"]
    assert not error and answer["stage"] == "merge"
    story = server.app.get_story(resolved)
    assert story.stage.value == "merge" and story.resolved_pending
    requeued = server.app.history(resolved)[-1]
    assert (requeued.type, requeued.actor) == ("MergeRequeued", f"agent:mergemaster-{resolved}-1")
    assert requeued.reason == "kept both greetings"

    error, text = results["again"]
    assert error and "illegal_transition" in text and "is in stage 'merge'" in text

    error, answer = results["gave_up"]
    assert not error and answer["stage"] == "merge_failure"
    assert server.app.get_story(gave_up).final
    assert server.app.history(gave_up)[-1].reason == "both sides rewrote add()"


def test_without_its_settings_the_server_says_what_is_missing() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "api.cli", "mcp"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert process.returncode == 2
    assert "STORYLINE_URL and STORYLINE_STORY_ID" in process.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "api.cli", "mcp", "--url", "ftp://x", "--story", "a b"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert bad.returncode == 2
    assert "url" in bad.stderr and "story_id" in bad.stderr and "Traceback" not in bad.stderr
