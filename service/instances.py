"""Is the server instance that holds an idempotency claim still alive?

A claim names its owner, a random instance id (one per API process and database). Each
owner holds a lock that the operating system or the database drops the moment the process
dies, so another process can tell "still running" from "killed" without waiting for a
lease or a heartbeat to age:

* PostgreSQL: a session-level advisory lock, keyed by the instance id, held by a dedicated
  connection. A checker asks ``pg_try_advisory_xact_lock`` on its own connection: granted
  means nobody holds it (the transaction's end gives it back at once).
* SQLite: an exclusive ``flock`` on ``<database>-instances/<id>.lock``; the kernel drops it
  when the process dies. A checker that gets the lock removes the file.

An instance that loses its lock while alive (its lock connection was cut) takes a new id
before its next claim: claims under the old id count as abandoned, as they would be after a
crash, and the fencing of the commit mark (``service.idempotency``) keeps their late commits
out.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from service.settings import Database

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: claims keep the lease rule
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import psycopg

    from service.sqlstore import SqlStore

_INSTANCE_ID = re.compile(r"[0-9a-f]{32}")


def new_instance_id() -> str:
    return uuid.uuid4().hex


def advisory_key(instance_id: str) -> int:
    """The signed 64-bit advisory lock key of an instance (its id's first 8 bytes)."""
    return int.from_bytes(bytes.fromhex(instance_id[:16]), "big", signed=True)


class InstanceLiveness(Protocol):
    def current(self) -> str:
        """This process's instance id, its lock held (taken on first use)."""
        ...

    def is_alive(self, instance_id: str) -> bool:
        """False only when the owner is provably gone (its lock is free)."""
        ...

    def close(self) -> None: ...


class PostgresInstance:
    """The instance's advisory lock lives on a dedicated connection for the process's life."""

    def __init__(self, db: Database, sql: SqlStore, *, verify_every_secs: float = 1.0) -> None:
        self._db = db
        self._sql = sql
        self._verify_every = verify_every_secs
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._id = ""
        self._verified = 0.0

    def current(self) -> str:
        with self._lock:
            now = time.monotonic()
            if self._conn is None or (
                now - self._verified >= self._verify_every and not self._still_held()
            ):
                self._acquire()
            self._verified = now
            return self._id

    def _still_held(self) -> bool:
        # At most one round trip a second, and only on the claim path: a cut connection
        # (server restart, idle proxy) is found before the next claim is written under it.
        assert self._conn is not None
        try:
            self._conn.execute("SELECT 1")
            return True
        except Exception:
            return False

    def _acquire(self) -> None:
        import psycopg

        self._drop_connection()
        instance_id = new_instance_id()
        conn = psycopg.connect(
            host=self._db.host,
            port=self._db.port,
            user=self._db.user,
            password=self._db.password or None,
            dbname=self._db.dbname,
            connect_timeout=10,
            autocommit=True,
            application_name=f"storyline instance {instance_id[:12]}",
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        try:
            # A fresh random key: nobody else holds it, so this never waits.
            conn.execute("SELECT pg_advisory_lock(%s)", (advisory_key(instance_id),))
        except BaseException:
            conn.close()
            raise
        self._conn, self._id = conn, instance_id

    def is_alive(self, instance_id: str) -> bool:
        if instance_id == self._id:
            return self._conn is not None
        if not _INSTANCE_ID.fullmatch(instance_id):
            return True  # not one of ours: leave it to the lease
        rows = self._sql.query(
            "SELECT pg_try_advisory_xact_lock(?) AS free", (advisory_key(instance_id),)
        )
        return not rows[0]["free"]

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._drop_connection()


class FileLockInstance:
    """The instance's lock is an open, ``flock``ed file beside the SQLite database."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._id = ""

    def _path(self, instance_id: str) -> Path:
        return self.directory / f"{instance_id}.lock"

    def current(self) -> str:
        with self._lock:
            if self._fd is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                instance_id = new_instance_id()
                fd = os.open(self._path(instance_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd, self._id = fd, instance_id
                self._sweep()
            return self._id

    def _sweep(self) -> None:
        # Files of killed instances that no claim asked about would otherwise pile up.
        for path in self.directory.glob("*.lock"):
            if path.stem != self._id:
                self.is_alive(path.stem)

    def is_alive(self, instance_id: str) -> bool:
        if instance_id == self._id:
            return self._fd is not None
        if fcntl is None or not _INSTANCE_ID.fullmatch(instance_id):
            return True  # cannot tell: leave it to the lease
        path = self._path(instance_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            # Its owner removed it on a clean stop, or a checker did after the owner died.
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._path(self._id).unlink()
                os.close(fd)


def instance_lock_dir(db: Database) -> Path:
    """Beside the database file, as SQLite keeps its own ``-wal`` and ``-shm`` files."""
    assert db.sqlite_path is not None
    return db.sqlite_path.with_name(db.sqlite_path.name + "-instances")


def liveness_for(db: Database, sql: SqlStore) -> InstanceLiveness:
    if db.kind == "postgres":
        return PostgresInstance(db, sql)
    return FileLockInstance(instance_lock_dir(db))
