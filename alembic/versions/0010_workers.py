"""Scale-out: worker runners, and per-story leases they take stories under.

``storyline_story_leases`` holds one row per story a worker runner took: the holder, a
generation that grows with every new claim (the fencing token recorded in the story's log
as ``WorkerClaimed``), and an expiry in database time (machines' clocks may differ).
``storyline_workers`` is the registry shown by ``/healthz``, ``/metrics`` and the board:
each worker's host, role, capacity, stories held and last heartbeat.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "storyline_story_leases",
        sa.Column("story_id", sa.Text(), primary_key=True),
        sa.Column("holder", sa.Text(), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=False),
    )
    op.create_index("storyline_story_leases_holder", "storyline_story_leases", ["holder"])
    op.create_table(
        "storyline_workers",
        sa.Column("worker_id", sa.Text(), primary_key=True),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("remote", sa.Text(), nullable=True),
        sa.Column("held", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("merger", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("ttl_secs", sa.Float(), nullable=False, server_default="15"),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.Float(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("storyline_workers")
    op.drop_index("storyline_story_leases_holder", table_name="storyline_story_leases")
    op.drop_table("storyline_story_leases")
