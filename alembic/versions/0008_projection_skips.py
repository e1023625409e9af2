"""Skipped events: an operator's way past an event a projection cannot apply.

A projection that fails on an event stops there (and says so in status, /healthz and
/metrics). ``storyline projections skip NAME --position P --reason ...`` records here that
the projection NAME leaves out the event at P, with who decided it, why and the error it
had, and moves the projection past it in the same transaction. The event stays in the log;
every later replay of NAME (a follower, a rebuild, a check) leaves out the same events, so
the read model stays reproducible and the record says what it lacks.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projection_skips",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("skipped_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("projection_skips")
