"""The projection tables (SQLAlchemy Core), one definition for SQLite and PostgreSQL.

Alembic owns the schema: ``alembic/versions/0002_projections.py`` creates exactly these
tables (a test compares the migrated database with this metadata). The column order of each
table is the order of the tuples the projections write, so COPY needs no column mapping.

Times are stored as UTC: ``timestamptz`` on PostgreSQL, naive-UTC text on SQLite, and always
read back as timezone-aware UTC datetimes (:class:`UtcDateTime`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB, VARCHAR
from sqlalchemy.types import TypeDecorator

metadata = MetaData()


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both dialects."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite has no time zones: store naive UTC so text comparisons stay chronological.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on PostgreSQL so auditors can query event data (``data->>'output'``) in SQL.
JsonColumn = JSON().with_variant(JSONB(), "postgresql")

STORY_ID = String(64)
# The board is paged in code-point order of story ids on both dialects. On PostgreSQL its
# key column is collated "C" so that order is an index order, whatever the database's
# default collation (migration 0005); SQLite compares text by bytes already.
BOARD_STORY_ID = String(64).with_variant(VARCHAR(64, collation="C"), "postgresql")
STAGE = String(16)

projection_positions = Table(
    "projection_positions",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),
    # Bumped by every rebuild, so a follower that cached state before the rebuild can tell
    # its cache is stale even if the rebuild happens to stop at the same position.
    Column("generation", Integer, nullable=False),
    Column("updated_at", UtcDateTime, nullable=True),
    Column("error", Text, nullable=True),
    Column("error_position", BigInteger, nullable=True),
)

# Events a projection leaves out, by an operator's decision (migration 0008): every replay of
# that projection leaves out the same ones, so a rebuild reproduces the live rows.
projection_skips = Table(
    "projection_skips",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("reason", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("error", Text, nullable=True),
    Column("skipped_at", UtcDateTime, nullable=False),
)

board = Table(
    "board",
    metadata,
    Column("story_id", BOARD_STORY_ID, primary_key=True),
    Column("name", Text, nullable=False),
    Column("stage", STAGE, nullable=False),
    Column("version", Integer, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("last_change", UtcDateTime, nullable=False),
    Column("last_event", String(64), nullable=False),
    Column("last_actor", Text, nullable=False),
    Column("last_reason", Text, nullable=True),
    Column("epic", Text, nullable=True),
    Column("priority", Integer, nullable=False),
    Column("depends_on", JsonColumn, nullable=False),
    Column("retry_count", Integer, nullable=False),
    Column("abort_respawns", Integer, nullable=False),
    Column("mergemaster_spawns", Integer, nullable=False),
    Column("leftover_respawns", Integer, nullable=False),
    Column("fixup_pending", Boolean, nullable=False),
    Column("final", Boolean, nullable=False),
    Column("merging", Boolean, nullable=False),
    Column("resolved_pending", Boolean, nullable=False),
    Column("merge_failure_kind", String(32), nullable=True),
    Column("blocked_from", STAGE, nullable=True),
    Column("blocked_reason", Text, nullable=True),
    Column("tokens_in", BigInteger, nullable=False),
    Column("tokens_out", BigInteger, nullable=False),
    Column("cost_usd", Double, nullable=False),
    Column("coder_attempts", Integer, nullable=False),
    Column("mergemaster_attempts", Integer, nullable=False),
    Column("running_agent", JsonColumn, nullable=True),
    Column("last_coder_outcome", String(32), nullable=True),
    Column("worktree_path", Text, nullable=True),
    Column("feature_branch", Text, nullable=True),
    Column("commits_ahead", Integer, nullable=False),
    Column("merge_commit", Text, nullable=True),
    Column("queued_position", BigInteger, nullable=True),
    Column("queued_at", UtcDateTime, nullable=True),
    # Review (migration 0009 appends them, so the table's column order stays the tuples').
    Column("evaluator_attempts", Integer, nullable=False),
    Column("pending_review", Integer, nullable=True),
    Column("review_score", Double, nullable=True),
    Column("review_passed", Boolean, nullable=True),
    Index("ix_board_queued_position", "queued_position"),
)

# Descending priority, then ascending id: the board's page order, read straight off the
# index instead of sorted on every request (migration 0005).
Index("ix_board_priority", board.c.priority.desc(), board.c.story_id)
Index("ix_board_stage_priority", board.c.stage, board.c.priority.desc(), board.c.story_id)

story_history = Table(
    "story_history",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("story_id", STORY_ID, nullable=False),
    Column("version", Integer, nullable=False),
    Column("type", String(64), nullable=False),
    Column("actor", Text, nullable=False),
    Column("reason", Text, nullable=True),
    Column("from_stage", STAGE, nullable=True),
    Column("to_stage", STAGE, nullable=True),
    Column("timestamp", UtcDateTime, nullable=False),
    Column("data", JsonColumn, nullable=False),
    Index("ix_story_history_story", "story_id", "position"),
)

agent_runs = Table(
    "agent_runs",
    metadata,
    Column("story_id", STORY_ID, primary_key=True),
    Column("role", String(16), primary_key=True),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("agent", Text, nullable=False),
    Column("runtime", Text, nullable=False),
    Column("model", Text, nullable=True),
    Column("purpose", String(64), nullable=False),
    Column("resume_session_id", Text, nullable=True),
    Column("pid", BigInteger, nullable=True),
    Column("requested_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime, nullable=True),
    Column("ended_at", UtcDateTime, nullable=True),
    Column("outcome", String(32), nullable=True),
    Column("exit_code", Integer, nullable=True),
    Column("signal", Integer, nullable=True),
    Column("turns", Integer, nullable=False),
    Column("tokens_in", BigInteger, nullable=False),
    Column("tokens_out", BigInteger, nullable=False),
    Column("cost_usd", Double, nullable=False),
    Column("session_id", Text, nullable=True),
    Column("log_path", Text, nullable=True),
    Column("spawn_position", BigInteger, nullable=False),
    Column("position", BigInteger, nullable=False),
    Index("ix_agent_runs_spawn_position", "spawn_position"),
)

# One row per story; a story is in the queue while ``queued_position`` is set. Keeping every
# story (not only queued ones) lets the projection know a story's name when it joins.
merge_queue = Table(
    "merge_queue",
    metadata,
    Column("story_id", STORY_ID, primary_key=True),
    Column("name", Text, nullable=False),
    Column("queued_position", BigInteger, nullable=True),
    Column("queued_at", UtcDateTime, nullable=True),
    Index("ix_merge_queue_queued_position", "queued_position"),
)

story_metrics = Table(
    "story_metrics",
    metadata,
    Column("story_id", STORY_ID, primary_key=True),
    Column("stage", STAGE, nullable=False),
    # When the story entered its current stage: the open interval is counted at query time,
    # so the stored rows never depend on the clock and a rebuild reproduces them exactly.
    Column("entered_at", UtcDateTime, nullable=False),
    Column("cost_usd", Double, nullable=False),
    Column("tokens_in", BigInteger, nullable=False),
    Column("tokens_out", BigInteger, nullable=False),
    Index("ix_story_metrics_stage", "stage"),
)

stage_metrics = Table(
    "stage_metrics",
    metadata,
    Column("stage", STAGE, primary_key=True),
    # Closed intervals only, in integer microseconds so sums are exact and order-independent.
    Column("micros_total", BigInteger, nullable=False),
    Column("entries", BigInteger, nullable=False),
)

# Concluded reviews per result (passed, failed) and score bucket (1 to 10, a tenth each):
# the pass rate and the score histogram of /metrics without reading the log (migration 0009).
review_metrics = Table(
    "review_metrics",
    metadata,
    Column("result", String(16), primary_key=True),
    Column("bucket", Integer, primary_key=True, autoincrement=False),
    Column("reviews", BigInteger, nullable=False),
    Column("score_e4_total", BigInteger, nullable=False),
)

PROJECTION_TABLES: tuple[Table, ...] = (
    projection_positions,
    projection_skips,
    board,
    story_history,
    agent_runs,
    merge_queue,
    story_metrics,
    stage_metrics,
    review_metrics,
)
"""Every table of the projections (migration 0002 creates them, 0008 the skips, 0009 the
review metrics and the board's review columns)."""
