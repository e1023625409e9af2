"""SQLAlchemy engines, transactions and bulk writes for the projection tables.

SQLite: the file is shared with the eventsourcing library's own connections, so every
connection runs in WAL mode with a busy timeout, and SQLAlchemy (not the sqlite3 module)
emits BEGIN: write transactions use ``BEGIN IMMEDIATE`` so they take the write lock up front
instead of failing on a lock upgrade halfway through. PostgreSQL: a writer engine's sessions
commit with ``synchronous_commit = off``; a crash can then lose the last few commits, but
rows and tracking position are lost together, so the events are simply applied again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
from psycopg.types.json import Jsonb, set_json_dumps
from sqlalchemy import JSON, Connection, Engine, String, Table, create_engine, event, tuple_
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.pool import ConnectionPoolEntry

from service.settings import Database

SQLITE_BUSY_TIMEOUT_MS = 30_000
_WRITE_OPTION = "storyline_write"
_DELETE_CHUNK = 500
_PG_ARRAY = {"String": "text", "Text": "text", "Integer": "int", "BigInteger": "bigint"}
_PG_TYPES = {
    "String": "text",
    "Text": "text",
    "Integer": "int4",
    "BigInteger": "int8",
    "Boolean": "bool",
    "Double": "float8",
    "DateTime": "timestamptz",
}


def _pg_type(column_type: Any) -> str:
    """The PostgreSQL type binary COPY must encode a column's values as."""
    if isinstance(column_type, JSON):
        return "jsonb"
    impl = getattr(column_type, "impl", column_type)  # a TypeDecorator stores like its impl
    name = type(impl).__name__
    if name not in _PG_TYPES:
        raise TypeError(f"no binary COPY type for a {name} column")
    return _PG_TYPES[name]


COPY_THRESHOLD = 100
"""Below this many rows a pipelined INSERT is cheaper than COPY's extra round trips."""


NUL_REPLACEMENT = "\ufffd"
"""What a read model stores for U+0000, which PostgreSQL text and jsonb cannot hold.

The event keeps the NUL (the log is JSON bytes); every text and JSON value a projection
writes goes through :func:`without_nul` or :func:`_json_dumps`, on both dialects, so the
same log gives the same rows on SQLite and PostgreSQL and a rebuild equals the live rows."""

# A JSON \u0000 escape, not preceded by an odd number of backslashes (then it would be the
# text "\u0000" after an escaped backslash). The SQL of HistoryProjection does the same.
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def without_nul(text: str) -> str:
    return text.replace("\x00", NUL_REPLACEMENT) if "\x00" in text else text


def _json_dumps(value: Any) -> str:
    dumped = orjson.dumps(value).decode()
    if "\\u0000" in dumped:  # orjson always escapes U+0000 so (it is a control character)
        dumped = _JSON_NUL.sub(lambda m: m.group(1) + NUL_REPLACEMENT, dumped)
    return dumped


def _postgres_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # COPY and raw executemany hand Python objects to psycopg's jsonb dumper: make it use
    # orjson (several times faster than the json module on a rebuild's million rows).
    set_json_dumps(_json_dumps, context=dbapi_connection)


def create_projection_engine(db: Database, *, pool_size: int = 5, writer: bool = False) -> Engine:
    """An engine for ``db`` configured for the projection workload (see module doc).

    A ``writer`` engine (the runner's) skips the pre-ping: its loop retries after a lost
    connection anyway, and the ping would cost a round trip on every small batch.
    """
    if db.kind == "sqlite":
        engine = create_engine(
            db.sqlalchemy_url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
            pool_size=pool_size,
            max_overflow=10,
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    engine = create_engine(
        db.sqlalchemy_url,
        connect_args={"options": "-c synchronous_commit=off"} if writer else {},
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
        pool_size=pool_size,
        max_overflow=10,
        pool_pre_ping=not writer,
    )
    event.listen(engine, "connect", _postgres_connect)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # The sqlite3 module would otherwise BEGIN lazily on the first DML statement and never
    # for SELECT, which breaks snapshots and SAVEPOINTs; _sqlite_begin takes over.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # Durable against a process crash in WAL mode; a power loss may drop the last
        # commits, which only means re-applying them (rows and position go together).
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection inside a write transaction, committed on normal exit."""
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE_OPTION: True})
        with conn.begin():
            yield conn


class BulkWriter:
    """Bulk writes of rows given as tuples in table column order, holding Python values.

    PostgreSQL: binary COPY for large batches (rebuilds: numbers, times and text are packed
    by psycopg's C dumpers, typed from the table definition, so the server parses only the
    JSON), a pipelined ``executemany`` (one ``execute`` for a single row) for small ones
    (live following), where COPY's extra round trips would dominate. SQLite: executemany
    through SQLAlchemy, whose column types convert datetimes and JSON.
    """

    def __init__(self, dialect_name: str) -> None:
        self.postgres = dialect_name == "postgresql"
        self._sql: dict[tuple[str, str], str] = {}
        self._json_columns: dict[str, list[int]] = {}
        self._copy_types: dict[str, list[str]] = {}
        self._sqlite_upserts: dict[str, Any] = {}
        self._text_columns: dict[str, list[int]] = {}

    def insert(self, conn: Connection, table: Table, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert rows whose keys are not in the table."""
        if not rows:
            return
        rows = self._without_nul(table, rows)
        if not self.postgres:
            conn.execute(table.insert(), self._dicts(table, rows))
        elif len(rows) >= COPY_THRESHOLD:
            self._copy(conn, table, rows)
        else:
            self._executemany(conn, self._statement(table, "insert"), self._pg_rows(table, rows))

    def upsert(
        self,
        conn: Connection,
        table: Table,
        rows: Sequence[tuple[Any, ...]],
        stored_keys: Sequence[Any],
    ) -> None:
        """Write rows that replace any row with the same key (``stored_keys`` may exist)."""
        if not rows:
            return
        rows = self._without_nul(table, rows)
        if not stored_keys:
            self.insert(conn, table, rows)
        elif self.postgres and len(rows) >= COPY_THRESHOLD:
            self.delete_keys(conn, table, stored_keys)
            self._copy(conn, table, rows)
        elif self.postgres:
            self._executemany(conn, self._statement(table, "upsert"), self._pg_rows(table, rows))
        else:
            conn.execute(self._sqlite_upsert(table), self._dicts(table, rows))

    # ------------------------------------------------------------------ helpers

    def _without_nul(
        self, table: Table, rows: Sequence[tuple[Any, ...]]
    ) -> Sequence[tuple[Any, ...]]:
        """The rows with NUL replaced in every text column (see :data:`NUL_REPLACEMENT`).

        Every text column of every table, so a column added later is covered too. A row
        is copied only when it holds a NUL; otherwise this costs one ``in`` per value.
        """
        indexes = self._text_columns.get(table.name)
        if indexes is None:
            indexes = [
                i
                for i, c in enumerate(table.columns)
                if isinstance(getattr(c.type, "impl", c.type), String)
            ]
            self._text_columns[table.name] = indexes
        cleaned: list[tuple[Any, ...]] | None = None
        for n, row in enumerate(rows):
            for i in indexes:
                value = row[i]
                if value is not None and "\x00" in value:
                    break
            else:
                if cleaned is not None:
                    cleaned.append(row)
                continue
            if cleaned is None:
                cleaned = list(rows[:n])
            cleaned.append(
                tuple(
                    without_nul(v) if i in indexes and v is not None else v
                    for i, v in enumerate(row)
                )
            )
        return rows if cleaned is None else cleaned

    def _dicts(self, table: Table, rows: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
        names = [c.name for c in table.columns]
        return [dict(zip(names, row, strict=True)) for row in rows]

    def _json_indexes(self, table: Table) -> list[int]:
        found = self._json_columns.get(table.name)
        if found is None:
            found = [i for i, c in enumerate(table.columns) if isinstance(c.type, JSON)]
            self._json_columns[table.name] = found
        return found

    def _pg_rows(self, table: Table, rows: Sequence[tuple[Any, ...]]) -> Sequence[tuple[Any, ...]]:
        # A raw executemany bypasses SQLAlchemy's types: JSON values are wrapped so psycopg
        # sends them as jsonb (a bare list would become an array, a bare str a JSON string).
        indexes = self._json_indexes(table)
        if not indexes:
            return rows
        converted = []
        for row in rows:
            values = list(row)
            for i in indexes:
                if values[i] is not None:
                    values[i] = Jsonb(values[i])
            converted.append(tuple(values))
        return converted

    def _types(self, table: Table) -> list[str]:
        found = self._copy_types.get(table.name)
        if found is None:
            found = [_pg_type(c.type) for c in table.columns]
            self._copy_types[table.name] = found
        return found

    def _statement(self, table: Table, kind: str) -> str:
        sql = self._sql.get((table.name, kind))
        if sql is None:
            columns = [f'"{c.name}"' for c in table.columns]
            if kind == "copy":
                sql = f'COPY "{table.name}" ({", ".join(columns)}) FROM STDIN (FORMAT BINARY)'
            else:
                marks = ", ".join(["%s"] * len(columns))
                sql = f'INSERT INTO "{table.name}" ({", ".join(columns)}) VALUES ({marks})'
                if kind == "upsert":
                    keys = [f'"{c.name}"' for c in table.primary_key.columns]
                    rest = [f"{c} = EXCLUDED.{c}" for c in columns if c not in keys]
                    sql += f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {', '.join(rest)}"
            self._sql[(table.name, kind)] = sql
        return sql

    def _sqlite_upsert(self, table: Table) -> Any:
        statement = self._sqlite_upserts.get(table.name)
        if statement is None:
            base = sqlite_insert(table)
            keys = [c.name for c in table.primary_key.columns]
            rest = {c.name: base.excluded[c.name] for c in table.columns if c.name not in keys}
            statement = base.on_conflict_do_update(index_elements=keys, set_=rest)
            self._sqlite_upserts[table.name] = statement
        return statement

    def _execute(self, conn: Connection, sql: str, params: Sequence[Any]) -> None:
        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cursor:
            cursor.execute(sql, params)

    def _executemany(self, conn: Connection, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cursor:
            if len(rows) == 1:
                # A live batch usually changes one row: executemany's pipeline round trip
                # (enter, sync, exit) would cost more than the statement.
                cursor.execute(sql, rows[0])
            else:
                cursor.executemany(sql, rows)

    def _copy(self, conn: Connection, table: Table, rows: Sequence[tuple[Any, ...]]) -> None:
        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cursor, cursor.copy(self._statement(table, "copy")) as copy:
            copy.set_types(self._types(table))
            write_row = copy.write_row
            for row in rows:
                write_row(row)

    def delete_keys(self, conn: Connection, table: Table, keys: Sequence[Any]) -> None:
        """Delete the rows whose primary key is in ``keys`` (scalars or tuples)."""
        if not keys:
            return
        pk = list(table.primary_key.columns)
        if self.postgres:
            # One array parameter per key column: thousands of keys in one short statement
            # (an IN list would make psycopg and the server parse thousands of parameters).
            columns = [list(keys)] if len(pk) == 1 else [list(c) for c in zip(*keys, strict=True)]
            casts = ", ".join(f"%s::{_PG_ARRAY[type(c.type).__name__]}[]" for c in pk)
            names = ", ".join(f'"{c.name}"' for c in pk)
            self._execute(
                conn,
                f'DELETE FROM "{table.name}" WHERE ({names}) IN (SELECT * FROM unnest({casts}))',
                columns,
            )
            return
        target = pk[0] if len(pk) == 1 else tuple_(*pk)
        for start in range(0, len(keys), _DELETE_CHUNK):
            chunk = list(keys[start : start + _DELETE_CHUNK])
            conn.execute(table.delete().where(target.in_(chunk)))

    def truncate(self, conn: Connection, tables: Sequence[Table]) -> None:
        if not tables:
            return
        if self.postgres:
            names = ", ".join(f'"{t.name}"' for t in tables)
            conn.exec_driver_sql(f"TRUNCATE {names}")
            return
        for table in tables:
            conn.execute(table.delete())
