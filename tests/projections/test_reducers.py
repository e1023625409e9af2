"""The pure reducers against the domain aggregate, on random valid workloads (no I/O).

After every command of every workload, the folded board state of the story equals the
aggregate's ``snapshot()`` on every shared field, so the projection never re-derives the
counters differently from the domain.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from domain.events import EVENTS_BY_NAME
from domain.story import Story
from projections.state import (
    ALL_STAGES,
    SHARED_SNAPSHOT_KEYS,
    STORY_FIELDS,
    QueueState,
    ReviewMetric,
    RunState,
    StageMetric,
    StoryMetric,
    StoryState,
    apply_metric_event,
    apply_queue_event,
    apply_review_metric,
    apply_run_event,
    apply_story_event,
    run_key,
)
from projections.tables import board
from projections.workload import generate
from service.codec import OrjsonTranscoder, PydanticMapper
from service.events_log import LoggedEvent, decode

MAPPER = PydanticMapper(transcoder=OrjsonTranscoder())


def logged(events: list[object], start: int) -> list[LoggedEvent]:
    out = []
    for offset, event in enumerate(events, start=1):
        stored = MAPPER.to_stored_event(event)  # type: ignore[arg-type]
        out.append(
            decode(
                start + offset,
                str(stored.originator_id),
                stored.originator_version,
                stored.topic,
                stored.state,
            )
        )
    return out


def shared_of(story: Story) -> dict[str, object]:
    snapshot = story.snapshot()
    return {key: snapshot[key] for key in SHARED_SNAPSHOT_KEYS}


def test_story_state_fields_are_the_board_columns() -> None:
    assert tuple(c.name for c in board.columns) == STORY_FIELDS


@pytest.mark.parametrize("seed", range(30))
def test_folded_state_equals_the_aggregate_after_every_command(seed: int) -> None:
    rng = random.Random(seed)
    states: dict[str, StoryState] = {}
    queue: dict[str, QueueState] = {}
    runs: dict[tuple[str, str, int], RunState] = {}
    story_metrics: dict[str, StoryMetric] = {}
    stage_metrics: dict[str, StageMetric] = {}
    changed: set[str] = set()
    reviews: dict[tuple[str, int], ReviewMetric] = {}
    reviews_changed: set[tuple[str, int]] = set()
    aggregates: dict[str, Story] = {}
    position = 0
    seen_types: Counter[str] = Counter()
    for story, events in generate(rng, stories=12, steps=500):
        for event in logged(events, position):
            position = event.position
            seen_types[event.type] += 1
            sid = event.story_id
            states[sid] = apply_story_event(states.get(sid), event)
            queue[sid] = apply_queue_event(queue.get(sid), event)
            key = run_key(event)
            if key is not None:
                runs[key] = apply_run_event(runs.get(key), event)
            story_metrics[sid] = apply_metric_event(
                story_metrics.get(sid), event, stage_metrics, changed
            )
            apply_review_metric(event, reviews, reviews_changed)
        aggregates[story.id] = story
        assert states[story.id].shared() == shared_of(story)

    for sid, story in aggregates.items():
        state = states[sid]
        assert queue[sid].queued_position == state.queued_position
        assert queue[sid].name == story.name
        assert story_metrics[sid].stage == story.stage.value
        assert round(story_metrics[sid].cost_usd, 6) == round(story.cost_usd, 6)
        assert story_metrics[sid].tokens_in == story.tokens_in
        story_runs = [r for r in runs.values() if r.story_id == sid]
        attempts = story.coder_attempts + story.mergemaster_attempts + story.evaluator_attempts
        assert len(story_runs) == attempts
        evaluator_runs = [r for r in story_runs if r.role == "evaluator"]
        assert len(evaluator_runs) == story.evaluator_attempts
        assert sum(r.tokens_out for r in story_runs) == story.tokens_out
        open_runs = [r for r in story_runs if r.ended_at is None]
        assert len(open_runs) == (1 if story.running_agent else 0)

    # The review metrics count every concluded verdict of the aggregates, by result.
    concluded = [
        r for story in aggregates.values() for r in story.reviews if r["passed"] is not None
    ]
    for result, passed in (("passed", True), ("failed", False)):
        mine = [r for r in concluded if r["passed"] is passed]
        counted = [m for (res, _), m in reviews.items() if res == result]
        assert sum(m.reviews for m in counted) == len(mine)
        assert sum(m.score_e4_total for m in counted) == sum(round(r["score"] * 1e4) for r in mine)

    # Every story entered backlog once; entries per stage are the stage changes folded.
    assert stage_metrics["backlog"].entries >= len(aggregates)
    assert all(m.micros_total >= 0 for m in stage_metrics.values())
    assert seen_types["StoryCreated"] == len(aggregates)


def test_the_workloads_reach_every_stage_and_event() -> None:
    """The random workloads above are only evidence if they exercise everything."""
    stages: set[str] = set()
    types: set[str] = set()
    position = 0
    for seed in range(30):
        for _story, events in generate(random.Random(seed), stories=12, steps=500):
            for event in logged(events, position):
                position = event.position
                stages.add(event.to_stage or "")
                types.add(event.type)
    assert stages == set(ALL_STAGES)
    assert types == set(EVENTS_BY_NAME)


def test_an_unknown_event_type_only_moves_the_common_fields() -> None:
    (created,) = logged(
        list(
            Story.create(
                story_id="s1",
                name="n",
                description="d",
                acceptance_criteria=["a"],
                depends_on=[],
                actor="user:a",
            ).collect_events()
        ),
        0,
    )
    state = apply_story_event(None, created)
    future = LoggedEvent(
        position=2,
        story_id="s1",
        version=2,
        type="SomethingNew",
        topic="storyline.SomethingNew.v1",
        timestamp=created.timestamp,
        actor="system",
        reason="from the future",
        from_stage="backlog",
        to_stage="backlog",
        data={"whatever": 1},
    )
    state = apply_story_event(state, future)
    assert (state.version, state.last_event) == (2, "SomethingNew")
    assert state.last_reason == "from the future"
    assert state.stage == "backlog"
