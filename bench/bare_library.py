"""Row 2: the bare ``eventsourcing`` application, one event saved per command.

A minimal aggregate (one ``@event`` command method) in a plain ``Application``; each client
holds its own aggregate in memory and each command triggers one event and calls ``save``
(no load: that is row 3's business). Variants:

* ``2``  the library's defaults (its JSON transcoder; on PostgreSQL the default statements:
  ``LOCK TABLE ... IN EXCLUSIVE MODE`` + ``INSERT`` + ``NOTIFY`` in one pipelined transaction);
* ``2b`` PostgreSQL with ``POSTGRES_ENABLE_DB_FUNCTIONS=yes`` (what storyline uses);
* ``2c`` a command that loads the aggregate first (``repository.get`` + trigger + ``save``),
  round robin over 20 aggregates per client, with the library's aggregate cache and
  fast-forward on (and DB functions on PostgreSQL): the bare library's version of row 3.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from bench.common import Measurement, Settings, run_clients, scratch_database
from service.settings import Database

LABELS = {
    "2": "bare eventsourcing app, save 1 event/command (library defaults)",
    "2b": "bare eventsourcing app, save 1 event/command (+ DB functions)",
    "2c": "bare eventsourcing app, get (cache + fast-forward) + save 1 event/command",
}


class Counter(Aggregate):
    """The smallest aggregate that records something per command."""

    @event("Created")
    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.reason = ""

    @event("Bumped")
    def bump(self, reason: str) -> None:
        self.count += 1
        self.reason = reason


class BareApp(Application[Any]):
    name = "bare"


def env_for(db: Database, *, db_functions: bool, create: bool = False) -> dict[str, str]:
    # Clients never create tables: concurrent CREATE OR REPLACE FUNCTION fails.
    create_table = "yes" if create else "no"
    if db.kind == "sqlite":
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(db.sqlite_path),
            "SQLITE_LOCK_TIMEOUT": "30",
            "CREATE_TABLE": create_table,
        }
    env = {
        "CREATE_TABLE": create_table,
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": db.dbname,
        "POSTGRES_HOST": db.host,
        "POSTGRES_PORT": str(db.port),
        "POSTGRES_USER": db.user,
        "POSTGRES_PASSWORD": db.password,
    }
    if db_functions:
        env["POSTGRES_ENABLE_DB_FUNCTIONS"] = "yes"
    return env


def create_tables(db: Database, *, db_functions: bool) -> None:
    # The library creates its own tables (and functions) by default; do it once, before
    # the clients start, so they never race on DDL.
    BareApp(env_for(db, db_functions=db_functions, create=True)).close()


def client(
    index: int, url: str, db_functions: bool, load: bool
) -> tuple[Callable[[], None], Callable[[], None]]:
    from service.settings import parse_database_url

    env = env_for(parse_database_url(url), db_functions=db_functions)
    if load:
        env.update({"AGGREGATE_CACHE_MAXSIZE": "256", "AGGREGATE_CACHE_FASTFORWARD": "y"})
    app = BareApp(env)
    counters = [Counter(name=f"client-{index}-{uuid.uuid4().hex[:6]}") for _ in range(20)]
    app.save(*counters)
    counter = counters[0]
    ids = [c.id for c in counters]
    turn = 0

    def save_only() -> None:
        counter.bump("bench")
        app.save(counter)

    def get_and_save() -> None:
        nonlocal turn
        turn += 1
        loaded: Counter = app.repository.get(ids[turn % len(ids)])
        loaded.bump("bench")
        app.save(loaded)

    return (get_and_save if load else save_only), app.close


def _one(settings: Settings, backend: str, variant: str, clients: int) -> Measurement:
    db_functions = variant in ("2b", "2c")
    with scratch_database(settings, backend, migrate=False) as db:
        create_tables(db, db_functions=db_functions)
        result = run_clients(
            "bench.bare_library:client",
            clients,
            settings,
            url=db.url,
            db_functions=db_functions,
            load=variant == "2c",
        )
    return Measurement(
        variant,
        LABELS[variant],
        backend,
        clients,
        result.rate,
        "commits/s",
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
    )


def run(settings: Settings) -> list[Measurement]:
    out: list[Measurement] = []
    for backend in settings.backends:
        variants = ("2", "2b", "2c") if backend == "postgres" else ("2", "2c")
        for variant in variants:
            for clients in (1, 4):
                out.append(_one(settings, backend, variant, clients))
    return out
