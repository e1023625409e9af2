"""Projection rebuild throughput against a bare read of the same events.

    python -m bench.projection_rebuild                    # 1,000,000 events, temp PG database
    python -m bench.projection_rebuild --events 20000     # smoke run
    python -m bench.projection_rebuild --database-url postgresql://u@host/db --keep

The events come from random valid workloads driven through the domain (every stage, agent
runs with tokens and cost), mapped by the application's own mapper and bulk-loaded into the
event store. Then, in one run and on the same events:

* bare read: the eventsourcing recorder's ``select_notifications`` over the whole log in
  batches (the library's own read path: rows fetched and turned into ``Notification``s);
* rebuild: ``ProjectionRunner.rebuild()`` of every projection (read, decode, fold, write
  board, history, agent runs, merge queue and metrics, one transaction per batch).

It prints events/s for both and the ratio rebuild/read against the target of 0.5.
Without ``--database-url`` a uniquely named PostgreSQL database is created on the admin
server and dropped afterwards. A ``sqlite:///`` URL is accepted too (not the target).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from projections import PROJECTION_NAMES, ProjectionRunner
from projections.workload import generate
from service import migrations
from service.application import StorylineApplication, events_table
from service.codec import OrjsonTranscoder, PydanticMapper
from service.settings import Database, parse_database_url

TARGET_RATIO = 0.5
ADMIN_URL = os.environ.get(
    "STORYLINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
Row = tuple[str, int, str, bytes]


@contextmanager
def temporary_database(admin_url: str) -> Iterator[Database]:
    name = f"sl_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    admin = parse_database_url(admin_url)
    db = Database(
        kind="postgres",
        host=admin.host,
        port=admin.port,
        user=admin.user,
        password=admin.password,
        dbname=name,
    )
    try:
        yield db
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def template_events(seed: int, events: int) -> list[Row]:
    """One workload's events in commit order (story ids without a prefix)."""
    mapper = PydanticMapper(transcoder=OrjsonTranscoder())
    stories = max(20, min(2000, events // 20))
    rows: list[Row] = []
    target = min(events, 50_000)
    for _story, new_events in generate(
        random.Random(seed), stories=stories, steps=target * 2, dependencies=False
    ):
        for event in new_events:
            stored = mapper.to_stored_event(event)
            story_id = str(stored.originator_id)
            rows.append((story_id, stored.originator_version, stored.topic, stored.state))
        if len(rows) >= target:
            break
    return rows


def replicated(template: list[Row], events: int) -> Iterator[Row]:
    """The template again and again under fresh story ids until ``events`` rows."""
    produced = 0
    copy = 0
    while produced < events:
        prefix = f"r{copy}-"
        for story_id, version, topic, state in template:
            if produced >= events:
                return
            yield (prefix + story_id, version, topic, state)
            produced += 1
        copy += 1


def load_events(db: Database, rows: Iterator[Row]) -> int:
    count = 0
    if db.kind == "postgres":
        conninfo = f"host={db.host} port={db.port} user={db.user} dbname={db.dbname}"
        if db.password:
            conninfo += f" password={db.password}"
        table = events_table(db)
        with psycopg.connect(conninfo) as conn:
            with conn.cursor() as cursor:
                copy_sql = (
                    f'COPY "{table}" (originator_id, originator_version, topic, state) FROM STDIN'
                )
                with cursor.copy(copy_sql) as copy:
                    for row in rows:
                        copy.write_row(row)
                        count += 1
            conn.commit()
            conn.autocommit = True
            conn.execute(f'VACUUM ANALYZE "{table}"')
        return count
    import sqlite3

    assert db.sqlite_path is not None
    with sqlite3.connect(db.sqlite_path) as conn:
        batch: list[Row] = []
        for row in rows:
            batch.append(row)
            if len(batch) == 10_000:
                conn.executemany("INSERT INTO stored_events VALUES (?, ?, ?, ?)", batch)
                count += len(batch)
                batch = []
        conn.executemany("INSERT INTO stored_events VALUES (?, ?, ?, ?)", batch)
        count += len(batch)
    return count


def bare_read(db: Database, batch: int) -> tuple[int, float]:
    """The library's own read of the whole log, in batches; returns (events, seconds)."""
    app = StorylineApplication(db)
    try:
        recorder: Any = app.recorder
        started = time.perf_counter()
        count = 0
        position = 0
        while True:
            notifications = recorder.select_notifications(position, batch, inclusive_of_start=False)
            if not notifications:
                break
            count += len(notifications)
            position = notifications[-1].id
        return count, time.perf_counter() - started
    finally:
        app.close()


def rebuild(db: Database, batch: int, name: str | None = None) -> tuple[int, float]:
    runner = ProjectionRunner(db, rebuild_batch_size=batch)
    try:
        started = time.perf_counter()
        applied = runner.rebuild(name)
        return applied, time.perf_counter() - started
    finally:
        runner.close()


def run(db: Database, args: argparse.Namespace) -> int:
    migrations.upgrade(db)
    started = time.perf_counter()
    template = template_events(args.seed, args.events)
    loaded = load_events(db, replicated(template, args.events))
    print(
        f"loaded {loaded:,} events ({len(template):,}-event workload replicated) "
        f"in {time.perf_counter() - started:.1f} s into {db.display}"
    )
    bare_read(db, args.batch_size)  # warm the cache so both timed runs read from memory
    read_rates: list[float] = []
    rebuild_rates: list[float] = []
    for _ in range(args.repeat):
        count, seconds = bare_read(db, args.batch_size)
        assert count == loaded, (count, loaded)
        read_rates.append(count / seconds)
        print(
            f"  bare read      {count:>10,} events {seconds:8.2f} s {count / seconds:>12,.0f} ev/s"
        )
        applied, seconds = rebuild(db, args.batch_size)
        assert applied == loaded, (applied, loaded)
        rebuild_rates.append(applied / seconds)
        print(
            f"  rebuild (all)  {applied:>10,} events {seconds:8.2f} s "
            f"{applied / seconds:>12,.0f} ev/s"
        )
    if args.breakdown:
        for name in PROJECTION_NAMES:
            applied, seconds = rebuild(db, args.batch_size, name)
            print(f"  rebuild {name:<12} {seconds:8.2f} s {applied / seconds:>12,.0f} ev/s")
    if args.check:
        runner = ProjectionRunner(db, rebuild_batch_size=args.batch_size)
        try:
            started = time.perf_counter()
            differences = runner.check()
            print(f"  check: {differences or 'equal'} ({time.perf_counter() - started:.1f} s)")
        finally:
            runner.close()
    read_rate = max(read_rates)
    rebuild_rate = max(rebuild_rates)
    ratio = rebuild_rate / read_rate
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(
        f"RESULT events={loaded} batch={args.batch_size} "
        f"bare_read={read_rate:,.0f} ev/s rebuild={rebuild_rate:,.0f} ev/s "
        f"ratio={ratio:.2f} target>={TARGET_RATIO} ({verdict} the target)"
    )
    return 0 if ratio >= TARGET_RATIO or args.no_fail else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--database-url", default=None, help="default: a temporary PG database")
    parser.add_argument("--admin-url", default=ADMIN_URL, help="server for the temp database")
    parser.add_argument("--batch-size", type=int, default=5000, help="events per read/transaction")
    parser.add_argument("--repeat", type=int, default=1, help="timed read+rebuild rounds (best)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--breakdown", action="store_true", help="also rebuild each projection")
    parser.add_argument("--check", action="store_true", help="also run check() afterwards")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even under the target")
    args = parser.parse_args(argv)
    if args.database_url:
        db = parse_database_url(args.database_url)
        if db.kind == "sqlite":
            assert db.sqlite_path is not None
            if db.sqlite_path.exists():
                parser.error(f"{db.sqlite_path} exists; the benchmark wants a new file")
        return run(db, args)
    with temporary_database(args.admin_url) as db:
        return run(db, args)


if __name__ == "__main__":
    sys.exit(main())
