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
running the command again.

A key without the mark (the command has not committed) names the server instance that
claimed it (``service.instances``). If that instance is provably gone (its process died: the
lock it held for its life is free), the key is taken over at once and the command runs, as
it never ran; a live owner keeps its claim for ``lease_secs``, and so do claims written
before owners were recorded. The mark is fenced by the owner: a command whose claim was
taken over (its instance lost its lock while still running) no longer matches the row.
"""

from __future__ import annotations

import hashlib
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

from service.instances import InstanceLiveness, liveness_for
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
    """The key a command runs under; the recorder marks it in the event's transaction.

    ``owner``: the instance that claimed the key (``Claim.owner``); the mark only applies
    while the row still names it. ``None`` marks the key whoever holds it."""

    actor: str
    key: str
    owner: str | None = None


MARK_SQL = (
    f"UPDATE {TABLE} SET story_id = ?, committed_position = ? "
    "WHERE actor = ? AND idem_key = ? AND status_code IS NULL "
    "AND (CAST(? AS TEXT) IS NULL OR owner_instance = ?)"
)
"""Run by the recorders inside the insert's transaction (``?`` placeholders; the PostgreSQL
recorder converts them)."""


class ClaimLost(Exception):
    """The key's claim moved to another server instance before this command committed.

    This instance was taken for dead (its liveness lock was gone) and another one took the
    key over, so that one runs the command: this command's transaction is rolled back
    rather than run it a second time."""

    def __init__(self, actor: str, key: str) -> None:
        super().__init__(f"the claim on idempotency key {key!r} of {actor} was taken over")
        self.actor = actor
        self.key = key


def check_marked(mark: IdempotencyMark, rowcount: int) -> None:
    """Raise :class:`ClaimLost` when a mark under an owner updated no row."""
    if rowcount == 0 and mark.owner is not None:
        raise ClaimLost(mark.actor, mark.key)


def mark_params(mark: IdempotencyMark, story_id: str, position: int) -> tuple[Any, ...]:
    return (story_id, position, mark.actor, mark.key, mark.owner, mark.owner)


@dataclass(frozen=True)
class Claim:
    """What :meth:`IdempotencyStore.claim` found.

    ``state`` is ``claimed`` (run the command, then :meth:`complete` or :meth:`release`),
    ``replay`` (send ``status_code``/``body`` again), ``mismatch`` (the key was used with a
    different body), ``in_progress`` (the first request has not finished yet) or
    ``committed`` (the first request's command committed at ``position`` on ``story_id``
    but its process died before answering: rebuild that answer, then :meth:`complete`).
    ``owner`` is the instance a ``claimed`` key is held by (for :class:`IdempotencyMark`).
    """

    state: Literal["claimed", "replay", "mismatch", "in_progress", "committed"]
    status_code: int | None = None
    body: Any = None
    story_id: str | None = None
    position: int | None = None
    owner: str | None = None


class IdempotencyStore:
    def __init__(
        self,
        app: StorylineApplication,
        *,
        ttl_secs: float = 24 * 3600,
        lease_secs: float = 60.0,
        purge_every_secs: float = 300.0,
        liveness: InstanceLiveness | None = None,
    ) -> None:
        self._sql = SqlStore(app)
        self.liveness = liveness if liveness is not None else liveness_for(app.db, self._sql)
        # The instance's lock (a connection, a file) goes with the store.
        self._finalizer = weakref.finalize(self, self.liveness.close)
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
            # Our lock is held before any row names us, so a checker never sees a live
            # owner without its lock.
            me = self.liveness.current()
            inserted = self._sql.write(
                f"INSERT INTO {TABLE} (actor, idem_key, fingerprint, created_at, owner_instance) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (actor, idem_key) DO NOTHING "
                "RETURNING idem_key",
                (actor, key, fp, now, me),
            )
            if inserted:
                return Claim("claimed", owner=me)
        rows = self._sql.query(
            f"SELECT fingerprint, status_code, response_body, created_at, story_id, "
            f"committed_position, owner_instance FROM {TABLE} WHERE actor = ? AND idem_key = ?",
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
        owner: str | None = row["owner_instance"]
        owner_gone = owner is not None and not self.liveness.is_alive(owner)
        if not owner_gone and now - float(row["created_at"]) < self.lease_secs:
            return Claim("in_progress")
        # The first request's process died before its command committed (or, with an owner
        # that is alive, the lease ran out): take the claim over, but only if nobody else
        # did and it did not commit in the meantime (compare-and-swap).
        me = self.liveness.current()
        same_owner = "owner_instance = ?" if owner is not None else "owner_instance IS NULL"
        taken = self._sql.write(
            f"UPDATE {TABLE} SET created_at = ?, owner_instance = ? "
            "WHERE actor = ? AND idem_key = ? AND status_code IS NULL "
            f"AND committed_position IS NULL AND created_at = ? AND {same_owner} "
            "RETURNING idem_key",
            (now, me, actor, key, row["created_at"], *([owner] if owner is not None else [])),
        )
        return Claim("claimed", owner=me) if taken else Claim("in_progress")

    def complete(self, actor: str, key: str, status_code: int, body: Any) -> None:
        self._sql.write(
            f"UPDATE {TABLE} SET status_code = ?, response_body = ?, completed_at = ? "
            "WHERE actor = ? AND idem_key = ?",
            (status_code, orjson.dumps(body).decode(), time.time(), actor, key),
        )

    def release(self, actor: str, key: str, owner: str | None = None) -> None:
        """Forget an unanswered claim (the command failed unexpectedly; a retry may run).

        ``owner``: the claim's owner (``Claim.owner``); a claim another instance has taken
        over since is not ours to forget."""
        # A marked key stays: its command committed (the failure came after the commit, a
        # lost connection say), and a retry must get that command's answer.
        self._sql.write(
            f"DELETE FROM {TABLE} WHERE actor = ? AND idem_key = ? AND status_code IS NULL "
            "AND committed_position IS NULL AND (CAST(? AS TEXT) IS NULL OR owner_instance = ?)",
            (actor, key, owner, owner),
        )

    def close(self) -> None:
        """Give up this process's instance lock (its claims then count as abandoned; a
        later claim takes a new one)."""
        self.liveness.close()

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
