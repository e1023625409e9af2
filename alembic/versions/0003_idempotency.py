"""API tables: idempotency keys and per-story agent tokens.

Both live in the shared database (not in a process) so that a restarted API still replays
answers it gave before, and so that a runner process can issue a token that an API process
on another machine accepts.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

IDEMPOTENCY = "storyline_idempotency"
AGENT_TOKENS = "storyline_agent_tokens"


def upgrade() -> None:
    op.create_table(
        IDEMPOTENCY,
        # Keys are scoped per actor: two clients picking the same key never collide.
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("idem_key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        # NULL status_code: the first request is still being executed.
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("completed_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("actor", "idem_key", name=f"{IDEMPOTENCY}_pkey"),
    )
    op.create_index(f"{IDEMPOTENCY}_created_idx", IDEMPOTENCY, ["created_at"])
    op.create_table(
        AGENT_TOKENS,
        # Only a SHA-256 of the token is stored; the token itself lives in the agent's env.
        sa.Column("token_hash", sa.Text(), nullable=False),
        sa.Column("story_id", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("issued_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name=f"{AGENT_TOKENS}_pkey"),
    )
    op.create_index(f"{AGENT_TOKENS}_story_idx", AGENT_TOKENS, ["story_id"])


def downgrade() -> None:
    op.drop_index(f"{AGENT_TOKENS}_story_idx", table_name=AGENT_TOKENS)
    op.drop_table(AGENT_TOKENS)
    op.drop_index(f"{IDEMPOTENCY}_created_idx", table_name=IDEMPOTENCY)
    op.drop_table(IDEMPOTENCY)
