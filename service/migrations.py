"""Run the Alembic migrations that own every storyline table."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from service.settings import Database

SCRIPT_LOCATION = Path(__file__).resolve().parent.parent / "alembic"


def alembic_config(db: Database) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("sqlalchemy.url", db.sqlalchemy_url.replace("%", "%%"))
    return cfg


def upgrade(db: Database, revision: str = "head") -> None:
    if db.kind == "sqlite":
        assert db.sqlite_path is not None
        db.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(db), revision)


def current_revision(db: Database) -> str | None:
    engine = create_engine(db.sqlalchemy_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    return ScriptDirectory.from_config(cfg).get_current_head()


def is_up_to_date(db: Database) -> bool:
    return current_revision(db) == head_revision()
