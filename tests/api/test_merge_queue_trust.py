"""Merge trust in the JSON API (issue 19, "shown to people"): a story's snapshot carries
the hunks its resolution lost, the drops a mergemaster declared and the gates found flaky
on it; ``/merge-queue`` rows carry them too and the answer lists the quarantined gates.

The data is made by the application itself, with the named events the runners send."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from api.schemas import MergeQueueOut, StoryOut
from service.application import StorylineApplication
from service.gate_registry import GateRegistryService
from tests.api.conftest import LiveServer, ServerFactory

HOSTILE = "<script>alert(1)</script>"
GATE = f"pytest -q -k '{HOSTILE}'"
"""A gate's command line is whatever the configuration says: hostile to a page."""
TREE = "ab" * 20
FP = "cd" * 32
LOST = {
    "file": f"src/{HOSTILE}.py",
    "side": "base",
    "hunk": "@@ -2,0 +3,4 @@",
    "lines": [f"def helper(): return '{HOSTILE}'", "    & < > \" '"],
}
DROP = {"file": "src/app.py", "side": "story", "hunk": "@@ -7,2 +7,0 @@"}
DROP_REASON = f"the base rewrote it {HOSTILE}"
RUNNER = "runner:test"


@dataclass
class TrustStory:
    """A story taken through gates (a flaky gate among them) and a resolution that lost a
    hunk, with the log positions a test may look at the story as of."""

    sid: str
    at: dict[str, int] = field(default_factory=dict)

    @property
    def last(self) -> int:
        return max(self.at.values())


def _send(app: StorylineApplication, story: TrustStory, label: str, event: str, **kw: Any) -> None:
    reason = kw.pop("reason", None)
    committed = app.transition(story.sid, event, actor=RUNNER, reason=reason, data=kw)
    story.at[label] = committed.position


def _verdict(
    app: StorylineApplication, story: TrustStory, label: str, passed: bool, **extra: Any
) -> None:
    data = {"phase": "gates", "gate": GATE, "tree": TREE, "fingerprint": FP, "passed": passed}
    _send(app, story, label, "record_gate_verdict", reason="a verdict", **data, **extra)


def to_gates(app: StorylineApplication, name: str) -> TrustStory:
    created = app.create_story(
        name=name, description="d", acceptance_criteria=["a"], actor="user:test"
    )
    story = TrustStory(created.story.id, {"created": created.position})
    _send(app, story, "coding", "start_coding")
    _send(app, story, "spawn", "spawn_agent", agent="coder", runtime="cli")
    _send(app, story, "started", "agent_started", attempt=1, pid=4242)
    _send(app, story, "exited", "agent_exited", attempt=1, outcome="completed")
    _send(app, story, "gates", "start_gates", commits_ahead=1)
    return story


def to_merge(app: StorylineApplication, story: TrustStory) -> None:
    _send(app, story, "passed", "gates_passed", feature_branch="story/x", commits_ahead=1)


def flaky_then_quarantined(app: StorylineApplication, story: TrustStory) -> None:
    """A gate fails, passes on a rerun of the same tree (flaky: quarantined), and its next
    failure is recorded as ignored."""
    _verdict(app, story, "failed", False, output=f"1 failed {HOSTILE}")
    _verdict(app, story, "rerun", True, rerun=1, output="all passed")
    _send(
        app,
        story,
        "flaky",
        "flaky_gate_detected",
        reason=f"failed then passed on one tree; quarantined {HOSTILE}",
        phase="gates",
        gate=GATE,
        tree=TREE,
        fingerprint=FP,
        outputs=[f"1 failed {HOSTILE}", "all passed"],
        verdicts=[False, True],
        action="quarantined",
    )
    story.at["quarantined"] = GateRegistryService(app).quarantine(
        actor=RUNNER,
        gate=GATE,
        phase="gates",
        reason=f"found flaky in story {story.sid}",
        story_id=story.sid,
    )
    _verdict(app, story, "ignored", False, ignored=True, output="1 failed again")


def lose_a_hunk_and_declare_one(app: StorylineApplication, story: TrustStory) -> None:
    """In the merge queue: a resolution that lost a hunk, then one declared drop."""
    _send(app, story, "merging", "start_merge", base_sha="abc123")
    _send(
        app,
        story,
        "hunks_lost",
        "merge_failed",
        kind="hunks_lost",
        details="the resolution drops lines",
        conflicts=[LOST["file"]],
        lost_hunks=[LOST],
    )
    _send(app, story, "declared", "declare_dropped_hunk", reason=DROP_REASON, **DROP)


def trust_story(app: StorylineApplication, name: str = "Trusted merge") -> TrustStory:
    """Everything at once, ending in the merge queue (resolved, waiting to merge again)."""
    story = to_gates(app, name)
    flaky_then_quarantined(app, story)
    to_merge(app, story)
    lose_a_hunk_and_declare_one(app, story)
    _send(app, story, "resolved", "merge_resolved", reason="amended")
    return story


def caught_up(live: LiveServer, position: int) -> None:
    assert live.read_models.wait_for(position, None, 20.0), "projections did not catch up"


# --------------------------------------------------------------------------- tests


def test_a_story_shows_its_lost_hunks_declared_drops_and_flaky_gates(live: LiveServer) -> None:
    app = live.service.app
    story = trust_story(app)
    client = live.client()
    body = client.get(f"/stories/{story.sid}").json()
    StoryOut.model_validate(body)
    assert body["lost_hunks"] == [LOST]
    assert body["declared_drops"] == [{**DROP, "reason": DROP_REASON}]
    assert body["flaky_gates"] == [GATE]
    assert body["merge_failure_kind"] == "hunks_lost"

    # As of before the merge failed: the flaky gate already, no hunks yet.
    before = client.get(f"/stories/{story.sid}", params={"as_of": story.at["passed"]}).json()
    assert (before["lost_hunks"], before["declared_drops"]) == ([], [])
    assert before["flaky_gates"] == [GATE]
    first = client.get(f"/stories/{story.sid}", params={"as_of": story.at["created"]}).json()
    assert (first["lost_hunks"], first["declared_drops"], first["flaky_gates"]) == ([], [], [])

    # A later failure of another kind replaces the lost hunks; declarations stay recorded.
    _send(app, story, "merging2", "start_merge")
    _send(app, story, "conflict", "merge_failed", kind="conflict_detected", conflicts=["a"])
    again = client.get(f"/stories/{story.sid}").json()
    assert again["lost_hunks"] == []
    assert again["declared_drops"] == [{**DROP, "reason": DROP_REASON}]


def test_the_schema_documents_the_new_fields(live: LiveServer) -> None:
    schemas = live.client().get("/openapi.json").json()["components"]["schemas"]
    story = schemas["StoryOut"]["properties"]
    for name in ("lost_hunks", "declared_drops", "flaky_gates"):
        assert name in story, name
    assert set(schemas["LostHunkOut"]["properties"]) == {"file", "side", "hunk", "lines"}
    assert set(schemas["DeclaredDropOut"]["properties"]) == {"file", "side", "hunk", "reason"}
    assert "quarantined_gates" in schemas["MergeQueueOut"]["properties"]


def test_the_merge_queue_shows_flaky_rows_and_quarantined_gates(
    serve_api: ServerFactory,
) -> None:
    live = serve_api(projections=True)
    app = live.service.app
    client = live.client()
    plain = to_gates(app, "Plain story")
    to_merge(app, plain)
    caught_up(live, plain.last)
    empty = client.get("/merge-queue").json()
    MergeQueueOut.model_validate(empty)
    assert empty["quarantined_gates"] == []
    [row] = empty["queue"]
    assert (row["flaky_gates"], row["lost_hunks"], row["declared_drops"]) == ([], [], [])

    story = trust_story(app)
    caught_up(live, story.last)
    answer = client.get("/merge-queue").json()
    MergeQueueOut.model_validate(answer)
    rows = {r["story_id"]: r for r in answer["queue"]}
    assert list(rows) == [plain.sid, story.sid]
    trusted = rows[story.sid]
    assert trusted["flaky_gates"] == [GATE]
    assert trusted["lost_hunks"] == [{k: LOST[k] for k in ("file", "side", "hunk")}]
    assert trusted["declared_drops"] == [{**DROP, "reason": DROP_REASON}]
    assert rows[plain.sid]["flaky_gates"] == []
    [gate] = answer["quarantined_gates"]
    assert (gate["gate"], gate["phase"], gate["story_id"]) == (GATE, "gates", story.sid)
    assert gate["reason"] == f"found flaky in story {story.sid}"
    assert gate["actor"] == RUNNER and gate["since"]

    # A person clears the gate: the queue no longer lists it, the story still names it.
    GateRegistryService(app).clear(actor="user:alice", gate=GATE, reason="fixed the test")
    cleared = client.get("/merge-queue").json()
    assert cleared["quarantined_gates"] == []
    assert {r["story_id"]: r for r in cleared["queue"]}[story.sid]["flaky_gates"] == [GATE]
