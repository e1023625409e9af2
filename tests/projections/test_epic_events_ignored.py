"""Epic events share the log with stories: every story reader skips them, the log keeps them.

The epic events here are raw rows written through the application's recorder, as the Epic
aggregate stores its events (same table, originator id ``epic-<n>``). Raw, so the readers
are shown to skip them by their id, whatever they hold: some carry stages and even story
agent-event topics, which a story reducer would fold into rows if it saw them.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from eventsourcing.persistence import StoredEvent
from sqlalchemy import text

from api.client import parse_sse
from domain.config import StorylineConfig
from domain.epic import Epic
from domain.errors import StoryNotFound
from domain.events import AgentExited, AgentSpawnRequested
from projections import ProjectionRunner, ReadModels
from projections.workload import drive_app
from runners.index import StoryIndex
from runners.supervisor import Supervisor
from service.application import StorylineApplication, events_table
from service.container import Service
from service.settings import Database
from tests.api.conftest import make_service, start_server
from tests.projections.conftest import dump_projection_tables

STORY_TABLES = ("board", "merge_queue", "agent_runs", "story_metrics", "stage_metrics")
EPIC_CREATED = "storyline.EpicCreated.v1"


class EpicLog:
    """Writes epic events into the event store and remembers their positions."""

    def __init__(self, app: StorylineApplication) -> None:
        self.app = app
        self.versions: dict[str, int] = {}
        self.positions: list[int] = []

    def record(self, epic_id: str, topic: str, **fields: Any) -> int:
        version = self.versions.get(epic_id, 0) + 1
        state = {
            "timestamp": datetime.now(UTC).isoformat(),
            "actor": "user:lead",
            "reason": None,
            "from_stage": None,
            "to_stage": None,
            **fields,
        }
        stored = StoredEvent(
            originator_id=epic_id,
            originator_version=version,
            topic=topic,
            state=orjson.dumps(state),
        )
        ids = self.app.recorder.insert_events([stored])
        assert ids
        self.versions[epic_id] = version
        self.positions.append(int(ids[-1]))
        return self.positions[-1]

    def cycle(self, epic_id: str) -> None:
        """The epic's creation, or a round of events a story reducer would fold."""
        if epic_id not in self.versions:
            self.record(
                epic_id,
                EPIC_CREATED,
                originator_topic="domain.epic:Epic",
                name=f"epic {epic_id}",
                goal="ship it",
                to_stage="backlog",
            )
            return
        attempt = self.versions[epic_id]
        self.record(epic_id, "storyline.EpicPlanned.v1", from_stage="backlog", to_stage="merge")
        self.record(
            epic_id,
            AgentSpawnRequested.TOPIC,
            role="coder",
            attempt=attempt,
            agent="planner",
            runtime="claude-code",
        )
        self.record(
            epic_id,
            AgentExited.TOPIC,
            class_version=2,
            role="coder",
            attempt=attempt,
            outcome="completed",
            tokens_in=100,
            tokens_out=10,
            cost_usd=1.5,
        )


def save_epic(app: StorylineApplication, epic_id: str, *, blocked: bool = False) -> Epic:
    """A real epic (the Epic aggregate's own events); blocked, no runner acts on it."""
    epic = Epic.create(
        epic_id=epic_id,
        name=f"epic {epic_id}",
        goal="ship it",
        acceptance_criteria=["it ships"],
        actor="user:lead",
    )
    if blocked:
        epic.block(actor="user:lead", reason="not yet")
    app.save(epic)
    return epic


def create(app: StorylineApplication, story_id: str, **kw: Any) -> int:
    return app.create_story(
        story_id=story_id,
        name=f"story {story_id}",
        description="",
        acceptance_criteria=["it works"],
        actor="user:test",
        **kw,
    ).position


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_epic_events_leave_the_story_tables_as_a_log_without_them(
    database: Database,
    app: StorylineApplication,
    runner: ProjectionRunner,
    read_models: ReadModels,
) -> None:
    epics = EpicLog(app)
    commits = itertools.count()

    def on_commit(_position: int) -> None:
        n = next(commits)
        if n % 7 == 3:
            epics.cycle(f"epic-{1 + n % 2}")
        if n % 19 == 0:
            runner.run_once()  # followed live, in small batches, epics among them

    drive_app(app, random.Random(5), stories=12, steps=260, on_commit=on_commit)
    epics.cycle("epic-3")  # the log ends with an epic event
    runner.run_once()
    head = app.max_position()
    assert len(epics.positions) > 20

    live = dump_projection_tables(read_models)
    # The audit trail keeps every event, the epics' too.
    assert len(live["story_history"]) == head
    epic_history = [row for row in live["story_history"] if row[1].startswith("epic-")]
    assert [row[0] for row in epic_history] == epics.positions
    for table in ("board", "merge_queue", "agent_runs", "story_metrics"):
        assert not [row for row in live[table] if str(row[0]).startswith("epic-")], table
    assert runner.check() == {}
    assert runner.rebuild() == head
    assert dump_projection_tables(read_models) == live

    # The same log without the epic events gives the very same story tables.
    with read_models.engine.begin() as conn:
        deleted = conn.execute(
            text(f"DELETE FROM {events_table(database)} WHERE originator_id LIKE 'epic-%'")
        )
        assert deleted.rowcount == len(epics.positions)
    runner.rebuild()
    without = dump_projection_tables(read_models)
    for table in STORY_TABLES:
        assert without[table] == live[table], table
    assert without["story_history"] == [
        row for row in live["story_history"] if not row[1].startswith("epic-")
    ]


def test_story_queries_and_read_models_leave_epics_out(
    app: StorylineApplication, runner: ProjectionRunner, read_models: ReadModels
) -> None:
    epics = EpicLog(app)
    create(app, "1", epic="epic-1")
    epics.cycle("epic-1")
    create(app, "2")
    epics.cycle("epic-1")
    epics.cycle("epic-2")
    save_epic(app, "epic-3")
    head = app.max_position()

    assert app.story_ids() == ["1", "2"]
    assert [s.id for s in app.iter_stories()] == ["1", "2"]
    for query in (
        lambda: app.get_story("epic-1"),
        lambda: app.get_story_as_of("epic-1", position=head),
        lambda: app.get_story_as_of("epic-2", at=datetime.now(UTC)),
        lambda: app.get_story("epic-3"),  # a real epic: loading it as a story is refused
        lambda: app.get_story_as_of("epic-3", position=head),
        lambda: app.transition("epic-1", "block", actor="user:test", reason="r"),
    ):
        with pytest.raises(StoryNotFound):
            query()
    # An epic's history is the epic service's: the story history refuses the id.
    with pytest.raises(StoryNotFound):
        app.history("epic-1")

    runner.run_once()
    assert [row["id"] for row in read_models.board_as_of(head)] == ["1", "2"]
    assert read_models.board_row("epic-1") is None
    assert read_models.merge_queue() == []
    assert read_models.agent_runs("epic-1") == []
    assert read_models.agent_runs() == []
    assert set(read_models.metrics()["story_cost_usd"]) == {"1", "2"}

    history = read_models.history(limit=1000)
    assert [e["position"] for e in history] == list(range(1, head + 1))
    assert {(e["story_id"], e["aggregate"]) for e in history} == {
        ("1", "story"),
        ("2", "story"),
        ("epic-1", "epic"),
        ("epic-2", "epic"),
        ("epic-3", "epic"),
    }
    # Keys and values as the log itself gives them.
    assert history == [e.as_json() for e in app.events_after(0, 1000)]
    assert [e["type"] for e in read_models.history("epic-1")] == [
        "EpicCreated",
        "EpicPlanned",
        "AgentSpawnRequested",
        "AgentExited",
    ]


def test_the_runner_never_steps_an_epic_as_a_story_and_notes_which_epics_changed(
    database: Database, app: StorylineApplication, tmp_path: Path
) -> None:
    create(app, "s1", epic="epic-1")
    save_epic(app, "epic-1", blocked=True)
    epic_2 = save_epic(app, "epic-2", blocked=True)
    create(app, "s2", epic="not an epic id, a label")

    service = Service(project=tmp_path, db=database, config=StorylineConfig(), app=app)
    supervisor = Supervisor(service)
    stepped: list[str] = []
    supervisor.after_step = stepped.append
    try:
        supervisor._tick()  # one pass of the loop: fold the log in, step what it touched
        assert wait_until(supervisor.idle)
    finally:
        supervisor.stop(kill_agents=False)  # waits for the steps' last bookkeeping
    # An epic may be stepped by an epic runner, never as a story: nothing failed, and the
    # story index holds the stories only.
    assert {"s1", "s2"} <= set(stepped) <= {"s1", "s2", "epic-1", "epic-2"}
    assert supervisor.status().errors == []
    assert supervisor.index.position == app.max_position()
    assert [s.story_id for s in supervisor.index.in_stage("backlog")] == ["s1", "s2"]
    assert supervisor.index.get("epic-1") is None
    assert supervisor.index.stage_of("epic-2") is None

    # What an epic runner learns: epics with events of their own, and epics whose stories
    # were created or moved; each once per change.
    index = StoryIndex()
    assert index.catch_up(app) == {"s1", "s2"}
    assert index.take_epics() == {"epic-1", "epic-2"}
    assert index.take_epics() == set()
    app.transition("s2", "start_coding", actor="user:test")
    assert index.catch_up(app) == {"s2"}
    assert index.take_epics() == set()  # s2's "epic" is a free-form label
    app.transition("s1", "start_coding", actor="user:test")
    assert index.catch_up(app) == {"s1"}
    assert index.take_epics() == {"epic-1"}
    epic_2.add_note(actor="user:lead", text="still waiting")
    app.save(epic_2)
    assert index.catch_up(app) == set()
    assert index.take_epics() == {"epic-2"}
    assert index.position == app.max_position()


def test_the_log_api_and_the_stream_deliver_epic_events(database: Database, tmp_path: Path) -> None:
    service = make_service(database, tmp_path)
    read_models = ReadModels(database)
    live = start_server(service, read_models, tokens=[])
    try:
        app = service.app
        create(app, "1")
        save_epic(app, "epic-1")
        epic_position = app.max_position()
        create(app, "2")
        client = live.client()

        page = client.get("/events", params={"after": 0}).json()
        assert [(e["story_id"], e["aggregate"], e["type"]) for e in page["events"]] == [
            ("1", "story", "StoryCreated"),
            ("epic-1", "epic", "EpicCreated"),
            ("2", "story", "StoryCreated"),
        ]

        received: list[dict[str, str]] = []
        with client.stream("GET", "/events/stream", params={"after": 0}) as response:
            assert response.status_code == 200
            for message in parse_sse(response.iter_lines()):
                received.append(message)
                if len(received) == 3:
                    break
        assert [m["event"] for m in received] == ["StoryCreated", "EpicCreated", "StoryCreated"]
        epic = orjson.loads(received[1]["data"])
        assert int(received[1]["id"]) == epic["position"] == epic_position
        assert epic["story_id"] == "epic-1" and epic["aggregate"] == "epic"
        assert epic["to_stage"] == "planning" and epic["actor"] == "user:lead"
        assert epic["data"]["goal"] == "ship it"
        assert epic["data"]["acceptance_criteria"] == ["it ships"]
        assert orjson.loads(received[0]["data"])["aggregate"] == "story"
        assert page["events"][1] == epic

        # A story route asked for an epic: not found, not a server error.
        assert client.get("/stories/epic-1").status_code == 404
    finally:
        live.stop()
        read_models.close()
        service.close()
