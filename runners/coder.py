"""Coder reactions: scheduling, worktrees, coder spawns, crash rules and server-owned gates.

Each method looks at one story's current state (loaded from the event store) and takes the
next step, recording it as an event. Because the decision depends only on recorded state,
running a reaction twice, or after a restart, does the right thing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from domain.config import StorylineConfig
from domain.errors import DomainError, IllegalTransition, VersionConflict
from domain.ids import feature_branch
from domain.stages import FINISHED_STAGES, AgentOutcome, AgentRole, Stage
from domain.story import Story
from runners.breaker import ProviderBreakers
from runners.gate_verdicts import GateJudge
from runners.gates import story_gate_pidfile
from runners.git_ops import GitError, Worktrees
from runners.index import StoryIndex
from runners.launcher import AgentConfigError, AgentLauncher, LaunchRequest
from runners.reasons import readable
from runners.remote import RemoteMoved
from service.application import StorylineApplication

logger = logging.getLogger(__name__)

ACTOR_SCHEDULER = "runner:scheduler"
ACTOR_CODER = "runner:coder"
ACTOR_GATES = "runner:gates"
ACTOR_BREAKER = "runner:breaker"

_SPAWN_AFTER = {
    "CodingStarted",
    "WorktreeReady",
    "GatesFailed",
    "FixupRequested",
    "StoryUnblocked",
    "ReviewFailed",
}


class CoderReactions:
    def __init__(
        self,
        app: StorylineApplication,
        config: StorylineConfig,
        project: Path,
        index: StoryIndex,
        launcher: AgentLauncher,
        breakers: ProviderBreakers | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.project = project
        self.index = index
        self.launcher = launcher
        self.breakers = breakers or ProviderBreakers(
            threshold=config.provider_breaker_failures,
            base_secs=config.provider_breaker_base_secs,
        )
        self.cluster_capacity: Callable[[], int] | None = None
        """Scale-out: how many stories the live workers can hold (else max_coders)."""
        self.on_breaker_closed: Callable[[], None] = lambda: None
        """Set by the supervisor: look at every story waiting to spawn."""
        self.worktrees = Worktrees(project, config.base_branch)
        # Worktree creation is disk- and lock-heavy: bounded however many stories start.
        self._worktree_slots = threading.BoundedSemaphore(config.worktree_parallelism)

    # ------------------------------------------------------------------ backlog

    def schedule(self, story: Story) -> None:
        """Start a backlog story by itself once all its dependencies are finished.

        Stories without dependencies wait for a client's ``start_coding``.
        """
        if not story.depends_on:
            return
        stages = {dep: self.index.stage_of(dep) for dep in story.depends_on}
        if any(stage not in {s.value for s in FINISHED_STAGES} for stage in stages.values()):
            return
        active = len(self.index.in_stage(Stage.CODING.value, Stage.GATES.value))
        limit = self.cluster_capacity() if self.cluster_capacity else self.config.max_coders
        if active >= limit:
            return
        with contextlib.suppress(VersionConflict, IllegalTransition):
            self.app.transition(
                story.id,
                "start_coding",
                actor=ACTOR_SCHEDULER,
                expected_version=story.version,
                reason="dependencies finished: "
                + ", ".join(f"{d} ({s})" for d, s in sorted(stages.items())),
            )

    # ------------------------------------------------------------------ coding

    def step(self, story: Story) -> bool:
        """One step for a story in ``coding``; True if something was recorded."""
        if story.running_agent is not None:
            self.launcher.reap_orphan(story)
            return self.launcher.running(story.id) is None
        path = self._worktrees(story).path_for(story.id)
        if story.worktree_path != str(path) or not path.is_dir():
            return self._ensure_worktree(story)
        outcome = story.last_coder_outcome
        if story.last_event in _SPAWN_AFTER:
            return self._spawn(story, self._purpose(story))
        if story.last_event == "UncommittedChangesFound":
            return self._spawn(story, "commit_leftovers")
        if story.last_event != "AgentExited" or outcome is None:
            return False
        said = (
            f"; the agent's last error: {story.last_agent_error}" if story.last_agent_error else ""
        )
        if outcome is AgentOutcome.PROVIDER_UNAVAILABLE:
            opened = self._provider_failed(story)
            if opened:
                return True  # the next step finds the breaker open and waits
            agent = self.config.agent_for("coder")
            if agent is not None and self.breakers.state(agent.name) != "closed":
                # Waiting on the breaker is the outage's doing, not the story's: no block.
                return self._spawn(story, "provider_retry")
            if story.abort_respawns >= self.config.abort_respawn_cap:
                return self._block(
                    story,
                    f"the model provider failed {story.abort_respawns} runs in a row (cap "
                    f"{self.config.abort_respawn_cap}){said}",
                )
            return self._spawn(story, "provider_retry")
        self._provider_answered(story, outcome)
        if outcome in (AgentOutcome.ABORTED_BEFORE_SESSION, AgentOutcome.LOST):
            if story.abort_respawns >= self.config.abort_respawn_cap:
                return self._block(
                    story,
                    f"the agent crashed before establishing a session "
                    f"{story.abort_respawns} times in a row (cap "
                    f"{self.config.abort_respawn_cap}); stopping to avoid a respawn loop{said}",
                )
            return self._spawn(story, "abort_respawn")
        if outcome is AgentOutcome.MAX_BUDGET:
            # More money is a person's decision: raise the cap or unblock to try again.
            return self._block(
                story,
                f"{story.last_agent_error or 'the agent stopped at its spending cap'}; raise "
                "the agent's max_budget_usd (or unblock the story) to spend more",
            )
        if outcome in (AgentOutcome.COMPLETED, AgentOutcome.PERMISSION_DENIED):
            return self._complete(story, outcome)
        if story.failed_runs > self.config.max_retries:
            return self._block(
                story,
                f"the agent run ended '{outcome.value}' {story.failed_runs} times in a row "
                f"(max_retries is {self.config.max_retries})",
            )
        return self._spawn(story, f"respawn after {outcome.value}")

    # ------------------------------------------------------------------ provider breaker

    def _provider_failed(self, story: Story) -> bool:
        """Count the story's provider failure; True when it opened the breaker (recorded)."""
        agent = self.config.agent_for("coder")
        if agent is None or story.last_agent_exit_at is None:
            return False
        opening = self.breakers.failure(agent.name, story.id, story.last_agent_exit_at.timestamp())
        if opening is None:
            return False
        wait = (opening.open_until - datetime.now(UTC)).total_seconds()
        logger.warning(
            "provider of agent %r failed %d runs in a row: no spawns for it for %.0f s",
            agent.name,
            opening.consecutive_failures,
            wait,
        )
        self._record_breaker(
            story,
            "provider_breaker_opened",
            agent.name,
            f"the model provider of agent {agent.name!r} failed {opening.consecutive_failures} "
            f"runs in a row; no spawns for it until {opening.open_until.isoformat()} "
            f"(opening {opening.opened_times} in a row), then one probe run",
            {
                "provider": opening.provider,
                "consecutive_failures": opening.consecutive_failures,
                "open_until": opening.open_until.isoformat(),
                "opened_times": opening.opened_times,
            },
        )
        return True

    def _provider_answered(self, story: Story, outcome: AgentOutcome) -> None:
        """A run that ended otherwise: it reached the provider (a probe's closes the breaker)
        unless it died before a session or with the runner, which says nothing about it."""
        agent = self.config.agent_for("coder")
        if agent is None or story.last_agent_exit_at is None:
            return
        exit_at = story.last_agent_exit_at.timestamp()
        if outcome in (AgentOutcome.ABORTED_BEFORE_SESSION, AgentOutcome.LOST):
            self.breakers.inconclusive(agent.name, story.id, exit_at)
            return
        if self.breakers.success(agent.name, story.id, exit_at):
            logger.warning("provider of agent %r answered the probe run: spawns resume", agent.name)
            self._record_breaker(
                story,
                "provider_breaker_closed",
                agent.name,
                f"the probe run of agent {agent.name!r} reached the model provider "
                f"(outcome {outcome.value}); spawns resume",
                {"provider": agent.name},
            )
            # Stories that waited on the breaker are spawned now, not at the next sweep.
            self.on_breaker_closed()

    def _record_breaker(
        self, story: Story, event: str, provider: str, reason: str, data: dict[str, object]
    ) -> None:
        # Not a step (no expected version): it must not fail because the story moved on.
        try:
            committed = self.app.transition(
                story.id, event, actor=ACTOR_BREAKER, reason=reason, data=data
            )
        except DomainError as exc:
            logger.warning("could not record %s on story %s: %s", event, story.id, exc)
            return
        self.breakers.recorded(provider, committed.story.modified_on)

    def _purpose(self, story: Story) -> str:
        if story.fixup_pending:
            return "fixup"
        if story.retry_count > 0:
            return "retry"
        return "code"

    def _worktrees(self, story: Story) -> Worktrees:
        """The story's worktrees: branched from, and counted against, its target branch."""
        return self.worktrees.on_branch(story.target_branch)

    def _target(self, story: Story) -> str:
        return story.target_branch or self.config.base_branch

    def _ensure_worktree(self, story: Story) -> bool:
        worktrees = self._worktrees(story)
        if story.target_branch is not None and not worktrees.base_exists():
            # git's own "invalid reference" would hide that the story names a missing branch.
            return self._block(story, f"target branch {story.target_branch} does not exist")
        path = None
        for attempt in range(3):
            try:
                with self._worktree_slots:
                    path = worktrees.ensure(story.id)
                break
            except GitError as exc:
                # A transient git failure (a lock, a concurrent registration) gets two more
                # tries before the story is blocked with git's own message.
                if attempt == 2:
                    return self._block(story, f"cannot create the worktree: {exc}")
                logger.warning("worktree for %s failed, retrying: %s", story.id, exc)
                time.sleep(0.5 * (attempt + 1))
        try:
            self.app.transition(
                story.id,
                "worktree_ready",
                actor=ACTOR_CODER,
                expected_version=story.version,
                data={"path": str(path), "branch": feature_branch(story.id)},
            )
        except (VersionConflict, IllegalTransition):
            return False
        return True

    def _spawn(self, story: Story, purpose: str) -> bool:
        agent = self.config.agent_for("coder")
        if agent is None:
            return self._block(story, 'no [[agent]] with stage = "coder" is configured')
        if not self.breakers.allow(
            agent.name, story.id, running=lambda sid: self.launcher.running(sid) is not None
        ):
            return False  # its provider's breaker is open: the story waits, nothing recorded
        leftovers: tuple[str, ...] = ()
        if purpose == "commit_leftovers":
            # Named in the prompt: "continue" alone did not tell the agent what was left.
            with contextlib.suppress(GitError):
                leftovers = tuple(self._worktrees(story).status(story.id).dirty_paths)
        # False when no coder slot is free: a freed slot wakes every waiting story.
        try:
            launched = self.launcher.launch(
                LaunchRequest(
                    story=story,
                    role=AgentRole.CODER,
                    agent=agent,
                    cwd=self._worktrees(story).path_for(story.id),
                    purpose=purpose,
                    uncommitted_paths=leftovers,
                ),
                limit=self.config.max_coders,
            )
        except AgentConfigError as exc:
            self.breakers.release_probe(agent.name, story.id)
            return self._block(story, str(exc))
        if not launched:
            self.breakers.release_probe(agent.name, story.id)
        return launched

    def _block(self, story: Story, reason: str) -> bool:
        try:
            self.app.transition(
                story.id,
                "block",
                actor=ACTOR_CODER,
                expected_version=story.version,
                reason=readable(reason),
            )
        except (VersionConflict, IllegalTransition):
            return False
        return True

    # ------------------------------------------------------------------ completion & gates

    def _complete(self, story: Story, outcome: AgentOutcome = AgentOutcome.COMPLETED) -> bool:
        """Server-owned completion of a run that ended normally.

        A run whose CLI refused tool calls (``permission_denied``) goes to the gates like
        any other when its work is committed; when it left changes uncommitted, the refusal
        is the likely cause and a respawn would meet the same rules, so the story is
        blocked with the refused calls named.
        """
        try:
            status = self._worktrees(story).status(story.id)
        except GitError as exc:
            return self._block(story, f"cannot inspect the worktree: {exc}")
        if status.dirty and outcome is AgentOutcome.PERMISSION_DENIED:
            listed = ", ".join(status.dirty_paths[:20])
            return self._block(
                story,
                f"{story.last_agent_error or 'the agent CLI refused tool calls'}; it left "
                f"uncommitted changes: {listed}",
            )
        if status.dirty and story.leftover_respawns == 0:
            try:
                self.app.transition(
                    story.id,
                    "uncommitted_changes_found",
                    actor=ACTOR_GATES,
                    expected_version=story.version,
                    reason="the agent exited with uncommitted changes; respawning it to commit",
                    data={"paths": status.dirty_paths[:1000]},
                )
            except (VersionConflict, IllegalTransition):
                return False
            return True
        try:
            committed = self.app.transition(
                story.id,
                "start_gates",
                actor=ACTOR_GATES,
                expected_version=story.version,
                data={"commits_ahead": status.commits_ahead},
            )
        except (VersionConflict, IllegalTransition):
            return False
        self.run_gates(committed.story)
        return True

    gate_judge: GateJudge | None = None
    """Set by the supervisor (it shares the verdict memory it rebuilds from the log)."""

    def _gate_judge(self) -> GateJudge:
        if self.gate_judge is None:
            self.gate_judge = GateJudge(self.app)
        return self.gate_judge

    def run_gates(self, story: Story) -> None:
        """Run the gates for a story in ``gates`` and record the verdict."""
        worktrees = self._worktrees(story)
        try:
            status = worktrees.status(story.id)
        except GitError as exc:
            self._gates_failed(story, f"cannot inspect the worktree: {exc}")
            return
        if status.dirty:
            listed = "\n".join(status.dirty_paths[:50])
            self._gates_failed(story, f"the agent left uncommitted changes:\n{listed}")
            return
        if status.commits_ahead == 0:
            self._gates_failed(
                story,
                f"no commits: {feature_branch(story.id)} is not ahead of "
                f"{self._target(story)}; the agent committed nothing",
            )
            return
        try:
            # Scale-out: the branch goes to the remote first, and the gates run on exactly
            # the pushed commit (the merger merges that commit). One machine: the tip.
            commit = worktrees.push(story.id)
        except RemoteMoved as exc:
            logger.warning("story %s: not gating, another worker pushed: %s", story.id, exc)
            return
        except GitError as exc:
            logger.warning("story %s: pushing the feature branch failed: %s", story.id, exc)
            return  # retried by the next sweep (the story stays in gates)
        if commit != status.head:
            self._gates_failed(
                story, f"the worktree is at {status.head}, not at the branch tip {commit}"
            )
            return
        # One command at a time, each verdict recorded, under the [gates] flaky policy.
        run = self._gate_judge().run(
            story,
            "gates",
            self.config.gates,
            worktrees.path_for(story.id),
            pidfile=story_gate_pidfile(self.project, story.id),
            actor=ACTOR_GATES,
        )
        if not run.passed:
            self._gates_failed(story, run.output)
            return
        try:
            self.app.transition(
                story.id,
                "gates_passed",
                actor=ACTOR_GATES,
                expected_version=story.version,
                data={
                    "feature_branch": feature_branch(story.id),
                    "commits_ahead": status.commits_ahead,
                    "output": run.output,
                    "review": self._reviewed(story),
                    "commit": commit,
                },
            )
        except (VersionConflict, IllegalTransition):
            logger.info("story %s moved while its gates ran; verdict dropped", story.id)

    def _reviewed(self, story: Story) -> bool:
        """Whether an evaluator reviews the story before it merges: its own flag, else the
        project's ``[review] enabled``."""
        return story.review if story.review is not None else self.config.review.enabled

    def _gates_failed(self, story: Story, output: str) -> None:
        try:
            self.app.transition(
                story.id,
                "gates_failed",
                actor=ACTOR_GATES,
                expected_version=story.version,
                data={"output": output},
            )
        except (VersionConflict, IllegalTransition):
            logger.info("story %s moved while its gates ran; verdict dropped", story.id)
        except DomainError:
            logger.exception("could not record the gate failure of %s", story.id)

    # ------------------------------------------------------------------ cleanup

    def cleanup(self, story: Story) -> None:
        """Remove the worktree of a finished story (the branch stays for the record)."""
        worktrees = self._worktrees(story)
        path = worktrees.path_for(story.id)
        if path.exists():
            try:
                worktrees.remove(story.id)
            except GitError:
                logger.exception("could not remove the worktree of %s", story.id)
