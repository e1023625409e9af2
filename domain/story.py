"""The Story aggregate: state derived from events, and the guards of the state machine.

Command methods check their guard and then trigger exactly one event; the event's ``apply``
(in ``domain.events``) is the state change, so replaying stored events rebuilds the same
state without re-running any guard. A refused command raises a :class:`DomainError` and
leaves the story untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

from eventsourcing.domain import BaseAggregate

from domain.errors import (
    DependenciesNotDone,
    IllegalTransition,
    InvalidCommand,
    InvalidField,
    InvalidStoryId,
)
from domain.events import (
    AgentExited,
    AgentSpawnRequested,
    AgentStarted,
    CodingStarted,
    DroppedHunkDeclared,
    FixupRequested,
    GateFlakyDetected,
    GatesFailed,
    GatesPassed,
    GatesStarted,
    GateVerdictRecorded,
    MergeFailed,
    MergemasterAttempted,
    MergeRequeued,
    MergeStarted,
    MergeSucceeded,
    NoteAdded,
    ProviderBreakerClosed,
    ProviderBreakerOpened,
    ReviewFailed,
    ReviewPassed,
    ReviewSubmitted,
    SpeculationRestarted,
    SpeculationUpdated,
    StoryArchived,
    StoryBlocked,
    StoryCreated,
    StoryDemoted,
    StoryEvent,
    StoryUnblocked,
    UncommittedChangesFound,
    WorkerClaimed,
    WorktreeReady,
)
from domain.ids import is_epic_id, validate_branch_name, validate_story_id
from domain.review import judge, unmet, verdict_passes
from domain.stages import (
    FINISHED_STAGES,
    MERGEMASTER_KINDS,
    WORKER_STAGES,
    AgentOutcome,
    AgentRole,
    MergeFailureKind,
    Stage,
)
from domain.transitions import legal_events_from

MAX_NAME = 200
MAX_TEXT = 20_000
MAX_CRITERIA = 100
MAX_DEPENDENCIES = 100


MAX_REASON = 10_000


def _clean_text(
    value: str,
    field: str,
    *,
    max_len: int,
    allow_newlines: bool,
    loc: tuple[str | int, ...] | None = None,
) -> str:
    where = loc if loc is not None else (field,)
    if not isinstance(value, str):
        raise InvalidField(where, f"{field} must be a string")
    if len(value) > max_len:
        raise InvalidField(where, f"{field} is longer than {max_len} characters")
    for ch in value:
        if ch in "\n\t" and allow_newlines:
            continue
        if ord(ch) < 32 or ord(ch) == 127:
            raise InvalidField(where, f"{field} contains a control character ({ord(ch):#04x})")
    return value


def clean_criteria(acceptance_criteria: list[str], what: str) -> list[str]:
    """Acceptance criteria as every aggregate takes them: one at least, bounded, not blank."""
    if not acceptance_criteria:
        raise InvalidCommand(f"{what} needs at least one acceptance criterion")
    if len(acceptance_criteria) > MAX_CRITERIA:
        raise InvalidCommand(f"at most {MAX_CRITERIA} acceptance criteria")
    criteria = [
        _clean_text(
            c,
            f"acceptance_criteria[{i}]",
            max_len=MAX_TEXT,
            allow_newlines=True,
            loc=("acceptance_criteria", i),
        )
        for i, c in enumerate(acceptance_criteria)
    ]
    if any(not c.strip() for c in criteria):
        raise InvalidCommand("acceptance criteria must not be empty")
    return criteria


def check_reason(reason: str | None) -> str | None:
    """Any reason, required or not: bounded, and no NUL.

    Only NUL, not every control character: runners put machine text (an agent's error, a
    tool's message) into optional reasons, and refusing a terminal escape there would leave
    an agent's exit unrecorded. NUL is never meaningful in text a person reads, and no read
    model could store it as it is.
    """
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise InvalidField(("reason",), "reason must be a string")
    if len(reason) > MAX_REASON:
        raise InvalidField(("reason",), f"reason is longer than {MAX_REASON} characters")
    if "\x00" in reason:
        raise InvalidField(("reason",), "reason contains a NUL character (U+0000)")
    return reason


def _require_reason(reason: str | None, what: str) -> str:
    if reason is None or not reason.strip():
        raise InvalidCommand(f"{what} needs a reason")
    return _clean_text(reason, "reason", max_len=MAX_REASON, allow_newlines=True)


class Story(BaseAggregate[str]):
    """A unit of work on a git repository, moved through typed stages."""

    TOPIC: ClassVar[str] = "storyline.Story.v1"

    def __init__(self) -> None:
        self.stage: Stage = Stage.BACKLOG
        self.name = ""
        self.description = ""
        self.acceptance_criteria: list[str] = []
        self.depends_on: list[str] = []
        self.epic: str | None = None
        self.target_branch: str | None = None
        """The branch this story merges into; None means the project's base branch."""
        self.priority = 0
        self.review: bool | None = None
        """Review before merging: True or False as the story asked, None as the project says."""
        self.last_event = ""
        # Counters and sub-states, all derived from events.
        self.retry_count = 0
        self.abort_respawns = 0
        self.mergemaster_spawns = 0
        self.leftover_respawns = 0
        self.failed_runs = 0
        self.fixup_pending = False
        self.final = False
        self.tokens_in = 0
        self.tokens_out = 0
        self.cost_usd = 0.0
        self.coder_attempts = 0
        self.mergemaster_attempts = 0
        self.evaluator_attempts = 0
        self.evaluator_failed_runs = 0
        """Evaluator runs in a row that ended without a verdict (crash, cap, none given)."""
        self.reviews: list[dict[str, Any]] = []
        """Every verdict, oldest first, with whether it passed once concluded."""
        self.pending_review: int | None = None
        """The evaluator attempt whose verdict is recorded but not yet concluded."""
        self.last_review_failure: dict[str, Any] | None = None
        """The last verdict that sent the story back: its gaps go into the coder's prompt."""
        self.running_agent: dict[str, Any] | None = None
        self.last_coder_outcome: AgentOutcome | None = None
        self.last_agent_error: str | None = None
        """The reason recorded with the last agent exit that did not complete."""
        self.last_agent_exit_at: datetime | None = None
        """When the last agent exit was recorded (the provider breaker counts each once)."""
        self.sessions: dict[str, str] = {}
        self.last_gate_output: str | None = None
        self.worktree_path: str | None = None
        self.feature_branch: str | None = None
        self.commits_ahead = 0
        self.gated_commit: str | None = None
        """The commit the story's gates last passed on, when the runner recorded it."""
        self.holder: str | None = None
        """Scale-out: the worker runner that last claimed the story (see WorkerClaimed)."""
        self.holder_generation = 0
        self.merging = False
        self.queued_at: datetime | None = None
        self.speculation: dict[str, Any] | None = None
        """Speculative merge queue: this story's stacked build while it merges
        (``state``, ``base_sha``, ``ahead``, ``parent``, ``commit``); None otherwise."""
        self.resolved_pending = False
        self.merge_commit: str | None = None
        self.merge_failure_kind: MergeFailureKind | None = None
        self.merge_failure_details: str | None = None
        self.conflicts: list[str] = []
        self.lost_hunks: list[dict[str, Any]] = []
        """What the last resolution dropped without saying so (``hunks_lost``)."""
        self.declared_drops: list[dict[str, Any]] = []
        """Hunks a mergemaster declared dropped on purpose, with its reasons."""
        self.gate_runs = 0
        self.flaky_gates: list[str] = []
        """Gates that gave this story different verdicts on the same tree."""
        self.blocked_from: Stage | None = None
        self.blocked_reason: str | None = None
        self.notes = 0
        self.state_version = 0
        """The version of the last event that was not a note (see ``NoteAdded``)."""

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls,
        *,
        story_id: str,
        name: str,
        description: str,
        acceptance_criteria: list[str],
        depends_on: list[str],
        actor: str,
        epic: str | None = None,
        priority: int = 0,
        reason: str | None = None,
        target_branch: str | None = None,
        review: bool | None = None,
    ) -> Story:
        validate_story_id(story_id)
        if is_epic_id(story_id):
            raise InvalidStoryId(story_id, "ids of the form epic-<n> name epics, not stories")
        if target_branch is not None:
            try:
                validate_branch_name(target_branch)
            except ValueError as exc:
                raise InvalidField(("target_branch",), str(exc)) from None
        name = _clean_text(name, "name", max_len=MAX_NAME, allow_newlines=False)
        if not name.strip():
            raise InvalidCommand("name must not be empty")
        description = _clean_text(description, "description", max_len=MAX_TEXT, allow_newlines=True)
        criteria = clean_criteria(acceptance_criteria, "a story")
        if len(depends_on) > MAX_DEPENDENCIES:
            raise InvalidCommand(f"at most {MAX_DEPENDENCIES} dependencies")
        deps = [validate_story_id(d) for d in depends_on]
        if story_id in deps:
            raise InvalidCommand(f"story {story_id!r} cannot depend on itself")
        if len(set(deps)) != len(deps):
            raise InvalidCommand("depends_on lists a story twice")
        if epic is not None:
            epic = _clean_text(epic, "epic", max_len=MAX_NAME, allow_newlines=False)
        if review is not None and not isinstance(review, bool):
            raise InvalidField(("review",), "review is true, false or null (the project decides)")
        if not -1_000_000 <= priority <= 1_000_000:
            raise InvalidCommand("priority must be between -1000000 and 1000000")
        reason = check_reason(reason)
        return cls._create(
            StoryCreated,
            id=story_id,
            actor=actor,
            reason=reason,
            to_stage=Stage.BACKLOG,
            name=name,
            description=description,
            acceptance_criteria=criteria,
            depends_on=deps,
            epic=epic,
            priority=priority,
            target_branch=target_branch,
            review=review,
        )

    # ------------------------------------------------------------------ helpers

    @property
    def legal_events(self) -> list[str]:
        return legal_events_from(self.stage)

    def _refuse(self, event: str, why: str = "") -> IllegalTransition:
        return IllegalTransition(self.id, self.stage.value, event, self.legal_events, why)

    def _require_stage(self, event: str, *stages: Stage) -> None:
        if self.stage not in stages:
            raise self._refuse(event)

    def _move(
        self,
        event_cls: type[StoryEvent],
        *,
        actor: str,
        to_stage: Stage | None = None,
        reason: str | None = None,
        **fields: Any,
    ) -> None:
        self.trigger_event(
            event_cls,
            actor=actor,
            reason=reason,
            from_stage=self.stage,
            to_stage=to_stage if to_stage is not None else self.stage,
            **fields,
        )

    # ------------------------------------------------------------------ coding

    def start_coding(
        self,
        *,
        actor: str,
        dependency_stages: Mapping[str, Stage | None],
        reason: str | None = None,
    ) -> None:
        """``dependency_stages`` maps each ``depends_on`` id to its stage (None if missing)."""
        self._require_stage("start_coding", Stage.BACKLOG)
        unfinished = {
            dep: (stage.value if stage is not None else "missing")
            for dep in self.depends_on
            if (stage := dependency_stages.get(dep)) not in FINISHED_STAGES
        }
        if unfinished:
            raise DependenciesNotDone(
                self.id, self.stage.value, "start_coding", self.legal_events, unfinished
            )
        self._move(CodingStarted, actor=actor, to_stage=Stage.CODING, reason=reason)

    def worktree_ready(self, *, actor: str, path: str, branch: str) -> None:
        self._require_stage("worktree_ready", Stage.CODING)
        self._move(WorktreeReady, actor=actor, path=path, branch=branch)

    def request_agent_spawn(
        self,
        *,
        actor: str,
        role: AgentRole,
        agent: str,
        runtime: str,
        model: str | None = None,
        purpose: str = "code",
        resume_session_id: str | None = None,
        argv: list[str] | None = None,
        log_path: str | None = None,
        reason: str | None = None,
    ) -> int:
        """Record that an agent is about to be spawned; returns the attempt number."""
        event = "spawn_agent"
        if role is AgentRole.PLANNER:
            raise self._refuse(event, "a planner plans an epic, not a story")
        if self.running_agent is not None:
            raise self._refuse(event, f"attempt {self.running_agent['attempt']} is still running")
        if role is AgentRole.CODER:
            self._require_stage(event, Stage.CODING)
            attempt = self.coder_attempts + 1
        elif role is AgentRole.EVALUATOR:
            self._require_stage(event, Stage.REVIEW)
            if self.pending_review is not None:
                raise self._refuse(
                    event, f"the verdict of evaluator attempt {self.pending_review} awaits"
                )
            attempt = self.evaluator_attempts + 1
        else:
            self._require_stage(event, Stage.MERGE_FAILURE)
            if self.merge_failure_kind not in MERGEMASTER_KINDS:
                raise self._refuse(
                    event, "a mergemaster only works on conflict_detected or hunks_lost"
                )
            if self.final:
                raise self._refuse(event, "a mergemaster already gave up on this story")
            attempt = self.mergemaster_attempts + 1
        self._move(
            AgentSpawnRequested,
            actor=actor,
            reason=reason,
            role=role,
            attempt=attempt,
            agent=agent,
            runtime=runtime,
            model=model,
            purpose=purpose,
            resume_session_id=resume_session_id,
            argv=list(argv or []),
            log_path=log_path,
        )
        return attempt

    def _require_running(self, event: str, role: AgentRole, attempt: int) -> dict[str, Any]:
        running = self.running_agent
        if running is None or running["role"] != role.value or running["attempt"] != attempt:
            raise self._refuse(event, f"no {role.value} attempt {attempt} is running")
        return running

    def agent_started(self, *, actor: str, role: AgentRole, attempt: int, pid: int) -> None:
        running = self._require_running("agent_started", role, attempt)
        if running["started"]:
            raise self._refuse("agent_started", f"attempt {attempt} was already started")
        if pid <= 0:
            raise InvalidCommand("pid must be positive")
        self._move(AgentStarted, actor=actor, role=role, attempt=attempt, pid=pid)

    def agent_exited(
        self,
        *,
        actor: str,
        role: AgentRole,
        attempt: int,
        outcome: AgentOutcome,
        exit_code: int | None = None,
        signal: int | None = None,
        session_id: str | None = None,
        turns: int = 0,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost_usd: float = 0.0,
        log_path: str | None = None,
        reason: str | None = None,
        **report: Any,
    ) -> None:
        """``report``: what the agent CLI said about its run (AgentExited's optional fields:
        model, result_subtype, permission_denials, model_usage, ...)."""
        self._require_running("agent_exited", role, attempt)
        if turns < 0 or tokens_in < 0 or tokens_out < 0 or cost_usd < 0:
            raise InvalidCommand("turns, tokens and cost must not be negative")
        self._move(
            AgentExited,
            **report,
            actor=actor,
            reason=reason,
            role=role,
            attempt=attempt,
            outcome=outcome,
            exit_code=exit_code,
            signal=signal,
            session_id=session_id,
            turns=turns,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=cost_usd,
            log_path=log_path,
        )

    def uncommitted_changes_found(self, *, actor: str, paths: list[str]) -> None:
        self._require_stage("uncommitted_changes_found", Stage.CODING)
        if self.running_agent is not None:
            raise self._refuse("uncommitted_changes_found", "an agent is still running")
        self._move(UncommittedChangesFound, actor=actor, paths=list(paths)[:1000])

    # ------------------------------------------------------------------ gates

    def start_gates(self, *, actor: str, commits_ahead: int = 0, reason: str | None = None) -> None:
        event = "start_gates"
        self._require_stage(event, Stage.CODING)
        if self.running_agent is not None:
            raise self._refuse(event, "an agent is still running")
        # A run whose CLI refused some tool calls still ended normally: its commits (if
        # any) are judged by the gates like any other.
        if self.last_coder_outcome not in (AgentOutcome.COMPLETED, AgentOutcome.PERMISSION_DENIED):
            raise self._refuse(event, "the last coder run did not complete")
        self._move(
            GatesStarted,
            actor=actor,
            reason=reason,
            to_stage=Stage.GATES,
            commits_ahead=commits_ahead,
        )

    def pass_gates(
        self,
        *,
        actor: str,
        feature_branch: str,
        commits_ahead: int,
        output: str = "",
        review: bool = False,
        commit: str | None = None,
    ) -> None:
        """Into the merge queue, or to review first when ``review`` (the runner decides from
        the story's own flag and the project's ``[review]``)."""
        event = "gates_passed"
        self._require_stage(event, Stage.GATES)
        if commits_ahead < 1:
            raise self._refuse(event, "the feature branch has no commits ahead of base")
        self._move(
            GatesPassed,
            actor=actor,
            to_stage=Stage.REVIEW if review else Stage.MERGE,
            feature_branch=feature_branch,
            commits_ahead=commits_ahead,
            output=output,
            commit=commit,
        )

    def fail_gates(self, *, actor: str, output: str, max_retries: int) -> None:
        """Back to coding with the failure stored, or blocked once retries are exhausted."""
        self._require_stage("gates_failed", Stage.GATES)
        retry_count = self.retry_count + 1
        if retry_count > max_retries:
            self._move(
                GatesFailed,
                actor=actor,
                to_stage=Stage.BLOCKED,
                reason=(
                    f"retries exhausted: gates failed {retry_count} times "
                    f"(max_retries is {max_retries})"
                ),
                output=output,
                retry_count=retry_count,
                exhausted=True,
            )
        else:
            self._move(
                GatesFailed,
                actor=actor,
                to_stage=Stage.CODING,
                reason=f"gates failed (retry {retry_count} of {max_retries})",
                output=output,
                retry_count=retry_count,
            )

    # ------------------------------------------------------------------ review

    def submit_review(
        self, *, actor: str, attempt: int, verdict: Any, commit: str | None = None
    ) -> None:
        """Record evaluator ``attempt``'s verdict; one per attempt, while it runs."""
        event = "submit_review"
        self._require_stage(event, Stage.REVIEW)
        running = self.running_agent
        if running is None or running["role"] != AgentRole.EVALUATOR.value:
            raise self._refuse(event, "no evaluator is running")
        if running["attempt"] != attempt:
            raise self._refuse(event, f"evaluator attempt {running['attempt']} is running")
        if self.pending_review == attempt:
            raise self._refuse(event, f"evaluator attempt {attempt} already gave its verdict")
        judged = judge(verdict, self.acceptance_criteria)
        self._move(
            ReviewSubmitted,
            actor=actor,
            reason=judged.tally(),
            attempt=attempt,
            criteria=judged.criteria,
            score=judged.score,
            summary=judged.summary,
            commit=commit,
        )

    def conclude_review(self, *, actor: str, min_score: float, max_retries: int) -> bool:
        """Pass the pending verdict into the merge queue or send the story back; True if
        it passed. Once the evaluator's exit is recorded (its verdict is final then)."""
        event = "conclude_review"
        self._require_stage(event, Stage.REVIEW)
        if self.running_agent is not None:
            raise self._refuse(event, "the evaluator is still running")
        if self.pending_review is None:
            raise self._refuse(event, "no verdict awaits a conclusion")
        if not 0.0 <= min_score <= 1.0:
            raise InvalidCommand("min_score is between 0 and 1")
        verdict = next(r for r in self.reviews if r["attempt"] == self.pending_review)
        judged, score = verdict["criteria"], float(verdict["score"])
        if verdict_passes(judged, score, min_score):
            self._move(
                ReviewPassed,
                actor=actor,
                to_stage=Stage.MERGE,
                reason=f"review passed: score {score:.2f} (min_score {min_score:.2f})",
                attempt=self.pending_review,
                score=score,
                min_score=min_score,
            )
            return True
        gaps = unmet(judged) or sorted(judged, key=lambda j: j["score"])[:3]
        listed = "; ".join(f"#{g['criterion']} {g['text'][:120]}" for g in gaps)
        retry_count = self.retry_count + 1
        exhausted = retry_count > max_retries
        if exhausted:
            reason = (
                f"retries exhausted: review failed {retry_count} times (max_retries is "
                f"{max_retries}); unmet: {listed}"
            )
        else:
            reason = (
                f"review failed (retry {retry_count} of {max_retries}), score {score:.2f}: "
                f"unmet: {listed}"
            )
        self._move(
            ReviewFailed,
            actor=actor,
            to_stage=Stage.BLOCKED if exhausted else Stage.CODING,
            reason=check_reason(reason[:MAX_REASON]),
            attempt=self.pending_review,
            score=score,
            min_score=min_score,
            gaps=gaps,
            summary=verdict.get("summary", ""),
            retry_count=retry_count,
            exhausted=exhausted,
        )
        return False

    # ------------------------------------------------------------------ merge

    def start_merge(
        self,
        *,
        actor: str,
        base_sha: str | None = None,
        ahead: list[str] | None = None,
        speculative_base: str | None = None,
        reason: str | None = None,
    ) -> None:
        event = "start_merge"
        self._require_stage(event, Stage.MERGE)
        if self.merging:
            raise self._refuse(event, "a merge of this story is already running")
        if ahead and speculative_base is None:
            raise InvalidCommand("a stacked merge names the commit it is squashed onto")
        if self.id in (ahead or []):
            raise InvalidCommand("a story cannot be stacked on itself")
        self._move(
            MergeStarted,
            actor=actor,
            reason=reason,
            base_sha=base_sha,
            resolved=self.resolved_pending,
            ahead=list(ahead or []),
            speculative_base=speculative_base,
        )

    def update_speculation(
        self,
        *,
        actor: str,
        reason: str | None,
        state: str,
        commit: str | None = None,
        parent: str | None = None,
    ) -> None:
        event = "update_speculation"
        self._require_stage(event, Stage.MERGE)
        if not self.merging or self.speculation is None:
            raise self._refuse(event, "no speculative merge of this story is running")
        self.trigger_event(
            SpeculationUpdated,
            actor=actor,
            reason=check_reason(reason),
            from_stage=self.stage,
            to_stage=self.stage,
            state=state,
            commit=commit,
            parent=parent,
        )

    def restart_speculation(
        self,
        *,
        actor: str,
        reason: str | None,
        queued_position: int | None = None,
        alone: bool = False,
    ) -> None:
        event = "restart_speculation"
        self._require_stage(event, Stage.MERGE)
        if not self.merging:
            raise self._refuse(event, "no merge of this story is running")
        if self.resolved_pending:
            raise self._refuse(event, "a mergemaster's resolution is not merged speculatively")
        why = _require_reason(reason, "restarting a speculative merge")
        self._move(
            SpeculationRestarted,
            actor=actor,
            reason=why,
            queued_position=queued_position,
            ahead=list((self.speculation or {}).get("ahead") or []),
            alone=alone,
        )

    def succeed_merge(self, *, actor: str, merge_commit: str, base_branch: str) -> None:
        event = "merge_succeeded"
        self._require_stage(event, Stage.MERGE)
        if not self.merging:
            raise self._refuse(event, "no merge was started")
        self._move(
            MergeSucceeded,
            actor=actor,
            to_stage=Stage.DONE,
            merge_commit=merge_commit,
            base_branch=base_branch,
        )

    def fail_merge(
        self,
        *,
        actor: str,
        kind: MergeFailureKind,
        details: str = "",
        conflicts: list[str] | None = None,
        reason: str | None = None,
        lost_hunks: list[dict[str, Any]] | None = None,
    ) -> None:
        event = "merge_failed"
        self._require_stage(event, Stage.MERGE)
        if not self.merging:
            raise self._refuse(event, "no merge was started")
        self._move(
            MergeFailed,
            actor=actor,
            to_stage=Stage.MERGE_FAILURE,
            reason=reason or f"merge failed: {kind.value}",
            kind=kind,
            details=details,
            conflicts=list(conflicts or []),
            lost_hunks=[dict(h) for h in lost_hunks or []],
        )

    def request_fixup(self, *, actor: str, reason: str | None = None) -> None:
        event = "request_fixup"
        self._require_stage(event, Stage.MERGE_FAILURE)
        if self.running_agent is not None:
            raise self._refuse(event, "a mergemaster is still running")
        self._move(FixupRequested, actor=actor, to_stage=Stage.CODING, reason=reason)

    def requeue_merge(
        self, *, actor: str, resolved: bool = False, reason: str | None = None
    ) -> None:
        event = "merge_resolved" if resolved else "requeue_merge"
        self._require_stage(event, Stage.MERGE_FAILURE)
        if resolved and self.merge_failure_kind not in MERGEMASTER_KINDS:
            raise self._refuse(event, "only a conflict_detected merge can be resolved")
        self._move(
            MergeRequeued, actor=actor, to_stage=Stage.MERGE, reason=reason, resolved=resolved
        )

    def mergemaster_gave_up(self, *, actor: str, reason: str | None) -> None:
        event = "merge_gave_up"
        self._require_stage(event, Stage.MERGE_FAILURE)
        if self.final:
            raise self._refuse(event, "a mergemaster already gave up on this story")
        reason = _require_reason(reason, "giving up a merge")
        self._move(MergemasterAttempted, actor=actor, reason=reason)

    # ------------------------------------------------------------------ operator

    def block(self, *, actor: str, reason: str | None) -> None:
        self._require_stage(
            "block",
            Stage.BACKLOG,
            Stage.CODING,
            Stage.GATES,
            Stage.REVIEW,
            Stage.MERGE,
            Stage.MERGE_FAILURE,
        )
        reason = _require_reason(reason, "blocking a story")
        self._move(
            StoryBlocked,
            actor=actor,
            to_stage=Stage.BLOCKED,
            reason=reason,
            blocked_from=self.stage,
        )

    def unblock(self, *, actor: str, reason: str | None = None) -> None:
        self._require_stage("unblock", Stage.BLOCKED)
        target = self.blocked_from or Stage.CODING
        # A merge that was interrupted by the block restarts from the queue.
        self._move(StoryUnblocked, actor=actor, to_stage=target, reason=reason)

    def demote(self, *, actor: str, reason: str | None = None) -> None:
        self._require_stage(
            "demote", Stage.CODING, Stage.GATES, Stage.REVIEW, Stage.MERGE, Stage.BLOCKED
        )
        self._move(StoryDemoted, actor=actor, to_stage=Stage.BACKLOG, reason=reason)

    def archive(self, *, actor: str, reason: str | None = None) -> None:
        self._require_stage("archive", Stage.DONE, Stage.BACKLOG, Stage.BLOCKED)
        abandoned = self.stage is not Stage.DONE
        if abandoned:
            reason = _require_reason(reason, "abandoning a story that is not done")
        self._move(
            StoryArchived, actor=actor, to_stage=Stage.ARCHIVED, reason=reason, abandoned=abandoned
        )

    # ------------------------------------------------------------------ notes

    def add_note(self, *, actor: str, text: str | None) -> None:
        if text is None or not text.strip():
            raise InvalidCommand("a note needs text (sent as the event's reason)")
        text = _clean_text(text, "note", max_len=10_000, allow_newlines=True)
        self.trigger_event(
            NoteAdded, actor=actor, reason=text, from_stage=self.stage, to_stage=self.stage
        )

    def provider_breaker_opened(
        self,
        *,
        actor: str,
        reason: str | None,
        provider: str,
        consecutive_failures: int,
        open_until: datetime,
        opened_times: int,
    ) -> None:
        self._require_stage("provider_breaker_opened", Stage.CODING)
        self.trigger_event(
            ProviderBreakerOpened,
            actor=actor,
            reason=reason,
            from_stage=self.stage,
            to_stage=self.stage,
            provider=provider,
            consecutive_failures=consecutive_failures,
            open_until=open_until,
            opened_times=opened_times,
        )

    def claim(
        self,
        *,
        actor: str,
        reason: str | None,
        worker: str,
        generation: int,
        drop_sessions: bool = False,
    ) -> None:
        """A worker runner takes the story under a lease of the given generation.

        Generations only grow: a claim at or below the recorded one comes from a lease that
        has since been taken again, and is refused (this is the fence)."""
        event = "claim"
        self._require_stage(event, *WORKER_STAGES)
        if generation <= self.holder_generation:
            raise self._refuse(
                event,
                f"lease generation {generation} is stale: {self.holder} claimed the story "
                f"under generation {self.holder_generation}",
            )
        self.trigger_event(
            WorkerClaimed,
            actor=actor,
            reason=check_reason(reason),
            from_stage=self.stage,
            to_stage=self.stage,
            worker=worker,
            generation=generation,
            previous=self.holder,
            drop_sessions=drop_sessions and self.holder not in (None, worker),
        )

    def provider_breaker_closed(self, *, actor: str, reason: str | None, provider: str) -> None:
        self._require_stage("provider_breaker_closed", Stage.CODING)
        self.trigger_event(
            ProviderBreakerClosed,
            actor=actor,
            reason=reason,
            from_stage=self.stage,
            to_stage=self.stage,
            provider=provider,
        )

    def declare_dropped_hunk(
        self, *, actor: str, file: str, side: str, hunk: str, reason: str | None
    ) -> None:
        """A mergemaster's word that one side's hunk is left out on purpose."""
        event = "declare_dropped_hunk"
        self._require_stage(event, Stage.MERGE_FAILURE, Stage.MERGE)
        if side not in ("story", "base"):
            raise InvalidField(("data", "side"), "side is 'story' or 'base'")
        why = _require_reason(reason, "declaring a dropped hunk")
        file = _clean_text(file, "file", max_len=4096, allow_newlines=False)
        hunk = _clean_text(hunk, "hunk", max_len=200, allow_newlines=False)
        if not file.strip() or not hunk.startswith("@@"):
            raise InvalidCommand("name the file and the hunk header as reported (@@ ... @@)")
        self.trigger_event(
            DroppedHunkDeclared,
            actor=actor,
            reason=why,
            from_stage=self.stage,
            to_stage=self.stage,
            file=file,
            side=side,
            hunk=hunk,
        )

    def record_gate_verdict(self, *, actor: str, reason: str | None, **verdict: Any) -> None:
        self._require_stage("record_gate_verdict", Stage.GATES, Stage.MERGE)
        self.trigger_event(
            GateVerdictRecorded,
            actor=actor,
            reason=check_reason(reason),
            from_stage=self.stage,
            to_stage=self.stage,
            **verdict,
        )

    def flaky_gate_detected(self, *, actor: str, reason: str | None, **found: Any) -> None:
        self._require_stage("flaky_gate_detected", Stage.GATES, Stage.MERGE)
        if not reason or not reason.strip():
            raise InvalidCommand("a flaky gate's verdict needs a reason (what was decided)")
        self.trigger_event(
            GateFlakyDetected,
            actor=actor,
            reason=check_reason(reason),
            from_stage=self.stage,
            to_stage=self.stage,
            **found,
        )

    def accepts_expected_version(self, expected: int) -> bool:
        """True when only notes were added since ``expected``: nothing a guard reads changed."""
        return self.state_version <= expected <= self.version

    # ------------------------------------------------------------------ views

    @property
    def in_merge_queue(self) -> bool:
        return self.stage is Stage.MERGE and not self.merging

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view of the whole state (used by the API, CLI and tests)."""
        return {
            "id": self.id,
            "version": self.version,
            "stage": self.stage.value,
            "name": self.name,
            "description": self.description,
            "acceptance_criteria": list(self.acceptance_criteria),
            "depends_on": list(self.depends_on),
            "epic": self.epic,
            "priority": self.priority,
            "review": self.review,
            "retry_count": self.retry_count,
            "abort_respawns": self.abort_respawns,
            "mergemaster_spawns": self.mergemaster_spawns,
            "failed_runs": self.failed_runs,
            "fixup_pending": self.fixup_pending,
            "final": self.final,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost_usd": round(self.cost_usd, 6),
            "coder_attempts": self.coder_attempts,
            "mergemaster_attempts": self.mergemaster_attempts,
            "evaluator_attempts": self.evaluator_attempts,
            "evaluator_failed_runs": self.evaluator_failed_runs,
            "reviews": [{**r, "criteria": [dict(c) for c in r["criteria"]]} for r in self.reviews],
            "pending_review": self.pending_review,
            "last_review_failure": dict(self.last_review_failure)
            if self.last_review_failure
            else None,
            "running_agent": dict(self.running_agent) if self.running_agent else None,
            "last_coder_outcome": self.last_coder_outcome.value
            if self.last_coder_outcome
            else None,
            "sessions": dict(self.sessions),
            "worktree_path": self.worktree_path,
            "feature_branch": self.feature_branch,
            "commits_ahead": self.commits_ahead,
            "gated_commit": self.gated_commit,
            "holder": self.holder,
            "holder_generation": self.holder_generation,
            "merging": self.merging,
            "speculation": (
                {k: list(v) if isinstance(v, list) else v for k, v in self.speculation.items()}
                if self.speculation
                else None
            ),
            "in_merge_queue": self.in_merge_queue,
            "resolved_pending": self.resolved_pending,
            "merge_commit": self.merge_commit,
            "merge_failure_kind": self.merge_failure_kind.value
            if self.merge_failure_kind
            else None,
            "merge_failure_details": self.merge_failure_details,
            "conflicts": list(self.conflicts),
            "lost_hunks": [
                {k: list(v) if isinstance(v, list) else v for k, v in hunk.items()}
                for hunk in self.lost_hunks
            ],
            "declared_drops": [dict(drop) for drop in self.declared_drops],
            "flaky_gates": list(self.flaky_gates),
            "blocked_from": self.blocked_from.value if self.blocked_from else None,
            "blocked_reason": self.blocked_reason,
            "last_gate_output": self.last_gate_output,
            "last_event": self.last_event,
            "created_on": self.created_on.isoformat(),
            "modified_on": self.modified_on.isoformat(),
            "legal_events": self.legal_events,
        }
