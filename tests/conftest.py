"""Shared fixtures: real databases (a SQLite file, a uniquely named PostgreSQL database).

PostgreSQL comes from ``STORYLINE_TEST_PG_URL`` (default: the local server as ``postgres``).
When it cannot be reached the PostgreSQL half is skipped and the run says so loudly at the
end; under CI (``CI`` or ``STORYLINE_REQUIRE_POSTGRES`` set) an unreachable server is an error.
"""

from __future__ import annotations

import os
import shutil
import time
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


def create_pg_database(template: str | None = None) -> Database:
    """A new database: empty, or a copy of ``template`` (one no session is connected to)."""
    require_postgres()
    name = f"sl_test_{uuid.uuid4().hex[:12]}"
    sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn.execute(sql)
                break
            except psycopg.errors.ObjectInUse:
                # The template's last session (the migration's) may still be ending.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
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


# Each test's migrated database is a copy of one that Alembic migrated at the start of the
# session (one per xdist worker): the same schema, without running every migration again for
# each of some 600 tests. Migrating itself stays tested: the template is a real upgrade, and
# tests/projections/test_migration.py and the CLI's ``db upgrade`` tests migrate their own.


@pytest.fixture(scope="session")
def migrated_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("migrated-template") / "storyline.db"
    migrations.upgrade(Database(kind="sqlite", sqlite_path=path))
    return path


@pytest.fixture(scope="session")
def migrated_pg_template() -> Iterator[str]:
    db = create_pg_database()
    try:
        migrations.upgrade(db)
        yield db.dbname
    finally:
        drop_pg_database(db)


def migrated_pg_database(request: pytest.FixtureRequest) -> Database:
    require_postgres()  # before the session's template: each test skips (or fails) itself
    return create_pg_database(template=request.getfixturevalue("migrated_pg_template"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "storyline.db"
        shutil.copyfile(request.getfixturevalue("migrated_sqlite_template"), path)
        yield Database(kind="sqlite", sqlite_path=path)
        return
    db = migrated_pg_database(request)
    try:
        yield db
    finally:
        drop_pg_database(db)


@pytest.fixture
def pg_database(request: pytest.FixtureRequest) -> Iterator[Database]:
    """A migrated, empty PostgreSQL database (for PostgreSQL-only tests)."""
    db = migrated_pg_database(request)
    try:
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
