"""Stages, outcomes and kinds: the closed vocabularies of the model (wire names lower case)."""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    BACKLOG = "backlog"
    CODING = "coding"
    GATES = "gates"
    REVIEW = "review"
    """An evaluator judges the work against the acceptance criteria (opt-in, ``[review]``)."""
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
    PERMISSION_DENIED = "permission_denied"
    """The run ended normally but its CLI refused one or more tool calls (its permission rules)."""
    MAX_TURNS = "max_turns"
    """The CLI stopped at its turn cap (``--max-turns``) before finishing."""
    MAX_BUDGET = "max_budget"
    """The CLI stopped at its spending cap (``--max-budget-usd``)."""
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    """The model provider failed (HTTP 429, 529 or 5xx, after the CLI's own retries)."""


class MergeFailureKind(StrEnum):
    CONFLICT_DETECTED = "conflict_detected"
    HUNKS_LOST = "hunks_lost"
    """A mergemaster's resolution dropped lines one side changed, without declaring it."""
    GATES_FAILED = "gates_failed"
    NO_COMMITS = "no_commits"
    OTHER = "other"


class AgentRole(StrEnum):
    CODER = "coder"
    MERGEMASTER = "mergemaster"
    PLANNER = "planner"
    """An epic's planner (its attempts are recorded on the epic, never on a story)."""
    EVALUATOR = "evaluator"
    """Reviews a story (or an epic's integration) against its acceptance criteria."""


FINISHED_STAGES = frozenset({Stage.DONE, Stage.ARCHIVED})
WORKER_STAGES = (Stage.CODING, Stage.GATES, Stage.REVIEW)
"""Stages whose steps run on the worker that holds the story (its worktree is there)."""
"""A dependency in one of these stages no longer holds its dependants back."""


MERGEMASTER_KINDS = frozenset({MergeFailureKind.CONFLICT_DETECTED, MergeFailureKind.HUNKS_LOST})
"""Merge failures a mergemaster works on."""
