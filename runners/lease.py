"""A lease in the database: at most one runner process acts at a time.

Several ``storyline runner`` processes may share a PostgreSQL database for availability;
the one holding the lease reacts, the others wait to take over when it stops renewing.
(Optimistic concurrency on the event store is the second line of defence: a spawn is
recorded before it happens, so two processes can never both record the same attempt.)
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from service.application import StorylineApplication
from service.sqlstore import SqlStore
from service.workers import database_now

TABLE = "storyline_runner_leases"


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(
        self,
        app: StorylineApplication,
        name: str = "runners",
        *,
        holder: str | None = None,
        ttl_secs: float = 15.0,
    ) -> None:
        self._sql = SqlStore(app)
        self._now = database_now(self._sql.kind)
        self.name = name
        self.holder = holder or default_holder()
        self.ttl_secs = ttl_secs
        self._held_until = 0.0
        self._renew_at = 0.0

    @property
    def held(self) -> bool:
        return time.time() < self._held_until

    def ensure(self) -> bool:
        """Hold the lease, renewing it only when a third of its time has passed.

        The supervisor calls this on every wake-up (every commit); renewing each time would
        add a database write per transition.
        """
        if self.held and time.time() < self._renew_at:
            return True
        return self.acquire()

    def acquire(self) -> bool:
        """Take or renew the lease; True while this process holds it.

        Expiry is judged by the database's clock (runners on several machines may disagree
        about the time); this process only counts down its own copy, from when it asked.
        """
        asked = time.time()
        now, ttl = self._now, self.ttl_secs
        rows = self._sql.write(
            f"UPDATE {TABLE} SET holder = ?, expires_at = {now} + ?, "
            f"acquired_at = CASE WHEN holder = ? THEN acquired_at ELSE {now} END "
            f"WHERE name = ? AND (holder = ? OR expires_at < {now}) RETURNING name",
            (self.holder, ttl, self.holder, self.name, self.holder),
        )
        if not rows:
            rows = self._sql.write(
                f"INSERT INTO {TABLE} (name, holder, expires_at, acquired_at) "
                f"VALUES (?, ?, {now} + ?, {now}) ON CONFLICT (name) DO NOTHING RETURNING name",
                (self.name, self.holder, ttl),
            )
        self._held_until = asked + ttl * 2 / 3 if rows else 0.0
        self._renew_at = asked + ttl / 3 if rows else 0.0
        return bool(rows)

    def release(self) -> None:
        self._sql.write(
            f"UPDATE {TABLE} SET expires_at = 0 WHERE name = ? AND holder = ?",
            (self.name, self.holder),
        )
        self._held_until = 0.0

    def current_holder(self) -> str | None:
        rows = self._sql.query(
            f"SELECT holder FROM {TABLE} WHERE name = ? AND expires_at >= {self._now}",
            (self.name,),
        )
        return str(rows[0]["holder"]) if rows else None
