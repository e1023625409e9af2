"""Commands start from this process's last committed state of a story, not a fresh read.

Another process (here: a second application on the same database) may have committed
since. Whatever the remembered state says, the outcome must be the one the store's state
gives: the insert of the next version is refused by the (story, version) key and the
command runs again on the store's state; a refusal by the guards is re-decided too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from domain.errors import IllegalTransition, VersionConflict
from domain.stages import Stage
from service.application import StorylineApplication
from service.settings import Database


@pytest.fixture
def two(database: Database) -> Iterator[tuple[StorylineApplication, StorylineApplication]]:
    first, second = StorylineApplication(database), StorylineApplication(database)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def create(app: StorylineApplication, story_id: str) -> str:
    return app.create_story(
        story_id=story_id,
        name="story",
        description="d",
        acceptance_criteria=["it works"],
        actor="user:alice",
    ).story.id


def test_a_command_refused_on_the_remembered_state_is_decided_on_the_store(
    two: tuple[StorylineApplication, StorylineApplication],
) -> None:
    first, second = two
    sid = create(first, "s1")
    first.transition(sid, "block", actor="user:alice", reason="wait")  # first remembers blocked
    second.transition(sid, "unblock", actor="user:bob")  # back in the backlog
    committed = first.transition(sid, "start_coding", actor="user:alice")
    assert committed.story.stage is Stage.CODING
    assert committed.story.version == 4
    assert [e.type for e in first.history(sid)][-1] == "CodingStarted"


def test_a_command_legal_on_both_states_records_the_store_state(
    two: tuple[StorylineApplication, StorylineApplication],
) -> None:
    first, second = two
    sid = create(first, "s2")  # first remembers backlog, version 1
    second.transition(sid, "block", actor="user:bob", reason="wait")
    committed = first.transition(sid, "archive", actor="user:alice", reason="dropped")
    assert committed.story.stage is Stage.ARCHIVED
    assert committed.story.version == 3
    archived = first.history(sid)[-1]
    assert archived.type == "StoryArchived"
    assert archived.from_stage == "blocked"  # not the remembered backlog


def test_expected_version_is_checked_against_the_store(
    two: tuple[StorylineApplication, StorylineApplication],
) -> None:
    first, second = two
    sid = create(first, "s3")
    second.transition(sid, "block", actor="user:bob", reason="wait")
    # The caller knows version 2 (first only remembers 1): accepted.
    first.transition(sid, "unblock", actor="user:alice", expected_version=2)
    with pytest.raises(VersionConflict):
        first.transition(sid, "start_coding", actor="user:alice", expected_version=2)
    assert second.get_story(sid).version == 3


def test_a_refused_command_leaves_the_remembered_state_intact(
    two: tuple[StorylineApplication, StorylineApplication],
) -> None:
    first, _ = two
    sid = create(first, "s4")
    with pytest.raises(IllegalTransition):
        first.transition(
            sid,
            "gates_passed",
            actor="user:alice",
            data={"feature_branch": "feature/story-s4", "commits_ahead": 1},
        )
    committed = first.transition(sid, "start_coding", actor="user:alice", expected_version=1)
    assert committed.story.version == 2
    again = first.transition(sid, "block", actor="user:alice", reason="r", expected_version=2)
    assert again.story.stage is Stage.BLOCKED
    assert again.story.blocked_from is Stage.CODING
