"""Read models built from the event log: board, history, agent runs, merge queue, metrics.

Public API (what the API, the CLI and the runners use):

``ReadModels(db)``
    Queries returning plain JSON-able dicts: ``board(stage, limit, cursor)`` (keyset pages
    ordered by priority descending, then story id; opaque cursor, ValueError if malformed),
    ``board_row(story_id)``, ``board_as_of(position)`` (replayed in memory),
    ``history(story_id, after, limit)`` (keys of ``LoggedEvent.as_json()``),
    ``merge_queue()``, ``agent_runs(story_id, limit)``, ``metrics()``, ``status()`` (a list of
    :class:`ProjectionStatus`), ``wait_for(position, names, timeout)`` (read-your-writes) and
    ``close()``.

``ProjectionRunner(db, app=None, names=None, batch_size=1000)``
    ``run_once()`` catches up and returns the events applied; ``start()`` / ``stop()`` follow
    the log in a daemon thread (LISTEN/NOTIFY on channel ``storyline_events`` plus a 1 s poll
    on PostgreSQL, a poll plus ``app.add_commit_listener`` on SQLite); ``rebuild(name,
    progress)`` drops and replays; ``check(name)`` replays into scratch tables and returns
    the differences per projection (an empty dict means equal).

``render_prometheus(metrics, statuses)``
    The Prometheus text exposition of ``ReadModels.metrics()`` and ``ReadModels.status()``.

Projection names: ``board``, ``history``, ``agent_runs``, ``merge_queue``, ``metrics``.
Epic events (originator ``epic-<n>``, same log) are in the history only; the others hold
stories alone.
Tables (Alembic revision 0002): ``board``, ``story_history``, ``agent_runs``,
``merge_queue``, ``story_metrics``, ``stage_metrics`` and the tracking table
``projection_positions``. A standalone follower runs with ``python -m projections.worker``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from projections.names import PROJECTION_NAMES

if TYPE_CHECKING:
    from projections.read_models import ProjectionStatus, ReadModels, render_prometheus
    from projections.runner import ProjectionFailed, ProjectionRunner

# Loaded on first use (PEP 562): importing the package for its names must not pull in
# SQLAlchemy and psycopg, which cost a CLI command half a second of start-up.
_LAZY = {
    "ProjectionStatus": "projections.read_models",
    "ReadModels": "projections.read_models",
    "render_prometheus": "projections.read_models",
    "ProjectionFailed": "projections.runner",
    "ProjectionRunner": "projections.runner",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'projections' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "PROJECTION_NAMES",
    "ProjectionFailed",
    "ProjectionRunner",
    "ProjectionStatus",
    "ReadModels",
    "render_prometheus",
]
