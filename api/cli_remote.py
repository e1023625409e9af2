"""Story and epic commands against either the local store or a running server (``--url``).

The CLI asks :func:`story_backend` for a backend and calls the same methods either way;
both return the API's JSON shapes (story snapshots with ``position``, history events as
``LoggedEvent.as_json()``), and both raise :class:`ClientError` for a refusal, with the
same ``code``/``status`` the HTTP API would answer. Remotely the actor is the one the token
maps to: a client cannot choose whom the events record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from api.client import ClientError, StorylineClient
from api.error_shapes import domain_status
from api.schemas import story_reviews
from api.schemas_epics import (
    check_answer,
    epic_evaluations,
    epic_id_refusal,
    epic_summaries,
    load_epic_view,
    plan_verdict,
)
from domain.errors import DomainError
from service.container import Service, open_service
from service.epics import EpicService
from service.policies import epic_policy


@contextmanager
def _refused() -> Iterator[None]:
    """A domain refusal raised as the ClientError the HTTP API would answer."""
    try:
        yield
    except DomainError as exc:
        raise ClientError(domain_status(exc), exc.code, exc.message, exc.details or None) from None


def _check_epic_id(epic_id: str) -> None:
    """The API's 422 for a malformed epic id (its 404 means a well-formed unknown one)."""
    refusal = epic_id_refusal(epic_id)
    if refusal is not None:
        raise ClientError(422, "invalid_epic_id", *refusal)


class LocalBackend:
    """The project's own store, in this process; events record ``actor``."""

    def __init__(self, service: Service, actor: str) -> None:
        self.service = service
        self.actor = actor
        self._epics: EpicService | None = None

    def create_story(
        self,
        *,
        name: str,
        acceptance_criteria: Sequence[str],
        description: str = "",
        depends_on: Sequence[str] = (),
        epic: str | None = None,
        priority: int = 0,
        story_id: str | None = None,
        review: bool | None = None,
    ) -> dict[str, Any]:
        with _refused():
            committed = self.service.app.create_story(
                name=name,
                description=description,
                acceptance_criteria=list(acceptance_criteria),
                depends_on=list(depends_on),
                epic=epic,
                priority=priority,
                story_id=story_id,
                actor=self.actor,
                review=review,
            )
        return committed.story.snapshot() | {"position": committed.position}

    def transition(
        self,
        story_id: str,
        event: str,
        *,
        expected_version: int | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        with _refused():
            committed = self.service.app.transition(
                story_id,
                event,
                actor=self.actor,
                expected_version=expected_version,
                reason=reason,
                data=data or {},
            )
        return committed.story.snapshot() | {"position": committed.position}

    def get_story(self, story_id: str, *, as_of: str | None = None) -> dict[str, Any]:
        with _refused():
            if as_of is None:
                return self.service.app.get_story(story_id).snapshot()
            position, at = _as_of(as_of)
            return self.service.app.get_story_as_of(story_id, position=position, at=at).snapshot()

    def history(self, story_id: str) -> list[dict[str, Any]]:
        with _refused():
            return [e.as_json() for e in self.service.app.history(story_id)]

    def story_reviews(self, story_id: str) -> dict[str, Any]:
        with _refused():
            return story_reviews(self.service.app.get_story(story_id).snapshot())

    def list_stories(self, *, stage: str | None = None) -> list[dict[str, Any]]:
        stories = [s.snapshot() for s in self.service.app.iter_stories()]
        return [s for s in stories if stage is None or s["stage"] == stage]

    def events(self, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        return [e.as_json() for e in self.service.app.events_after(after, limit)]

    # ------------------------------------------------------------------ epics

    @property
    def epics(self) -> EpicService:
        if self._epics is None:
            self._epics = EpicService(self.service.app, epic_policy(self.service.config))
        return self._epics

    def create_epic(
        self,
        *,
        name: str,
        goal: str,
        acceptance_criteria: Sequence[str],
        max_budget_usd: float | None = None,
        review: bool | None = None,
    ) -> dict[str, Any]:
        with _refused():
            committed = self.epics.create(
                name=name,
                goal=goal,
                acceptance_criteria=list(acceptance_criteria),
                max_budget_usd=max_budget_usd,
                actor=self.actor,
                review=review,
            )
            return load_epic_view(self.epics, committed.epic.id, committed=committed.position)

    def epic_transition(
        self,
        epic_id: str,
        event: str,
        *,
        expected_version: int | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        _check_epic_id(epic_id)
        with _refused():
            committed = self.epics.transition(
                epic_id,
                event,
                actor=self.actor,
                expected_version=expected_version,
                reason=reason,
                data=data or {},
            )
            view = load_epic_view(self.epics, epic_id, committed=committed.position)
        if event == "submit_plan" and isinstance(committed.result, list):
            view |= plan_verdict(committed.epic, committed.result)
        return view

    def answer_questions(
        self,
        epic_id: str,
        answers: Sequence[str],
        *,
        reason: str | None = None,
        expected_version: int | None = None,
    ) -> dict[str, Any]:
        """``POST /epics/{id}/answers`` on the local store: the same checks, the same errors."""
        _check_epic_id(epic_id)
        for index, answer in enumerate(answers):
            try:
                check_answer(answer)
            except ValueError as exc:
                raise ClientError(
                    422, "validation_error", f"answers[{index}]: {exc}", {"index": index}
                ) from None
        return self.epic_transition(
            epic_id,
            "answer_questions",
            expected_version=expected_version,
            reason=reason,
            data={"answers": list(answers)},
        )

    def epic_evaluations(self, epic_id: str) -> dict[str, Any]:
        _check_epic_id(epic_id)
        with _refused():
            return epic_evaluations(self.epics.get(epic_id))

    def get_epic(self, epic_id: str, *, as_of: str | None = None) -> dict[str, Any]:
        _check_epic_id(epic_id)
        with _refused():
            if as_of is None:
                return load_epic_view(self.epics, epic_id)
            position, at = _as_of(as_of)
            return load_epic_view(self.epics, epic_id, position=position, at=at, as_of=as_of)

    def list_epics(self) -> list[dict[str, Any]]:
        return epic_summaries(self.epics)

    def epic_history(self, epic_id: str) -> list[dict[str, Any]]:
        _check_epic_id(epic_id)
        with _refused():
            return [e.as_json() for e in self.epics.history(epic_id)]


def _as_of(value: str) -> tuple[int | None, datetime | None]:
    """``as_of`` as the (position, at) pair the application's as-of reads take."""
    if value.strip().isascii() and value.strip().isdigit():
        return int(value), None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ClientError(
            422, "invalid_as_of", "as_of must be a log position or an ISO 8601 time"
        ) from None
    return None, moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class RemoteBackend:
    """A running server; the token (``--token`` or ``$STORYLINE_TOKEN``) decides the actor.

    Commands and single reads are the client's own methods (same names, same answers);
    only the paged and enveloped reads need adapting.
    """

    def __init__(self, client: StorylineClient) -> None:
        self.client = client
        self.create_story = client.create_story
        self.transition = client.transition
        self.get_story = client.get_story
        self.history = client.history
        self.story_reviews = client.story_reviews
        self.answer_questions = client.answer_questions
        self.epic_evaluations = client.epic_evaluations
        self.create_epic = client.create_epic
        self.epic_transition = client.epic_transition
        self.get_epic = client.get_epic
        self.list_epics = client.list_epics
        self.epic_history = client.epic_history

    def list_stories(self, *, stage: str | None = None) -> list[dict[str, Any]]:
        """Board rows (the projection's shape), every page."""
        rows: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page = self.client.list_stories(stage=stage, limit=1000, cursor=cursor)
            rows.extend(page["stories"])
            cursor = page.get("next_cursor")
            if not cursor:
                return rows

    def events(self, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        return list(self.client.events(after=after, limit=limit)["events"])


StoryBackend = LocalBackend | RemoteBackend

L = TypeVar("L")
R = TypeVar("R")


@contextmanager
def open_backend(
    *,
    url: str | None,
    token: str | None,
    project: Path | str | None,
    database_url: str | None,
    local: Callable[[Service], L],
    remote: Callable[[StorylineClient], R],
) -> Iterator[L | R]:
    """``remote`` over a client of the server at ``url`` when given, else ``local`` over
    the project's store; either is closed afterwards."""
    if url:
        client = StorylineClient(url, token=token)
        try:
            yield remote(client)
        finally:
            client.close()
        return
    service = open_service(project, database_url)
    try:
        yield local(service)
    finally:
        service.close()


@contextmanager
def story_backend(
    *,
    url: str | None,
    token: str | None = None,
    project: Path | str | None = None,
    database_url: str | None = None,
    actor: str = "user:local",
) -> Iterator[StoryBackend]:
    """A remote backend when ``url`` is given, else the project's local store.

    ``actor`` is used locally only. Opening the local store may raise the container's
    ``SettingsError``/``ConfigError``; the CLI reports those as configuration errors.
    """
    with open_backend(
        url=url,
        token=token,
        project=project,
        database_url=database_url,
        local=lambda service: LocalBackend(service, actor),
        remote=RemoteBackend,
    ) as chosen:
        yield chosen


__all__ = [
    "ClientError",
    "LocalBackend",
    "RemoteBackend",
    "StoryBackend",
    "open_backend",
    "story_backend",
]
