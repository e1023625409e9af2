"""Run the Alembic migrations that own every storyline table.

Alembic is imported only when a migration runs: every CLI command opens the service, and
checking that a database is current must not cost the ~0.3 s Alembic takes to import.
"""

from __future__ import annotations

import re
import sqlite3
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from service.settings import Database

if TYPE_CHECKING:
    from alembic.config import Config

SCRIPT_LOCATION = Path(__file__).resolve().parent.parent / "alembic"
_REVISION = re.compile(r'^revision\s*=\s*["\']([^"\']+)["\']', re.MULTILINE)
_DOWN = re.compile(r'^down_revision\s*=\s*(None|["\']([^"\']+)["\'])', re.MULTILINE)


def alembic_config(db: Database) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("sqlalchemy.url", db.sqlalchemy_url.replace("%", "%%"))
    return cfg


def upgrade(db: Database, revision: str = "head") -> None:
    from alembic import command

    path = db.sqlite_path if db.kind == "sqlite" else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(db), revision)
    if path is not None:
        _use_wal(path)


def _use_wal(path: Path) -> None:
    """Leave the file in WAL mode (it is persistent). The application's connections would
    switch it themselves, but that switch needs the file to themselves: the first two
    connections of a new database (the API's and the projections', say) could make each
    other fail with "database is locked"."""
    conn = sqlite3.connect(str(path), timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def current_revision(db: Database) -> str | None:
    if db.kind == "sqlite":
        assert db.sqlite_path is not None
        if not db.sqlite_path.exists():
            return None
        conn = sqlite3.connect(db.sqlite_path, timeout=30)
        try:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:
            return None  # no alembic_version table yet
        finally:
            conn.close()
        return str(row[0]) if row else None
    import psycopg

    with psycopg.connect(
        host=db.host,
        port=db.port,
        user=db.user,
        password=db.password or None,
        dbname=db.dbname,
        connect_timeout=10,
    ) as pg:
        try:
            found = pg.execute("SELECT version_num FROM alembic_version").fetchone()
        except psycopg.errors.UndefinedTable:
            return None
    return str(found[0]) if found else None


@cache
def head_revision() -> str | None:
    """The newest revision, read from the migration files (one linear chain)."""
    parents: dict[str, str | None] = {}
    for path in (SCRIPT_LOCATION / "versions").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        revision, down = _REVISION.search(text), _DOWN.search(text)
        if revision and down:
            parents[revision.group(1)] = down.group(2)
    children = {parent for parent in parents.values() if parent}
    heads = [rev for rev in parents if rev not in children]
    if len(heads) != 1:
        raise RuntimeError(f"the migrations must form one chain; heads: {sorted(heads)}")
    return heads[0]


def is_up_to_date(db: Database) -> bool:
    return current_revision(db) == head_revision()
