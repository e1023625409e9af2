"""Event store: the eventsourcing library's tables, with text story ids.

The statements are the library's own (eventsourcing 9.5, ``ORIGINATOR_ID_TYPE=text``,
PostgreSQL DB functions enabled), frozen here so a library upgrade never changes an applied
migration silently.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

EVENTS = "storyline_events"
SQLITE_EVENTS = "stored_events"  # the library's fixed SQLite table name

SQLITE = [
    f"CREATE TABLE IF NOT EXISTS {SQLITE_EVENTS} (originator_id TEXT, originator_version INTEGER, "
    "topic TEXT, state BLOB, PRIMARY KEY (originator_id, originator_version))",
]

POSTGRES = [
    f'CREATE TABLE IF NOT EXISTS "{EVENTS}" (originator_id text NOT NULL, '
    "originator_version bigint NOT NULL, topic text, state bytea, notification_id bigserial, "
    "PRIMARY KEY (originator_id, originator_version)) WITH (autovacuum_enabled = true, "
    "autovacuum_vacuum_threshold = 100000000, autovacuum_vacuum_scale_factor = 0.5, "
    "autovacuum_analyze_threshold = 1000, autovacuum_analyze_scale_factor = 0.01)",
    """DO $$ BEGIN
        CREATE TYPE stored_event_text AS
            (originator_id text, originator_version bigint, topic text, state bytea);
    EXCEPTION WHEN duplicate_object THEN NULL; END $$""",
    f'CREATE UNIQUE INDEX IF NOT EXISTS "{EVENTS}_notification_id_idx" '
    f'ON "{EVENTS}" (notification_id ASC)',
    f"""CREATE OR REPLACE FUNCTION es_insert_events_text(events stored_event_text[])
        RETURNS SETOF bigint LANGUAGE plpgsql AS $BODY$
        BEGIN
            SET LOCAL lock_timeout = '0s';
            NOTIFY "{EVENTS}";
            RETURN QUERY
            INSERT INTO "{EVENTS}" AS t (originator_id, originator_version, topic, state)
            SELECT originator_id, originator_version, topic, state FROM unnest(events)
            RETURNING notification_id;
        END;
        $BODY$""",
]


def upgrade() -> None:
    statements = POSTGRES if op.get_bind().dialect.name == "postgresql" else SQLITE
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS es_insert_events_text(stored_event_text[])")
        op.execute(f'DROP TABLE IF EXISTS "{EVENTS}"')
        op.execute("DROP TYPE IF EXISTS stored_event_text")
    else:
        op.execute(f"DROP TABLE IF EXISTS {SQLITE_EVENTS}")
