"""Build stories in every stage through their real command methods (no I/O)."""

from __future__ import annotations

from domain.stages import AgentOutcome, AgentRole, MergeFailureKind, Stage
from domain.story import Story

ACTOR = "user:test"


def new_story(story_id: str = "s1", depends_on: list[str] | None = None) -> Story:
    return Story.create(
        story_id=story_id,
        name="Add rate limiting",
        description="to the upload endpoint",
        acceptance_criteria=["429 after 10 requests/s"],
        depends_on=depends_on or [],
        actor=ACTOR,
    )


def run_coder(story: Story, outcome: AgentOutcome = AgentOutcome.COMPLETED) -> int:
    attempt = story.request_agent_spawn(
        actor="runner:coder", role=AgentRole.CODER, agent="coder", runtime="cli"
    )
    story.agent_started(actor="runner:coder", role=AgentRole.CODER, attempt=attempt, pid=4242)
    story.agent_exited(
        actor="runner:coder",
        role=AgentRole.CODER,
        attempt=attempt,
        outcome=outcome,
        session_id=None if outcome is AgentOutcome.ABORTED_BEFORE_SESSION else f"sess-{attempt}",
        tokens_in=100,
        tokens_out=50,
        cost_usd=0.01,
    )
    return attempt


def story_in(stage: Stage, *, conflict: bool = True) -> Story:
    """A fresh story brought to ``stage`` along the main path."""
    story = new_story()
    if stage is Stage.BACKLOG:
        return story
    story.start_coding(actor=ACTOR, dependency_stages={})
    if stage is Stage.CODING:
        return story
    if stage is Stage.BLOCKED:
        story.block(actor=ACTOR, reason="waiting for infra")
        return story
    run_coder(story)
    story.start_gates(actor="runner:gates", commits_ahead=1)
    if stage is Stage.GATES:
        return story
    if stage is Stage.REVIEW:
        story.pass_gates(
            actor="runner:gates", feature_branch="feature/story-s1", commits_ahead=1, review=True
        )
        return story
    story.pass_gates(actor="runner:gates", feature_branch="feature/story-s1", commits_ahead=1)
    if stage is Stage.MERGE:
        return story
    story.start_merge(actor="runner:merge", base_sha="abc")
    if stage is Stage.MERGE_FAILURE:
        story.fail_merge(
            actor="runner:merge",
            kind=MergeFailureKind.CONFLICT_DETECTED if conflict else MergeFailureKind.GATES_FAILED,
            details="CONFLICT (content): Merge conflict in app.py",
            conflicts=["app.py"],
        )
        return story
    story.succeed_merge(actor="runner:merge", merge_commit="def", base_branch="main")
    if stage is Stage.DONE:
        return story
    story.archive(actor=ACTOR)
    assert stage is Stage.ARCHIVED
    return story


def run_evaluator(
    story: Story,
    verdict: dict[str, object] | None,
    outcome: AgentOutcome = AgentOutcome.COMPLETED,
) -> int:
    """One evaluator attempt in review: spawned, started, its verdict (if any), its exit."""
    attempt = story.request_agent_spawn(
        actor="runner:review", role=AgentRole.EVALUATOR, agent="evaluator", runtime="cli"
    )
    story.agent_started(actor="runner:review", role=AgentRole.EVALUATOR, attempt=attempt, pid=4343)
    if verdict is not None:
        story.submit_review(
            actor=f"agent:evaluator-{story.id}-{attempt}", attempt=attempt, verdict=verdict
        )
    story.agent_exited(
        actor="runner:review", role=AgentRole.EVALUATOR, attempt=attempt, outcome=outcome
    )
    return attempt
