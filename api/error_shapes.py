"""The error body and the HTTP status of each domain error, without the web framework.

``api.errors`` installs them as FastAPI handlers; the CLI's local backend uses them as
they are, so a command fails the same way with or without ``--url`` and starts without
importing FastAPI.
"""

from __future__ import annotations

from typing import Any

from domain.errors import (
    DependenciesNotDone,
    DomainError,
    IllegalTransition,
    InvalidCommand,
    InvalidStoryId,
    StoryExists,
    StoryNotFound,
    UnknownEvent,
    VersionConflict,
)

# Order matters: subclasses before their bases (DependenciesNotDone is an IllegalTransition).
DOMAIN_STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (StoryNotFound, 404),
    (DependenciesNotDone, 409),
    (IllegalTransition, 409),
    (VersionConflict, 409),
    (StoryExists, 409),
    # A malformed story id is bad input wherever it appears (path or body): 422, so that a
    # 404 always means "well-formed, but no such story".
    (InvalidStoryId, 422),
    (InvalidCommand, 422),
    (UnknownEvent, 422),
)


def domain_status(exc: DomainError) -> int:
    for cls, status in DOMAIN_STATUS:
        if isinstance(exc, cls):
            return status
    return 422


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def domain_error_body(exc: DomainError) -> dict[str, Any]:
    return error_body(exc.code, exc.message, exc.details or None)
