"""Notes never fail a runner's command: an expected version that is stale only by notes
still applies, on each backend, also when the note lands between the command's read and
its write; any other event in between is still a version conflict."""

from __future__ import annotations

from typing import Any

import pytest

from domain.errors import VersionConflict
from service.application import StorylineApplication
from service.settings import Database


def coding_story(app: StorylineApplication) -> str:
    sid = str(
        app.create_story(
            name="notes", description="", acceptance_criteria=["ok"], actor="user:t"
        ).story.id
    )
    app.transition(sid, "start_coding", actor="user:t")
    return sid


def test_a_version_stale_only_by_notes_still_applies(database: Database) -> None:
    runner = StorylineApplication(database)
    agent = StorylineApplication(database)
    try:
        sid = coding_story(runner)
        seen = runner.get_story(sid).version
        agent.transition(sid, "add_note", actor="agent:coder-1-1", reason="looking at it")
        agent.transition(sid, "add_note", actor="user:alice", reason="take your time")
        committed = runner.transition(
            sid,
            "worktree_ready",
            actor="runner:coder",
            expected_version=seen,
            data={"path": "/w/1", "branch": "feature/story-1"},
        )
        assert committed.story.version == seen + 3
        assert [e.type for e in runner.history(sid)][-3:] == [
            "NoteAdded",
            "NoteAdded",
            "WorktreeReady",
        ]

        # A real step in between is still a lost race.
        seen = runner.get_story(sid).version
        agent.transition(sid, "block", actor="user:alice", reason="infra is down")
        with pytest.raises(VersionConflict):
            runner.transition(sid, "demote", actor="user:t", expected_version=seen)
    finally:
        runner.close()
        agent.close()


def test_a_note_committed_between_read_and_write_does_not_fail_the_command(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = StorylineApplication(database)
    agent = StorylineApplication(database)
    try:
        sid = coding_story(runner)
        seen = runner.get_story(sid).version
        runner._recent.forget(sid)  # the command reads the store, then saves
        real_save = runner.save
        notes: list[int] = []

        def save_after_a_note(*args: Any, **kwargs: Any) -> Any:
            if not notes:
                notes.append(
                    agent.transition(sid, "add_note", actor="agent:coder-1-1", reason="hi").position
                )
            return real_save(*args, **kwargs)

        monkeypatch.setattr(runner, "save", save_after_a_note)
        committed = runner.transition(
            sid,
            "worktree_ready",
            actor="runner:coder",
            expected_version=seen,
            data={"path": "/w/1", "branch": "feature/story-1"},
        )
        assert notes and committed.position > notes[0]
        assert [e.type for e in runner.history(sid)][-2:] == ["NoteAdded", "WorktreeReady"]
    finally:
        runner.close()
        agent.close()
