"""Domain errors. Each message is meant to be shown to a user as it is."""

from __future__ import annotations

from collections.abc import Sequence


class DomainError(Exception):
    """Base class: a command was refused and nothing changed."""

    code = "domain_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def details(self) -> dict[str, object]:
        return {}


class InvalidStoryId(DomainError):
    code = "invalid_story_id"

    def __init__(self, story_id: str, why: str) -> None:
        super().__init__(f"invalid story id {story_id!r}: {why}")
        self.story_id = story_id
        self.why = why


class InvalidCommand(DomainError):
    """A command's arguments are malformed (empty reason, unknown kind, ...)."""

    code = "invalid_command"


class InvalidField(InvalidCommand):
    """One field of a command is refused (a NUL or control character, say).

    The code and the shape of ``details`` are those of a request the API's schema refuses,
    so a client reads one kind of field error whichever layer found it.
    """

    code = "validation_error"

    def __init__(self, loc: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = list(loc)

    @property
    def field(self) -> str:
        return ".".join(str(part) for part in self.loc)

    @property
    def details(self) -> list[dict[str, object]]:  # type: ignore[override]
        return [{"loc": self.loc, "msg": self.message, "type": "value_error"}]


class UnknownEvent(DomainError):
    code = "unknown_event"

    def __init__(self, event: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown event {event!r}; known events: {', '.join(known)}")
        self.event = event
        self.known = list(known)

    @property
    def details(self) -> dict[str, object]:
        return {"event": self.event, "known_events": self.known}


class IllegalTransition(DomainError):
    code = "illegal_transition"

    def __init__(
        self, story_id: str, stage: str, event: str, legal: Sequence[str], why: str = ""
    ) -> None:
        legal_text = ", ".join(legal) if legal else "none"
        message = (
            f"story {story_id!r} is in stage {stage!r}: event {event!r} is not allowed"
            f"{' (' + why + ')' if why else ''}; legal events from {stage!r}: {legal_text}"
        )
        super().__init__(message)
        self.story_id = story_id
        self.stage = stage
        self.event = event
        self.legal = list(legal)
        self.why = why

    @property
    def details(self) -> dict[str, object]:
        return {
            "story_id": self.story_id,
            "stage": self.stage,
            "event": self.event,
            "legal_events": self.legal,
            **({"why": self.why} if self.why else {}),
        }


class DependenciesNotDone(IllegalTransition):
    code = "dependencies_not_done"

    def __init__(
        self,
        story_id: str,
        stage: str,
        event: str,
        legal: Sequence[str],
        unfinished: dict[str, str],
    ) -> None:
        listed = ", ".join(f"{dep} ({stage_})" for dep, stage_ in sorted(unfinished.items()))
        super().__init__(story_id, stage, event, legal, why=f"unfinished dependencies: {listed}")
        self.unfinished = dict(unfinished)

    @property
    def details(self) -> dict[str, object]:
        return {**super().details, "unfinished_dependencies": self.unfinished}


class NotHolder(IllegalTransition):
    """Scale-out fencing: a worker runner records a step for a story another worker has
    claimed since (its lease expired and was taken). Refused like any illegal move, so the
    runners' usual "the story moved on" handling drops the stale step."""

    code = "not_holder"

    def __init__(
        self,
        story_id: str,
        stage: str,
        event: str,
        legal: Sequence[str],
        worker: str,
        holder: str | None,
    ) -> None:
        held = f"worker {holder!r} holds it" if holder else "no worker has claimed it"
        super().__init__(story_id, stage, event, legal, f"{held}, not {worker!r}")
        self.worker = worker
        self.holder = holder


class StoryNotFound(DomainError):
    code = "story_not_found"

    def __init__(self, story_id: str) -> None:
        super().__init__(f"story {story_id!r} does not exist")
        self.story_id = story_id

    @property
    def details(self) -> dict[str, object]:
        return {"story_id": self.story_id}


class StoryExists(DomainError):
    code = "story_exists"

    def __init__(self, story_id: str) -> None:
        super().__init__(f"story {story_id!r} already exists")
        self.story_id = story_id

    @property
    def details(self) -> dict[str, object]:
        return {"story_id": self.story_id}


class VersionConflict(DomainError):
    code = "version_conflict"

    def __init__(self, story_id: str, expected: int, current: int) -> None:
        super().__init__(
            f"story {story_id!r} is at version {current}, not the expected version {expected}; "
            "reload it and try again"
        )
        self.story_id = story_id
        self.expected = expected
        self.current = current

    @property
    def details(self) -> dict[str, object]:
        return {
            "story_id": self.story_id,
            "expected_version": self.expected,
            "current_version": self.current,
        }


class EpicNotFound(StoryNotFound):
    code = "epic_not_found"

    def __init__(self, epic_id: str) -> None:
        DomainError.__init__(self, f"epic {epic_id!r} does not exist")
        self.story_id = epic_id

    @property
    def details(self) -> dict[str, object]:
        return {"epic_id": self.story_id}


class EpicIllegalTransition(IllegalTransition):
    """An epic event refused in the epic's stage (same code and shape as a story's)."""

    def __init__(
        self, epic_id: str, stage: str, event: str, legal: Sequence[str], why: str = ""
    ) -> None:
        super().__init__(epic_id, stage, event, legal, why)
        legal_text = ", ".join(legal) if legal else "none"
        self.message = (
            f"epic {epic_id!r} is in stage {stage!r}: event {event!r} is not allowed"
            f"{' (' + why + ')' if why else ''}; legal events from {stage!r}: {legal_text}"
        )
        self.args = (self.message,)

    @property
    def details(self) -> dict[str, object]:
        details = super().details
        details["epic_id"] = details.pop("story_id")
        return details


class EpicVersionConflict(VersionConflict):
    """An epic changed since the version the caller expected (same code and status)."""

    def __init__(self, epic_id: str, expected: int, current: int) -> None:
        super().__init__(epic_id, expected, current)
        self.message = (
            f"epic {epic_id!r} is at version {current}, not the expected version {expected}; "
            "reload it and try again"
        )
        self.args = (self.message,)

    @property
    def details(self) -> dict[str, object]:
        details = super().details
        details["epic_id"] = details.pop("story_id")
        return details
