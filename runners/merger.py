"""Merge reactions: the merge queue, squash merges with compare-and-swap, merge-gate fixups,
mergemaster agents for conflicts, and draining queued conflicts one freed slot at a time.

A mergemaster's resolution is checked before it may land (:mod:`runners.hunk_check`): every
line either side changed since the story branched must still be reflected in it, unless the
mergemaster declared the drop (``declare_dropped_hunk``). An undeclared loss is a
``hunks_lost`` merge failure that goes back to a mergemaster, whose attempts on one conflict
stay under ``mergemaster_respawn_cap``. A clean squash is not checked: it is git's own
three-way merge, which drops nothing. Nor is a resolution that was re-applied cleanly on a
base that moved while it was being gated (``rebase_onto_base``): that too is git's merge,
of a resolution already checked.

Queue order is the log position at which a story entered the queue (GatesPassed,
MergeRequeued, or an unblock back to merge). ``max_mergemasters`` bounds both the merges in
flight and the mergemaster agents running.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from domain.config import StorylineConfig
from domain.errors import DomainError, IllegalTransition, VersionConflict
from domain.ids import feature_branch
from domain.stages import MERGEMASTER_KINDS, AgentRole, MergeFailureKind, Stage
from domain.story import MAX_REASON, Story
from runners.gate_verdicts import GateJudge
from runners.gates import story_gate_pidfile
from runners.git_ops import GitError, MergeWorkspaces, SquashResult
from runners.hunk_check import check_resolution, merge_base_of
from runners.index import StoryIndex
from runners.launcher import AgentConfigError, AgentLauncher, LaunchRequest
from runners.spec_queue import SpeculativeQueue
from service.application import StorylineApplication

logger = logging.getLogger(__name__)

ACTOR_MERGE = "runner:merge"
ACTOR_MERGEMASTER = "runner:mergemaster"
CAS_ATTEMPTS = 3
_MERGEMASTER_KIND_VALUES = frozenset(k.value for k in MERGEMASTER_KINDS)


class MergeReactions:
    def __init__(
        self,
        app: StorylineApplication,
        config: StorylineConfig,
        project: Path,
        index: StoryIndex,
        launcher: AgentLauncher,
        on_slot_freed: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.on_slot_freed = on_slot_freed
        self.config = config
        self.project = project
        self.index = index
        self.launcher = launcher
        self.workspaces = MergeWorkspaces(project, config.base_branch)
        self._merging: set[str] = set()
        self._slot_lock = threading.Lock()
        self._last_mergemaster_exit: str | None = None
        self._fixup_patterns = [re.compile(p) for p in config.merge_gates.fixup_patterns]
        self.stopping: threading.Event | None = None
        """Set by the supervisor: its stop flag (a stacked build waiting gives up on it)."""
        self.spec: SpeculativeQueue | None = None
        if config.max_merge_slots > 1 or config.merge_queue.batch > 1:
            # The speculative merge queue (runners/spec_queue.py); off by default.
            self.spec = SpeculativeQueue(self)

    def note_mergemaster_exit(self, story_id: str) -> None:
        self._last_mergemaster_exit = story_id

    # ------------------------------------------------------------------ dispatch

    def step(self, story: Story) -> bool:
        if story.stage is Stage.MERGE:
            return self._merge_step(story)
        if story.stage is Stage.MERGE_FAILURE:
            return self._failure_step(story)
        return False

    # ------------------------------------------------------------------ merge queue

    def _queue(self) -> list[str]:
        self.index.catch_up(self.app)
        return [s.story_id for s in self.index.in_stage(Stage.MERGE.value) if not s.merging]

    def _merge_step(self, story: Story) -> bool:
        if self.launcher.running(story.id) is not None:
            return False  # a mergemaster that resolved is still finishing; merge after it
        if story.running_agent is not None:
            self.launcher.reap_orphan(story)
            return True
        if self.spec is not None:
            return self.spec.step(story)
        if story.merging:
            if story.id in self._merging:
                return False
            return self._resume_merge(story)
        with self._slot_lock:
            queue = self._queue()
            free = self.config.max_mergemasters - len(self._merging)
            # Strict queue order: only the first ``free`` queued stories may start.
            if free <= 0 or story.id not in queue[:free]:
                return False
            self._merging.add(story.id)
        try:
            self._merge(story)
        finally:
            with self._slot_lock:
                self._merging.discard(story.id)
        self._wake_queue()
        return True

    def _wake_queue(self) -> None:
        # The slot is free again: the next queued story must not wait for a sweep.
        if self.on_slot_freed is not None:
            self.on_slot_freed()

    def _workspaces(self, story: Story) -> MergeWorkspaces:
        """The story's merge workspaces: squashing onto, and advancing, its target branch."""
        return self.workspaces.on_branch(story.target_branch)

    def _target(self, story: Story) -> str:
        return story.target_branch or self.config.base_branch

    def _missing(self, story: Story) -> str:
        if story.target_branch is None:
            return "the base branch does not exist"
        return f"target branch {story.target_branch} does not exist"

    def _base_tip(self, story: Story) -> str:
        # Scale-out: synced from the remote first (this clone's base may lag behind it).
        tip = self._workspaces(story).sync_base()
        if tip is None:
            raise GitError(self._missing(story))
        return tip

    def _merge(self, story: Story) -> None:
        try:
            base = self._base_tip(story)
        except GitError as exc:
            base = None
            logger.error("merge of %s: %s", story.id, exc)
        try:
            committed = self.app.transition(
                story.id,
                "start_merge",
                actor=ACTOR_MERGE,
                expected_version=story.version,
                data={"base_sha": base},
            )
        except (VersionConflict, IllegalTransition):
            return
        story = committed.story
        if base is None:
            self._fail(story, MergeFailureKind.OTHER, self._missing(story))
            return
        try:
            if story.resolved_pending:
                self._merge_resolution(story)
            else:
                self._squash_and_land(story)
        except GitError as exc:
            self._fail(story, MergeFailureKind.OTHER, str(exc))

    def _message(self, story: Story) -> str:
        return (
            f"{story.name} (story {story.id})\n\n"
            f"Squash-merged by storyline from {story.feature_branch}."
        )

    def _squash_and_land(self, story: Story) -> None:
        workspaces = self._workspaces(story)
        remote = workspaces.remote
        if remote is not None and story.gated_commit is not None:
            # The merge takes exactly the commit the worker's gates passed on.
            tip = remote.sync_branch(feature_branch(story.id))
            if tip != story.gated_commit:
                raise GitError(
                    f"the remote's {feature_branch(story.id)} is at {tip}, not at "
                    f"{story.gated_commit}, the commit its gates passed on"
                )
        workspaces.prepare(story.id)
        self._land(story, workspaces.squash_merge(story.id, self._message(story)))

    def _merge_resolution(self, story: Story) -> None:
        """Land what a mergemaster committed in the conflicted workspace."""
        workspaces = self._workspaces(story)
        head = workspaces.finish_resolution(story.id, self._message(story))
        base = workspaces.started_base(story.id)
        if base is None:
            raise GitError("the merge workspace lost its recorded base")
        if not self._resolution_keeps_both_sides(story, base, head):
            return
        self._land(story, SquashResult(outcome="merged", base_sha=base, commit_sha=head))

    def _resolution_keeps_both_sides(self, story: Story, base: str, resolution: str) -> bool:
        """Check the resolution against both sides; record a ``hunks_lost`` failure if not.

        The workspace keeps the resolution commit either way, so the next mergemaster
        amends it rather than starting over.
        """
        tip = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"refs/heads/{story.feature_branch}"],
            cwd=self.project,
            capture_output=True,
            text=True,
            check=False,
        )
        if tip.returncode != 0:
            raise GitError(
                f"{story.feature_branch} does not exist: the resolution cannot be checked "
                "against the story's changes"
            )
        story_tip = tip.stdout.strip()
        report = check_resolution(
            self.project,
            merge_base=merge_base_of(self.project, story_tip, base),
            story=story_tip,
            base=base,
            resolution=resolution,
            declared=story.declared_drops,
        )
        if report.unchecked:
            text = "hunk check: some files could not be checked\n" + report.details()
            self._note(story, text[:MAX_REASON])
        if report.ok:
            return True
        self._fail(
            story,
            MergeFailureKind.HUNKS_LOST,
            report.details(),
            conflicts=report.files(),
            lost_hunks=[h.as_dict() for h in report.lost],
        )
        return False

    def _note(self, story: Story, text: str) -> None:
        try:
            self.app.transition(story.id, "add_note", actor=ACTOR_MERGE, reason=text)
        except DomainError:
            logger.exception("could not add a note to %s", story.id)

    def _land(self, story: Story, result: SquashResult) -> None:
        """Gate the squashed commit, then compare-and-swap the target branch onto it."""
        workspaces = self._workspaces(story)
        for _ in range(CAS_ATTEMPTS):
            if not self._handle_result(story, result):
                return
            assert result.commit_sha is not None
            if not self._merge_gates_pass(story):
                return
            if workspaces.advance_base(result.base_sha, result.commit_sha):
                self._succeed(story, result.commit_sha)
                return
            # Someone moved the target while we merged: re-apply on the new tip, never overwrite.
            logger.info(
                "%s moved during the merge of %s; re-applying", workspaces.base_branch, story.id
            )
            result = workspaces.rebase_onto_base(story.id)
        moving = (
            "the base branch"
            if story.target_branch is None
            else f"the target branch {story.target_branch}"
        )
        self._fail(story, MergeFailureKind.OTHER, f"{moving} kept moving during the merge")

    def _handle_result(self, story: Story, result: SquashResult) -> bool:
        """Record a failed squash; True when the result is a commit to land."""
        if result.outcome == "merged" and result.commit_sha:
            return True
        if result.outcome == "conflict":
            details = "\n".join(
                [*result.conflict_lines, "", "Conflicting paths:", *result.conflicts]
            ).strip()
            self._fail(
                story, MergeFailureKind.CONFLICT_DETECTED, details, conflicts=result.conflicts
            )
        elif result.outcome == "no_commits":
            self._fail(
                story,
                MergeFailureKind.NO_COMMITS,
                f"{story.feature_branch} has nothing that {self._target(story)} lacks",
            )
        else:
            self._fail(story, MergeFailureKind.OTHER, result.output)
        return False

    gate_judge: GateJudge | None = None
    """Set by the supervisor (it shares the verdict memory it rebuilds from the log)."""

    def _judge(self) -> GateJudge:
        if self.gate_judge is None:
            self.gate_judge = GateJudge(self.app)
            self.gate_judge.reuse_by_default = self.spec is not None
        return self.gate_judge

    def _merge_gates_pass(self, story: Story) -> bool:
        # The squashed commit is checked out in the workspace: its tree is what is judged.
        run = self._judge().run(
            story,
            "merge_gates",
            self.config.merge_gates,
            self._workspaces(story).path_for(story.id),
            pidfile=story_gate_pidfile(self.project, story.id),
            actor=ACTOR_MERGE,
        )
        if not run.passed:
            self._fail(story, MergeFailureKind.GATES_FAILED, run.output)
        return run.passed

    def _succeed(self, story: Story, commit: str) -> None:
        try:
            self.app.transition(
                story.id,
                "merge_succeeded",
                actor=ACTOR_MERGE,
                data={"merge_commit": commit, "base_branch": self._target(story)},
            )
        except DomainError:
            logger.exception("merged %s as %s but could not record it", story.id, commit)

    def _fail(
        self,
        story: Story,
        kind: MergeFailureKind,
        details: str,
        conflicts: list[str] | None = None,
        lost_hunks: list[dict[str, object]] | None = None,
    ) -> None:
        data: dict[str, object] = {
            "kind": kind.value,
            "details": details,
            "conflicts": conflicts or [],
        }
        if lost_hunks:
            data["lost_hunks"] = lost_hunks
        try:
            self.app.transition(
                story.id,
                "merge_failed",
                actor=ACTOR_MERGE,
                reason=f"merge failed: {kind.value}",
                data=data,
            )
        except DomainError:
            logger.exception("could not record the merge failure of %s", story.id)

    def _resume_merge(self, story: Story) -> bool:
        """A merge was started but never recorded an outcome: the runner died mid-merge.

        If our squash commit already reached the base (the crash came after the
        compare-and-swap), record the success; otherwise redo the merge from a clean
        workspace. Either way the base holds the change at most once.
        """
        with self._slot_lock:
            if story.id in self._merging:
                return False
            self._merging.add(story.id)
        try:
            landed = self._landed_commit(story)
            if landed is not None:
                self._succeed(story, landed)
                return True
            try:
                if story.resolved_pending:
                    self._merge_resolution(story)
                else:
                    self._squash_and_land(story)
            except GitError as exc:
                self._fail(story, MergeFailureKind.OTHER, str(exc))
            return True
        finally:
            with self._slot_lock:
                self._merging.discard(story.id)
            self._wake_queue()

    def _landed_commit(self, story: Story) -> str | None:
        workspaces = self._workspaces(story)
        base = workspaces.started_base(story.id)
        try:
            head = workspaces.head(story.id)
            tip = self._base_tip(story)
        except GitError:
            return self._landed_elsewhere(story)
        if base is None or head == base:
            return self._landed_elsewhere(story)
        check = subprocess.run(
            ["git", "merge-base", "--is-ancestor", head, tip],
            cwd=self.project,
            capture_output=True,
            check=False,
        )
        return head if check.returncode == 0 else None

    def _landed_elsewhere(self, story: Story) -> str | None:
        """Scale-out: the merger that started this merge died after its push landed, and
        this one (another clone) has no workspace to compare with. The remote base says
        whether the story's squash commit is there: one named for the story, on the base's
        first-parent line since the commit the merge started from."""
        if self.workspaces.remote is None:
            return None
        started = [e for e in self.app.history(story.id) if e.type == "MergeStarted"]
        base = started[-1].data.get("base_sha") if started else None
        if not isinstance(base, str) or not base:
            return None
        try:
            tip = self._base_tip(story)
        except GitError:
            return None
        log = subprocess.run(
            ["git", "log", "--first-parent", "--format=%H%x09%s", f"{base}..{tip}", "--"],
            cwd=self.project,
            capture_output=True,
            text=True,
            check=False,
        )
        if log.returncode != 0:
            return None
        for line in log.stdout.splitlines():
            sha, _, subject = line.partition("\t")
            if subject.endswith(f"(story {story.id})"):
                return sha
        return None

    # ------------------------------------------------------------------ merge failures

    def _failure_step(self, story: Story) -> bool:
        kind = story.merge_failure_kind
        if kind is MergeFailureKind.GATES_FAILED:
            return self._maybe_fixup(story)
        if kind not in MERGEMASTER_KINDS or story.final:
            return False
        if self.launcher.running(story.id) is not None:
            return False
        if story.running_agent is not None:
            self.launcher.reap_orphan(story)
            return True
        if story.mergemaster_spawns >= self.config.mergemaster_respawn_cap:
            try:
                self.app.transition(
                    story.id,
                    "merge_gave_up",
                    actor=ACTOR_MERGEMASTER,
                    expected_version=story.version,
                    reason=(
                        f"the mergemaster exited without a verdict {story.mergemaster_spawns} "
                        f"times (cap {self.config.mergemaster_respawn_cap}); counted as a "
                        "genuine failure"
                    ),
                )
            except (VersionConflict, IllegalTransition):
                return False
            return True
        if kind is MergeFailureKind.HUNKS_LOST and self._sent_back_too_often(story):
            return True
        return self._maybe_spawn_mergemaster(story)

    def _sent_back_too_often(self, story: Story) -> bool:
        """Give up once the mergemasters of this conflict used up the cap between them.

        A ``hunks_lost`` failure resets the story's exits-without-verdict counter like any
        merge failure, so the attempts are counted from the history instead: every
        mergemaster spawned since the merge failure that first called for one.
        """
        attempts = 0
        for event in reversed(self.app.history(story.id)):
            if event.type == "MergeFailed" and event.data.get("kind") != "hunks_lost":
                break
            if event.type == "AgentSpawnRequested" and event.data.get("role") == "mergemaster":
                attempts += 1
        cap = self.config.mergemaster_respawn_cap
        if attempts < cap:
            return False
        try:
            self.app.transition(
                story.id,
                "merge_gave_up",
                actor=ACTOR_MERGEMASTER,
                expected_version=story.version,
                reason=(
                    f"{attempts} mergemaster attempts on this conflict (cap {cap}) and the last "
                    "resolution still drops hunks without declaring them; a person decides"
                ),
            )
        except (VersionConflict, IllegalTransition):
            return False
        return True

    def _maybe_fixup(self, story: Story) -> bool:
        output = story.merge_failure_details or ""
        pattern = next((p for p in self._fixup_patterns if p.search(output)), None)
        if pattern is None:
            return False  # not self-evident: a person decides (requeue_merge, block, ...)
        try:
            self.app.transition(
                story.id,
                "request_fixup",
                actor=ACTOR_MERGE,
                expected_version=story.version,
                reason=f"self-evident merge-gate failure (matched {pattern.pattern!r}): "
                "back to coding as a capped fix-up",
            )
        except (VersionConflict, IllegalTransition):
            return False
        return True

    def _conflict_queue(self) -> list[str]:
        """Conflict stories waiting for a mergemaster, oldest first."""
        self.index.catch_up(self.app)
        return [
            s.story_id
            for s in self.index.in_stage(Stage.MERGE_FAILURE.value)
            if s.merge_failure_kind in _MERGEMASTER_KIND_VALUES
            and not s.final
            and self.launcher.running(s.story_id) is None
        ]

    def _maybe_spawn_mergemaster(self, story: Story) -> bool:
        agent = self.config.agent_for("mergemaster")
        if agent is None:
            return False
        waiting = self._conflict_queue()
        # The story whose mergemaster just exited goes to the back of the line, so a freed
        # slot always passes to another queued story first.
        last = self._last_mergemaster_exit
        if last in waiting and len(waiting) > 1:
            waiting.remove(last)
            waiting.append(last)
        free = self.config.max_mergemasters - self.launcher.count(AgentRole.MERGEMASTER)
        if free <= 0 or story.id not in waiting[:free]:
            return False
        try:
            launched = self.launcher.launch(
                LaunchRequest(
                    story=story,
                    role=AgentRole.MERGEMASTER,
                    agent=agent,
                    cwd=self._workspaces(story).path_for(story.id),
                    # The prompt differs: a resolution to amend rather than a conflict.
                    purpose=(
                        "hunks_lost"
                        if story.merge_failure_kind is MergeFailureKind.HUNKS_LOST
                        else "mergemaster"
                    ),
                    conflict_details=story.merge_failure_details,
                ),
                limit=self.config.max_mergemasters,
            )
        except AgentConfigError as exc:
            logger.error("cannot spawn a mergemaster for %s: %s", story.id, exc)
            return False
        if launched and self._last_mergemaster_exit == story.id:
            self._last_mergemaster_exit = None
        return launched

    # ------------------------------------------------------------------ cleanup

    def cleanup(self, story: Story) -> None:
        workspaces = self._workspaces(story)
        if workspaces.path_for(story.id).exists():
            try:
                workspaces.remove(story.id)
            except GitError:
                logger.exception("could not remove the merge workspace of %s", story.id)
