"""The application layer: the one door to the Story model.

Commands (create, transition) load a story, run the domain's guard and save the new event
with optimistic concurrency; queries (get, as-of, history, the global log) replay or read the
event store. The API, the CLI and the runners all call this class.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, Mapper, StoredEvent

from domain.commands import Policy, apply_named
from domain.errors import DomainError, StoryExists, StoryNotFound, VersionConflict
from domain.events import StoryCreated, StoryEvent
from domain.ids import is_epic_id, validate_story_id
from domain.stages import Stage
from domain.story import Story
from service.codec import OrjsonTranscoder, PydanticMapper
from service.events_log import LoggedEvent, decode_row
from service.idempotency import MARK_KWARG, IdempotencyMark
from service.settings import Database

logger = logging.getLogger(__name__)


def events_table(db: Database) -> str:
    """The library names the SQLite table itself; on PostgreSQL it follows the app name."""
    return "storyline_events" if db.kind == "postgres" else "stored_events"


def position_column(db: Database) -> str:
    return "notification_id" if db.kind == "postgres" else "rowid"


AGGREGATE_CACHE_SIZE = 256
"""Stories kept decoded per process (see ``persistence_env``)."""


def persistence_env(db: Database, *, pool_size: int = 5) -> dict[str, str]:
    """The eventsourcing library's environment for ``db``; tables are never created here."""
    common = {
        "ORIGINATOR_ID_TYPE": "text",
        "CREATE_TABLE": "no",
        # Commands on a story load it first: with the cache a load decodes only the events
        # committed since the cached version (fast-forward, one query), instead of the
        # whole history. Fast-forward keeps several processes correct: every load still
        # asks the store what is newer. Bounded, because a story can hold megabytes of
        # gate output; the working set (stories being driven) is small.
        "AGGREGATE_CACHE_MAXSIZE": str(AGGREGATE_CACHE_SIZE),
        "AGGREGATE_CACHE_FASTFORWARD": "y",
    }
    if db.kind == "sqlite":
        return {
            **common,
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(db.sqlite_path),
            "SQLITE_LOCK_TIMEOUT": "30",
            # The library's recorder, marking idempotency keys (service/recorder.py).
            "APPLICATION_RECORDER_TOPIC": "service.recorder:StorylineSQLiteRecorder",
        }
    return {
        **common,
        # The library's PostgreSQL persistence with a cheaper pool check (service/pg_pool.py).
        "PERSISTENCE_MODULE": "service.pg_pool:StorylinePostgresFactory",
        "POSTGRES_DBNAME": db.dbname,
        "POSTGRES_HOST": db.host,
        "POSTGRES_PORT": str(db.port),
        "POSTGRES_USER": db.user,
        "POSTGRES_PASSWORD": db.password,
        "POSTGRES_ENABLE_DB_FUNCTIONS": "yes",
        # The library's recorder with cheaper hot statements (service/recorder.py).
        "APPLICATION_RECORDER_TOPIC": "service.recorder:StorylinePostgresRecorder",
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": "10",
        # How long a command waits for a pooled connection (the library names it so): an
        # outage is answered 503 in about this plus the recorder's retry budget.
        "POSTGRES_CONNECT_TIMEOUT": "5",
        # A pooled connection is checked when it is taken: after a PostgreSQL restart every
        # idle one is dead, and each would fail a request (a 503) before the pool replaced
        # it. The check pings only a connection the server wrote to (service/pg_pool.py).
        "POSTGRES_PRE_PING": "y",
        "POSTGRES_SCHEMA": "public",
    }


def _marked(mark: IdempotencyMark | None) -> dict[str, IdempotencyMark]:
    """``save()`` keyword arguments that carry ``mark`` to the recorder (none without)."""
    return {} if mark is None else {MARK_KWARG: mark}


def _project_story(story: Story | None, events: Iterable[StoryEvent]) -> Story | None:
    """Replay ``events`` onto ``story``.

    The library's default projector asserts ``isinstance(event, CanMutateProtocol)`` for
    every event: a runtime-checkable Protocol check that cost more than decoding the event
    (a quarter of a transition's CPU in the profile, see BENCHMARKS.md). Our events are
    always ``StoryEvent`` (the mapper resolves pinned topics), so the check buys nothing.
    """
    for event in events:
        story = event.mutate(story)  # type: ignore[arg-type]
    return story


_ATOMS = (str, int, float, Enum, datetime, type(None))
_ATOM_TYPES = frozenset({str, int, float, bool, datetime, type(None)})


def _copy_story(story: Story) -> Story:
    """An independent copy: immutable values shared, lists and dicts of them copied,
    anything else deep-copied. Five times cheaper than ``deepcopy`` of the whole story."""
    state = story.__dict__.copy()
    for key, value in state.items():
        kind = type(value)
        if kind in _ATOM_TYPES:
            continue
        if kind is list:
            flat = all(isinstance(item, _ATOMS) for item in value)
        elif kind is dict:
            flat = all(isinstance(item, _ATOMS) for item in value.values())
        else:
            flat = isinstance(value, _ATOMS)
            if flat:
                continue
        state[key] = value.copy() if flat else deepcopy(value)
    copy = object.__new__(type(story))
    copy.__dict__.update(state)
    return copy


class _RecentStories:
    """The last committed state of the stories this process commanded recently.

    A command starts from it without reading the store first (one round trip fewer); the
    store still decides: if another process committed meanwhile, the insert of the next
    version violates the (story, version) key and the command runs again from the store's
    state. Bounded, like the library's cache, because a story can be large.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[str, Story] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, story_id: str) -> Story | None:
        with self._lock:
            story = self._items.get(story_id)
            if story is None:
                return None
            self._items.move_to_end(story_id)
        return _copy_story(story)

    def put(self, story: Story) -> None:
        copy = _copy_story(story)
        with self._lock:
            current = self._items.get(story.id)
            if current is not None and current.version >= copy.version:
                return  # a concurrent command of this process already went further
            self._items[story.id] = copy
            self._items.move_to_end(story.id)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def forget(self, story_id: str) -> None:
        with self._lock:
            self._items.pop(story_id, None)


class _Stale(Exception):
    """The remembered state may be behind the store: decide on the store's state."""


class _OnlyNotesMeanwhile(Exception):
    """Another writer added only notes before this command saved: it runs again on ``story``
    (a note changes nothing a guard reads, so it must not fail a runner's command)."""

    def __init__(self, story: Story) -> None:
        self.story = story


_NOTE_RETRIES = 5


@dataclass(frozen=True)
class Committed:
    """The result of a command: the story after it and the log position of its event."""

    story: Story
    position: int


@dataclass
class _IdAllocator:
    next_id: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class StorylineApplication(Application[str]):
    name = "storyline"

    def __init__(self, db: Database, *, policy: Policy | None = None, pool_size: int = 5) -> None:
        self.db = db
        self.policy = policy or Policy()
        self._ids = _IdAllocator()
        self._commit_listeners: list[Callable[[int], None]] = []
        self._recent = _RecentStories(AGGREGATE_CACHE_SIZE)
        self.fence: Callable[[Story, str, str], None] | None = None
        """Checked before every story command (a worker runner's: see domain.fencing)."""
        env = persistence_env(db, pool_size=pool_size)
        super().__init__(env)

    def construct_mapper(self) -> Mapper[str]:
        return PydanticMapper(transcoder=OrjsonTranscoder())

    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(position)`` after every commit made through this application.

        In-process followers (projections, runners) use it to wake at once instead of
        waiting for their next poll; other processes poll or LISTEN.
        """
        self._commit_listeners.append(listener)

    def remove_commit_listener(self, listener: Callable[[int], None]) -> None:
        """Stop calling ``listener`` (a missing one is ignored)."""
        with contextlib.suppress(ValueError):
            self._commit_listeners.remove(listener)

    def _committed(self, position: int) -> None:
        for listener in list(self._commit_listeners):
            try:
                listener(position)
            except Exception:  # a broken follower must never fail the writer
                logger.exception("commit listener failed")

    # ------------------------------------------------------------------ SQL helpers

    @property
    def _is_postgres(self) -> bool:
        return self.db.kind == "postgres"

    @property
    def _events(self) -> str:
        return events_table(self.db)

    @property
    def _pos(self) -> str:
        return position_column(self.db)

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self._is_postgres else statement

    def _fetch(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        datastore: Any = self.recorder.datastore  # type: ignore[attr-defined]
        with datastore.transaction(commit=False) as curs:
            curs.execute(self._sql(statement), tuple(params))
            return list(curs.fetchall())

    # ------------------------------------------------------------------ commands

    def create_story(
        self,
        *,
        name: str,
        description: str,
        acceptance_criteria: list[str],
        actor: str,
        depends_on: Sequence[str] = (),
        epic: str | None = None,
        priority: int = 0,
        story_id: str | None = None,
        reason: str | None = None,
        idempotency: IdempotencyMark | None = None,
        target_branch: str | None = None,
        review: bool | None = None,
    ) -> Committed:
        """Create a story; without ``story_id`` the next free number is allocated.

        ``idempotency``: the key this command runs under, marked in the event's transaction
        (see ``service.idempotency``)."""
        deps = list(depends_on)
        for dep in deps:
            validate_story_id(dep)
            if is_epic_id(dep) or not self._exists(dep):
                raise StoryNotFound(dep)
        attempts = 0
        while True:
            sid = story_id if story_id is not None else self._allocate_id()
            story = Story.create(
                story_id=sid,
                name=name,
                description=description,
                acceptance_criteria=list(acceptance_criteria),
                depends_on=deps,
                epic=epic,
                priority=priority,
                actor=actor,
                reason=reason,
                target_branch=target_branch,
                review=review,
            )
            try:
                recordings = self.save(story, **_marked(idempotency))
            except IntegrityError:
                if story_id is not None or attempts >= 20:
                    raise StoryExists(sid) from None
                attempts += 1
                with self._ids.lock:
                    self._ids.next_id = None
                continue
            position = recordings[-1].notification.id
            self._recent.put(story)
            self._committed(position)
            return Committed(story, position)

    def transition(
        self,
        story_id: str,
        event: str,
        *,
        actor: str,
        expected_version: int | None = None,
        reason: str | None = None,
        data: Mapping[str, Any] | None = None,
        idempotency: IdempotencyMark | None = None,
    ) -> Committed:
        """Apply the named transition; a stale ``expected_version`` is a VersionConflict.

        ``idempotency``: as for :meth:`create_story`."""
        validate_story_id(story_id)
        marked = _marked(idempotency)
        recent = self._recent.get(story_id)
        if recent is not None:
            try:
                return self._apply(
                    recent, event, actor, expected_version, reason, data, marked, fresh=False
                )
            except _Stale:
                self._recent.forget(story_id)
        story = self.get_story(story_id)
        for _ in range(_NOTE_RETRIES):
            try:
                return self._apply(
                    story, event, actor, expected_version, reason, data, marked, fresh=True
                )
            except _OnlyNotesMeanwhile as meanwhile:
                story = meanwhile.story
        expected = expected_version if expected_version is not None else story.version
        raise VersionConflict(story_id, expected, story.version)

    def _apply(
        self,
        story: Story,
        event: str,
        actor: str,
        expected_version: int | None,
        reason: str | None,
        data: Mapping[str, Any] | None,
        marked: dict[str, IdempotencyMark],
        *,
        fresh: bool,
    ) -> Committed:
        """Guard and save on ``story``; unless ``fresh`` (just read from the store), every
        refusal is only provisional (``_Stale``) and is decided again on the store's state."""
        story_id = story.id
        if expected_version is not None and not story.accepts_expected_version(expected_version):
            if not fresh:
                raise _Stale
            raise VersionConflict(story_id, expected_version, story.version)
        loaded_version = story.version
        dependency_stages: dict[str, Stage | None] = {}
        if event == "start_coding":
            dependency_stages = {dep: self._stage_of(dep) for dep in story.depends_on}
        try:
            if self.fence is not None:
                self.fence(story, event, actor)
            apply_named(
                story,
                event,
                actor=actor,
                reason=reason,
                data=data,
                policy=self.policy,
                dependency_stages=dependency_stages,
            )
        except DomainError:
            if not fresh:
                raise _Stale from None
            raise
        try:
            recordings = self.save(story, **marked)
        except IntegrityError:
            if not fresh:
                raise _Stale from None
            expected = expected_version if expected_version is not None else loaded_version
            current = self.get_story(story_id)
            if current.accepts_expected_version(expected):
                raise _OnlyNotesMeanwhile(current) from None
            raise VersionConflict(story_id, expected, current.version) from None
        position = recordings[-1].notification.id
        self._recent.put(story)
        self._committed(position)
        return Committed(story, position)

    # ------------------------------------------------------------------ queries

    def get_story(self, story_id: str) -> Story:
        validate_story_id(story_id)
        if is_epic_id(story_id):
            # An epic's events share the store: loading them as a story would fail to
            # decode (or build the wrong aggregate). No story has an epic's id.
            raise StoryNotFound(story_id)
        try:
            story: Story = self.repository.get(story_id, projector_func=_project_story)
        except AggregateNotFoundError:
            raise StoryNotFound(story_id) from None
        return story

    def get_story_as_of(
        self, story_id: str, *, position: int | None = None, at: datetime | None = None
    ) -> Story:
        """The story as it was after the log position ``position`` or at time ``at``."""
        validate_story_id(story_id)
        if is_epic_id(story_id):
            raise StoryNotFound(story_id)  # as in get_story: an epic is not a story
        story: Story | None = None
        for logged, domain_event in self._story_events(story_id):
            if position is not None and logged.position > position:
                break
            if at is not None and logged.timestamp > at:
                break
            story = domain_event.mutate(story)  # type: ignore[arg-type]
        if story is None:
            raise StoryNotFound(story_id)
        return story

    def history(self, story_id: str) -> list[LoggedEvent]:
        """Every event of the story, oldest first, with its global position."""
        validate_story_id(story_id)
        if is_epic_id(story_id):
            raise StoryNotFound(story_id)  # an epic's history is the epic service's
        rows = self._fetch(
            f"SELECT {self._pos} AS position, originator_id, originator_version, topic, state "
            f"FROM {self._events} WHERE originator_id = ? ORDER BY originator_version",
            (story_id,),
        )
        if not rows:
            raise StoryNotFound(story_id)
        return [decode_row(row) for row in rows]

    def events_after(self, position: int, limit: int = 100) -> list[LoggedEvent]:
        """The global log after ``position`` (exclusive), oldest first."""
        rows = self._fetch(
            f"SELECT {self._pos} AS position, originator_id, originator_version, topic, state "
            f"FROM {self._events} WHERE {self._pos} > ? ORDER BY {self._pos} LIMIT ?",
            (position, limit),
        )
        return [decode_row(row) for row in rows]

    def max_position(self) -> int:
        rows = self._fetch(f"SELECT MAX({self._pos}) AS m FROM {self._events}")
        value = rows[0]["m"] if rows else None
        return int(value or 0)

    def story_ids(self) -> list[str]:
        """Every story's id, oldest first; epics (same store) are not stories.

        Epics are filtered here rather than in SQL: SQLite has no regular expressions, a
        LIKE on the prefix would also drop a story named "epic-x", and epics are few."""
        rows = self._fetch(
            f"SELECT originator_id FROM {self._events} WHERE originator_version = 1 "
            f"ORDER BY {self._pos}"
        )
        ids = (str(row["originator_id"]) for row in rows)
        # Not epics, and not project-level aggregates (the gate registry, ``_gates``).
        return [sid for sid in ids if sid[:1].isalnum() and not is_epic_id(sid)]

    def iter_stories(self) -> Iterator[Story]:
        for sid in self.story_ids():
            yield self.get_story(sid)

    # ------------------------------------------------------------------ internals

    def _story_events(self, story_id: str) -> Iterator[tuple[LoggedEvent, StoryEvent]]:
        return self.aggregate_events(story_id)

    def aggregate_events(self, originator_id: str) -> Iterator[tuple[LoggedEvent, Any]]:
        """Every event of one aggregate (a story, an epic, the gate registry), oldest first:
        as logged (with its position) and as its domain event."""
        rows = self._fetch(
            f"SELECT {self._pos} AS position, originator_id, originator_version, topic, state "
            f"FROM {self._events} WHERE originator_id = ? ORDER BY originator_version",
            (originator_id,),
        )
        for row in rows:
            stored = StoredEvent(
                originator_id=str(row["originator_id"]),
                originator_version=int(row["originator_version"]),
                topic=str(row["topic"]),
                state=bytes(row["state"]),
            )
            yield decode_row(row), self.mapper.to_domain_event(stored)

    def _exists(self, story_id: str) -> bool:
        rows = self._fetch(
            f"SELECT 1 AS one FROM {self._events} "
            "WHERE originator_id = ? AND originator_version = 1",
            (story_id,),
        )
        return bool(rows)

    def _stage_of(self, story_id: str) -> Stage | None:
        try:
            return self.get_story(story_id).stage
        except StoryNotFound:
            return None

    def _allocate_id(self) -> str:
        with self._ids.lock:
            if self._ids.next_id is None:
                if self._is_postgres:
                    statement = (
                        f"SELECT MAX(originator_id::bigint) AS m FROM {self._events} "
                        "WHERE originator_version = 1 AND originator_id ~ '^[0-9]{1,18}$'"
                    )
                else:
                    statement = (
                        f"SELECT MAX(CAST(originator_id AS INTEGER)) AS m FROM {self._events} "
                        "WHERE originator_version = 1 AND originator_id GLOB '[0-9]*' "
                        "AND originator_id NOT GLOB '*[^0-9]*' AND length(originator_id) <= 18"
                    )
                rows = self._fetch(statement)
                self._ids.next_id = int(rows[0]["m"] or 0) + 1
            allocated = self._ids.next_id
            self._ids.next_id += 1
            return str(allocated)


__all__ = ["Committed", "LoggedEvent", "StoryCreated", "StorylineApplication", "persistence_env"]
