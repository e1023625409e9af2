"""Worker runners in the database: per-story leases and the worker registry (scale-out).

PostgreSQL is the only state the workers share (besides the git remote). A story lease is a
row claimed by an atomic upsert that succeeds only when the row is free, expired or already
the caller's (the same guarantee ``SELECT ... FOR UPDATE SKIP LOCKED`` gives a job queue: two
workers never both win; the loser moves on instead of waiting). Every new claim raises the
row's generation, which the winner then records in the story's log (``WorkerClaimed``): that
log entry, not this table, fences the story's later writes.

Times are the database's clock (``expires_at``, ``heartbeat_at`` in epoch seconds), so the
workers' own clocks may disagree without one stealing another's live lease.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from service.sqlstore import SqlStore

if TYPE_CHECKING:
    from service.application import StorylineApplication

LEASES = "storyline_story_leases"
WORKERS = "storyline_workers"


def default_worker_id() -> str:
    """host:pid:random. A restarted worker is a new worker: its old leases simply expire."""
    host = "".join(
        c if (c.isascii() and c.isalnum()) or c in "._-" else "-" for c in socket.gethostname()
    )[:100]
    if not host[:1].isalnum():
        host = f"host{host}"
    return f"{host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def without_credentials(url: str | None) -> str | None:
    """The remote's URL without a user or password (an ``https://user:token@...`` URL must
    not reach the registry, which every reader of the API and the board sees)."""
    if not url or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(hidden)"
    if parts.scheme and parts.netloc:
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url  # scp-like user@host:path: a login name, no secret


def database_now(kind: str) -> str:
    """SQL for the database's clock in epoch seconds (leases expire by it)."""
    if kind == "postgres":
        return "EXTRACT(EPOCH FROM clock_timestamp())::float8"
    return "((julianday('now') - 2440587.5) * 86400.0)"


def _greatest(kind: str, a: str, b: str) -> str:
    return f"GREATEST({a}, {b})" if kind == "postgres" else f"MAX({a}, {b})"


@dataclass(frozen=True)
class Claim:
    story_id: str
    holder: str
    generation: int
    expires_at: float


class StoryLeases:
    """The lease table, as one worker (``worker``) uses it."""

    def __init__(self, app: StorylineApplication, worker: str, ttl_secs: float = 15.0) -> None:
        self._sql = SqlStore(app)
        self.worker = worker
        self.ttl_secs = ttl_secs
        self._now = database_now(self._sql.kind)

    def claim(self, story_id: str, *, floor: int = 1) -> Claim | None:
        """Take or keep the story's lease; None while another worker's lease is live.

        A new claim (the row was free, expired, or someone else's expired one) gets a new
        generation, at least ``floor`` (the story's recorded generation + 1, so a wiped table
        can never hand out a generation the log would refuse as stale). Keeping a live lease
        of one's own keeps its generation.
        """
        t = LEASES
        now = self._now
        bumped = _greatest(self._sql.kind, f"{t}.generation + 1", "excluded.generation")
        rows = self._sql.write(
            f"INSERT INTO {t} (story_id, holder, generation, expires_at, acquired_at) "
            f"VALUES (?, ?, ?, {now} + ?, {now}) "
            f"ON CONFLICT (story_id) DO UPDATE SET "
            f"generation = CASE WHEN {t}.holder = excluded.holder AND {t}.expires_at >= {now} "
            f"THEN {t}.generation ELSE {bumped} END, "
            f"acquired_at = CASE WHEN {t}.holder = excluded.holder AND {t}.expires_at >= {now} "
            f"THEN {t}.acquired_at ELSE excluded.acquired_at END, "
            f"holder = excluded.holder, expires_at = excluded.expires_at "
            f"WHERE {t}.expires_at < {now} OR {t}.holder = excluded.holder "
            f"RETURNING story_id, holder, generation, expires_at",
            (story_id, self.worker, max(1, floor), self.ttl_secs),
        )
        if not rows:
            return None
        row = rows[0]
        return Claim(
            str(row["story_id"]), str(row["holder"]), int(row["generation"]), row["expires_at"]
        )

    def renew(self) -> set[str]:
        """Extend every live lease of this worker; returns the stories still held.

        A lease that expired is not revived, even if nobody took it: its story must be
        claimed again (a new generation), since another worker may be about to.
        """
        rows = self._sql.write(
            f"UPDATE {LEASES} SET expires_at = {self._now} + ? "
            f"WHERE holder = ? AND expires_at >= {self._now} RETURNING story_id",
            (self.ttl_secs, self.worker),
        )
        return {str(r["story_id"]) for r in rows}

    def release(self, story_id: str) -> None:
        """Give the lease up: the row goes (the table holds live and expired leases only;
        the next claim's generation comes from the story's log, as ``floor``)."""
        self._sql.write(
            f"DELETE FROM {LEASES} WHERE story_id = ? AND holder = ?", (story_id, self.worker)
        )

    def release_all(self) -> None:
        self._sql.write(f"DELETE FROM {LEASES} WHERE holder = ?", (self.worker,))


@dataclass(frozen=True)
class LeaseRow:
    story_id: str
    holder: str
    generation: int
    expires_in: float


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    host: str
    pid: int
    role: str
    capacity: int
    remote: str | None
    held: int
    merger: bool
    ttl_secs: float
    """The worker's lease time: silent for longer than this, it counts as gone."""
    started_at: float
    heartbeat_age: float
    """Seconds since the last heartbeat, by the database's clock."""
    stopped: bool

    @property
    def alive(self) -> bool:
        return not self.stopped and self.heartbeat_age <= self.ttl_secs

    def as_json(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "role": self.role,
            "capacity": self.capacity,
            "remote": self.remote,
            "held": self.held,
            "merger": self.merger,
            "ttl_secs": self.ttl_secs,
            "heartbeat_age_secs": round(self.heartbeat_age, 3),
            "alive": self.alive,
            "stopped": self.stopped,
        }


class Workers:
    """The registry: heartbeats written by workers, read by the API, CLI and board."""

    FORGET_AFTER_SECS = 86400.0
    """A worker gone for a day leaves the registry (a restarted worker is a new row)."""

    def __init__(self, app: StorylineApplication) -> None:
        self._sql = SqlStore(app)
        self._now = database_now(self._sql.kind)

    def heartbeat(
        self,
        worker_id: str,
        *,
        role: str,
        capacity: int,
        held: int,
        merger: bool,
        remote: str | None,
        ttl_secs: float = 15.0,
    ) -> None:
        now = self._now
        self._sql.write(
            f"INSERT INTO {WORKERS} (worker_id, host, pid, role, capacity, remote, held, "
            f"merger, ttl_secs, started_at, heartbeat_at) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {now}, {now}) "
            f"ON CONFLICT (worker_id) DO UPDATE SET capacity = excluded.capacity, "
            f"held = excluded.held, merger = excluded.merger, ttl_secs = excluded.ttl_secs, "
            f"heartbeat_at = excluded.heartbeat_at, stopped_at = NULL",
            (
                worker_id,
                socket.gethostname(),
                os.getpid(),
                role,
                capacity,
                without_credentials(remote),
                held,
                merger,
                ttl_secs,
            ),
        )

    def stopped(self, worker_id: str) -> None:
        self._sql.write(
            f"UPDATE {WORKERS} SET stopped_at = {self._now}, held = 0, merger = ? "
            "WHERE worker_id = ?",
            (False, worker_id),
        )

    def rows(self) -> list[WorkerRow]:
        rows = self._sql.query(
            "SELECT worker_id, host, pid, role, capacity, remote, held, merger, ttl_secs, "
            f"started_at, "
            f"{self._now} - heartbeat_at AS age, stopped_at FROM {WORKERS} "
            f"WHERE heartbeat_at >= {self._now} - ? ORDER BY worker_id",
            (self.FORGET_AFTER_SECS,),
        )
        return [
            WorkerRow(
                worker_id=str(r["worker_id"]),
                host=str(r["host"]),
                pid=int(r["pid"]),
                role=str(r["role"]),
                capacity=int(r["capacity"]),
                remote=r["remote"],
                held=int(r["held"]),
                merger=bool(r["merger"]),
                ttl_secs=float(r["ttl_secs"]),
                started_at=float(r["started_at"]),
                heartbeat_age=max(0.0, float(r["age"])),
                stopped=r["stopped_at"] is not None,
            )
            for r in rows
        ]

    def leases(self) -> list[LeaseRow]:
        """Live story leases: which worker holds which story."""
        rows = self._sql.query(
            f"SELECT story_id, holder, generation, expires_at - {self._now} AS left_secs "
            f"FROM {LEASES} WHERE holder IS NOT NULL AND expires_at >= {self._now} "
            "ORDER BY story_id"
        )
        return [
            LeaseRow(
                str(r["story_id"]), str(r["holder"]), int(r["generation"]), float(r["left_secs"])
            )
            for r in rows
        ]

    def holders(self) -> dict[str, str]:
        return {row.story_id: row.holder for row in self.leases()}
