"""The read-model queries on SQLite and PostgreSQL, against what the application says."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta

import pytest

from projections import PROJECTION_NAMES, ProjectionRunner, ReadModels, render_prometheus
from projections.read_models import encode_cursor
from projections.state import ALL_STAGES, SHARED_SNAPSHOT_KEYS, TERMINAL_STAGES
from projections.workload import drive_app
from service.application import StorylineApplication

ACTOR = "user:test"


def create(app: StorylineApplication, name: str, priority: int = 0) -> str:
    return app.create_story(
        name=name,
        description="d",
        acceptance_criteria=["done"],
        actor=ACTOR,
        priority=priority,
    ).story.id


def to_merge(app: StorylineApplication, story_id: str) -> int:
    """Drive a story from backlog through coding and gates into the merge queue."""
    app.transition(story_id, "start_coding", actor=ACTOR)
    app.transition(
        story_id, "spawn_agent", actor=ACTOR, data={"agent": "c", "runtime": "claude-code"}
    )
    app.transition(story_id, "agent_started", actor=ACTOR, data={"attempt": 1, "pid": 10})
    app.transition(
        story_id,
        "agent_exited",
        actor=ACTOR,
        data={
            "attempt": 1,
            "outcome": "completed",
            "tokens_in": 100,
            "tokens_out": 10,
            "cost_usd": 0.25,
            "turns": 3,
            "session_id": "s1",
        },
    )
    app.transition(story_id, "start_gates", actor=ACTOR)
    data = {"feature_branch": f"feature/story-{story_id}", "commits_ahead": 1}
    return app.transition(story_id, "gates_passed", actor=ACTOR, data=data).position


def queue_ids(read_models: ReadModels) -> list[str]:
    return [row["story_id"] for row in read_models.merge_queue()]


def test_merge_queue_order_follows_the_events_that_queued_stories(
    app: StorylineApplication, runner: ProjectionRunner, read_models: ReadModels
) -> None:
    a, b, c = (create(app, n) for n in ("a", "b", "c"))
    queued_b = to_merge(app, b)
    to_merge(app, a)
    to_merge(app, c)
    runner.run_once()
    assert queue_ids(read_models) == [b, a, c]
    first = read_models.merge_queue()[0]
    assert first == {
        "position_in_queue": 1,
        "story_id": b,
        "name": "b",
        "queued_at_position": queued_b,
        "queued_at": first["queued_at"],
    }

    app.transition(a, "start_merge", actor=ACTOR)
    app.transition(a, "merge_failed", actor=ACTOR, data={"kind": "conflict_detected"})
    runner.run_once()
    assert queue_ids(read_models) == [b, c]
    assert read_models.board_row(a)["merge_failure_kind"] == "conflict_detected"  # type: ignore[index]

    app.transition(a, "requeue_merge", actor=ACTOR, reason="retry")
    app.transition(b, "block", actor=ACTOR, reason="hold on")
    runner.run_once()
    assert queue_ids(read_models) == [c, a]
    app.transition(b, "unblock", actor=ACTOR)
    runner.run_once()
    assert queue_ids(read_models) == [c, a, b]
    ranks = {row["id"]: row["queue_position"] for row in read_models.board(limit=10)[0]}
    assert ranks == {c: 1, a: 2, b: 3}
    assert read_models.board_row(b)["blocked_from"] is None  # type: ignore[index]


def test_queue_ranks_count_the_whole_queue_even_when_a_page_shows_part_of_it(
    app: StorylineApplication, runner: ProjectionRunner, read_models: ReadModels
) -> None:
    # Queued in the order low, mid, high, top; the board pages by priority, so the first
    # page shows the stories queued last, whose ranks count the ones not on the page.
    low, mid, high, top = (
        create(app, n, priority=p) for n, p in (("l", 1), ("m", 2), ("h", 3), ("t", 4))
    )
    idle = create(app, "idle", priority=9)
    for story_id in (low, mid, high, top):
        to_merge(app, story_id)
    runner.run_once()

    first, cursor = read_models.board(limit=3)
    assert [(row["id"], row["queue_position"]) for row in first] == [
        (idle, None),
        (top, 4),
        (high, 3),
    ]
    second, _ = read_models.board(limit=3, cursor=cursor)
    assert [(row["id"], row["queue_position"]) for row in second] == [(mid, 2), (low, 1)]
    assert read_models.board_row(high)["queue_position"] == 3  # type: ignore[index]
    assert read_models.board_row(idle)["queue_position"] is None  # type: ignore[index]

    app.transition(low, "start_merge", actor=ACTOR)
    app.transition(low, "merge_failed", actor=ACTOR, data={"kind": "conflict_detected"})
    runner.run_once()
    assert read_models.board_row(top)["queue_position"] == 3  # type: ignore[index]
    merge_page, _ = read_models.board(stage="merge", limit=1)
    assert [(row["id"], row["queue_position"]) for row in merge_page] == [(top, 3)]


def test_board_pages_by_priority_then_id_with_an_opaque_cursor(
    app: StorylineApplication, runner: ProjectionRunner, read_models: ReadModels
) -> None:
    ids = [create(app, f"s{i}", priority=i % 3) for i in range(11)]
    app.transition(ids[4], "start_coding", actor=ACTOR)
    runner.run_once()

    seen: list[dict[str, object]] = []
    cursor = None
    while True:
        page, cursor = read_models.board(limit=4, cursor=cursor)
        assert len(page) <= 4
        seen.extend(page)
        if cursor is None:
            break
    assert len(seen) == 11
    keys = [(-int(row["priority"]), str(row["id"])) for row in seen]  # type: ignore[call-overload]
    assert keys == sorted(keys)
    assert {row["id"] for row in seen} == set(ids)

    coding, nothing_more = read_models.board(stage="coding")
    assert [row["id"] for row in coding] == [ids[4]] and nothing_more is None
    row = coding[0]
    for key in [
        "id",
        "name",
        "stage",
        "version",
        "retry_count",
        "abort_respawns",
        "mergemaster_spawns",
        "fixup_pending",
        "final",
        "merge_failure_kind",
        "queue_position",
        "tokens_in",
        "tokens_out",
        "cost_usd",
        "epic",
        "priority",
        "depends_on",
        "last_event",
        "last_actor",
        "last_reason",
        "last_change",
        "position",
    ]:
        assert key in row
    assert row["last_event"] == "CodingStarted" and row["last_actor"] == ACTOR

    for bad in ("nonsense", "b1.", "b1.bm90IGpzb24", encode_cursor(1, "x") + "!!", "b1.WzEsMl0"):
        with pytest.raises(ValueError):
            read_models.board(cursor=bad)
    with pytest.raises(ValueError):
        read_models.board(stage="nowhere")
    with pytest.raises(ValueError):
        read_models.board(limit=0)
    assert read_models.board_row("missing") is None


def test_history_runs_metrics_and_status_agree_with_the_log(
    app: StorylineApplication, runner: ProjectionRunner, read_models: ReadModels
) -> None:
    ids = drive_app(app, random.Random(5), stories=10, steps=250)
    runner.run_once()
    head = app.max_position()

    for story_id in ids:
        expected = [e.as_json() for e in app.history(story_id)]
        assert read_models.history(story_id, limit=1000) == expected
    everything = read_models.history(limit=10_000)
    assert [e["position"] for e in everything] == list(range(1, head + 1))
    middle = head // 2
    assert read_models.history(after=middle, limit=3) == everything[middle : middle + 3]

    spawns = [e for e in everything if e["type"] == "AgentSpawnRequested"]
    runs = read_models.agent_runs(limit=1000)
    assert len(runs) == len(spawns)
    assert [r["spawn_position"] for r in runs] == sorted(
        (e["position"] for e in spawns), reverse=True
    )
    exits = {
        (e["story_id"], e["data"]["role"], e["data"]["attempt"]): e
        for e in everything
        if e["type"] == "AgentExited"
    }
    for run in runs:
        ended = exits.get((run["story_id"], run["role"], run["attempt"]))
        if ended is None:
            assert run["ended_at"] is None and run["outcome"] is None
        else:
            assert run["outcome"] == ended["data"]["outcome"]
            assert run["tokens_in"] == ended["data"]["tokens_in"]
            assert run["ended_at"] == ended["timestamp"]
    one = ids[0]
    assert all(r["story_id"] == one for r in read_models.agent_runs(story_id=one))

    now = datetime.now(UTC) + timedelta(seconds=10)
    metrics = read_models.metrics(now=now)
    board = read_models.board(limit=1000)[0]
    assert metrics["stories_per_stage"] == {
        stage: sum(1 for row in board if row["stage"] == stage) for stage in ALL_STAGES
    }
    assert metrics["events_total"] == head
    assert metrics["story_cost_usd"] == {row["id"]: row["cost_usd"] for row in board}
    assert metrics["stage_seconds_total"] == pytest.approx(stage_seconds(everything, now))

    statuses = read_models.status()
    assert [s.name for s in statuses] == list(PROJECTION_NAMES)
    assert all((s.position, s.head, s.lag, s.error) == (head, head, 0, None) for s in statuses)
    text = render_prometheus(metrics, statuses)
    assert 'storyline_projection_lag{projection="board"} 0\n' in text
    assert f"storyline_events_total {head}\n" in text
    coding = metrics["stories_per_stage"]["coding"]
    assert f'storyline_stories{{stage="coding"}} {coding}\n' in text
    assert text.count("# TYPE ") == 10

    # Reviews counted by the metrics projection are the log's concluded reviews.
    concluded = {"passed": 0, "failed": 0}
    for event in everything:
        if event["type"] in ("ReviewPassed", "ReviewFailed"):
            concluded["passed" if event["type"] == "ReviewPassed" else "failed"] += 1
    assert metrics["reviews_total"] == concluded
    assert metrics["review_score_count"] == sum(concluded.values())
    for result, n in concluded.items():
        assert f'storyline_reviews_total{{result="{result}"}} {n}\n' in text


def stage_seconds(events: list[dict[str, object]], now: datetime) -> dict[str, float]:
    """Seconds per stage recomputed from the audit trail (open stays counted up to now)."""
    totals = dict.fromkeys(ALL_STAGES, 0.0)
    current: dict[str, tuple[str, datetime]] = {}
    for event in events:
        story = str(event["story_id"])
        when = datetime.fromisoformat(str(event["timestamp"]))
        stage = str(event["to_stage"])
        previous = current.get(story)
        if previous is None or previous[0] != stage:
            if previous is not None:
                totals[previous[0]] += (when - previous[1]).total_seconds()
            current[story] = (stage, when)
    for stage, since in current.values():
        if stage not in TERMINAL_STAGES:
            totals[stage] += (now - since).total_seconds()
    return totals


def test_the_board_as_of_a_position_equals_the_story_as_of_it(
    app: StorylineApplication, read_models: ReadModels
) -> None:
    ids = drive_app(app, random.Random(9), stories=6, steps=120)
    head = app.max_position()
    for position in sorted({1, 2, head // 3, head // 2, head - 1, head}):
        rows = {row["id"]: row for row in read_models.board_as_of(position)}
        for story_id in ids:
            try:
                story = app.get_story_as_of(story_id, position=position)
            except Exception:
                assert story_id not in rows
                continue
            snapshot = story.snapshot()
            row = rows[story_id]
            for key in SHARED_SNAPSHOT_KEYS:
                if key not in ("created_on", "modified_on"):
                    assert row[key] == snapshot[key], (position, story_id, key)
            assert row["last_change"] == snapshot["modified_on"]
    assert read_models.board_as_of(0) == []
    with pytest.raises(ValueError):
        read_models.board_as_of(-1)


def test_wait_for_gives_read_your_writes(
    app: StorylineApplication, runner: ProjectionRunner, read_models: ReadModels
) -> None:
    story = create(app, "mine")
    position = app.transition(story, "start_coding", actor=ACTOR).position
    assert read_models.wait_for(position, ["board"], timeout=0.05) is False
    with pytest.raises(ValueError):
        read_models.wait_for(position, ["no-such-projection"], timeout=0.01)

    runner.start()
    try:
        for event in ["block", "unblock"] * 3:
            position = app.transition(story, event, actor=ACTOR, reason="toggling").position
            assert read_models.wait_for(position, ["board", "history"], timeout=10)
            row = read_models.board_row(story)
            assert row is not None and row["position"] == position
            assert row["stage"] == ("blocked" if event == "block" else "coding")
        assert read_models.wait_for(app.max_position(), timeout=10)
    finally:
        runner.stop()


def test_a_follower_thread_picks_up_commits_from_another_thread(
    app: StorylineApplication, runner: ProjectionRunner, read_models: ReadModels
) -> None:
    runner.start()
    try:
        done = threading.Event()

        def write() -> None:
            drive_app(app, random.Random(2), stories=5, steps=60)
            done.set()

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(60)
        assert done.is_set()
        assert read_models.wait_for(app.max_position(), timeout=20)
    finally:
        runner.stop()
    assert runner.check() == {}
