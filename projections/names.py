"""The projections' names, importable without the projections (the CLI validates names
before it needs SQLAlchemy; ``projections.definitions`` checks the two agree at import)."""

from __future__ import annotations

PROJECTION_NAMES: tuple[str, ...] = ("board", "history", "agent_runs", "merge_queue", "metrics")
"""Every projection by name, in the order status lists them."""
