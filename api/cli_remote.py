"""Story and epic commands against either the local store or a running server (``--url``).

The CLI asks :func:`story_backend` for a backend and calls the same methods either way;
both return the API's JSON shapes (story snapshots with ``position``, history events as
``LoggedEvent.as_json()``), and both raise :class:`ClientError` for a refusal, with the
same ``code``/``status`` the HTTP API would answer. Remotely the actor is the one the token
maps to: a client cannot choose whom the events record.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from api.client import ClientError, StorylineClient
from api.error_shapes import domain_status
from api.schemas_epics import epic_id_refusal, epic_summaries, load_epic_view, plan_verdict
from domain.epic_commands import EpicPolicy
from domain.errors import DomainError
from service.container import Service, open_service
from service.epics import EpicService


class StoryBackend(Protocol):
    def create_story(
        self,
        *,
        name: str,
        acceptance_criteria: list[str],
        description: str = "",
        depends_on: list[str] | None = None,
        epic: str | None = None,
        priority: int = 0,
        story_id: str | None = None,
    ) -> dict[str, Any]: ...

    def transition(
        self,
        story_id: str,
        event: str,
        *,
        expected_version: int | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> dict[str, Any]: ...

    def get_story(self, story_id: str, *, as_of: str | None = None) -> dict[str, Any]: ...

    def history(self, story_id: str) -> list[dict[str, Any]]: ...

    def list_stories(self, *, stage: str | None = None) -> list[dict[str, Any]]: ...

    def events(self, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]: ...

    def create_epic(
        self,
        *,
        name: str,
        goal: str,
        acceptance_criteria: list[str],
        max_budget_usd: float | None = None,
    ) -> dict[str, Any]: ...

    def epic_transition(
        self,
        epic_id: str,
        event: str,
        *,
        expected_version: int | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> dict[str, Any]: ...

    def get_epic(self, epic_id: str, *, as_of: str | None = None) -> dict[str, Any]: ...

    def list_epics(self) -> list[dict[str, Any]]: ...

    def epic_history(self, epic_id: str) -> list[dict[str, Any]]: ...


def _client_error(exc: DomainError) -> ClientError:
    return ClientError(domain_status(exc), exc.code, exc.message, exc.details or None)


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
        acceptance_criteria: list[str],
        description: str = "",
        depends_on: list[str] | None = None,
        epic: str | None = None,
        priority: int = 0,
        story_id: str | None = None,
    ) -> dict[str, Any]:
        try:
            committed = self.service.app.create_story(
                name=name,
                description=description,
                acceptance_criteria=list(acceptance_criteria),
                depends_on=list(depends_on or []),
                epic=epic,
                priority=priority,
                story_id=story_id,
                actor=self.actor,
            )
        except DomainError as exc:
            raise _client_error(exc) from None
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
        try:
            committed = self.service.app.transition(
                story_id,
                event,
                actor=self.actor,
                expected_version=expected_version,
                reason=reason,
                data=data or {},
            )
        except DomainError as exc:
            raise _client_error(exc) from None
        return committed.story.snapshot() | {"position": committed.position}

    def get_story(self, story_id: str, *, as_of: str | None = None) -> dict[str, Any]:
        try:
            if as_of is None:
                return self.service.app.get_story(story_id).snapshot()
            if as_of.strip().isascii() and as_of.strip().isdigit():
                story = self.service.app.get_story_as_of(story_id, position=int(as_of))
            else:
                story = self.service.app.get_story_as_of(story_id, at=_parse_time(as_of))
            return story.snapshot()
        except DomainError as exc:
            raise _client_error(exc) from None

    def history(self, story_id: str) -> list[dict[str, Any]]:
        try:
            return [e.as_json() for e in self.service.app.history(story_id)]
        except DomainError as exc:
            raise _client_error(exc) from None

    def list_stories(self, *, stage: str | None = None) -> list[dict[str, Any]]:
        stories = [s.snapshot() for s in self.service.app.iter_stories()]
        return [s for s in stories if stage is None or s["stage"] == stage]

    def events(self, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        return [e.as_json() for e in self.service.app.events_after(after, limit)]

    # ------------------------------------------------------------------ epics

    @property
    def epics(self) -> EpicService:
        if self._epics is None:
            policy = EpicPolicy(max_plan_attempts=self.service.config.epic.max_plan_attempts)
            self._epics = EpicService(self.service.app, policy)
        return self._epics

    def create_epic(
        self,
        *,
        name: str,
        goal: str,
        acceptance_criteria: list[str],
        max_budget_usd: float | None = None,
    ) -> dict[str, Any]:
        try:
            committed = self.epics.create(
                name=name,
                goal=goal,
                acceptance_criteria=list(acceptance_criteria),
                max_budget_usd=max_budget_usd,
                actor=self.actor,
            )
            return load_epic_view(self.epics, committed.epic.id, committed=committed.position)
        except DomainError as exc:
            raise _client_error(exc) from None

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
        try:
            committed = self.epics.transition(
                epic_id,
                event,
                actor=self.actor,
                expected_version=expected_version,
                reason=reason,
                data=data or {},
            )
            view = load_epic_view(self.epics, epic_id, committed=committed.position)
        except DomainError as exc:
            raise _client_error(exc) from None
        if event == "submit_plan" and isinstance(committed.result, list):
            view |= plan_verdict(committed.epic, committed.result)
        return view

    def get_epic(self, epic_id: str, *, as_of: str | None = None) -> dict[str, Any]:
        _check_epic_id(epic_id)
        try:
            if as_of is None:
                return load_epic_view(self.epics, epic_id)
            if as_of.strip().isascii() and as_of.strip().isdigit():
                return load_epic_view(self.epics, epic_id, position=int(as_of), as_of=as_of)
            return load_epic_view(self.epics, epic_id, at=_parse_time(as_of), as_of=as_of)
        except DomainError as exc:
            raise _client_error(exc) from None

    def list_epics(self) -> list[dict[str, Any]]:
        return epic_summaries(self.epics)

    def epic_history(self, epic_id: str) -> list[dict[str, Any]]:
        _check_epic_id(epic_id)
        try:
            return [e.as_json() for e in self.epics.history(epic_id)]
        except DomainError as exc:
            raise _client_error(exc) from None


def _parse_time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ClientError(
            422, "invalid_as_of", "as_of must be a log position or an ISO 8601 time"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class RemoteBackend:
    """A running server; the token (``--token`` or ``$STORYLINE_TOKEN``) decides the actor."""

    def __init__(self, client: StorylineClient) -> None:
        self.client = client

    def create_story(
        self,
        *,
        name: str,
        acceptance_criteria: list[str],
        description: str = "",
        depends_on: list[str] | None = None,
        epic: str | None = None,
        priority: int = 0,
        story_id: str | None = None,
    ) -> dict[str, Any]:
        return self.client.create_story(
            name=name,
            description=description,
            acceptance_criteria=acceptance_criteria,
            depends_on=depends_on or [],
            epic=epic,
            priority=priority,
            story_id=story_id,
        )

    def transition(
        self,
        story_id: str,
        event: str,
        *,
        expected_version: int | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return self.client.transition(
            story_id, event, expected_version=expected_version, reason=reason, data=data
        )

    def get_story(self, story_id: str, *, as_of: str | None = None) -> dict[str, Any]:
        return self.client.get_story(story_id, as_of=as_of)

    def history(self, story_id: str) -> list[dict[str, Any]]:
        return self.client.history(story_id)

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

    def create_epic(
        self,
        *,
        name: str,
        goal: str,
        acceptance_criteria: list[str],
        max_budget_usd: float | None = None,
    ) -> dict[str, Any]:
        return self.client.create_epic(
            name=name,
            goal=goal,
            acceptance_criteria=acceptance_criteria,
            max_budget_usd=max_budget_usd,
        )

    def epic_transition(
        self,
        epic_id: str,
        event: str,
        *,
        expected_version: int | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return self.client.epic_transition(
            epic_id, event, expected_version=expected_version, reason=reason, data=data
        )

    def get_epic(self, epic_id: str, *, as_of: str | None = None) -> dict[str, Any]:
        return self.client.get_epic(epic_id, as_of=as_of)

    def list_epics(self) -> list[dict[str, Any]]:
        return self.client.list_epics()

    def epic_history(self, epic_id: str) -> list[dict[str, Any]]:
        return self.client.epic_history(epic_id)


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
    if url:
        client = StorylineClient(url, token=token)
        try:
            yield RemoteBackend(client)
        finally:
            client.close()
        return
    service = open_service(project, database_url)
    try:
        yield LocalBackend(service, actor)
    finally:
        service.close()


__all__ = ["ClientError", "LocalBackend", "RemoteBackend", "StoryBackend", "story_backend"]
