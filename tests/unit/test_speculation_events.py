"""The speculative merge queue's story events: a stacked MergeStarted, its progress
(SpeculationUpdated, not a step) and a dropped build (SpeculationRestarted: stays in merge,
back in the queue). Old MergeStarted events (without the new fields) still decode."""

from __future__ import annotations

from typing import Any

import pytest

from domain.commands import Policy, apply_named
from domain.errors import DomainError, IllegalTransition, InvalidCommand
from domain.events import MergeStarted, SpeculationRestarted
from domain.stages import Stage
from domain.story import Story
from tests.unit.story_builders import ACTOR, story_in

SHA_B = "b" * 40
SHA_P = "c" * 40
SHA_C = "d" * 40


def send(story: Story, event: str, reason: str | None = "why", **data: Any) -> None:
    apply_named(story, event, actor=ACTOR, reason=reason, data=data, policy=Policy(max_retries=3))


def stacked() -> Story:
    story = story_in(Stage.MERGE)
    send(story, "start_merge", base_sha=SHA_B, ahead=["s7", "s8"], speculative_base=SHA_P)
    return story


def test_stacked_start_records_its_base_and_the_stories_ahead() -> None:
    story = stacked()
    assert story.merging and not story.in_merge_queue
    assert story.snapshot()["speculation"] == {
        "state": "building",
        "base_sha": SHA_B,
        "ahead": ["s7", "s8"],
        "parent": SHA_P,
        "commit": None,
    }
    event = story.pending_events[-1]
    assert isinstance(event, MergeStarted) and event.ahead == ["s7", "s8"]


def test_plain_start_has_no_speculation() -> None:
    story = story_in(Stage.MERGE)
    send(story, "start_merge", base_sha=SHA_B)
    assert story.merging and story.speculation is None


def test_progress_is_not_a_step() -> None:
    story = stacked()
    state_version = story.state_version
    send(story, "update_speculation", state="gating", commit=SHA_C)
    send(story, "update_speculation", state="passed")
    assert story.state_version == state_version  # an expected version still holds
    assert story.speculation is not None
    assert story.speculation["state"] == "passed" and story.speculation["commit"] == SHA_C
    assert story.stage is Stage.MERGE and story.merging


def test_restart_requeues_in_merge_and_needs_a_reason() -> None:
    story = stacked()
    with pytest.raises(InvalidCommand):
        send(story, "restart_speculation", reason=None)
    send(story, "restart_speculation", reason="s7 ahead was ejected", queued_position=12)
    assert story.stage is Stage.MERGE and story.in_merge_queue
    assert story.speculation is None
    event = story.pending_events[-1]
    assert isinstance(event, SpeculationRestarted)
    assert event.queued_position == 12 and event.ahead == ["s7", "s8"]
    # Only a running merge can be restarted.
    with pytest.raises(IllegalTransition):
        send(story, "restart_speculation", reason="again")


def test_progress_needs_a_speculative_merge() -> None:
    story = story_in(Stage.MERGE)
    with pytest.raises(IllegalTransition):
        send(story, "update_speculation", state="gating")
    send(story, "start_merge", base_sha=SHA_B)
    with pytest.raises(IllegalTransition):
        send(story, "update_speculation", state="gating")


@pytest.mark.parametrize(
    "data",
    [
        {"ahead": ["s7"]},  # stacked without the commit it is squashed onto
        {"ahead": ["s1"], "speculative_base": SHA_P},  # on itself
        {"speculative_base": "not-a-sha"},
    ],
)
def test_bad_stacked_start_changes_nothing(data: dict[str, Any]) -> None:
    story = story_in(Stage.MERGE)
    version = story.version
    with pytest.raises(DomainError):
        send(story, "start_merge", **data)
    assert story.version == version and not story.merging


def test_bad_state_is_refused() -> None:
    story = stacked()
    with pytest.raises(InvalidCommand):
        send(story, "update_speculation", state="landed-somewhere")


@pytest.mark.parametrize("stage", [s for s in Stage if s is not Stage.MERGE])
def test_refused_outside_merge(stage: Stage) -> None:
    story = story_in(stage)
    with pytest.raises(IllegalTransition):
        send(story, "restart_speculation", reason="x")


def test_block_and_failure_clear_the_speculation() -> None:
    story = stacked()
    story.block(actor=ACTOR, reason="a person stops it")
    assert story.speculation is None
    story = stacked()
    send(story, "merge_failed", kind="gates_failed", details="boom")
    assert story.speculation is None and story.stage is Stage.MERGE_FAILURE


def test_old_merge_started_decodes_without_the_new_fields() -> None:
    event = MergeStarted.model_validate(
        {
            "originator_id": "s1",
            "originator_version": 9,
            "timestamp": "2026-01-01T00:00:00+00:00",
            "actor": "runner:merge",
            "base_sha": SHA_B,
        }
    )
    assert event.ahead == [] and event.speculative_base is None
