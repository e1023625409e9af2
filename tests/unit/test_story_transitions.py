"""Every row of the transition table, and every refused transition, on the pure model."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from domain.commands import Policy, apply_named
from domain.errors import (
    DependenciesNotDone,
    IllegalTransition,
    InvalidCommand,
    InvalidStoryId,
    UnknownEvent,
)
from domain.stages import AgentOutcome, AgentRole, MergeFailureKind, Stage
from domain.story import Story
from domain.transitions import EVENT_NAMES, TRANSITIONS, legal_events_from
from tests.unit.story_builders import ACTOR, new_story, run_coder, story_in

# Valid data for each named event, so that a refusal can only come from the stage guard.
DATA: dict[str, dict[str, Any]] = {
    "worktree_ready": {"path": "/tmp/wt/s1", "branch": "feature/story-s1"},
    "spawn_agent": {"role": "coder", "agent": "coder", "runtime": "cli"},
    "agent_started": {"role": "coder", "attempt": 1, "pid": 99},
    "agent_exited": {"role": "coder", "attempt": 1, "outcome": "completed"},
    "uncommitted_changes_found": {"paths": ["a.py"]},
    "start_gates": {"commits_ahead": 1},
    "gates_passed": {"feature_branch": "feature/story-s1", "commits_ahead": 2},
    "gates_failed": {"output": "FAILED test_x"},
    "start_merge": {"base_sha": "abc"},
    "merge_succeeded": {"merge_commit": "cafe", "base_branch": "main"},
    "merge_failed": {"kind": "no_commits"},
    "update_speculation": {"state": "gating", "commit": "cafe"},
    "provider_breaker_opened": {
        "provider": "coder",
        "consecutive_failures": 3,
        "open_until": "2026-01-01T00:00:10+00:00",
        "opened_times": 1,
    },
    "provider_breaker_closed": {"provider": "coder"},
    "claim": {"worker": "host-a:41:0c1d", "generation": 1},
    "declare_dropped_hunk": {"file": "a.py", "side": "base", "hunk": "@@ -3,0 +4,2 @@"},
    "record_gate_verdict": {
        "phase": "gates",
        "gate": "python check.py",
        "tree": "ab12",
        "fingerprint": "cd34",
        "passed": False,
        "output": "FAILED",
    },
    "submit_review": {
        "attempt": 1,
        "criteria": [{"criterion": 0, "met": True, "score": 0.9, "evidence": "test_rate_limit"}],
    },
    "flaky_gate_detected": {
        "phase": "merge_gates",
        "gate": "python check.py",
        "tree": "ab12",
        "fingerprint": "cd34",
        "outputs": ["ok", "FAILED"],
        "verdicts": [True, False],
        "action": "recorded",
    },
}
REASON = "because the test says so"


def send(story: Story, event: str, **overrides: Any) -> None:
    apply_named(
        story,
        event,
        actor=ACTOR,
        reason=overrides.pop("reason", REASON),
        data=overrides.pop("data", DATA.get(event, {})),
        policy=Policy(max_retries=overrides.pop("max_retries", 3)),
        dependency_stages=overrides.pop("deps", {}),
    )


def state(story: Story) -> dict[str, Any]:
    return copy.deepcopy({k: v for k, v in story.snapshot().items() if k != "modified_on"})


# (stage the story is in, event, stage expected after) for every legal row of the table.
ROWS = [
    (Stage.BACKLOG, "start_coding", Stage.CODING),
    (Stage.CODING, "worktree_ready", Stage.CODING),
    (Stage.CODING, "spawn_agent", Stage.CODING),
    (Stage.CODING, "uncommitted_changes_found", Stage.CODING),
    (Stage.GATES, "gates_passed", Stage.MERGE),
    (Stage.GATES, "gates_failed", Stage.CODING),
    (Stage.MERGE, "start_merge", Stage.MERGE),
    (Stage.MERGE_FAILURE, "request_fixup", Stage.CODING),
    (Stage.MERGE_FAILURE, "requeue_merge", Stage.MERGE),
    (Stage.MERGE_FAILURE, "merge_resolved", Stage.MERGE),
    (Stage.MERGE_FAILURE, "merge_gave_up", Stage.MERGE_FAILURE),
    (Stage.MERGE_FAILURE, "spawn_agent", Stage.MERGE_FAILURE),
    (Stage.REVIEW, "spawn_agent", Stage.REVIEW),
    (Stage.BACKLOG, "block", Stage.BLOCKED),
    (Stage.CODING, "block", Stage.BLOCKED),
    (Stage.GATES, "block", Stage.BLOCKED),
    (Stage.REVIEW, "block", Stage.BLOCKED),
    (Stage.MERGE, "block", Stage.BLOCKED),
    (Stage.MERGE_FAILURE, "block", Stage.BLOCKED),
    (Stage.BLOCKED, "unblock", Stage.CODING),
    (Stage.CODING, "demote", Stage.BACKLOG),
    (Stage.GATES, "demote", Stage.BACKLOG),
    (Stage.REVIEW, "demote", Stage.BACKLOG),
    (Stage.MERGE, "demote", Stage.BACKLOG),
    (Stage.BLOCKED, "demote", Stage.BACKLOG),
    (Stage.DONE, "archive", Stage.ARCHIVED),
    (Stage.BACKLOG, "archive", Stage.ARCHIVED),
    (Stage.BLOCKED, "archive", Stage.ARCHIVED),
    # Not moves: recorded in their stage, which stays.
    (Stage.MERGE_FAILURE, "declare_dropped_hunk", Stage.MERGE_FAILURE),
    (Stage.MERGE, "declare_dropped_hunk", Stage.MERGE),
    (Stage.GATES, "record_gate_verdict", Stage.GATES),
    (Stage.MERGE, "record_gate_verdict", Stage.MERGE),
    (Stage.GATES, "flaky_gate_detected", Stage.GATES),
    (Stage.MERGE, "flaky_gate_detected", Stage.MERGE),
    (Stage.CODING, "claim", Stage.CODING),
    (Stage.GATES, "claim", Stage.GATES),
    (Stage.REVIEW, "claim", Stage.REVIEW),
]


@pytest.mark.parametrize(("stage", "event", "target"), ROWS, ids=lambda v: str(v))
def test_legal_row(stage: Stage, event: str, target: Stage) -> None:
    story = story_in(stage)
    version = story.version
    if event == "spawn_agent" and stage is Stage.MERGE_FAILURE:
        send(story, event, data={"role": "mergemaster", "agent": "mm", "runtime": "cli"})
    elif event == "spawn_agent" and stage is Stage.REVIEW:
        send(story, event, data={"role": "evaluator", "agent": "ev", "runtime": "cli"})
    else:
        send(story, event)
    assert story.stage is target
    assert story.version == version + 1
    last = story.pending_events[-1]
    assert last.from_stage is stage  # type: ignore[attr-defined]
    assert last.to_stage is target  # type: ignore[attr-defined]
    assert last.actor == ACTOR  # type: ignore[attr-defined]


def test_every_named_event_has_a_row() -> None:
    covered = {event for _, event, _ in ROWS} | {
        "agent_started",
        "agent_exited",
        "start_gates",
        "merge_succeeded",
        "merge_failed",
        "add_note",  # legal in every stage: tests/unit/test_note_added.py
        # not steps, legal in coding: tests/unit/test_breaker_events.py
        "provider_breaker_opened",
        "provider_breaker_closed",
        # the review's verdict and conclusion: tests/unit/test_review_transitions.py
        "submit_review",
        "conclude_review",
        # the speculative merge queue's: tests/unit/test_speculation_events.py
        "restart_speculation",
        "update_speculation",
    }
    assert covered == set(EVENT_NAMES)


def test_agent_lifecycle_rows() -> None:
    story = story_in(Stage.CODING)
    send(story, "spawn_agent")
    send(story, "agent_started")
    assert story.running_agent == {
        "role": "coder",
        "attempt": 1,
        "agent": "coder",
        "started": True,
        "pid": 99,
    }
    send(story, "agent_exited")
    assert story.running_agent is None and story.stage is Stage.CODING
    send(story, "start_gates")
    assert story.stage is Stage.GATES


def test_merge_outcome_rows() -> None:
    story = story_in(Stage.MERGE)
    send(story, "start_merge")
    send(story, "merge_succeeded")
    assert story.stage is Stage.DONE and story.merge_commit == "cafe"
    story = story_in(Stage.MERGE)
    send(story, "start_merge")
    send(story, "merge_failed")
    assert story.stage is Stage.MERGE_FAILURE
    assert story.merge_failure_kind is MergeFailureKind.NO_COMMITS


REFUSED = [
    (stage, event) for stage in Stage for event in EVENT_NAMES if stage not in TRANSITIONS[event][1]
]


@pytest.mark.parametrize(("stage", "event"), REFUSED, ids=lambda v: str(v))
def test_refused_transition_changes_nothing(stage: Stage, event: str) -> None:
    story = story_in(stage)
    before = state(story)
    pending = len(story.pending_events)
    with pytest.raises(IllegalTransition) as info:
        send(story, event)
    assert state(story) == before
    assert len(story.pending_events) == pending
    error = info.value
    assert error.story_id == "s1"
    assert error.stage == stage.value
    assert error.event == event
    assert error.legal == legal_events_from(stage)
    assert f"'{stage.value}'" in error.message and f"'{event}'" in error.message


def test_dependency_guard_names_unfinished_dependencies() -> None:
    story = new_story("s3", depends_on=["s1", "s2", "s4"])
    with pytest.raises(DependenciesNotDone) as info:
        send(story, "start_coding", deps={"s1": Stage.DONE, "s2": Stage.MERGE, "s4": None})
    assert info.value.unfinished == {"s2": "merge", "s4": "missing"}
    assert "s2 (merge)" in info.value.message and "s4 (missing)" in info.value.message
    assert story.stage is Stage.BACKLOG and story.version == 1
    send(story, "start_coding", deps={"s1": Stage.DONE, "s2": Stage.ARCHIVED, "s4": Stage.DONE})
    assert story.stage is Stage.CODING


def test_gate_failures_count_retries_then_block() -> None:
    story = story_in(Stage.CODING)
    for retry in (1, 2):
        run_coder(story)
        send(story, "start_gates")
        send(story, "gates_failed", max_retries=2)
        assert story.stage is Stage.CODING and story.retry_count == retry
        assert story.last_gate_output == "FAILED test_x"
    run_coder(story)
    send(story, "start_gates")
    send(story, "gates_failed", max_retries=2)
    assert story.stage is Stage.BLOCKED
    assert story.retry_count == 3
    assert "retries exhausted" in (story.blocked_reason or "")
    send(story, "unblock")
    assert story.stage is Stage.CODING and story.retry_count == 0


def test_aborts_count_until_a_normal_exit_resets_them() -> None:
    story = story_in(Stage.CODING)
    run_coder(story)  # a completed run records a session
    assert story.sessions == {"coder": "sess-1"}
    for n in range(1, 4):
        run_coder(story, AgentOutcome.ABORTED_BEFORE_SESSION)
        assert story.abort_respawns == n
        assert story.sessions == {}  # pruned: the next spawn starts cold
    assert story.retry_count == 0
    run_coder(story, AgentOutcome.FAILED)
    assert story.abort_respawns == 0


def test_tokens_and_cost_accumulate_over_attempts() -> None:
    story = story_in(Stage.CODING)
    run_coder(story)
    run_coder(story)
    assert (story.tokens_in, story.tokens_out) == (200, 100)
    assert story.cost_usd == pytest.approx(0.02)
    assert story.coder_attempts == 2


def test_fixup_resets_retries_and_sets_pending() -> None:
    story = story_in(Stage.MERGE_FAILURE, conflict=False)
    story.retry_count = 2  # as if it had failed gates twice before passing
    send(story, "request_fixup")
    assert story.stage is Stage.CODING
    assert story.fixup_pending and story.retry_count == 0
    run_coder(story)
    send(story, "start_gates")
    send(story, "gates_passed")
    assert not story.fixup_pending


def test_mergemaster_exit_without_verdict_counts_as_transient() -> None:
    story = story_in(Stage.MERGE_FAILURE)
    for spawn in (1, 2):
        attempt = story.request_agent_spawn(
            actor="runner:merge", role=AgentRole.MERGEMASTER, agent="mm", runtime="cli"
        )
        assert attempt == spawn
        story.agent_exited(
            actor="runner:merge",
            role=AgentRole.MERGEMASTER,
            attempt=attempt,
            outcome=AgentOutcome.COMPLETED,
        )
        assert story.mergemaster_spawns == spawn
    attempt = story.request_agent_spawn(
        actor="runner:merge", role=AgentRole.MERGEMASTER, agent="mm", runtime="cli"
    )
    send(story, "merge_resolved")
    story.agent_exited(
        actor="runner:merge",
        role=AgentRole.MERGEMASTER,
        attempt=attempt,
        outcome=AgentOutcome.COMPLETED,
    )
    assert story.stage is Stage.MERGE and story.resolved_pending
    assert story.mergemaster_spawns == 2  # a resolving exit is not transient


def test_gave_up_is_final_and_refuses_more_mergemasters() -> None:
    story = story_in(Stage.MERGE_FAILURE)
    send(story, "merge_gave_up", reason="both sides rewrote the parser")
    assert story.final
    with pytest.raises(IllegalTransition, match="already gave up"):
        send(story, "spawn_agent", data={"role": "mergemaster", "agent": "m", "runtime": "cli"})
    send(story, "requeue_merge")  # an operator may still requeue it
    assert story.stage is Stage.MERGE and not story.final


def test_mergemaster_only_for_conflicts() -> None:
    story = story_in(Stage.MERGE_FAILURE, conflict=False)
    with pytest.raises(IllegalTransition, match="conflict_detected"):
        send(story, "spawn_agent", data={"role": "mergemaster", "agent": "m", "runtime": "cli"})
    with pytest.raises(IllegalTransition):
        send(story, "merge_resolved")


def test_unblock_returns_to_the_stage_it_left() -> None:
    story = story_in(Stage.MERGE)
    send(story, "block")
    assert story.blocked_from is Stage.MERGE
    send(story, "unblock")
    assert story.stage is Stage.MERGE and story.in_merge_queue


@pytest.mark.parametrize("event", ["block", "merge_gave_up"])
def test_reason_required(event: str) -> None:
    story = story_in(Stage.MERGE_FAILURE)
    for reason in (None, "", "   "):
        with pytest.raises(InvalidCommand, match="needs a reason"):
            send(story, event, reason=reason)
    assert (
        story.stage is Stage.MERGE_FAILURE
        and story.version == story_in(Stage.MERGE_FAILURE).version
    )


def test_abandoning_needs_a_reason_but_archiving_done_does_not() -> None:
    story = story_in(Stage.BACKLOG)
    with pytest.raises(InvalidCommand):
        send(story, "archive", reason=None)
    send(story, "archive", reason="duplicate of s7")
    assert story.pending_events[-1].abandoned  # type: ignore[attr-defined]
    done = story_in(Stage.DONE)
    send(done, "archive", reason=None)
    assert done.stage is Stage.ARCHIVED


def test_second_spawn_refused_while_an_agent_runs() -> None:
    story = story_in(Stage.CODING)
    send(story, "spawn_agent")
    with pytest.raises(IllegalTransition, match="still running"):
        send(story, "spawn_agent")
    with pytest.raises(IllegalTransition, match="still running"):
        send(story, "start_gates")


def test_gates_need_a_completed_run_and_commits() -> None:
    story = story_in(Stage.CODING)
    with pytest.raises(IllegalTransition, match="did not complete"):
        send(story, "start_gates")
    run_coder(story, AgentOutcome.FAILED)
    with pytest.raises(IllegalTransition, match="did not complete"):
        send(story, "start_gates")
    run_coder(story)
    send(story, "start_gates")
    with pytest.raises(IllegalTransition, match="no commits"):
        send(story, "gates_passed", data={"feature_branch": "f", "commits_ahead": 0})


def test_unknown_event_and_bad_data_are_refused() -> None:
    story = story_in(Stage.CODING)
    with pytest.raises(UnknownEvent):
        send(story, "teleport")
    with pytest.raises(InvalidCommand, match="agent"):
        send(story, "spawn_agent", data={"role": "coder"})
    with pytest.raises(InvalidCommand, match=r"unexpected|Extra"):
        send(story, "block", data={"surprise": 1})
    assert story.version == story_in(Stage.CODING).version


@pytest.mark.parametrize(
    "bad",
    ["", "../x", "a/b", "a b", "-rf", ".hidden", "x" * 65, "a\x00b", "tab\there", "a..b", "x.lock"],
)
def test_hostile_story_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidStoryId):
        new_story(bad)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("name", "", "empty"),
        ("name", "x" * 201, "longer"),
        ("name", "bell\x07", "control"),
        ("acceptance_criteria", [], "at least one"),
        ("acceptance_criteria", [" "], "empty"),
        ("depends_on", ["s1"], "itself"),
        ("depends_on", ["a", "a"], "twice"),
    ],
)
def test_bad_story_fields_are_refused(field: str, value: Any, match: str) -> None:
    fields: dict[str, Any] = {
        "story_id": "s1",
        "name": "n",
        "description": "d",
        "acceptance_criteria": ["c"],
        "depends_on": [],
        "actor": ACTOR,
    }
    fields[field] = value
    with pytest.raises(InvalidCommand, match=match):
        Story.create(**fields)
