"""The epic's command and query layer, beside the story's (``service.application``).

Epics share the application's event store, so an epic and the stories it farms out are
saved in one transaction (``farm_out``): after a crash either the round exists with all its
stories or nothing of it does, and a retry can never create a story twice (the story ids
are derived from the epic, so a second save conflicts).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from domain.epic import Epic
from domain.epic_commands import EpicPolicy, apply_epic_named
from domain.epic_events import EpicEvent, RunMode
from domain.errors import EpicNotFound, EpicVersionConflict, StoryExists, StoryNotFound
from domain.ids import integration_branch, is_epic_id, validate_epic_id
from domain.story import Story
from service.application import StorylineApplication, _marked
from service.events_log import LoggedEvent
from service.idempotency import IdempotencyMark


@dataclass(frozen=True)
class EpicCommitted:
    epic: Epic
    position: int
    result: object = None
    """What the command returned (``submit_plan``: the plan's problems)."""


@dataclass(frozen=True)
class NewStory:
    """A story a round of the epic creates (see ``farm_out``)."""

    story_id: str
    name: str
    description: str
    acceptance_criteria: list[str]
    depends_on: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Ledger:
    tokens_in: int
    tokens_out: int
    cost_usd: float
    planner_cost_usd: float
    stories_cost_usd: float
    evaluator_cost_usd: float = 0.0
    """The epic's evaluator runs (its stories' own evaluators are in ``stories_cost_usd``)."""


class EpicService:
    def __init__(self, app: StorylineApplication, policy: EpicPolicy | None = None) -> None:
        self.app = app
        self.policy = policy or EpicPolicy()
        self._id_lock = threading.Lock()

    # ------------------------------------------------------------------ commands

    def create(
        self,
        *,
        name: str,
        goal: str,
        acceptance_criteria: list[str],
        actor: str,
        max_budget_usd: float | None = None,
        reason: str | None = None,
        idempotency: IdempotencyMark | None = None,
        review: bool | None = None,
    ) -> EpicCommitted:
        for _ in range(20):
            epic = Epic.create(
                epic_id=self._next_id(),
                name=name,
                goal=goal,
                acceptance_criteria=acceptance_criteria,
                actor=actor,
                max_budget_usd=max_budget_usd,
                reason=reason,
                review=review,
            )
            try:
                recordings = self.app.save(epic, **_marked(idempotency))
            except IntegrityError:
                continue  # another writer took the number: take the next one
            return self._done(epic, recordings[-1].notification.id)
        raise StoryExists("epic-?")

    def transition(
        self,
        epic_id: str,
        event: str,
        *,
        actor: str,
        expected_version: int | None = None,
        reason: str | None = None,
        data: Mapping[str, Any] | None = None,
        idempotency: IdempotencyMark | None = None,
    ) -> EpicCommitted:
        """Apply the named epic transition; a stale ``expected_version`` is a VersionConflict."""
        epic = self.get(epic_id)
        if expected_version is not None and epic.version != expected_version:
            raise EpicVersionConflict(epic_id, expected_version, epic.version)
        loaded = epic.version
        result = apply_epic_named(
            epic, event, actor=actor, reason=reason, data=data, policy=self.policy
        )
        try:
            recordings = self.app.save(epic, **_marked(idempotency))
        except IntegrityError:
            current = self.get(epic_id)
            raise EpicVersionConflict(epic_id, loaded, current.version) from None
        position = recordings[-1].notification.id
        self.app._committed(position)
        return EpicCommitted(epic, position, result)

    def farm_out(
        self,
        epic_id: str,
        *,
        actor: str,
        mode: RunMode,
        stories: Sequence[NewStory],
        fork_point: str,
        integration_tip: str,
        expected_version: int,
        kept: Sequence[str] = (),
        reason: str | None = None,
        priority: int = 0,
    ) -> EpicCommitted:
        """Start a round: the epic's event and its new stories, in one transaction."""
        epic = self.get(epic_id)
        if epic.version != expected_version:
            raise EpicVersionConflict(epic_id, expected_version, epic.version)
        branch = integration_branch(epic_id)
        created = [
            Story.create(
                story_id=s.story_id,
                name=s.name,
                description=s.description,
                acceptance_criteria=list(s.acceptance_criteria),
                depends_on=list(s.depends_on),
                actor=actor,
                epic=epic_id,
                priority=priority,
                reason=f"farmed out by epic {epic_id} ({mode.value})",
                target_branch=branch,
            )
            for s in stories
        ]
        epic.farm_out(
            actor=actor,
            mode=mode,
            stories=[s.story_id for s in stories],
            fork_point=fork_point,
            integration_tip=integration_tip,
            kept=list(kept),
            reason=reason,
        )
        try:
            # The stories first: a view of the epic as of its event's position shows them.
            recordings = self.app.save(*created, epic)
        except IntegrityError:
            current = self.get(epic_id)
            raise EpicVersionConflict(epic_id, expected_version, current.version) from None
        position = recordings[-1].notification.id
        self.app._committed(position)
        return EpicCommitted(epic, position)

    def _done(self, epic: Epic, position: int) -> EpicCommitted:
        self.app._committed(position)
        return EpicCommitted(epic, position)

    def _next_id(self) -> str:
        with self._id_lock:
            events = self.app._events
            if self.app.db.kind == "postgres":
                statement = (
                    f"SELECT MAX(substr(originator_id, 6)::bigint) AS m FROM {events} "
                    "WHERE originator_version = 1 AND originator_id ~ '^epic-[1-9][0-9]{0,17}$'"
                )
            else:
                statement = (
                    f"SELECT MAX(CAST(substr(originator_id, 6) AS INTEGER)) AS m FROM {events} "
                    "WHERE originator_version = 1 AND originator_id GLOB 'epic-[1-9]*' "
                    "AND substr(originator_id, 6) NOT GLOB '*[^0-9]*' "
                    "AND length(originator_id) <= 23"
                )
            rows = self.app._fetch(statement)
            return f"epic-{int(rows[0]['m'] or 0) + 1}"

    # ------------------------------------------------------------------ queries

    def get(self, epic_id: str) -> Epic:
        try:
            validate_epic_id(epic_id)
        except Exception:
            raise EpicNotFound(str(epic_id)[:80]) from None
        try:
            epic: object = self.app.repository.get(epic_id)
        except AggregateNotFoundError:
            raise EpicNotFound(epic_id) from None
        if not isinstance(epic, Epic):
            raise EpicNotFound(epic_id)
        return epic

    def get_as_of(
        self, epic_id: str, *, position: int | None = None, at: datetime | None = None
    ) -> Epic:
        self.get(epic_id)
        epic: Epic | None = None
        for logged, event in self._events_of(epic_id):
            if position is not None and logged.position > position:
                break
            if at is not None and logged.timestamp > at:
                break
            epic = event.mutate(epic)  # type: ignore[arg-type]
        if epic is None:
            raise EpicNotFound(epic_id)
        return epic

    def history(self, epic_id: str) -> list[LoggedEvent]:
        self.get(epic_id)
        return [logged for logged, _ in self._events_of(epic_id)]

    def ids(self) -> list[str]:
        rows = self.app._fetch(
            f"SELECT originator_id FROM {self.app._events} WHERE originator_version = 1 "
            "AND topic = ? "
            f"ORDER BY {self.app._pos}",
            ("storyline.EpicCreated.v1",),
        )
        return [str(r["originator_id"]) for r in rows if is_epic_id(str(r["originator_id"]))]

    def iter(self) -> Iterator[Epic]:
        for epic_id in self.ids():
            yield self.get(epic_id)

    def stories(self, epic: Epic) -> list[Story]:
        found: list[Story] = []
        for sid in epic.stories:
            try:
                found.append(self.app.get_story(sid))
            except StoryNotFound:
                continue
        return found

    def ledger(self, epic: Epic, stories: Sequence[Story] | None = None) -> Ledger:
        stories = self.stories(epic) if stories is None else stories
        spent = sum(s.cost_usd for s in stories)
        own_in = epic.planner_tokens_in + epic.evaluator_tokens_in
        own_out = epic.planner_tokens_out + epic.evaluator_tokens_out
        return Ledger(
            tokens_in=own_in + sum(s.tokens_in for s in stories),
            tokens_out=own_out + sum(s.tokens_out for s in stories),
            cost_usd=epic.planner_cost_usd + epic.evaluator_cost_usd + spent,
            planner_cost_usd=epic.planner_cost_usd,
            stories_cost_usd=spent,
            evaluator_cost_usd=epic.evaluator_cost_usd,
        )

    def _events_of(self, epic_id: str) -> Iterator[tuple[LoggedEvent, EpicEvent]]:
        return self.app.aggregate_events(epic_id)
