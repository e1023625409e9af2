"""Board pages read in index order: story ids collated "C", priority descending.

The board is paged by (priority descending, story id in code-point order). Until this
revision the indexes held ascending priority and the database's default collation, so
PostgreSQL sorted the whole top-priority group of a stage on every page (9,401 rows for
``/board?stage=coding&limit=50`` at 100,000 stories, p99 121 ms).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_INDEXES = ("ix_board_priority", "ix_board_stage_priority")


def _collate_story_id(collation: str | None) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite compares text byte by byte, which is code-point order for UTF-8
    clause = f' COLLATE "{collation}"' if collation else ' COLLATE "default"'
    op.execute(f"ALTER TABLE board ALTER COLUMN story_id TYPE VARCHAR(64){clause}")


def upgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="board")
    _collate_story_id("C")
    op.create_index("ix_board_priority", "board", [sa.text("priority DESC"), "story_id"])
    op.create_index(
        "ix_board_stage_priority", "board", ["stage", sa.text("priority DESC"), "story_id"]
    )


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="board")
    _collate_story_id(None)
    op.create_index("ix_board_priority", "board", ["priority", "story_id"])
    op.create_index("ix_board_stage_priority", "board", ["stage", "priority", "story_id"])
