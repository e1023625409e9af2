"""Mergemasters: verdicts through the real API, respawn cap, and one freed slot at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from domain.stages import MergeFailureKind, Stage
from service.settings import Database
from tests.pipeline_support import calls, git, make_config, make_repo, running_pipeline

pytestmark = pytest.mark.slow


def edit(body: str, delay: float) -> list[dict[str, object]]:
    return [
        {"sleep": delay, "interval": 0.25},
        {"write": "app.py", "content": f"def add(a, b):\n    return {body}\n"},
        {"commit": f"add as {body}"},
    ]


RESOLVE = [
    {"resolve_conflicts": "theirs"},
    {"commit": "resolve"},
    # Taking one side drops the other's line: said so, or the resolution is sent back.
    {
        "api": {
            "event": "declare_dropped_hunk",
            "reason": "the story's b + a replaces the base's a + b",
            "data": {"file": "app.py", "side": "base", "hunk": "@@ -2 +2 @@"},
        }
    },
    {"api": {"event": "merge_resolved", "reason": "took the incoming side"}},
]
GIVE_UP = [{"api": {"event": "merge_gave_up", "reason": "both sides rewrote add()"}}]
SHRUG = [{"say": "not sure what to do"}]  # exits with neither verdict: transient


# 4: the same inside the speculative merge queue (issue 17): conflicts on the real base,
# mergemasters as ever, and a resolution merged by the plain path.
@pytest.mark.parametrize("slots", [1, 4])
def test_three_conflicts_share_one_mergemaster_slot(
    tmp_path: Path, database: Database, slots: int
) -> None:
    repo = make_repo(tmp_path / "repo")
    coder = {
        "s0": edit("a + b", 0.0),
        # Slower, so s0 lands first and these three conflict with it.
        "s1": edit("b + a", 1.5),
        "s2": edit("(a + b) * 1", 1.5),
        "s3": edit("sum((a, b))", 1.5),
    }
    config = make_config(
        tmp_path,
        coder,
        max_coders=4,
        max_mergemasters=1,
        max_merge_slots=slots,
        mergemaster_script={"s1": RESOLVE, "s2": GIVE_UP, "s3": SHRUG},
    )
    with running_pipeline(repo, database, config, with_api=True) as p:
        for sid in ("s0", "s1", "s2", "s3"):
            p.add(sid)
        # All four branch from the same base; s0 is quickest, so the others conflict.
        for sid in ("s0", "s1", "s2", "s3"):
            p.start(sid)
        assert p.wait_stage("s0", Stage.DONE, timeout=60).stage is Stage.DONE
        s1 = p.wait_for("s1", lambda s: s.stage is Stage.DONE, timeout=90)
        s2 = p.wait_for("s2", lambda s: s.final and not s.running_agent, timeout=90)
        s3 = p.wait_for("s3", lambda s: s.final and not s.running_agent, timeout=90)
        log = p.app.events_after(0, 10_000)

    # Every story in the race went through conflict_detected first.
    for sid in ("s1", "s2", "s3"):
        failed = [e for e in log if e.story_id == sid and e.type == "MergeFailed"]
        assert failed and failed[0].data["kind"] == MergeFailureKind.CONFLICT_DETECTED.value

    # s1's mergemaster resolved through the API: merged, never respawned.
    mm = [e for e in log if e.type == "AgentSpawnRequested" and e.data["role"] == "mergemaster"]
    assert [e.story_id for e in mm].count("s1") == 1
    resolved = next(e for e in log if e.story_id == "s1" and e.type == "MergeRequeued")
    assert resolved.actor == "agent:mergemaster-s1-1" and resolved.data["resolved"] is True
    assert s1.merge_commit == git(repo, "rev-parse", "main")
    assert "story s1" in git(repo, "log", "-1", "--format=%s", "main")

    # s2 gave up genuinely: one spawn, final, the agent is the recorded actor.
    assert [e.story_id for e in mm].count("s2") == 1
    gave_up = next(e for e in log if e.story_id == "s2" and e.type == "MergemasterAttempted")
    assert gave_up.actor == "agent:mergemaster-s2-1"
    assert s2.stage is Stage.MERGE_FAILURE

    # s3 exited without a verdict: respawned up to the cap (3), then recorded genuine.
    assert [e.story_id for e in mm].count("s3") == 3
    s3_final = next(e for e in log if e.story_id == "s3" and e.type == "MergemasterAttempted")
    assert s3_final.actor == "runner:mergemaster" and "3 times" in (s3_final.reason or "")
    assert s3.mergemaster_spawns == 3

    # One slot: a mergemaster never started while another was running.
    running: str | None = None
    for e in log:
        if e.type == "AgentSpawnRequested" and e.data["role"] == "mergemaster":
            assert running is None, f"{e.story_id} spawned while {running}'s mergemaster ran"
            running = e.story_id
        elif e.type == "AgentExited" and e.data["role"] == "mergemaster":
            assert running == e.story_id
            running = None

    # Each exit handed the freed slot to a queued story other than the one just handled
    # whenever another was waiting (replayed from the log).
    waiting: set[str] = set()
    just_handled: str | None = None
    handed_over = 0
    for e in log:
        if e.type == "MergeFailed" and e.data["kind"] == "conflict_detected":
            waiting.add(e.story_id)
        elif e.type in ("MergemasterAttempted", "MergeRequeued"):
            waiting.discard(e.story_id)
        elif e.type == "AgentExited" and e.data["role"] == "mergemaster":
            just_handled = e.story_id
        elif e.type == "AgentSpawnRequested" and e.data["role"] == "mergemaster":
            if just_handled is not None and waiting - {just_handled}:
                assert e.story_id != just_handled, "the slot went back to the story just handled"
                handed_over += 1
            just_handled = None
    assert handed_over >= 2
    assert len(calls(tmp_path, "mergemaster")) == len(mm) == 5
