"""The merge-trust events (a declared drop, a gate verdict, a flaky detection) are recorded
on a story without being steps: the runners' next step and a command's expected version are
unaffected, and a replay gives the same state."""

from __future__ import annotations

import pytest

from domain.commands import Policy, apply_named
from domain.errors import IllegalTransition, InvalidCommand, InvalidField
from domain.stages import Stage
from domain.story import Story
from tests.unit.story_builders import ACTOR, story_in
from tests.unit.test_story_transitions import DATA


def _send(story: Story, event: str, data: dict[str, object], reason: str = "r") -> None:
    apply_named(story, event, actor=ACTOR, reason=reason, data=data, policy=Policy())


@pytest.mark.parametrize(
    ("stage", "event"),
    [
        (Stage.MERGE_FAILURE, "declare_dropped_hunk"),
        (Stage.GATES, "record_gate_verdict"),
        (Stage.MERGE, "flaky_gate_detected"),
    ],
)
def test_not_a_step(stage: Stage, event: str) -> None:
    story = story_in(stage)
    before = (story.state_version, story.last_event, story.stage)
    version = story.version
    _send(story, event, DATA[event])
    assert story.version == version + 1
    assert (story.state_version, story.last_event, story.stage) == before
    assert story.accepts_expected_version(version)
    replayed = None
    for e in story.collect_events():
        replayed = e.mutate(replayed)
    assert replayed is not None
    assert replayed.declared_drops == story.declared_drops
    assert replayed.gate_runs == story.gate_runs
    assert replayed.flaky_gates == story.flaky_gates


def test_declared_drop_is_kept_with_its_reason() -> None:
    story = story_in(Stage.MERGE_FAILURE)
    _send(story, "declare_dropped_hunk", DATA["declare_dropped_hunk"], reason="superseded")
    assert story.declared_drops == [
        {"file": "a.py", "side": "base", "hunk": "@@ -3,0 +4,2 @@", "reason": "superseded"}
    ]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"file": "a.py", "side": "theirs", "hunk": "@@ -1 +1 @@"}, InvalidCommand),
        ({"file": "a.py", "side": "base", "hunk": "not a header"}, InvalidCommand),
        ({"file": "a\x00.py", "side": "base", "hunk": "@@ -1 +1 @@"}, InvalidField),
    ],
)
def test_bad_declarations_are_refused(data: dict[str, object], error: type[Exception]) -> None:
    story = story_in(Stage.MERGE_FAILURE)
    version = story.version
    with pytest.raises(error):
        _send(story, "declare_dropped_hunk", data)
    assert story.version == version


def test_a_declaration_needs_a_reason_and_the_merge_stages() -> None:
    story = story_in(Stage.MERGE_FAILURE)
    with pytest.raises(InvalidCommand, match="reason"):
        _send(story, "declare_dropped_hunk", DATA["declare_dropped_hunk"], reason=" ")
    with pytest.raises(IllegalTransition):
        _send(story_in(Stage.CODING), "declare_dropped_hunk", DATA["declare_dropped_hunk"])
    with pytest.raises(IllegalTransition):
        _send(story_in(Stage.CODING), "record_gate_verdict", DATA["record_gate_verdict"])


def test_a_flaky_verdict_needs_two_runs_and_a_reason() -> None:
    story = story_in(Stage.GATES)
    one_run = {**DATA["flaky_gate_detected"], "verdicts": [False], "outputs": ["x"]}
    with pytest.raises(InvalidCommand):
        _send(story, "flaky_gate_detected", one_run)
    with pytest.raises(InvalidCommand, match="reason"):
        _send(story, "flaky_gate_detected", DATA["flaky_gate_detected"], reason="")
