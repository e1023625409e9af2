"""Idempotency keys learn, in the command's own transaction, that it committed.

Until this revision the event and the key's answer were two transactions: a process killed
between them left a claimed key with no answer, and after the lease a retry ran the
command again (a second story for a retried create). Now the event insert also writes the
story and log position onto the key's row, so a retry rebuilds the first answer instead.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

IDEMPOTENCY = "storyline_idempotency"


def upgrade() -> None:
    with op.batch_alter_table(IDEMPOTENCY) as batch:
        batch.add_column(sa.Column("story_id", sa.Text(), nullable=True))
        batch.add_column(sa.Column("committed_position", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table(IDEMPOTENCY) as batch:
        batch.drop_column("committed_position")
        batch.drop_column("story_id")
