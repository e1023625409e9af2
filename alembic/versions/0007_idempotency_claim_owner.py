"""Idempotency claims name the server instance that holds them.

A claim left by a server that was killed before its command committed used to block the key
for the whole lease (60 s). With the owner's instance id on the row, another server can ask
whether that instance is still alive (a session advisory lock on PostgreSQL, a file lock
beside the SQLite database) and take a dead owner's claim over at once.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

IDEMPOTENCY = "storyline_idempotency"


def upgrade() -> None:
    with op.batch_alter_table(IDEMPOTENCY) as batch:
        # NULL for claims written before this revision: they keep the lease rule.
        batch.add_column(sa.Column("owner_instance", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table(IDEMPOTENCY) as batch:
        batch.drop_column("owner_instance")
