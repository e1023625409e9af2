"""Random command sequences: no illegal state, refusals change nothing, replay is exact."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.commands import Policy, apply_named
from domain.errors import DomainError
from domain.stages import FINISHED_STAGES, Stage
from domain.story import Story
from domain.transitions import EVENT_NAMES
from service.codec import OrjsonTranscoder, PydanticMapper
from tests.unit.story_builders import new_story

MAPPER = PydanticMapper(transcoder=OrjsonTranscoder())


def data_for(event: str, draw: Any, story: Story) -> dict[str, Any]:
    """Plausible data for ``event`` (sometimes wrong, so guards get exercised)."""
    role = draw(st.sampled_from(["coder", "mergemaster"]))
    running = story.running_agent or {}
    attempt = draw(st.sampled_from([running.get("attempt") or 1, 1, 2, 7]))
    if running and draw(st.booleans()):
        role = running["role"]
    match event:
        case "spawn_agent":
            return {"role": role, "agent": "a", "runtime": "cli"}
        case "agent_started":
            return {"role": role, "attempt": attempt, "pid": draw(st.integers(1, 99999))}
        case "agent_exited":
            return {
                "role": role,
                "attempt": attempt,
                "outcome": draw(
                    st.sampled_from(["completed", "aborted_before_session", "failed", "inactive"])
                ),
                "session_id": draw(st.sampled_from([None, "s-1", "s-2"])),
                "tokens_in": draw(st.integers(0, 1000)),
                "tokens_out": draw(st.integers(0, 1000)),
                "cost_usd": draw(st.floats(0, 2, allow_nan=False)),
            }
        case "worktree_ready":
            return {"path": "/wt", "branch": "feature/story-s1"}
        case "uncommitted_changes_found":
            return {"paths": ["x.py"]}
        case "start_gates":
            return {"commits_ahead": draw(st.integers(0, 3))}
        case "gates_passed":
            return {"feature_branch": "feature/story-s1", "commits_ahead": draw(st.integers(0, 3))}
        case "gates_failed":
            return {"output": draw(st.text(max_size=30))}
        case "start_merge":
            return {"base_sha": "abc"}
        case "merge_succeeded":
            return {"merge_commit": "c0ffee", "base_branch": "main"}
        case "merge_failed":
            return {
                "kind": draw(
                    st.sampled_from(["conflict_detected", "gates_failed", "no_commits", "other"])
                ),
                "details": "x",
            }
    return {}


def assert_invariants(story: Story, max_retries: int) -> None:
    assert isinstance(story.stage, Stage)
    assert story.retry_count >= 0 and story.abort_respawns >= 0 and story.mergemaster_spawns >= 0
    assert story.tokens_in >= 0 and story.tokens_out >= 0 and story.cost_usd >= 0
    if story.merging or story.queued_at is not None:
        assert story.stage is Stage.MERGE
    if story.stage is Stage.BLOCKED:
        assert story.blocked_from is not None and story.blocked_reason
    if story.stage is Stage.MERGE_FAILURE:
        assert story.merge_failure_kind is not None
    if story.stage is not Stage.BLOCKED:
        assert story.retry_count <= max_retries
    if story.stage in FINISHED_STAGES:
        assert story.merge_commit is not None or story.stage is Stage.ARCHIVED


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), max_retries=st.integers(0, 3))
def test_random_command_sequences(data: st.DataObject, max_retries: int) -> None:
    story = new_story()
    events = list(story.collect_events())
    for _ in range(data.draw(st.integers(5, 60), label="length")):
        event = data.draw(st.sampled_from(EVENT_NAMES), label="event")
        payload = data_for(event, data.draw, story)
        reason = data.draw(st.sampled_from([None, "", "because"]), label="reason")
        deps_done = data.draw(st.booleans())
        before = copy.deepcopy(story.snapshot())
        try:
            apply_named(
                story,
                event,
                actor="user:fuzz",
                reason=reason,
                data=payload,
                policy=Policy(max_retries=max_retries),
                dependency_stages={} if deps_done else {"x": Stage.CODING},
            )
        except DomainError:
            assert story.snapshot() == before, f"refused {event} changed the story"
            assert not story.pending_events
            continue
        new = story.collect_events()
        assert len(new) == 1
        events.extend(new)
        assert_invariants(story, max_retries)

    # Replaying the stored form of every event rebuilds exactly the same state.
    replayed: Story | None = None
    for event in events:
        domain_event = MAPPER.to_domain_event(MAPPER.to_stored_event(event))
        replayed = domain_event.mutate(replayed)  # type: ignore[attr-defined]
    assert replayed is not None
    assert replayed.snapshot() == story.snapshot()
    assert replayed.version == len(events)


def test_dependencies_are_derived_not_trusted() -> None:
    story = new_story("s2", depends_on=["s1"])
    try:
        apply_named(
            story,
            "start_coding",
            actor="user:x",
            reason=None,
            data={},
            policy=Policy(),
            dependency_stages={"s1": Stage.CODING},
        )
    except DomainError as exc:
        assert "s1 (coding)" in exc.message
    else:  # pragma: no cover - the guard must refuse
        raise AssertionError("start_coding ignored an unfinished dependency")
    assert story.stage is Stage.BACKLOG
