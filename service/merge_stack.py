"""The speculative merge stack as people see it (``GET /merge-queue``'s ``stack``).

From the stories themselves (the stack is at most ``max_merge_slots`` x ``batch`` deep):
each merging story's speculative base (the base sha it started from and the stories
stacked below it that have not landed yet) and the state its build is in (``building``,
``waiting``, ``batched``, ``gating``, ``passed`` = waiting for the stories ahead to land,
``landing``), in landing order."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from domain.errors import DomainError
from domain.stages import Stage
from service.application import StorylineApplication


def merge_stack(app: StorylineApplication, story_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The stacked builds among ``story_ids`` (stories in ``merge``), head first."""
    merging: dict[str, dict[str, Any]] = {}
    for sid in story_ids:
        try:
            story = app.get_story(sid)
        except DomainError:
            continue
        if story.stage is Stage.MERGE and story.merging and story.speculation is not None:
            merging[sid] = {
                "story_id": sid,
                "name": story.name,
                "target_branch": story.target_branch,
                **{k: v for k, v in story.speculation.items() if k != "ahead"},
                "ahead_at_start": list(story.speculation.get("ahead") or []),
            }
    for row in merging.values():
        # Ahead and not landed yet: what the build still waits for.
        row["ahead"] = [sid for sid in row["ahead_at_start"] if sid in merging]
    rows = sorted(merging.values(), key=lambda r: (len(r["ahead"]), r["story_id"]))
    for rank, row in enumerate(rows, start=1):
        row["position_in_stack"] = rank
    return rows
