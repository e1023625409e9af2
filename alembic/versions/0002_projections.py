"""Projection tables: board, history, agent runs, merge queue, metrics, tracking positions.

Frozen copies of ``projections/tables.py`` as of this revision (a test checks that the
migrated schema and the metadata agree), so later edits there need a new revision.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
JSON_DATA = sa.JSON().with_variant(JSONB(), "postgresql")
STORY_ID = sa.String(64)
STAGE = sa.String(16)


def upgrade() -> None:
    op.create_table(
        "projection_positions",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("updated_at", TS, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("error_position", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "board",
        sa.Column("story_id", STORY_ID, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("stage", STAGE, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_change", TS, nullable=False),
        sa.Column("last_event", sa.String(64), nullable=False),
        sa.Column("last_actor", sa.Text, nullable=False),
        sa.Column("last_reason", sa.Text, nullable=True),
        sa.Column("epic", sa.Text, nullable=True),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("depends_on", JSON_DATA, nullable=False),
        sa.Column("retry_count", sa.Integer, nullable=False),
        sa.Column("abort_respawns", sa.Integer, nullable=False),
        sa.Column("mergemaster_spawns", sa.Integer, nullable=False),
        sa.Column("leftover_respawns", sa.Integer, nullable=False),
        sa.Column("fixup_pending", sa.Boolean, nullable=False),
        sa.Column("final", sa.Boolean, nullable=False),
        sa.Column("merging", sa.Boolean, nullable=False),
        sa.Column("resolved_pending", sa.Boolean, nullable=False),
        sa.Column("merge_failure_kind", sa.String(32), nullable=True),
        sa.Column("blocked_from", STAGE, nullable=True),
        sa.Column("blocked_reason", sa.Text, nullable=True),
        sa.Column("tokens_in", sa.BigInteger, nullable=False),
        sa.Column("tokens_out", sa.BigInteger, nullable=False),
        sa.Column("cost_usd", sa.Double, nullable=False),
        sa.Column("coder_attempts", sa.Integer, nullable=False),
        sa.Column("mergemaster_attempts", sa.Integer, nullable=False),
        sa.Column("running_agent", JSON_DATA, nullable=True),
        sa.Column("last_coder_outcome", sa.String(32), nullable=True),
        sa.Column("worktree_path", sa.Text, nullable=True),
        sa.Column("feature_branch", sa.Text, nullable=True),
        sa.Column("commits_ahead", sa.Integer, nullable=False),
        sa.Column("merge_commit", sa.Text, nullable=True),
        sa.Column("queued_position", sa.BigInteger, nullable=True),
        sa.Column("queued_at", TS, nullable=True),
    )
    op.create_index("ix_board_priority", "board", ["priority", "story_id"])
    op.create_index("ix_board_stage_priority", "board", ["stage", "priority", "story_id"])
    op.create_index("ix_board_queued_position", "board", ["queued_position"])
    op.create_table(
        "story_history",
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("story_id", STORY_ID, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("from_stage", STAGE, nullable=True),
        sa.Column("to_stage", STAGE, nullable=True),
        sa.Column("timestamp", TS, nullable=False),
        sa.Column("data", JSON_DATA, nullable=False),
    )
    op.create_index("ix_story_history_story", "story_history", ["story_id", "position"])
    op.create_table(
        "agent_runs",
        sa.Column("story_id", STORY_ID, primary_key=True),
        sa.Column("role", sa.String(16), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("agent", sa.Text, nullable=False),
        sa.Column("runtime", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=True),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("resume_session_id", sa.Text, nullable=True),
        sa.Column("pid", sa.BigInteger, nullable=True),
        sa.Column("requested_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("outcome", sa.String(32), nullable=True),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("signal", sa.Integer, nullable=True),
        sa.Column("turns", sa.Integer, nullable=False),
        sa.Column("tokens_in", sa.BigInteger, nullable=False),
        sa.Column("tokens_out", sa.BigInteger, nullable=False),
        sa.Column("cost_usd", sa.Double, nullable=False),
        sa.Column("session_id", sa.Text, nullable=True),
        sa.Column("log_path", sa.Text, nullable=True),
        sa.Column("spawn_position", sa.BigInteger, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_agent_runs_spawn_position", "agent_runs", ["spawn_position"])
    op.create_table(
        "merge_queue",
        sa.Column("story_id", STORY_ID, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("queued_position", sa.BigInteger, nullable=True),
        sa.Column("queued_at", TS, nullable=True),
    )
    op.create_index("ix_merge_queue_queued_position", "merge_queue", ["queued_position"])
    op.create_table(
        "story_metrics",
        sa.Column("story_id", STORY_ID, primary_key=True),
        sa.Column("stage", STAGE, nullable=False),
        sa.Column("entered_at", TS, nullable=False),
        sa.Column("cost_usd", sa.Double, nullable=False),
        sa.Column("tokens_in", sa.BigInteger, nullable=False),
        sa.Column("tokens_out", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_story_metrics_stage", "story_metrics", ["stage"])
    op.create_table(
        "stage_metrics",
        sa.Column("stage", STAGE, primary_key=True),
        sa.Column("micros_total", sa.BigInteger, nullable=False),
        sa.Column("entries", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "stage_metrics",
        "story_metrics",
        "merge_queue",
        "agent_runs",
        "story_history",
        "board",
        "projection_positions",
    ):
        op.drop_table(table)
