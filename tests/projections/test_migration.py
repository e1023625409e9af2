"""Migration 0002 creates exactly the tables ``projections.tables`` describes, and undoes them."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool

from projections.tables import PROJECTION_TABLES, metadata
from service import migrations
from service.settings import Database

OURS = {table.name for table in PROJECTION_TABLES}


def differences(db: Database) -> list[Any]:
    engine = create_engine(db.sqlalchemy_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            found = compare_metadata(context, metadata)
    finally:
        engine.dispose()

    def table_of(diff: Any) -> str | None:
        entry = diff[0] if isinstance(diff, list) else diff
        for item in entry[1:]:
            name = getattr(item, "name", None) if not isinstance(item, str) else None
            table = getattr(item, "table", None)
            if table is not None:
                return str(table.name)
            if name in OURS:
                return str(name)
            if isinstance(item, str) and item in OURS:
                return item
        return None

    return [d for d in found if table_of(d) in OURS]


def table_names(db: Database) -> set[str]:
    engine = create_engine(db.sqlalchemy_url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_the_migrated_schema_is_the_metadata(database: Database) -> None:
    assert table_names(database) >= OURS
    assert differences(database) == []


def test_downgrade_removes_the_projection_tables_and_upgrade_restores_them(
    database: Database,
) -> None:
    command.downgrade(migrations.alembic_config(database), "0001")
    assert not OURS & table_names(database)
    migrations.upgrade(database)
    assert table_names(database) >= OURS
    assert differences(database) == []
