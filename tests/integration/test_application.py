"""The application layer on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from domain.errors import (
    DependenciesNotDone,
    IllegalTransition,
    InvalidStoryId,
    StoryExists,
    StoryNotFound,
    VersionConflict,
)
from domain.stages import Stage
from service.application import StorylineApplication
from service.settings import Database

CRITERIA = ["it works"]


def create(app: StorylineApplication, **kwargs: object) -> str:
    fields: dict[str, object] = {
        "name": "story",
        "description": "d",
        "acceptance_criteria": CRITERIA,
        "actor": "user:alice",
    }
    fields.update(kwargs)
    return app.create_story(**fields).story.id  # type: ignore[arg-type]


def test_create_allocates_sequential_ids(app: StorylineApplication) -> None:
    assert [create(app) for _ in range(3)] == ["1", "2", "3"]
    assert create(app, story_id="auth-42") == "auth-42"
    assert create(app) == "4"
    with pytest.raises(StoryExists):
        create(app, story_id="auth-42")


def test_new_application_continues_numbering(database: Database) -> None:
    first = StorylineApplication(database)
    create(first)
    create(first)
    first.close()
    second = StorylineApplication(database)
    try:
        assert create(second) == "3"
    finally:
        second.close()


def test_transition_records_actor_reason_and_stages(app: StorylineApplication) -> None:
    sid = create(app)
    committed = app.transition(sid, "start_coding", actor="user:bob", expected_version=1)
    assert committed.story.stage is Stage.CODING
    committed = app.transition(sid, "block", actor="user:carol", reason="needs a database")
    history = app.history(sid)
    assert [e.type for e in history] == ["StoryCreated", "CodingStarted", "StoryBlocked"]
    blocked = history[-1]
    assert blocked.actor == "user:carol"
    assert blocked.reason == "needs a database"
    assert (blocked.from_stage, blocked.to_stage) == ("coding", "blocked")
    assert blocked.position == committed.position
    assert [e.version for e in history] == [1, 2, 3]
    assert history == sorted(history, key=lambda e: e.position)


def test_stale_expected_version_is_a_conflict_naming_both(app: StorylineApplication) -> None:
    sid = create(app)
    app.transition(sid, "start_coding", actor="user:a", expected_version=1)
    with pytest.raises(VersionConflict) as info:
        app.transition(sid, "block", actor="user:a", reason="r", expected_version=1)
    assert (info.value.expected, info.value.current) == (1, 2)
    assert "version 2" in info.value.message and "expected version 1" in info.value.message
    assert app.get_story(sid).stage is Stage.CODING
    assert len(app.history(sid)) == 2


def test_refusals_change_nothing_in_the_store(app: StorylineApplication) -> None:
    dep = create(app)
    sid = create(app, depends_on=[dep])
    head = app.max_position()
    with pytest.raises(DependenciesNotDone, match=f"{dep} \\(backlog\\)"):
        app.transition(sid, "start_coding", actor="user:a")
    with pytest.raises(IllegalTransition):
        app.transition(sid, "unblock", actor="user:a")
    with pytest.raises(StoryNotFound):
        app.transition("nope", "start_coding", actor="user:a")
    with pytest.raises(InvalidStoryId):
        app.transition("../../etc", "start_coding", actor="user:a")
    with pytest.raises(StoryNotFound):
        create(app, depends_on=["missing"])
    assert app.max_position() == head


def test_dependent_starts_once_dependency_is_done_or_archived(app: StorylineApplication) -> None:
    dep = create(app)
    sid = create(app, depends_on=[dep])
    app.transition(dep, "archive", actor="user:a", reason="not needed after all")
    app.transition(sid, "start_coding", actor="user:a")
    assert app.get_story(sid).stage is Stage.CODING


def test_as_of_position_and_time(app: StorylineApplication) -> None:
    sid = create(app)
    created_at = app.history(sid)[0].timestamp
    moved = app.transition(sid, "start_coding", actor="user:a")
    app.transition(sid, "block", actor="user:a", reason="wait")
    assert app.get_story(sid).stage is Stage.BLOCKED
    assert app.get_story_as_of(sid, position=moved.position).stage is Stage.CODING
    assert app.get_story_as_of(sid, position=moved.position - 1).stage is Stage.BACKLOG
    assert app.get_story_as_of(sid, at=created_at).stage is Stage.BACKLOG
    assert app.get_story_as_of(sid, at=datetime.now(UTC)).stage is Stage.BLOCKED
    with pytest.raises(StoryNotFound):
        app.get_story_as_of(sid, at=created_at - timedelta(seconds=1))


def test_global_log_pages_in_order(app: StorylineApplication) -> None:
    ids = [create(app) for _ in range(5)]
    for sid in ids:
        app.transition(sid, "start_coding", actor="user:a")
    first = app.events_after(0, limit=4)
    rest = app.events_after(first[-1].position, limit=100)
    log = first + rest
    assert len(log) == 10
    assert [e.position for e in log] == sorted({e.position for e in log})
    assert [e.type for e in log[:5]] == ["StoryCreated"] * 5
    assert app.events_after(log[-1].position) == []


def test_two_writers_race_exactly_one_wins(database: Database) -> None:
    setup = StorylineApplication(database)
    sid = create(setup)
    setup.close()
    writers = [StorylineApplication(database) for _ in range(2)]
    stories = [w.get_story(sid) for w in writers]  # both load version 1
    assert all(s.version == 1 for s in stories)
    barrier = threading.Barrier(2)
    results: list[object] = [None, None]

    def run(i: int) -> None:
        story = stories[i]
        story.start_coding(actor=f"user:w{i}", dependency_stages={})
        barrier.wait()
        try:
            writers[i].save(story)
            results[i] = "ok"
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(type(r).__name__ if r != "ok" else "ok" for r in results) == [
        "IntegrityError",
        "ok",
    ]
    # Through the application layer the loser sees a VersionConflict.
    with pytest.raises(VersionConflict):
        writers[0].transition(sid, "block", actor="user:w0", reason="r", expected_version=1)
    assert [e.type for e in writers[1].history(sid)] == ["StoryCreated", "CodingStarted"]
    for w in writers:
        w.close()


def test_concurrent_transitions_through_application(database: Database) -> None:
    setup = StorylineApplication(database)
    sid = create(setup)
    setup.close()
    apps = [StorylineApplication(database) for _ in range(4)]
    outcomes: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(apps))

    def run(a: StorylineApplication) -> None:
        barrier.wait()
        try:
            a.transition(sid, "start_coding", actor="user:x", expected_version=1)
            result = "ok"
        except (VersionConflict, IllegalTransition):
            result = "conflict"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=run, args=(a,)) for a in apps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "ok"]
    assert len(apps[0].history(sid)) == 2
    for a in apps:
        a.close()


def test_events_are_stored_under_pinned_topics(app: StorylineApplication) -> None:
    sid = create(app)
    app.transition(sid, "start_coding", actor="user:a")
    assert [e.topic for e in app.history(sid)] == [
        "storyline.StoryCreated.v1",
        "storyline.CodingStarted.v1",
    ]


def test_commit_listeners_hear_positions(app: StorylineApplication) -> None:
    heard: list[int] = []
    app.add_commit_listener(heard.append)
    app.add_commit_listener(lambda _: (_ for _ in ()).throw(RuntimeError("broken follower")))
    committed = app.create_story(
        name="n", description="d", acceptance_criteria=CRITERIA, actor="user:a"
    )
    assert heard == [committed.position]


def test_head_revision_read_from_files_matches_alembic() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from service import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations.SCRIPT_LOCATION))
    assert migrations.head_revision() == ScriptDirectory.from_config(cfg).get_current_head()


def test_migrated_database_reports_the_head(database: Database) -> None:
    from service import migrations

    assert migrations.current_revision(database) == migrations.head_revision()
    assert migrations.is_up_to_date(database)
