"""Random valid workloads: stories driven through every stage by the domain's own commands.

Used by the projection tests (live follow vs rebuild, reducer vs aggregate, crash test) and
by ``bench/projection_rebuild.py``. Every step picks a command that is legal from the story's
current state and runs it through ``domain.commands.apply_named`` (in memory) or
``StorylineApplication.transition`` (persisted), so the guards decide what really happens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from domain.commands import Policy, apply_named
from domain.errors import DomainError
from domain.stages import MERGEMASTER_KINDS, AgentOutcome, MergeFailureKind, Stage
from domain.story import Story

if TYPE_CHECKING:
    from service.application import StorylineApplication

Command = tuple[str, dict[str, Any], str | None]

OUTCOMES = (
    ("completed", 60),
    ("aborted_before_session", 15),
    ("timed_out", 8),
    ("inactive", 7),
    ("failed", 10),
)
KINDS = tuple(kind.value for kind in MergeFailureKind)
CRITERIA = ("it works", "it is tested")
"""Every generated story's acceptance criteria (an evaluator judges each by its index)."""


def _weighted(rng: random.Random, choices: list[tuple[Command, int]]) -> Command | None:
    if not choices:
        return None
    commands, weights = zip(*choices, strict=True)
    return rng.choices(commands, weights=weights)[0]


def _exit(rng: random.Random, role: str, attempt: int) -> Command:
    outcome = rng.choices([o for o, _ in OUTCOMES], weights=[w for _, w in OUTCOMES])[0]
    session = None if outcome == "aborted_before_session" else f"sess-{rng.randrange(10**6)}"
    return (
        "agent_exited",
        {
            "role": role,
            "attempt": attempt,
            "outcome": outcome,
            "exit_code": 0 if outcome == "completed" else rng.choice([1, 2, None]),
            "signal": 9 if outcome == "aborted_before_session" else None,
            "session_id": session,
            "turns": rng.randrange(0, 40),
            "tokens_in": rng.randrange(0, 50_000),
            "tokens_out": rng.randrange(0, 8_000),
            "cost_usd": round(rng.random() * 0.5, 4),
            "log_path": f"/tmp/logs/{attempt}.log",
        },
        None,
    )


def verdict(story: Story, rng: random.Random, attempt: int) -> dict[str, Any]:
    """A valid ``submit_review`` for ``story``: every acceptance criterion judged by index.

    Mostly every criterion met with high scores (the review passes at ``min_score`` 0.8),
    sometimes one unmet or scored low, so both conclusions happen."""
    criteria = []
    for index in range(len(story.acceptance_criteria)):
        met = rng.random() < 0.8
        score = round(rng.uniform(0.75, 1.0) if met else rng.uniform(0.0, 0.6), 2)
        evidence = f"tests/test_story.py::test_{index} {'passes' if met else 'fails'}"
        criteria.append({"criterion": index, "met": met, "score": score, "evidence": evidence})
    summary = f"reviewed by the workload (attempt {attempt})"
    return {"attempt": attempt, "criteria": criteria, "summary": summary}


def _review_options(story: Story, rng: random.Random) -> list[tuple[Command, int]]:
    """The review stage: spawn an evaluator, it starts, gives its verdict, exits, and the
    runner concludes (or a person blocks or demotes the story meanwhile)."""
    running = story.running_agent
    options: list[tuple[Command, int]] = []
    if running is not None:
        role, attempt = running["role"], running["attempt"]
        if not running["started"]:
            started = {"role": role, "attempt": attempt, "pid": 5151}
            options.append((("agent_started", started, None), 85))
            options.append((_exit(rng, role, attempt), 15))
        else:
            if role == "evaluator" and story.pending_review != attempt:
                options.append((("submit_review", verdict(story, rng, attempt), None), 80))
            options.append((_exit(rng, role, attempt), 40))
        return options
    if story.pending_review is not None:
        options.append((("conclude_review", {}, None), 90))
    else:
        evaluator = {"role": "evaluator", "agent": "evaluator-1", "runtime": "claude-code"}
        options.append((("spawn_agent", {**evaluator, "purpose": "review"}, None), 90))
    block: Command = ("block", {}, "blocked by the workload at review")
    options += [(block, 3), (("demote", {}, "demoted by the workload"), 2)]
    return options


def next_command(story: Story, rng: random.Random) -> Command | None:
    """A random command that is legal from the story's state (None when it is finished)."""
    stage = story.stage
    running = story.running_agent
    options: list[tuple[Command, int]] = []
    block: Command = ("block", {}, f"blocked by the workload at {stage.value}")
    if stage is Stage.BACKLOG:
        options = [(("start_coding", {}, None), 85), (block, 5)]
        options.append((("archive", {}, "abandoned by the workload"), 3))
    elif stage is Stage.CODING:
        if running is not None:
            role, attempt = running["role"], running["attempt"]
            if not running["started"]:
                started = {"role": role, "attempt": attempt, "pid": 4242}
                options.append((("agent_started", started, None), 85))
                options.append((_exit(rng, role, attempt), 15))
            else:
                options.append((_exit(rng, role, attempt), 100))
        else:
            if story.worktree_path is None:
                wt = {"path": f"/w/{story.id}", "branch": f"feature/story-{story.id}"}
                options.append((("worktree_ready", wt, None), 60))
            coder: dict[str, Any] = {"role": "coder", "agent": "coder-1", "runtime": "claude-code"}
            coder["model"] = rng.choice(["sonnet", "opus", None])
            coder["purpose"] = "fixup" if story.fixup_pending else "code"
            options.append((("spawn_agent", coder, None), 40))
            if story.last_coder_outcome is AgentOutcome.COMPLETED:
                options.append((("start_gates", {"commits_ahead": rng.randrange(0, 4)}, None), 80))
                options.append((("uncommitted_changes_found", {"paths": ["a.py"]}, None), 5))
            options += [(block, 3), (("demote", {}, "demoted by the workload"), 2)]
            if story.last_coder_outcome in (
                AgentOutcome.ABORTED_BEFORE_SESSION,
                AgentOutcome.PROVIDER_UNAVAILABLE,
            ):
                # A runner's provider breaker: recorded on a story, never a step.
                opened = {
                    "provider": "coder-1",
                    "consecutive_failures": 3,
                    "open_until": "2026-01-01T00:00:10+00:00",
                    "opened_times": rng.randrange(1, 4),
                }
                options.append((("provider_breaker_opened", opened, "3 provider failures"), 20))
                closed = {"provider": "coder-1"}
                options.append((("provider_breaker_closed", closed, "the probe ran"), 10))
    elif stage is Stage.GATES:
        passed: dict[str, Any] = {
            "feature_branch": f"feature/story-{story.id}",
            "commits_ahead": 2,
            "output": "ok",
        }
        # Half the stories are reviewed before the merge queue (as ``[review]`` decides).
        passed["review"] = rng.random() < 0.5
        options = [
            (("gates_passed", passed, None), 60),
            (("gates_failed", {"output": "FAILED test_x\n" * rng.randrange(1, 4)}, None), 35),
            (block, 3),
            (("demote", {}, None), 2),
        ]
        gate = {"phase": "gates", "gate": "pytest -q", "tree": "ab12", "fingerprint": "cd34"}
        options.append((("record_gate_verdict", {**gate, "passed": rng.random() < 0.5}, None), 10))
        flaky = {**gate, "outputs": ["ok", "FAILED"], "verdicts": [True, False]}
        options.append((("flaky_gate_detected", {**flaky, "action": "retried"}, "rerun"), 2))
    elif stage is Stage.REVIEW:
        options = _review_options(story, rng)
    elif stage is Stage.MERGE:
        if story.merging:
            kind = rng.choice(KINDS)
            failed: dict[str, Any] = {"kind": kind, "details": f"{kind} details"}
            if kind in ("conflict_detected", "hunks_lost"):
                failed["conflicts"] = ["src/x.py"]
            done = {"merge_commit": f"{rng.randrange(16**12):012x}", "base_branch": "main"}
            options = [(("merge_succeeded", done, None), 50), (("merge_failed", failed, None), 50)]
            if story.speculation is not None:  # the speculative merge queue's events
                progress = {"state": rng.choice(["gating", "passed"]), "commit": "c0ffee"}
                options.append((("update_speculation", progress, None), 20))
                options.append((("restart_speculation", {}, "a story ahead was ejected"), 10))
        else:
            options = [(("start_merge", {"base_sha": "abc123"}, None), 85), (block, 8)]
            options.append((("demote", {}, None), 4))
            stacked = {"base_sha": "abc123", "ahead": ["q1"], "speculative_base": "def456"}
            options.append((("start_merge", stacked, None), 15))
    elif stage is Stage.MERGE_FAILURE:
        if running is not None:
            role, attempt = running["role"], running["attempt"]
            if not running["started"]:
                started = {"role": role, "attempt": attempt, "pid": 777}
                options.append((("agent_started", started, None), 80))
            options.append((_exit(rng, role, attempt), 40))
            if running["started"]:
                options.append((("merge_resolved", {}, "resolved"), 30))
                options.append((("merge_gave_up", {}, "cannot resolve"), 20))
        else:
            failure = story.merge_failure_kind
            options = [(("requeue_merge", {}, "operator requeue"), 15), (block, 8)]
            options.append((("request_fixup", {}, "fixup"), 30 if failure is not None else 10))
            if failure in MERGEMASTER_KINDS:
                drop = {"file": "src/x.py", "side": "base", "hunk": "@@ -3,0 +4,2 @@"}
                options.append((("declare_dropped_hunk", drop, "superseded"), 5))
            if failure in MERGEMASTER_KINDS and not story.final:
                mm = {"role": "mergemaster", "agent": "mm", "runtime": "claude-code"}
                options += [
                    (("spawn_agent", {**mm, "purpose": "mergemaster"}, None), 50),
                    (("merge_resolved", {}, None), 10),
                    (("merge_gave_up", {}, "the mergemaster gave up"), 10),
                ]
    elif stage is Stage.BLOCKED:
        options = [
            (("unblock", {}, "unblocked by the workload"), 70),
            (("demote", {}, None), 15),
            (("archive", {}, "abandoned while blocked"), 10),
        ]
    elif stage is Stage.DONE:
        options = [(("archive", {}, None), 100)]
    if stage in (Stage.CODING, Stage.GATES, Stage.REVIEW):
        # Scale-out: a worker runner claims (or takes over) the story; never a step.
        claim = {
            "worker": rng.choice(["host-a:1:aa", "host-b:2:bb"]),
            "generation": story.holder_generation + 1,
            "drop_sessions": rng.random() < 0.5,
        }
        options.append((("claim", claim, "a worker took the story"), 4))
    if stage is not Stage.ARCHIVED:
        # Now and then a note: legal in every stage, never a step.
        options.append((("add_note", {}, f"a note at {stage.value}"), 2))
    if running is not None and stage not in (Stage.CODING, Stage.REVIEW, Stage.MERGE_FAILURE):
        # An agent outliving its stage (blocked, demoted, resolved) still exits.
        options.append((_exit(rng, running["role"], running["attempt"]), 50))
    return _weighted(rng, options)


@dataclass
class Workload:
    """Stories in memory; events are collected in the order the commands ran."""

    rng: random.Random
    policy: Policy = field(default_factory=lambda: Policy(max_retries=2))
    stories: dict[str, Story] = field(default_factory=dict)
    prefix: str = ""
    actor: str = "user:workload"

    def create(self, index: int, depends_on: list[str] | None = None) -> Story:
        story = Story.create(
            story_id=f"{self.prefix}{index}",
            name=f"story {index}",
            description="generated by the workload",
            acceptance_criteria=list(CRITERIA),
            depends_on=depends_on or [],
            actor=self.actor,
            epic=self.rng.choice([None, "epic-a", "epic-b"]),
            priority=self.rng.randrange(-2, 3),
        )
        self.stories[story.id] = story
        return story

    def step(self) -> Story | None:
        """Run one random legal command on a random unfinished story."""
        active = [s for s in self.stories.values() if s.stage is not Stage.ARCHIVED]
        if not active:
            return None
        story = self.rng.choice(active)
        command = next_command(story, self.rng)
        if command is None:
            return None
        name, data, reason = command
        deps = {d: self.stories[d].stage if d in self.stories else None for d in story.depends_on}
        try:
            apply_named(
                story,
                name,
                actor=self.actor,
                reason=reason,
                data=data,
                policy=self.policy,
                dependency_stages=deps,
            )
        except DomainError:
            return None
        return story


def generate(
    rng: random.Random, *, stories: int, steps: int, prefix: str = "", dependencies: bool = True
) -> Iterator[tuple[Story, list[Any]]]:
    """Yield ``(story, new domain events)`` in commit order, creations interleaved."""
    work = Workload(rng, prefix=prefix)
    created = 0
    for _ in range(steps):
        if created < stories and (created == 0 or rng.random() < stories / max(steps, 1) * 2):
            deps: list[str] = []
            if dependencies and created > 2 and rng.random() < 0.2:
                deps = [f"{prefix}{rng.randrange(created)}"]
            story = work.create(created, deps)
            created += 1
        else:
            maybe = work.step()
            if maybe is None:
                continue
            story = maybe
        yield story, list(story.collect_events())


def drive_app(
    app: StorylineApplication,
    rng: random.Random,
    *,
    stories: int,
    steps: int,
    dependencies: bool = True,
    on_commit: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[str]:
    """Run a random workload through the application (persisted, with optimistic locking).

    Returns the ids of the stories created. ``on_commit(position)`` is called after each
    committed command; ``should_stop()`` ends the workload early.
    """
    local: dict[str, Story] = {}
    ids: list[str] = []
    for _ in range(steps):
        if should_stop is not None and should_stop():
            break
        if len(ids) < stories and (not ids or rng.random() < stories / max(steps, 1) * 2):
            deps: list[str] = []
            if dependencies and len(ids) > 2 and rng.random() < 0.2:
                deps = [rng.choice(ids)]
            committed = app.create_story(
                name=f"story {len(ids)}",
                description="generated by the workload",
                acceptance_criteria=list(CRITERIA),
                depends_on=deps,
                actor="user:workload",
                epic=rng.choice([None, "epic-a", "epic-b"]),
                priority=rng.randrange(-2, 3),
            )
            ids.append(committed.story.id)
        else:
            candidates = [s for s in local.values() if s.stage is not Stage.ARCHIVED]
            if not candidates:
                continue
            story = rng.choice(candidates)
            command = next_command(story, rng)
            if command is None:
                continue
            name, data, reason = command
            try:
                committed = app.transition(
                    story.id,
                    name,
                    actor=rng.choice(["user:alice", "runner:coder", "agent:coder-1", "system"]),
                    expected_version=story.version,
                    reason=reason,
                    data=data,
                )
            except DomainError:
                continue
        local[committed.story.id] = committed.story
        if on_commit is not None:
            on_commit(committed.position)
    return ids


__all__ = ["Workload", "drive_app", "generate", "next_command", "verdict"]
