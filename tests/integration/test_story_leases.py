"""Scale-out on a real SQLite file and a real PostgreSQL database: per-story leases, the
worker registry, and fencing by the claim recorded in the story's log."""

from __future__ import annotations

import threading
import time

import pytest

from domain.errors import IllegalTransition, NotHolder
from domain.fencing import worker_fence
from domain.stages import Stage
from service.application import StorylineApplication
from service.workers import StoryLeases, Workers


def coding_story(app: StorylineApplication) -> str:
    sid = app.create_story(
        name="s", description="d", acceptance_criteria=["ok"], actor="user:t"
    ).story.id
    app.transition(sid, "start_coding", actor="user:t")
    return sid


def test_one_claim_wins_and_generations_grow(app: StorylineApplication) -> None:
    a = StoryLeases(app, "host-a:1:aa", ttl_secs=0.6)
    b = StoryLeases(app, "host-b:2:bb", ttl_secs=0.6)
    first = a.claim("7")
    assert first is not None and first.generation == 1 and first.holder == "host-a:1:aa"
    assert b.claim("7") is None  # a's lease is live
    kept = a.claim("7")
    assert kept is not None and kept.generation == 1  # keeping one's own lease: same token
    assert a.renew() == {"7"}
    time.sleep(0.8)
    assert a.renew() == set()  # expired: not revived, even though nobody took it
    taken = b.claim("7")
    assert taken is not None and taken.generation == 2 and taken.holder == "host-b:2:bb"
    assert a.claim("7") is None
    b.release("7")
    # A released lease leaves no row: the next claim's generation comes from the log (the
    # floor a worker passes is the story's recorded generation + 1).
    assert Workers(app).leases() == []
    again = a.claim("7", floor=taken.generation + 1)
    assert again is not None and again.generation == 3
    # A floor from the log wins over a table that was wiped or restored from an old backup.
    a.release("8")
    floor = a.claim("8", floor=12)
    assert floor is not None and floor.generation == 12


def test_concurrent_claims_have_one_winner(app: StorylineApplication) -> None:
    leases = [StoryLeases(app, f"w{i}", ttl_secs=30) for i in range(6)]
    wins: list[str] = []
    barrier = threading.Barrier(len(leases))

    def race(lease: StoryLeases) -> None:
        barrier.wait()
        for _ in range(3):
            try:
                claim = lease.claim("race")
            except Exception as exc:  # SQLite may answer "database is locked"; try again
                if "locked" not in str(exc):
                    raise
                time.sleep(0.05)
                continue
            if claim is not None:
                wins.append(lease.worker)
            return

    threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert Workers(app).holders() == {"race": wins[0]}


def test_registry_lists_workers_and_their_stories(app: StorylineApplication) -> None:
    workers = Workers(app)
    workers.heartbeat("w1", role="worker", capacity=2, held=1, merger=False, remote="file:///r")
    workers.heartbeat("w2", role="all", capacity=3, held=0, merger=True, remote="file:///r")
    StoryLeases(app, "w1").claim("s9")
    rows = {w.worker_id: w for w in workers.rows()}
    assert set(rows) == {"w1", "w2"}
    assert rows["w2"].merger and rows["w2"].capacity == 3
    assert rows["w1"].alive and rows["w1"].held == 1
    workers.stopped("w1")
    rows = {w.worker_id: w for w in workers.rows()}
    assert rows["w1"].stopped and not rows["w1"].alive
    assert rows["w1"].as_json()["alive"] is False
    assert [(lease.story_id, lease.holder) for lease in workers.leases()] == [("s9", "w1")]


def test_claims_are_recorded_and_fence_stale_workers(app: StorylineApplication) -> None:
    sid = coding_story(app)
    app.transition(sid, "claim", actor="runner:w1", data={"worker": "w1", "generation": 1})
    story = app.get_story(sid)
    assert (story.holder, story.holder_generation) == ("w1", 1)
    # Worker 2 takes over under generation 2; worker 1 comes back with a stale view.
    app.transition(sid, "claim", actor="runner:w2", data={"worker": "w2", "generation": 2})
    with pytest.raises(IllegalTransition, match="stale"):
        app.transition(sid, "claim", actor="runner:w1", data={"worker": "w1", "generation": 2})
    app.fence = worker_fence("w1")
    version = app.get_story(sid).version
    with pytest.raises(NotHolder, match="'w2' holds it"):
        app.transition(
            sid,
            "worktree_ready",
            actor="runner:coder",
            data={"path": "/tmp/x", "branch": "feature/story-1"},
        )
    assert app.get_story(sid).version == version  # nothing recorded
    app.fence = worker_fence("w2")
    app.transition(
        sid, "worktree_ready", actor="runner:coder", data={"path": "/tmp/x", "branch": "b"}
    )
    # Outside the worker stages the fence does not apply (the merger's stages, blocked).
    app.fence = None  # a person, through the API's own application
    app.transition(sid, "block", actor="user:t", reason="paused")
    assert app.get_story(sid).stage is Stage.BLOCKED
    app.fence = worker_fence("w1")
    app.transition(sid, "add_note", actor="runner:w1", reason="seen blocked")
    history = [e.type for e in app.history(sid)]
    assert history.count("WorkerClaimed") == 2


def test_a_taken_over_story_drops_the_coder_session_unless_shared(
    app: StorylineApplication,
) -> None:
    sid = coding_story(app)
    app.transition(sid, "claim", actor="runner:w1", data={"worker": "w1", "generation": 1})
    app.transition(
        sid,
        "spawn_agent",
        actor="runner:coder",
        data={"role": "coder", "agent": "c", "runtime": "cli"},
    )
    app.transition(
        sid,
        "agent_started",
        actor="runner:coder",
        data={"role": "coder", "attempt": 1, "pid": 4242},
    )
    app.transition(
        sid,
        "agent_exited",
        actor="runner:coder",
        data={"role": "coder", "attempt": 1, "outcome": "failed", "session_id": "sess-1"},
    )
    assert app.get_story(sid).sessions == {"coder": "sess-1"}
    # Shared session storage: the next worker may resume it.
    app.transition(
        sid,
        "claim",
        actor="runner:w2",
        data={"worker": "w2", "generation": 2, "drop_sessions": False},
    )
    assert app.get_story(sid).sessions == {"coder": "sess-1"}
    # Otherwise the session stayed on w2's machine: w3 starts cold.
    app.transition(
        sid,
        "claim",
        actor="runner:w3",
        data={"worker": "w3", "generation": 3, "drop_sessions": True},
    )
    story = app.get_story(sid)
    assert story.sessions == {} and story.holder == "w3"
    last = app.history(sid)[-1]
    assert last.data["drop_sessions"] is True and last.data["previous"] == "w2"


def test_claim_refused_outside_worker_stages_and_with_bad_ids(
    app: StorylineApplication,
) -> None:
    sid = app.create_story(
        name="s", description="d", acceptance_criteria=["ok"], actor="user:t"
    ).story.id
    with pytest.raises(IllegalTransition):
        app.transition(sid, "claim", actor="runner:w", data={"worker": "w", "generation": 1})
    app.transition(sid, "start_coding", actor="user:t")
    from domain.errors import InvalidCommand

    for bad in ({"worker": "w 1", "generation": 1}, {"worker": "w", "generation": 0}):
        with pytest.raises(InvalidCommand):
            app.transition(sid, "claim", actor="runner:w", data=bad)
    assert app.get_story(sid).holder is None
