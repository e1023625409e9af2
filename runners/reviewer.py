"""Review reactions: an evaluator judges a story in ``review`` against its acceptance criteria.

After the gates pass, a story whose ``review`` flag is True (or None with ``[review]
enabled``) waits here before the merge queue. One step, decided from recorded state only:

- an evaluator runs: wait (after a restart, its orphan is killed and recorded ``lost``);
- a verdict is recorded but not concluded (``pending_review``): send ``conclude_review``.
  That is what lets a restarted runner finish a review without asking for a second verdict;
- otherwise (re)spawn an evaluator, unless the caps say stop: ``[review] max_failed_runs``
  runs in a row without a verdict, or ``abort_respawn_cap`` crashes before a session (or
  runs lost with the runner, or provider failures), which consume no retry.

An evaluator that ends normally without a verdict is recorded as ``failed`` by the launcher
(``runners.launcher.NO_VERDICT``), so the domain counts it in ``evaluator_failed_runs``.

The evaluator works in the story's worktree at the commit the gates passed. Whatever it
does there is undone after it exits: the worktree and the feature branch go back to that
commit (``git checkout -f -B feature/story-<id> <commit>`` and ``git clean -fd``), so an
evaluator's edits or commits can never reach the merge, nor the next coder's worktree. The
commit is kept in ``.storyline/run/<id>.reviewed`` from before the spawn until that restore,
so a restarted runner restores it too. ``git clean`` leaves ignored files (caches), which no
merge takes.

Evaluators have their own slots: at most ``max_coders`` run at once (they are agent
sessions like coders, but counting them against the coders would let reviews starve coding
or the reverse).
"""

from __future__ import annotations

import logging
from pathlib import Path

from domain.config import StorylineConfig
from domain.errors import IllegalTransition, VersionConflict
from domain.ids import feature_branch, validate_story_id
from domain.stages import AgentRole, Stage
from domain.story import Story
from runners.git_base import GitError, cut_diff, run_git
from runners.launcher import AgentConfigError, AgentLauncher, LaunchRequest
from runners.reasons import readable
from runners.worktrees import Worktrees
from service.application import StorylineApplication

logger = logging.getLogger(__name__)

ACTOR_REVIEW = "runner:review"


class ReviewReactions:
    def __init__(
        self,
        app: StorylineApplication,
        config: StorylineConfig,
        project: Path,
        launcher: AgentLauncher,
        worktrees: Worktrees,
    ) -> None:
        self.app = app
        self.config = config
        self.project = project
        self.launcher = launcher
        self.worktrees = worktrees
        self.run_dir = project / ".storyline" / "run"

    def step(self, story: Story) -> bool:
        """One step for a story in ``review``; True if something was recorded."""
        if story.stage is not Stage.REVIEW:
            return False
        if story.running_agent is not None:
            self.launcher.reap_orphan(story)
            return self.launcher.running(story.id) is None
        if self.launcher.running(story.id) is not None:
            return False  # the exit is recorded and its handle about to go: woken after
        problem = self._restore(story)
        if problem is not None:
            return self._block(
                story, f"cannot put the worktree back to the reviewed commit: {problem}"
            )
        if story.pending_review is not None:
            return self._conclude(story)
        said = (
            f"; the evaluator's last error: {story.last_agent_error}"
            if story.last_agent_error
            else ""
        )
        cap = self.config.review.max_failed_runs
        if story.evaluator_failed_runs >= cap:
            return self._block(
                story,
                f"the evaluator ran {story.evaluator_failed_runs} times in a row without "
                f"giving a verdict ([review] max_failed_runs is {cap}){said}",
            )
        if story.abort_respawns >= self.config.abort_respawn_cap:
            return self._block(
                story,
                f"the evaluator crashed before establishing a session (or was lost, or its "
                f"provider failed) {story.abort_respawns} times in a row (cap "
                f"{self.config.abort_respawn_cap}); stopping to avoid a respawn loop{said}",
            )
        return self._spawn(story)

    # ------------------------------------------------------------------ verdict

    def _conclude(self, story: Story) -> bool:
        try:
            self.app.transition(
                story.id, "conclude_review", actor=ACTOR_REVIEW, expected_version=story.version
            )
        except (VersionConflict, IllegalTransition):
            return False
        return True

    # ------------------------------------------------------------------ spawn

    def _worktrees(self, story: Story) -> Worktrees:
        return self.worktrees.on_branch(story.target_branch)

    def _target(self, story: Story) -> str:
        return story.target_branch or self.config.base_branch

    def _spawn(self, story: Story) -> bool:
        agent = self.config.agent_for("evaluator")
        if agent is None:
            return self._block(story, 'no [[agent]] with stage = "evaluator" is configured')
        worktrees = self._worktrees(story)
        try:
            path = worktrees.ensure(story.id)
            head = run_git(["rev-parse", "HEAD"], path, ceiling=path.parent).stdout.strip()
            base = self._target(story)
            stat = run_git(
                ["diff", "--stat", f"refs/heads/{base}...HEAD"], path, ceiling=path.parent
            ).stdout
            diff = run_git(["diff", f"refs/heads/{base}...HEAD"], path, ceiling=path.parent).stdout
        except GitError as exc:
            return self._block(story, f"cannot read the change to review: {exc}")
        # Before the spawn is recorded: whatever happens next, the runner (this one or the
        # next) knows which commit to put back once the evaluator is gone.
        self._write_marker(story.id, head, story.evaluator_attempts + 1)
        purpose = "review_respawn" if story.last_event == "AgentExited" else "review"
        try:
            return self.launcher.launch(
                LaunchRequest(
                    story=story,
                    role=AgentRole.EVALUATOR,
                    agent=agent,
                    cwd=path,
                    purpose=purpose,
                    review_diff=cut_diff(f"{stat}\n{diff}", f"git diff {base}...HEAD"),
                    review_commit=head,
                ),
                limit=self.config.max_coders,
            )
        except AgentConfigError as exc:
            return self._block(story, str(exc))

    # ------------------------------------------------------------------ the reviewed commit

    def _marker(self, story_id: str) -> Path:
        return self.run_dir / f"{validate_story_id(story_id)}.reviewed"

    def _write_marker(self, story_id: str, commit: str, attempt: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._marker(story_id).write_text(f"{commit} {attempt}\n", encoding="utf-8")

    def cleanup(self, story: Story) -> None:
        """A finished story never comes back to review: its marker goes."""
        self._marker(story.id).unlink(missing_ok=True)

    def _evaluator_ran_since_gates(self, story: Story, attempt: int) -> bool:
        """Whether evaluator ``attempt`` was spawned after the story's last gates passed.

        Otherwise the marker is stale (the evaluator never started, or the story left review
        while it ran, was coded again and passed its gates anew): restoring it would throw
        away the new commits."""
        for event in reversed(self.app.history(story.id)):
            if event.type == "GatesPassed":
                return False
            if (
                event.type == "AgentSpawnRequested"
                and event.data.get("role") == AgentRole.EVALUATOR.value
                and event.data.get("attempt") == attempt
            ):
                return True
        return False

    def _restore(self, story: Story) -> str | None:
        """Put the worktree and the feature branch back to the commit the last evaluator
        was shown; None when done (or nothing to do), else what went wrong."""
        marker = self._marker(story.id)
        try:
            fields = marker.read_text(encoding="utf-8").split()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return str(exc)
        commit = fields[0] if fields else ""
        attempt = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
        path = self._worktrees(story).path_for(story.id)
        if commit and path.is_dir() and self._evaluator_ran_since_gates(story, attempt):
            try:
                run_git(["cat-file", "-e", f"{commit}^{{commit}}"], path, ceiling=path.parent)
                head = run_git(["rev-parse", "HEAD"], path, ceiling=path.parent).stdout.strip()
                branch = run_git(
                    ["symbolic-ref", "-q", "HEAD"], path, ceiling=path.parent, check=False
                ).stdout.strip()
                status = run_git(
                    ["status", "--porcelain", "--untracked-files=all"], path, ceiling=path.parent
                ).stdout
                fb = feature_branch(story.id)
                if head != commit or branch != f"refs/heads/{fb}" or status.strip():
                    logger.warning(
                        "story %s: the evaluator left the worktree at %s (%s); back to %s",
                        story.id,
                        head[:12],
                        "dirty" if status.strip() else "clean",
                        commit[:12],
                    )
                    run_git(["checkout", "-q", "-f", "-B", fb, commit], path, ceiling=path.parent)
                    run_git(["clean", "-q", "-fd"], path, ceiling=path.parent)
            except GitError as exc:
                return str(exc)
        marker.unlink(missing_ok=True)
        return None

    def _block(self, story: Story, reason: str) -> bool:
        try:
            self.app.transition(
                story.id,
                "block",
                actor=ACTOR_REVIEW,
                expected_version=story.version,
                reason=readable(reason),
            )
        except (VersionConflict, IllegalTransition):
            return False
        return True
