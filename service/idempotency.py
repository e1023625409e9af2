"""Durable idempotency keys: the same key and body replays the first answer.

A key is claimed (a row with no answer yet) before the command runs and completed with the
answer after it, so a retry that arrives while the first request is still running sees
"in progress" rather than running the command twice. Keys are scoped per actor and kept
for ``ttl_secs``; rows live in the database, so a restarted API still remembers them.

The event and the answer are two transactions, but the first one also marks the key: the
event store's insert writes the story id and the event's log position onto the key's row in
the event's own transaction (:class:`IdempotencyMark`, passed through the library's
``save(**kwargs)`` to ``service.recorder``). A process killed between the commit and the
answer therefore leaves a key that says "committed at position P": a retry gets
``Claim("committed")`` and rebuilds the first answer from the story as of P instead of
running the command again. A key without the mark (the process died before the commit)
is taken over after ``lease_secs`` and the command runs, as it never ran.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

from service.sqlstore import SqlStore

if TYPE_CHECKING:
    from service.application import StorylineApplication

TABLE = "storyline_idempotency"
MAX_KEY_LENGTH = 200


def fingerprint(method: str, path: str, body: Any) -> str:
    """A stable digest of what a request asks for (key order in the JSON does not matter)."""
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256()
    digest.update(f"{method.upper()} {path}\n".encode())
    digest.update(canonical)
    return digest.hexdigest()


def valid_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_LENGTH and all(33 <= ord(ch) <= 126 for ch in key)


MARK_KWARG = "idempotency_mark"
"""The keyword under which ``Application.save`` hands an :class:`IdempotencyMark` to the
recorder (the library passes save's keyword arguments through to ``insert_events``)."""


@dataclass(frozen=True)
class IdempotencyMark:
    """The key a command runs under; the recorder marks it in the event's transaction."""

    actor: str
    key: str


MARK_SQL = (
    f"UPDATE {TABLE} SET story_id = ?, committed_position = ? "
    "WHERE actor = ? AND idem_key = ? AND status_code IS NULL"
)
"""Run by the recorders inside the insert's transaction (``?`` placeholders; the PostgreSQL
recorder converts them)."""


def mark_params(mark: IdempotencyMark, story_id: str, position: int) -> tuple[Any, ...]:
    return (story_id, position, mark.actor, mark.key)


@dataclass(frozen=True)
class Claim:
    """What :meth:`IdempotencyStore.claim` found.

    ``state`` is ``claimed`` (run the command, then :meth:`complete` or :meth:`release`),
    ``replay`` (send ``status_code``/``body`` again), ``mismatch`` (the key was used with a
    different body), ``in_progress`` (the first request has not finished yet) or
    ``committed`` (the first request's command committed at ``position`` on ``story_id``
    but its process died before answering: rebuild that answer, then :meth:`complete`).
    """

    state: Literal["claimed", "replay", "mismatch", "in_progress", "committed"]
    status_code: int | None = None
    body: Any = None
    story_id: str | None = None
    position: int | None = None


class IdempotencyStore:
    def __init__(
        self,
        app: StorylineApplication,
        *,
        ttl_secs: float = 24 * 3600,
        lease_secs: float = 60.0,
        purge_every_secs: float = 300.0,
    ) -> None:
        self._sql = SqlStore(app)
        self.ttl_secs = ttl_secs
        self.lease_secs = lease_secs
        self._purge_every = purge_every_secs
        self._last_purge = 0.0
        self._purge_lock = threading.Lock()

    def claim(self, actor: str, key: str, fp: str, *, seen: bool = False) -> Claim:
        """Claim ``key`` for a request with fingerprint ``fp``, or say why not.

        ``seen``: the key was found in use a moment ago (a poll while waiting for the first
        request): read before trying to insert, so waiting costs no write transactions.
        """
        now = time.time()
        if not seen:
            self._maybe_purge(now)
            inserted = self._sql.write(
                f"INSERT INTO {TABLE} (actor, idem_key, fingerprint, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (actor, idem_key) DO NOTHING RETURNING idem_key",
                (actor, key, fp, now),
            )
            if inserted:
                return Claim("claimed")
        rows = self._sql.query(
            f"SELECT fingerprint, status_code, response_body, created_at, story_id, "
            f"committed_position FROM {TABLE} WHERE actor = ? AND idem_key = ?",
            (actor, key),
        )
        if not rows:
            # Purged between our insert and our read: the key is free again.
            return self.claim(actor, key, fp)
        row = rows[0]
        if row["fingerprint"] != fp:
            return Claim("mismatch")
        if row["status_code"] is not None:
            return Claim("replay", int(row["status_code"]), orjson.loads(row["response_body"]))
        if row["committed_position"] is not None:
            # The command committed but its answer is not stored: its process died, or it is
            # about to store it. Either way the answer can be rebuilt now (the same answer,
            # whoever stores it first).
            return Claim(
                "committed",
                story_id=str(row["story_id"]),
                position=int(row["committed_position"]),
            )
        if now - float(row["created_at"]) < self.lease_secs:
            return Claim("in_progress")
        # The first request's process died before answering: take the lease over, but only
        # if nobody else did in the meantime (compare-and-swap on created_at).
        taken = self._sql.write(
            f"UPDATE {TABLE} SET created_at = ? WHERE actor = ? AND idem_key = ? "
            "AND status_code IS NULL AND created_at = ? RETURNING idem_key",
            (now, actor, key, row["created_at"]),
        )
        return Claim("claimed") if taken else Claim("in_progress")

    def complete(self, actor: str, key: str, status_code: int, body: Any) -> None:
        self._sql.write(
            f"UPDATE {TABLE} SET status_code = ?, response_body = ?, completed_at = ? "
            "WHERE actor = ? AND idem_key = ?",
            (status_code, orjson.dumps(body).decode(), time.time(), actor, key),
        )

    def release(self, actor: str, key: str) -> None:
        """Forget an unanswered claim (the command failed unexpectedly; a retry may run)."""
        # A marked key stays: its command committed (the failure came after the commit, a
        # lost connection say), and a retry must get that command's answer.
        self._sql.write(
            f"DELETE FROM {TABLE} WHERE actor = ? AND idem_key = ? AND status_code IS NULL "
            "AND committed_position IS NULL",
            (actor, key),
        )

    def purge(self, older_than: float) -> None:
        self._sql.write(f"DELETE FROM {TABLE} WHERE created_at < ?", (older_than,))

    def _maybe_purge(self, now: float) -> None:
        if now - self._last_purge < self._purge_every or not self._purge_lock.acquire(False):
            return
        try:
            self._last_purge = now
            self.purge(now - self.ttl_secs)
        finally:
            self._purge_lock.release()
