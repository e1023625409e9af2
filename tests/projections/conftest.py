"""Fixtures for the projection tests: a runner and the read models on the ``database``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from projections import ProjectionRunner, ReadModels
from projections.definitions import PROJECTIONS, build
from projections.engine import BulkWriter
from service.application import StorylineApplication
from service.settings import Database


@pytest.fixture
def runner(database: Database, app: StorylineApplication) -> Iterator[ProjectionRunner]:
    # An odd, small batch so stories and agent runs straddle batch boundaries.
    projection_runner = ProjectionRunner(
        database, app, batch_size=7, rebuild_batch_size=50, poll_interval=0.2
    )
    try:
        yield projection_runner
    finally:
        projection_runner.close()


@pytest.fixture
def read_models(database: Database) -> Iterator[ReadModels]:
    models = ReadModels(database)
    try:
        yield models
    finally:
        models.close()


def database_url(db: Database) -> str:
    if db.kind == "sqlite":
        return f"sqlite:///{db.sqlite_path}"
    return f"postgresql://{db.user}@{db.host}:{db.port}/{db.dbname}"


def dump_projection_tables(read_models: ReadModels) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every projection table, in primary-key order."""
    writer = BulkWriter(read_models.engine.dialect.name)
    dumped: dict[str, list[tuple[Any, ...]]] = {}
    with read_models.engine.connect() as conn:
        for name in PROJECTIONS:
            for table in build(name, writer).all_tables:
                query = select(table).order_by(*table.primary_key.columns)
                dumped[table.name] = [tuple(row) for row in conn.execute(query)]
    return dumped
