"""ProviderBreakerOpened / ProviderBreakerClosed: legal in coding only, not steps (the
runners' next step and a command's expected version are untouched), stored under pinned
topics and replayed from the log on both backends."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from domain.commands import Policy, apply_named
from domain.errors import IllegalTransition, InvalidCommand
from domain.events import ProviderBreakerClosed, ProviderBreakerOpened
from domain.stages import Stage
from domain.story import Story
from domain.transitions import legal_events_from
from projections.state import apply_story_event
from service.application import StorylineApplication
from service.events_log import LoggedEvent
from tests.unit.story_builders import story_in

RUNNER = "runner:coder"
UNTIL = "2026-11-30T05:00:10+00:00"
OPENED = {"provider": "claude", "consecutive_failures": 3, "open_until": UNTIL, "opened_times": 2}


def send(story: Story, event: str, data: dict[str, Any]) -> None:
    apply_named(
        story, event, actor=RUNNER, reason="the provider failed", data=data, policy=Policy()
    )


def _state(story: Story) -> dict[str, Any]:
    skip = {"version", "modified_on"}
    return copy.deepcopy({k: v for k, v in story.snapshot().items() if k not in skip})


def test_opening_and_closing_are_legal_in_coding_and_not_steps() -> None:
    story = story_in(Stage.CODING)
    before = _state(story)
    version, state_version = story.version, story.state_version
    assert "provider_breaker_opened" in legal_events_from(Stage.CODING)
    send(story, "provider_breaker_opened", OPENED)
    send(story, "provider_breaker_closed", {"provider": "claude"})
    assert story.version == version + 2
    assert story.state_version == state_version
    assert _state(story) == before  # stage, last_event, counters: all unchanged
    opened, closed = story.pending_events[-2:]
    assert isinstance(opened, ProviderBreakerOpened)
    assert isinstance(closed, ProviderBreakerClosed)
    assert (opened.provider, opened.consecutive_failures, opened.opened_times) == ("claude", 3, 2)
    assert opened.open_until == datetime(2026, 11, 30, 5, 0, 10, tzinfo=UTC)
    assert (opened.actor, opened.reason) == (RUNNER, "the provider failed")
    assert opened.TOPIC == "storyline.ProviderBreakerOpened.v1"
    assert closed.TOPIC == "storyline.ProviderBreakerClosed.v1"
    assert story.accepts_expected_version(version)  # a runner's stale read still applies


@pytest.mark.parametrize("stage", [s for s in Stage if s is not Stage.CODING], ids=str)
def test_refused_outside_coding_and_nothing_changes(stage: Stage) -> None:
    story = story_in(stage)
    version = story.version
    with pytest.raises(IllegalTransition):
        send(story, "provider_breaker_opened", OPENED)
    assert story.version == version


@pytest.mark.parametrize(
    "data",
    [
        {**OPENED, "consecutive_failures": 0},
        {**OPENED, "opened_times": 0},
        {**OPENED, "open_until": "2026-11-30T05:00:10"},  # no zone: ambiguous after a move
        {**OPENED, "provider": ""},
        {k: v for k, v in OPENED.items() if k != "provider"},
    ],
)
def test_bad_data_is_refused_and_nothing_changes(data: dict[str, Any]) -> None:
    story = story_in(Stage.CODING)
    version = story.version
    with pytest.raises(InvalidCommand):
        send(story, "provider_breaker_opened", data)
    assert story.version == version


def test_replay_and_the_board_mirror_the_aggregate() -> None:
    story = story_in(Stage.CODING)
    send(story, "provider_breaker_opened", OPENED)
    send(story, "provider_breaker_closed", {"provider": "claude"})
    events = story.collect_events()
    replayed: Story | None = None
    for event in events:
        replayed = event.mutate(replayed)  # type: ignore[arg-type]
    assert replayed is not None
    assert replayed.snapshot() == story.snapshot()
    board = None
    for position, event in enumerate(events, start=1):
        board = apply_story_event(
            board,
            LoggedEvent(
                position=position,
                story_id=story.id,
                version=event.originator_version,
                type=type(event).__name__,
                topic=event.TOPIC,  # type: ignore[attr-defined]
                timestamp=event.timestamp,
                actor=event.actor,
                reason=event.reason,
                from_stage=event.from_stage.value if event.from_stage else None,
                to_stage=event.to_stage.value if event.to_stage else None,
                data={},
            ),
        )
    assert board is not None
    assert (board.last_event, board.version) == (story.last_event, story.version)


def test_stored_and_read_back(app: StorylineApplication) -> None:
    app.create_story(story_id="b1", name="n", description="d", acceptance_criteria=["a"], actor="u")
    app.transition("b1", "start_coding", actor="u")
    app.transition("b1", "provider_breaker_opened", actor=RUNNER, reason="3 in a row", data=OPENED)
    app.transition("b1", "provider_breaker_closed", actor=RUNNER, data={"provider": "claude"})
    logged = [e for e in app.events_after(0, 100) if e.story_id == "b1"]
    assert [e.type for e in logged[-2:]] == ["ProviderBreakerOpened", "ProviderBreakerClosed"]
    assert logged[-2].topic == "storyline.ProviderBreakerOpened.v1"
    assert logged[-2].data["provider"] == "claude"
    assert logged[-2].data["opened_times"] == 2
    assert logged[-2].actor == RUNNER and logged[-2].reason == "3 in a row"
    story = app.get_story("b1")
    assert (story.stage, story.last_event, story.version) == (Stage.CODING, "CodingStarted", 4)
