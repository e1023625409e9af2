"""Which failures mean "the database is away or busy", and how to say so in one log line.

A PostgreSQL restart makes every layer fail at once: the event store (the library's
OperationalError), the read models (SQLAlchemy's OperationalError around psycopg's) and
direct psycopg reads. These are expected while the database is away; the operator needs the
cause once per failure, not a traceback for each. Anything else keeps its traceback.
"""

from __future__ import annotations

import functools

MAX_LINE = 300


@functools.cache
def unavailable_errors() -> tuple[type[Exception], ...]:
    """The exception classes that mean the database could not be reached or was busy."""
    from eventsourcing.persistence import OperationalError as StoreOperationalError

    found: list[type[Exception]] = [StoreOperationalError]
    try:
        import psycopg

        found.append(psycopg.OperationalError)  # includes psycopg_pool.PoolTimeout
    except ImportError:  # pragma: no cover - psycopg is a dependency
        pass
    try:
        import sqlalchemy.exc

        found += [sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError]
    except ImportError:  # pragma: no cover - SQLAlchemy is a dependency
        pass
    return tuple(found)


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, unavailable_errors())


def describe(exc: BaseException) -> str:
    """``Class: message`` of the underlying driver error, on one line, bounded."""
    inner = getattr(exc, "orig", None) or exc.__cause__ or exc
    text = " ".join(str(inner).split())
    line = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


__all__ = ["describe", "is_unavailable", "unavailable_errors"]
