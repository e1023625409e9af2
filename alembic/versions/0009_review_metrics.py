"""Review: the board's review columns and the review metrics (pass rate, score histogram).

The board gains four columns at its end (the projections write rows as tuples in column
order, so new columns only ever go last); existing rows are stories from before the review
stage, which had no evaluator and no verdict (0, NULL). ``review_metrics`` counts concluded
reviews per result and score bucket for ``/metrics``. A log without review events replays
into the same rows as before plus these defaults, so no rebuild is needed.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "board",
        sa.Column("evaluator_attempts", sa.Integer, nullable=False, server_default="0"),
    )
    op.add_column("board", sa.Column("pending_review", sa.Integer, nullable=True))
    op.add_column("board", sa.Column("review_score", sa.Double, nullable=True))
    op.add_column("board", sa.Column("review_passed", sa.Boolean, nullable=True))
    op.create_table(
        "review_metrics",
        sa.Column("result", sa.String(16), primary_key=True),
        sa.Column("bucket", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("reviews", sa.BigInteger, nullable=False),
        sa.Column("score_e4_total", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("review_metrics")
    with op.batch_alter_table("board") as batch:
        batch.drop_column("review_passed")
        batch.drop_column("review_score")
        batch.drop_column("pending_review")
        batch.drop_column("evaluator_attempts")
