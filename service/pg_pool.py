"""The event store's PostgreSQL pool checks a connection only when the server spoke to it.

After a PostgreSQL restart every idle pooled connection is dead, and without a check each
one fails a request (answered 503) before the pool replaces it. The library's pre-ping
(``POSTGRES_PRE_PING``) checks with an empty query on every checkout: one more round trip
on every command, a measurable share of a commit (BENCHMARKS.md, row 3). And when it finds a
dead connection psycopg_pool backs off (1 s, then 2 s, 4 s ...) before taking the next one,
which after a restart is just as dead: with four or more stale connections the request runs
into the pool's timeout.

A connection that sits idle in the pool has nothing to read: the server only writes to it
when it ends it (a shutdown, a restart, a terminated backend: its last message and the
closed socket) or for a notification. So the check here asks the kernel, without a round
trip, whether the socket is readable, and pings only then. A ping that fails means the
server went away, so every idle connection is checked at once (``pool.check()``) and the
dead ones replaced: the request waits out one back-off and gets a new connection instead of
a 503. A peer that vanished without a word (a cut cable) is not detected here; the request
fails and is answered 503, as without any check.
"""

from __future__ import annotations

import select
import weakref
from collections.abc import Callable
from typing import Any

import psycopg
from eventsourcing.postgres import ConnectionPool, PostgresFactory
from eventsourcing.utils import Environment


def spoken_to(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server wrote to the idle ``conn`` (or it is closed): then ping it."""
    if conn.closed:
        return True
    poller = select.poll()  # not select.select: a busy server may have fds past 1024
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def check_if_spoken_to(pool: ConnectionPool[Any]) -> Callable[[psycopg.Connection[Any]], None]:
    """The check ``pool`` runs on checkout: raise if the connection is dead (the pool then
    replaces it), after sweeping the other idle connections, which died with it."""
    pool_ref = weakref.ref(pool)  # the pool holds the check: no reference cycle

    def check(conn: psycopg.Connection[Any]) -> None:
        if not spoken_to(conn):
            return
        try:
            ConnectionPool.check_connection(conn)
        except Exception:
            swept = pool_ref()
            if swept is not None:
                swept.check()
            raise

    return check


class StorylinePostgresFactory(PostgresFactory):
    """The library's PostgreSQL persistence, with :func:`check_if_spoken_to` as the pool's
    check when ``POSTGRES_PRE_PING`` is on (``PERSISTENCE_MODULE`` names this class)."""

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        pool = self.datastore.pool
        # psycopg_pool takes the check only as a constructor argument, and the library
        # builds the pool; it keeps the callable in ``_check``. Replaced only when the
        # library set its pre-ping there, so a different pool keeps the library's check.
        if getattr(pool, "_check", None) is ConnectionPool.check_connection:
            pool._check = check_if_spoken_to(pool)
        if isinstance(pool.kwargs, dict):
            pool.kwargs.update(DEAD_PEER_KWARGS)


DEAD_PEER_KWARGS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
"""libpq settings for a server whose host vanished (no RST, no FIN): without them a query
on such a connection waits for the kernel's own retransmission limit, about 15 minutes.
Unacknowledged data for 10 s, or an idle connection unanswered for 25 s, ends it, and the
request is answered 503. A server that is up but hung is not detected this way."""
