"""Short SQL statements on the application's own connection pool.

The API's tables (idempotency keys, agent tokens) are small and hot; borrowing the event
store's pool avoids a second pool per process and keeps SQLite on one set of connections
(WAL, busy timeout) instead of two that could starve each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.application import StorylineApplication

Row = Mapping[str, Any]


class SqlStore:
    """Runs one statement per transaction; ``?`` placeholders work on both databases."""

    def __init__(self, app: StorylineApplication) -> None:
        self.kind = app.db.kind
        self._datastore: Any = app.recorder.datastore  # type: ignore[attr-defined]

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.kind == "postgres" else statement

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._datastore.transaction(commit=False) as curs:
            curs.execute(self._sql(statement), tuple(params))
            return [dict(row) for row in curs.fetchall()]

    def write(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        """Execute and commit; returns the rows of a ``RETURNING`` clause (else empty)."""
        with self._datastore.transaction(commit=True) as curs:
            curs.execute(self._sql(statement), tuple(params))
            if " RETURNING " not in statement.upper():
                return []
            return [dict(row) for row in curs.fetchall()]
