"""Shared fixtures: real databases (a SQLite file, a uniquely named PostgreSQL database).

PostgreSQL comes from ``STORYLINE_TEST_PG_URL`` (default: the local server as ``postgres``).
When it cannot be reached the PostgreSQL half is skipped and the run says so loudly at the
end; under CI (``CI`` or ``STORYLINE_REQUIRE_POSTGRES`` set) an unreachable server is an error.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from service import migrations
from service.settings import Database, parse_database_url

PG_ADMIN_URL = os.environ.get(
    "STORYLINE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_PG = bool(os.environ.get("CI") or os.environ.get("STORYLINE_REQUIRE_POSTGRES"))

_pg_state: dict[str, object] = {"checked": False, "error": None, "skipped": 0}


def _pg_error() -> str | None:
    if not _pg_state["checked"]:
        _pg_state["checked"] = True
        try:
            with psycopg.connect(PG_ADMIN_URL, connect_timeout=5, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:
            _pg_state["error"] = f"{type(exc).__name__}: {exc}".strip()
    return _pg_state["error"]  # type: ignore[return-value]


def require_postgres() -> None:
    error = _pg_error()
    if error is None:
        return
    if REQUIRE_PG:
        pytest.fail(f"PostgreSQL is required here but unreachable at {PG_ADMIN_URL}: {error}")
    _pg_state["skipped"] = int(_pg_state["skipped"]) + 1  # type: ignore[call-overload]
    pytest.skip(f"PostgreSQL unreachable ({error})")


def create_pg_database() -> Database:
    require_postgres()
    name = f"sl_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    admin = parse_database_url(PG_ADMIN_URL)
    return Database(
        kind="postgres",
        host=admin.host,
        port=admin.port,
        user=admin.user,
        password=admin.password,
        dbname=name,
    )


def drop_pg_database(db: Database) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db.dbname}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty database of each kind."""
    if request.param == "sqlite":
        db = Database(kind="sqlite", sqlite_path=tmp_path / "storyline.db")
        migrations.upgrade(db)
        yield db
        return
    db = create_pg_database()
    try:
        migrations.upgrade(db)
        yield db
    finally:
        drop_pg_database(db)


@pytest.fixture
def pg_database() -> Iterator[Database]:
    """A migrated, empty PostgreSQL database (for PostgreSQL-only tests)."""
    db = create_pg_database()
    try:
        migrations.upgrade(db)
        yield db
    finally:
        drop_pg_database(db)


@pytest.fixture
def app(database: Database) -> Iterator[object]:
    from service.application import StorylineApplication

    application = StorylineApplication(database)
    try:
        yield application
    finally:
        application.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = int(_pg_state["skipped"])  # type: ignore[call-overload]
    if skipped:
        bar = "!" * 78
        terminalreporter.write_line(bar, red=True, bold=True)
        terminalreporter.write_line(
            f"PostgreSQL was NOT tested: {skipped} PostgreSQL tests were skipped because "
            f"{PG_ADMIN_URL} is unreachable ({_pg_state['error']}).",
            red=True,
            bold=True,
        )
        terminalreporter.write_line(
            "Start PostgreSQL (or set STORYLINE_TEST_PG_URL) to run the whole suite.",
            red=True,
            bold=True,
        )
        terminalreporter.write_line(bar, red=True, bold=True)
