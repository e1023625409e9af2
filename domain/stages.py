"""Stages, outcomes and kinds: the closed vocabularies of the model (wire names lower case)."""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    BACKLOG = "backlog"
    CODING = "coding"
    GATES = "gates"
    MERGE = "merge"
    MERGE_FAILURE = "merge_failure"
    BLOCKED = "blocked"
    DONE = "done"
    ARCHIVED = "archived"


class AgentOutcome(StrEnum):
    COMPLETED = "completed"
    ABORTED_BEFORE_SESSION = "aborted_before_session"
    TIMED_OUT = "timed_out"
    INACTIVE = "inactive"
    FAILED = "failed"
    LOST = "lost"
    """The runner recorded the agent as started but found its process gone after a restart."""


class MergeFailureKind(StrEnum):
    CONFLICT_DETECTED = "conflict_detected"
    GATES_FAILED = "gates_failed"
    NO_COMMITS = "no_commits"
    OTHER = "other"


class AgentRole(StrEnum):
    CODER = "coder"
    MERGEMASTER = "mergemaster"


FINISHED_STAGES = frozenset({Stage.DONE, Stage.ARCHIVED})
"""A dependency in one of these stages no longer holds its dependants back."""
