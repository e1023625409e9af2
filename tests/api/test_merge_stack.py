"""``/merge-queue`` shows the speculative stack (issue 17): each build's speculative base
(base sha + the stories below it not landed yet) and its state, head first; a story's
snapshot carries its build. The data is made with the named events the runner sends."""

from __future__ import annotations

import re

from api.schemas import MergeQueueOut
from service.application import StorylineApplication
from tests.api.conftest import ServerFactory

RUNNER = "runner:merge"
BASE = "a" * 40
C1, C2, C3 = "1" * 40, "2" * 40, "3" * 40


def to_merge(app: StorylineApplication, sid: str) -> None:
    app.create_story(
        story_id=sid,
        name=f"story {sid}",
        description="d",
        acceptance_criteria=["c"],
        depends_on=[],
        actor="user:test",
    )
    for event, data in [
        ("start_coding", {}),
        ("worktree_ready", {"path": f"/tmp/{sid}", "branch": f"feature/story-{sid}"}),
        ("spawn_agent", {"role": "coder", "agent": "coder", "runtime": "cli"}),
        ("agent_started", {"role": "coder", "attempt": 1, "pid": 9}),
        ("agent_exited", {"role": "coder", "attempt": 1, "outcome": "completed"}),
        ("start_gates", {"commits_ahead": 1}),
        ("gates_passed", {"feature_branch": f"feature/story-{sid}", "commits_ahead": 1}),
    ]:
        app.transition(sid, event, actor="user:test", data=data)


def stacked(app: StorylineApplication, sid: str, ahead: list[str], parent: str) -> int:
    return app.transition(
        sid,
        "start_merge",
        actor=RUNNER,
        data={"base_sha": BASE, "ahead": ahead, "speculative_base": parent},
    ).position


def test_the_stack_is_shown_head_first_with_bases_and_states(serve_api: ServerFactory) -> None:
    live = serve_api(projections=True)
    app = live.service.app
    for sid in ("s1", "s2", "s3", "s4"):
        to_merge(app, sid)
    stacked(app, "s1", [], BASE)
    app.transition("s1", "update_speculation", actor=RUNNER, data={"state": "gating", "commit": C1})
    stacked(app, "s2", ["s1"], C1)
    app.transition("s2", "update_speculation", actor=RUNNER, data={"state": "passed"})
    stacked(app, "s3", ["s1", "s2"], C2)
    last = app.transition(
        "s3",
        "restart_speculation",
        actor=RUNNER,
        reason="story s2 ahead of it was ejected",
        data={"queued_position": 1},
    ).position
    assert live.read_models.wait_for(last, None, 20.0), "projections did not catch up"
    body = live.client().get("/merge-queue").json()
    MergeQueueOut.model_validate(body)
    stack = body["stack"]
    assert [r["story_id"] for r in stack] == ["s1", "s2"]
    assert stack[0]["state"] == "gating" and stack[0]["commit"] == C1
    assert stack[0]["ahead"] == [] and stack[0]["base_sha"] == BASE
    assert stack[1]["state"] == "passed" and stack[1]["ahead"] == ["s1"]
    assert stack[1]["parent"] == C1 and stack[1]["position_in_stack"] == 2
    # The restarted build is back in the queue (not in the stack), ahead of s4.
    assert [r["story_id"] for r in body["queue"]] == ["s3", "s4"]
    snapshot = live.client().get("/stories/s2").json()
    assert snapshot["speculation"]["state"] == "passed"
    assert live.client().get("/stories/s3").json()["speculation"] is None
    # The web board's merge-queue page shows the same stack, head first, with its states.
    page = live.client().get("/ui/fragments/merge-queue").text
    assert 'id="merge-stack"' in page
    assert re.findall(r'<tr data-story-id="(s\d)" data-state="(\w+)">', page) == [
        ("s1", "gating"),
        ("s2", "passed"),
    ]
    assert f"<code>{C1[:12]}</code>" in page
