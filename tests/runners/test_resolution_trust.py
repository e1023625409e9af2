"""A mergemaster's resolution may not silently drop either side's work (issue 19).

A real pipeline (real git, the scripted agent as coder and mergemaster, the real API) on
each backend. The story appends ``shout()`` to app.py; while its coder works, the base gains
``helper()`` at the same place, so the squash merge conflicts and a mergemaster resolves it.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from domain.stages import AgentRole, MergeFailureKind, Stage
from service.settings import Database
from tests.api.conftest import ServerFactory, serve_api  # noqa: F401
from tests.api.test_projections_api import create, send, to_merge_queue
from tests.mcp.conftest import Server, agent_env, call, mcp_session, server  # noqa: F401
from tests.pipeline_support import Pipeline, calls, git, make_config, make_repo, running_pipeline

pytestmark = pytest.mark.slow

APP = "def add(a, b):\n    return a + b\n"
HELPER = "\n\ndef helper():\n    return 'from the base'\n"
SHOUT = "\n\ndef shout(text):\n    return text.upper()\n"
CHECK = "from app import add\nassert add(2, 3) == 5\nprint('ok')\n"

CODER = {
    "*": [
        # Long enough for the test to move the base while the coder works.
        {"sleep": 1.5, "interval": 0.25},
        {"write": "app.py", "content": APP + SHOUT},
        {"commit": "add shout()"},
    ]
}
KEEP_THE_STORY = [{"resolve_conflicts": "theirs"}, {"commit": "resolve: the story's side"}]
RESOLVED = {"api": {"event": "merge_resolved", "reason": "resolved"}}


def base_hunk() -> str:
    """The header ``git diff -U0`` gives the base's new function (what the check names)."""
    with tempfile.TemporaryDirectory() as scratch:
        old, new = Path(scratch, "old"), Path(scratch, "new")
        old.write_text(APP)
        new.write_text(APP + HELPER)
        out = subprocess.run(
            ["git", "diff", "--no-index", "-U0", str(old), str(new)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    found = re.search(r"^(@@ [^@]* @@)", out, re.MULTILINE)
    assert found, out
    return found.group(1)


def conflict_with_the_base(p: Pipeline, repo: Path, sid: str) -> None:
    """Start the story and, once its worktree exists, commit ``helper()`` on main."""
    p.add(sid)
    p.start(sid)
    p.wait_for(sid, lambda s: s.running_agent is not None, timeout=60)
    (repo / "app.py").write_text(APP + HELPER)
    git(repo, "commit", "-q", "-am", "base: add helper()")


def merge_failures(p: Pipeline, sid: str) -> list[dict[str, Any]]:
    return [e.data for e in p.app.history(sid) if e.type == "MergeFailed"]


def mergemaster_spawns(p: Pipeline, sid: str) -> int:
    return sum(
        1
        for e in p.app.history(sid)
        if e.type == "AgentSpawnRequested" and e.data["role"] == "mergemaster"
    )


def pipeline_config(tmp_path: Path, mergemaster: Any, **kw: Any) -> Any:
    return make_config(tmp_path, CODER, mergemaster_script={"s1": mergemaster}, **kw)


def test_a_resolution_keeping_both_sides_lands(tmp_path: Path, database: Database) -> None:
    repo = make_repo(tmp_path / "repo", {"app.py": APP, "check.py": CHECK})
    union = [{"resolve_conflicts": "union"}, {"commit": "resolve: both"}, RESOLVED]
    with running_pipeline(repo, database, pipeline_config(tmp_path, union), with_api=True) as p:
        conflict_with_the_base(p, repo, "s1")
        done = p.wait_stage("s1", Stage.DONE, timeout=90)
        failures = merge_failures(p, "s1")
        spawns = mergemaster_spawns(p, "s1")
    assert [f["kind"] for f in failures] == [MergeFailureKind.CONFLICT_DETECTED.value]
    assert spawns == 1
    landed = git(repo, "show", "main:app.py")
    assert "def helper():" in landed and "def shout(text):" in landed
    assert done.merge_commit == git(repo, "rev-parse", "main")


def test_a_silent_drop_is_sent_back_named_then_the_fixed_resolution_lands(
    tmp_path: Path, database: Database
) -> None:
    repo = make_repo(tmp_path / "repo", {"app.py": APP, "check.py": CHECK})
    script = {
        "1": [*KEEP_THE_STORY, RESOLVED],
        "2": [
            {"expect_in_prompt": "Your resolution dropped hunks"},
            {"expect_in_prompt": f"app.py (base) {base_hunk()}"},
            {"write": "app.py", "content": APP + HELPER + SHOUT},
            {"commit": "resolve: both sides", "amend": True},
            RESOLVED,
        ],
    }
    with running_pipeline(repo, database, pipeline_config(tmp_path, script), with_api=True) as p:
        conflict_with_the_base(p, repo, "s1")
        done = p.wait_stage("s1", Stage.DONE, timeout=120)
        failures = merge_failures(p, "s1")
        history = p.app.history("s1")
        started_base = git(repo, "rev-parse", "main~1")
    assert [f["kind"] for f in failures] == ["conflict_detected", "hunks_lost"]
    lost = failures[1]
    assert lost["lost_hunks"] == [
        {
            "file": "app.py",
            "side": "base",
            "hunk": base_hunk(),
            "lines": ["def helper():", "    return 'from the base'"],
        }
    ]
    assert lost["conflicts"] == ["app.py"]
    assert "def helper():" in lost["details"] and base_hunk() in lost["details"]
    # The second mergemaster was told which hunk, and to amend.
    prompts = [c["prompt"] for c in calls(tmp_path, "mergemaster")]
    assert len(prompts) == 2
    assert "Your resolution dropped hunks" not in prompts[0]
    assert f"app.py (base) {base_hunk()}" in prompts[1] and "def helper():" in prompts[1]
    assert "git commit --amend" in prompts[1]
    spawned = [e for e in history if e.type == "AgentSpawnRequested"]
    assert [e.data["purpose"] for e in spawned if e.data["role"] == "mergemaster"] == [
        "mergemaster",
        "hunks_lost",
    ]
    landed = git(repo, "show", "main:app.py")
    assert landed == (APP + HELPER + SHOUT).strip()
    # Still one squash commit on top of the base it started from.
    assert done.merge_commit == git(repo, "rev-parse", "main")
    assert git(repo, "rev-parse", "main^") == started_base


def test_a_declared_drop_lands_with_the_declaration_in_the_history(
    tmp_path: Path, database: Database
) -> None:
    repo = make_repo(tmp_path / "repo", {"app.py": APP, "check.py": CHECK})
    why = "helper() is replaced by the story's shout()"
    declare = {
        "api": {
            "event": "declare_dropped_hunk",
            "reason": why,
            "data": {"file": "app.py", "side": "base", "hunk": base_hunk()},
        }
    }
    script = [*KEEP_THE_STORY, declare, RESOLVED]
    config = pipeline_config(tmp_path, script)
    # With its own agent token: a mergemaster may declare a drop on its story.
    with running_pipeline(repo, database, config, with_api=True) as p:
        conflict_with_the_base(p, repo, "s1")
        done = p.wait_stage("s1", Stage.DONE, timeout=90)
        history = p.app.history("s1")
        story = p.story("s1")
    assert [e.data["kind"] for e in history if e.type == "MergeFailed"] == ["conflict_detected"]
    [declared] = [e for e in history if e.type == "DroppedHunkDeclared"]
    assert declared.data["file"] == "app.py" and declared.data["side"] == "base"
    assert declared.data["hunk"] == base_hunk() and declared.reason == why
    assert story.declared_drops == [
        {"file": "app.py", "side": "base", "hunk": base_hunk(), "reason": why}
    ]
    assert git(repo, "show", "main:app.py") == (APP + SHOUT).strip()
    assert done.merge_commit == git(repo, "rev-parse", "main")


def test_resolutions_that_keep_dropping_count_toward_the_mergemaster_cap(
    tmp_path: Path, database: Database
) -> None:
    repo = make_repo(tmp_path / "repo", {"app.py": APP, "check.py": CHECK})
    # Every attempt reports resolved without fixing anything.
    script = {"1": [*KEEP_THE_STORY, RESOLVED], "*": [RESOLVED]}
    config = pipeline_config(tmp_path, script, mergemaster_respawn_cap=2)
    with running_pipeline(repo, database, config, with_api=True) as p:
        conflict_with_the_base(p, repo, "s1")
        story = p.wait_for("s1", lambda s: s.final and not s.running_agent, timeout=120)
        history = p.app.history("s1")
    assert story.stage is Stage.MERGE_FAILURE
    assert story.merge_failure_kind is MergeFailureKind.HUNKS_LOST
    assert [e.data["kind"] for e in history if e.type == "MergeFailed"] == [
        "conflict_detected",
        "hunks_lost",
        "hunks_lost",
    ]
    assert mergemaster_spawns_in(history) == 2
    [gave_up] = [e for e in history if e.type == "MergemasterAttempted"]
    assert gave_up.actor == "runner:mergemaster" and "cap 2" in (gave_up.reason or "")
    assert "def helper():" in git(repo, "show", "main:app.py")
    assert "def shout" not in git(repo, "show", "main:app.py")


def mergemaster_spawns_in(history: list[Any]) -> int:
    return sum(
        1
        for e in history
        if e.type == "AgentSpawnRequested" and e.data["role"] == AgentRole.MERGEMASTER.value
    )


def test_declare_dropped_hunk_over_mcp_reaches_the_history(server: Server) -> None:  # noqa: F811
    app = server.app
    sid = app.create_story(
        name="mcp drop", description="d", acceptance_criteria=["works"], actor="user:t"
    ).story.id

    def step(event: str, **data: Any) -> None:
        app.transition(sid, event, actor="runner:test", data=data)

    step("start_coding")
    step("spawn_agent", role="coder", agent="coder", runtime="cli")
    step("agent_started", role="coder", attempt=1, pid=4242)
    step("agent_exited", role="coder", attempt=1, outcome="completed")
    step("start_gates", commits_ahead=1)
    step("gates_passed", feature_branch=f"feature/story-{sid}", commits_ahead=1)
    step("start_merge", base_sha="abc")
    step("merge_failed", kind="conflict_detected", details="CONFLICT", conflicts=["app.py"])
    from tests.mcp.conftest import ADMIN_TOKEN

    env = agent_env(server, sid, ADMIN_TOKEN)

    async def scenario() -> dict[str, Any]:
        async with mcp_session(env) as s:
            tools = {t.name for t in (await s.list_tools()).tools}
            return {
                "tools": tools,
                "ok": await call(
                    s,
                    "declare_dropped_hunk",
                    file="app.py",
                    side="base",
                    hunk="@@ -2,0 +3,4 @@",
                    reason="superseded",
                ),
                "bad_side": await call(
                    s, "declare_dropped_hunk", file="a", side="left", hunk="@@ -1 +1 @@", reason="x"
                ),
                "bad_hunk": await call(
                    s, "declare_dropped_hunk", file="a", side="base", hunk="line 3", reason="x"
                ),
                "mergemaster": await s.get_prompt("mergemaster"),
            }

    got = anyio.run(scenario)
    assert "declare_dropped_hunk" in got["tools"]
    error, answer = got["ok"]
    assert not error, answer
    assert answer["declared"] == {"file": "app.py", "side": "base", "hunk": "@@ -2,0 +3,4 @@"}
    assert answer["stage"] == "merge_failure"
    for key in ("bad_side", "bad_hunk"):
        error, text = got[key]
        assert error, text
    drops = [e for e in app.history(sid) if e.type == "DroppedHunkDeclared"]
    assert [(e.data["hunk"], e.reason) for e in drops] == [("@@ -2,0 +3,4 @@", "superseded")]
    assert "declare_dropped_hunk" in got["mergemaster"].messages[0].content.text
    json.dumps(answer)  # the answer is plain data


def test_the_merge_queue_shows_declared_and_detected_drops(serve_api: ServerFactory) -> None:  # noqa: F811
    live = serve_api(projections=True)
    client = live.client()
    sid = create(client, "queued after a drop")
    to_merge_queue(client, sid)
    send(client, sid, "start_merge", base_sha="abc")
    lost = {"file": "app.py", "side": "base", "hunk": "@@ -2,0 +3,4 @@", "lines": ["def h():"]}
    send(client, sid, "merge_failed", kind="hunks_lost", conflicts=["app.py"], lost_hunks=[lost])
    drop = {"file": "app.py", "side": "base", "hunk": "@@ -2,0 +3,4 @@"}
    response = client.post(
        f"/stories/{sid}/transitions",
        params={"wait": "true"},
        json={"event": "declare_dropped_hunk", "reason": "superseded", "data": drop},
    )
    assert response.status_code == 200, response.text
    send(client, sid, "merge_resolved")
    [row] = client.get("/merge-queue").json()["queue"]
    assert row["story_id"] == sid
    assert row["declared_drops"] == [{**drop, "reason": "superseded"}]
    assert row["lost_hunks"] == [drop]
    events = client.get(f"/stories/{sid}/history").json()["events"]
    [declared] = [e for e in events if e["type"] == "DroppedHunkDeclared"]
    assert declared["reason"] == "superseded"
