"""Fencing for worker runners on several machines (scale-out).

A worker records a story's worker steps (coding, gates, review) only while the story's
latest ``WorkerClaimed`` names it. Leases in the database say who *may* claim; the claim in
the story's own log is what every later write is checked against, inside the same
optimistic-concurrency save, so a worker that was partitioned away and comes back after its
lease was taken is refused however stale its view is.
"""

from __future__ import annotations

from collections.abc import Callable

from domain.errors import NotHolder
from domain.stages import WORKER_STAGES
from domain.story import Story

Fence = Callable[[Story, str, str], None]

MERGER_ACTORS = frozenset({"runner:merge", "runner:mergemaster", "runner:epic", "runner:planner"})
"""The merger lease holder's reactions: fenced by that lease and the CAS push, not by a
story's claim (an epic may stop a story some worker holds)."""


def worker_fence(worker: str) -> Fence:
    """The check a worker's application runs before each story command."""

    def fence(story: Story, event: str, actor: str) -> None:
        if event == "claim" or story.stage not in WORKER_STAGES or actor in MERGER_ACTORS:
            return
        if story.holder != worker:
            raise NotHolder(
                story.id, story.stage.value, event, story.legal_events, worker, story.holder
            )

    return fence
