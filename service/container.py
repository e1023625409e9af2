"""Opening the service for a project: config, database, schema check, application."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from domain.config import StorylineConfig
from service import migrations
from service.application import StorylineApplication
from service.config_file import load_config
from service.policies import story_policy
from service.settings import Database, SettingsError, project_dir, resolve_database


@dataclass
class Service:
    project: Path
    db: Database
    config: StorylineConfig
    app: StorylineApplication

    @property
    def state_dir(self) -> Path:
        return self.project / ".storyline"

    def close(self) -> None:
        self.app.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ensure_schema(db: Database) -> None:
    """SQLite (embedded, one machine) migrates itself; PostgreSQL must be migrated first.

    Several processes may share a PostgreSQL database, so none of them races to create
    tables at start-up: ``storyline db upgrade`` does it once.
    """
    if db.kind == "sqlite":
        if migrations.current_revision(db) != migrations.head_revision():
            migrations.upgrade(db)
        return
    try:
        current = migrations.current_revision(db)
    except Exception as exc:
        raise SettingsError(f"cannot reach the database {db.display}: {exc}") from None
    head = migrations.head_revision()
    if current != head:
        raise SettingsError(
            f"the database {db.display} is at schema revision {current or 'none'}, "
            f"this storyline needs {head}: run `storyline db upgrade`"
        )


def open_service(
    project: str | Path | None = None,
    database_url: str | None = None,
    *,
    config: StorylineConfig | None = None,
    pool_size: int = 5,
) -> Service:
    root = project_dir(project)
    db = resolve_database(root, database_url)
    cfg = config if config is not None else load_config(root)
    ensure_schema(db)
    app = StorylineApplication(db, policy=story_policy(cfg), pool_size=pool_size)
    return Service(project=root, db=db, config=cfg, app=app)
