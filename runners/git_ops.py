"""The git layer of the runners, in one import.

- :mod:`runners.worktrees`: :class:`Worktrees` (per-story coding worktrees on
  ``feature/story-<id>``) and :class:`WorktreeStatus`.
- :mod:`runners.merge_workspace`: :class:`MergeWorkspaces` (per-story squash-merge
  workspaces, compare-and-swap of the base branch, rebase after a lost race, checks of a
  mergemaster's resolution) and :class:`SquashResult`.
- :mod:`runners.git_base`: :class:`GitError` and :func:`run_git`.

Every story id that becomes a path or a branch goes through
:func:`domain.ids.validate_story_id` first, so a hostile id raises
:class:`domain.errors.InvalidStoryId` before git or the filesystem is touched.
"""

from __future__ import annotations

from runners.git_base import STORYLINE_EMAIL, STORYLINE_NAME, GitError, GitResult, run_git
from runners.merge_workspace import MergeOutcome, MergeWorkspaces, SquashResult
from runners.worktrees import Worktrees, WorktreeStatus

__all__ = [
    "STORYLINE_EMAIL",
    "STORYLINE_NAME",
    "GitError",
    "GitResult",
    "MergeOutcome",
    "MergeWorkspaces",
    "SquashResult",
    "WorktreeStatus",
    "Worktrees",
    "run_git",
]
