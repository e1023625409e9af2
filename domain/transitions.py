"""The transition table: which named events may be sent from which stage.

Names are the snake_case wire names used by the API, the CLI and the runners. Finer guards
(dependencies, a running agent, retries) are checked by the Story's command methods; this
table answers "what could happen from here", which every refusal lists.
"""

from __future__ import annotations

from domain.stages import Stage

_ACTIVE = (
    Stage.BACKLOG,
    Stage.CODING,
    Stage.GATES,
    Stage.REVIEW,
    Stage.MERGE,
    Stage.MERGE_FAILURE,
)
_AGENTS = (Stage.CODING, Stage.REVIEW, Stage.MERGE_FAILURE)
"""Stages an agent works in: a coder, an evaluator, a mergemaster."""

TRANSITIONS: dict[str, tuple[str, tuple[Stage, ...]]] = {
    # name: (event class, stages it may be sent from)
    "start_coding": ("CodingStarted", (Stage.BACKLOG,)),
    "worktree_ready": ("WorktreeReady", (Stage.CODING,)),
    "spawn_agent": ("AgentSpawnRequested", _AGENTS),
    "agent_started": ("AgentStarted", _AGENTS),
    "agent_exited": ("AgentExited", _AGENTS),
    "uncommitted_changes_found": ("UncommittedChangesFound", (Stage.CODING,)),
    "start_gates": ("GatesStarted", (Stage.CODING,)),
    "gates_passed": ("GatesPassed", (Stage.GATES,)),
    "gates_failed": ("GatesFailed", (Stage.GATES,)),
    # An evaluator's verdict is recorded (not a move); the runner then concludes the review:
    # into the merge queue, or back to coding with the unmet criteria (blocked when the
    # retries are used up).
    "submit_review": ("ReviewSubmitted", (Stage.REVIEW,)),
    "conclude_review": ("ReviewPassed or ReviewFailed", (Stage.REVIEW,)),
    "start_merge": ("MergeStarted", (Stage.MERGE,)),
    "merge_succeeded": ("MergeSucceeded", (Stage.MERGE,)),
    "merge_failed": ("MergeFailed", (Stage.MERGE,)),
    "request_fixup": ("FixupRequested", (Stage.MERGE_FAILURE,)),
    "requeue_merge": ("MergeRequeued", (Stage.MERGE_FAILURE,)),
    "merge_resolved": ("MergeRequeued", (Stage.MERGE_FAILURE,)),
    "merge_gave_up": ("MergemasterAttempted", (Stage.MERGE_FAILURE,)),
    # The speculative merge queue (``max_merge_slots`` > 1): a stacked build dropped and
    # requeued at its old position (stays in merge), and a build's progress (not a move).
    "restart_speculation": ("SpeculationRestarted", (Stage.MERGE,)),
    "update_speculation": ("SpeculationUpdated", (Stage.MERGE,)),
    "block": ("StoryBlocked", _ACTIVE),
    "unblock": ("StoryUnblocked", (Stage.BLOCKED,)),
    "demote": (
        "StoryDemoted",
        (Stage.CODING, Stage.GATES, Stage.REVIEW, Stage.MERGE, Stage.BLOCKED),
    ),
    "archive": ("StoryArchived", (Stage.DONE, Stage.BACKLOG, Stage.BLOCKED)),
    # Not a move: a note (its text is the reason) may be added to a story in any stage.
    "add_note": ("NoteAdded", tuple(Stage)),
    # Not moves either: a runner's provider circuit breaker, recorded on the story whose
    # agent exit opened it or whose probe run closed it.
    "provider_breaker_opened": ("ProviderBreakerOpened", (Stage.CODING,)),
    "provider_breaker_closed": ("ProviderBreakerClosed", (Stage.CODING,)),
    # Not a move: a worker runner takes the story under a lease (scale-out); only the
    # worker of the latest claim records the story's worker steps.
    "claim": ("WorkerClaimed", (Stage.CODING, Stage.GATES, Stage.REVIEW)),
    # Not moves: a mergemaster's declaration of an intended drop, and the gates' evidence.
    "declare_dropped_hunk": ("DroppedHunkDeclared", (Stage.MERGE_FAILURE, Stage.MERGE)),
    "record_gate_verdict": ("GateVerdictRecorded", (Stage.GATES, Stage.MERGE)),
    "flaky_gate_detected": ("GateFlakyDetected", (Stage.GATES, Stage.MERGE)),
}

EVENT_NAMES: tuple[str, ...] = tuple(TRANSITIONS)


def legal_events_from(stage: Stage) -> list[str]:
    """Wire names of the events that may be sent from ``stage`` (before finer guards)."""
    return [name for name, (_, stages) in TRANSITIONS.items() if stage in stages]
