"""The review stage on the pure model: verdicts, conclusions, retries, refusals."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from domain.commands import Policy, apply_named
from domain.errors import IllegalTransition, InvalidField
from domain.stages import AgentOutcome, AgentRole, Stage
from domain.story import Story
from tests.unit.story_builders import ACTOR, run_coder, run_evaluator

CRITERIA = ["429 after 10 requests/s", "the limit is configurable", "documented in README"]


def reviewed_story() -> Story:
    story = Story.create(
        story_id="r1",
        name="Rate limit",
        description="uploads",
        acceptance_criteria=CRITERIA,
        depends_on=[],
        actor=ACTOR,
        review=True,
    )
    story.start_coding(actor=ACTOR, dependency_stages={})
    run_coder(story)
    story.start_gates(actor="runner:gates", commits_ahead=1)
    story.pass_gates(
        actor="runner:gates", feature_branch="feature/story-r1", commits_ahead=1, review=True
    )
    return story


def verdict(*met: bool, score: float = 0.9) -> dict[str, Any]:
    return {
        "criteria": [
            {"criterion": i, "met": m, "score": score if m else 0.2, "evidence": f"test_{i}"}
            for i, m in enumerate(met)
        ],
        "summary": "looked at the diff",
    }


def conclude(story: Story, *, min_score: float = 0.8, max_retries: int = 2) -> None:
    apply_named(
        story,
        "conclude_review",
        actor="runner:review",
        reason=None,
        data={},
        policy=Policy(max_retries=max_retries, min_score=min_score),
    )


def test_gates_passed_goes_to_review_and_out_of_the_queue() -> None:
    story = reviewed_story()
    assert story.stage is Stage.REVIEW
    assert story.review is True
    assert story.queued_at is None and not story.in_merge_queue


def test_a_verdict_with_every_criterion_met_passes_into_the_merge_queue() -> None:
    story = reviewed_story()
    run_evaluator(story, verdict(True, True, True))
    assert story.pending_review == 1
    conclude(story)
    assert story.stage is Stage.MERGE and story.in_merge_queue
    assert story.reviews[0]["passed"] is True and story.reviews[0]["score"] == 0.9
    assert story.reviews[0]["criteria"][1]["text"] == CRITERIA[1]
    assert story.pending_review is None
    assert story.retry_count == 0


def test_an_unmet_criterion_sends_the_story_back_with_its_evidence() -> None:
    story = reviewed_story()
    run_evaluator(story, verdict(True, False, True))
    conclude(story)
    assert story.stage is Stage.CODING
    assert story.retry_count == 1
    failure = story.last_review_failure
    assert failure is not None
    assert [g["criterion"] for g in failure["gaps"]] == [1]
    assert failure["gaps"][0]["evidence"] == "test_1"
    assert failure["gaps"][0]["text"] == CRITERIA[1]
    last = story.pending_events[-1]
    assert "unmet: #1 the limit is configurable" in (last.reason or "")  # type: ignore[attr-defined]


def test_every_criterion_met_but_a_low_score_also_fails() -> None:
    story = reviewed_story()
    run_evaluator(story, verdict(True, True, True, score=0.5))
    conclude(story, min_score=0.8)
    assert story.stage is Stage.CODING
    assert story.last_review_failure is not None
    assert len(story.last_review_failure["gaps"]) == 3  # the lowest-scored criteria


def test_review_failures_consume_retries_until_blocked_with_the_unmet_criteria() -> None:
    story = reviewed_story()
    for _ in range(2):
        run_evaluator(story, verdict(False, True, True))
        conclude(story, max_retries=2)
        assert story.stage is Stage.CODING
        run_coder(story)
        story.start_gates(actor="runner:gates", commits_ahead=1)
        story.pass_gates(
            actor="runner:gates", feature_branch="feature/story-r1", commits_ahead=1, review=True
        )
    run_evaluator(story, verdict(False, True, True))
    conclude(story, max_retries=2)
    assert story.stage is Stage.BLOCKED
    assert story.blocked_reason is not None
    assert "retries exhausted" in story.blocked_reason
    assert CRITERIA[0] in story.blocked_reason
    assert story.evaluator_attempts == 3 and len(story.reviews) == 3


def test_one_verdict_per_attempt_and_only_from_the_running_evaluator() -> None:
    story = reviewed_story()
    with pytest.raises(IllegalTransition, match="no evaluator is running"):
        story.submit_review(actor="agent:x", attempt=1, verdict=verdict(True, True, True))
    attempt = story.request_agent_spawn(
        actor="runner:review", role=AgentRole.EVALUATOR, agent="ev", runtime="cli"
    )
    story.agent_started(actor="runner:review", role=AgentRole.EVALUATOR, attempt=attempt, pid=9)
    story.submit_review(actor="agent:x", attempt=attempt, verdict=verdict(True, True, True))
    before = copy.deepcopy(story.snapshot())
    with pytest.raises(IllegalTransition, match="already gave its verdict"):
        story.submit_review(actor="agent:x", attempt=attempt, verdict=verdict(False, True, True))
    with pytest.raises(IllegalTransition, match="still running"):
        conclude(story)
    assert story.snapshot() == before


def test_no_new_evaluator_while_a_verdict_awaits_its_conclusion() -> None:
    story = reviewed_story()
    run_evaluator(story, verdict(True, True, True))
    with pytest.raises(IllegalTransition, match="awaits"):
        story.request_agent_spawn(
            actor="runner:review", role=AgentRole.EVALUATOR, agent="ev", runtime="cli"
        )


@pytest.mark.parametrize(
    ("criteria", "message"),
    [
        ([{"criterion": 0, "met": True, "score": 1, "evidence": "x"}], "missing: 1, 2"),
        (
            [{"criterion": i % 2, "met": True, "score": 1, "evidence": "x"} for i in range(3)],
            "judged twice",
        ),
        (
            [{"criterion": i, "met": True, "score": 1, "evidence": "x"} for i in (0, 1, 2, 7)],
            "criterion 7 does not exist",
        ),
        (
            [{"criterion": i, "met": True, "score": 1.5, "evidence": "x"} for i in range(3)],
            "malformed",
        ),
        (
            [{"criterion": i, "met": True, "score": 1, "evidence": " "} for i in range(3)],
            "malformed",
        ),
        ([], "malformed"),
    ],
)
def test_a_malformed_verdict_is_refused_and_changes_nothing(
    criteria: list[dict[str, Any]], message: str
) -> None:
    story = reviewed_story()
    attempt = story.request_agent_spawn(
        actor="runner:review", role=AgentRole.EVALUATOR, agent="ev", runtime="cli"
    )
    before = copy.deepcopy(story.snapshot())
    with pytest.raises(InvalidField, match=message):
        story.submit_review(actor="agent:x", attempt=attempt, verdict={"criteria": criteria})
    assert story.snapshot() == before


def test_evaluator_runs_without_a_verdict_are_counted_a_crash_before_a_session_is_not() -> None:
    story = reviewed_story()
    run_evaluator(story, None, AgentOutcome.ABORTED_BEFORE_SESSION)
    assert story.evaluator_failed_runs == 0 and story.abort_respawns == 1
    run_evaluator(story, None, AgentOutcome.FAILED)
    run_evaluator(story, None, AgentOutcome.FAILED)
    assert story.evaluator_failed_runs == 2
    assert story.retry_count == 0 and story.stage is Stage.REVIEW
    run_evaluator(story, verdict(True, True, True))
    conclude(story)
    assert story.evaluator_failed_runs == 0


def test_blocked_in_review_resumes_review_with_the_pending_verdict() -> None:
    story = reviewed_story()
    run_evaluator(story, verdict(True, True, True))
    story.block(actor=ACTOR, reason="hold on")
    story.unblock(actor=ACTOR)
    assert story.stage is Stage.REVIEW and story.pending_review == 1
    conclude(story)
    assert story.stage is Stage.MERGE


def test_demoting_from_review_drops_the_pending_verdict() -> None:
    story = reviewed_story()
    run_evaluator(story, verdict(True, True, True))
    story.demote(actor=ACTOR, reason="rethink")
    assert story.stage is Stage.BACKLOG and story.pending_review is None


def test_a_story_created_with_a_non_boolean_review_flag_is_refused() -> None:
    with pytest.raises(InvalidField, match="review"):
        Story.create(
            story_id="r2",
            name="n",
            description="d",
            acceptance_criteria=["a"],
            depends_on=[],
            actor=ACTOR,
            review="yes",  # type: ignore[arg-type]
        )
