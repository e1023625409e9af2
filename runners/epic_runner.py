"""The epic's reactions: plan, farm out, integrate, blame, replan, land.

Level-triggered like the story reactions: each step reads the epic's recorded state and does
the one next thing, recording it as an event before acting on it wherever an action cannot
be repeated safely. So a runner killed anywhere resumes without doing a step twice:

- a plan is accepted once (``submit_plan`` refuses a second), and a round's stories are
  saved with the epic's ``StoriesFarmedOut`` in one transaction with ids derived from the
  epic, so a repeated farm-out conflicts instead of duplicating a story;
- a union verdict or blame probe is recorded before anything acts on it; one killed before
  its verdict was recorded is simply run again (its pid file lets the next run kill a gate
  left behind);
- the integration branch and the base branch only move by compare-and-swap, and a landing
  that reached the base before the runner died is found (``EpicGit.landed_commit``) and
  recorded instead of squashed again.

Evaluation and evolution (issue 15): a passed union goes to ``evaluating`` when the epic (or
``[review] enabled``) asks for it. An evaluator agent scores the integration commit against
the epic's criteria; its verdict is recorded by the agent itself, and the runner concludes it
once the evaluator's exit is recorded (so a restarted runner concludes a verdict it finds
pending and never asks for a second one). Under the threshold the planner plans follow-up
stories for the gaps (an evolution, stories ``<epic>.e<n>.<k>``); a worse evolution is
discarded and the integration branch moved back to the kept commit before anything builds on
it or lands (checked on every step, so a runner killed in between fixes it on restart).
While the planner's questions wait for a person (``awaiting_answers``) nothing runs.

The seed's rules (car-multi ``run_foreman``): never give up without trying a whole-goal
session when the plan does not decompose; after a union failure, blame the round's stories
by leave-one-out and, when a proper subset is implicated, keep the clean work and replan
only that region; re-run the whole goal only when ``recover_via_single_session`` is on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from domain.config import StorylineConfig
from domain.epic import Epic
from domain.epic_events import EpicStage, RunMode
from domain.errors import DomainError, IllegalTransition, VersionConflict
from domain.plan import Plan
from domain.stages import FINISHED_STAGES, Stage
from domain.story import Story
from runners.epic_git import EpicGit
from runners.gates import run_gates
from runners.git_base import GitError, cut_diff, run_git
from runners.launcher import AgentConfigError
from runners.planner import PlannerLauncher
from service.epics import EpicService, NewStory

logger = logging.getLogger(__name__)

ACTOR = "runner:epic"
CAS_ATTEMPTS = 5
MAX_LAYOUT_ENTRIES = 400
MAX_BRIEF_OUTPUT = 4_000
MAX_EVIDENCE_SHOWN = 1_500


def _tail(text: str, limit: int = MAX_BRIEF_OUTPUT) -> str:
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


class EpicReactions:
    def __init__(
        self,
        epics: EpicService,
        config: StorylineConfig,
        project: Path,
        planner: PlannerLauncher,
        *,
        git: EpicGit | None = None,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.epics = epics
        self.app = epics.app
        self.config = config
        self.project = project
        self.planner = planner
        self.git = git or EpicGit(project, config.base_branch)
        self.on_change = on_change

    # ------------------------------------------------------------------ dispatch

    def step(self, epic: Epic) -> bool:
        """Do the epic's next thing; True when something was recorded (step again)."""
        stage = epic.stage
        if stage is EpicStage.PLANNING:
            return self._planning(epic)
        if stage is EpicStage.RUNNING:
            return self._running(epic)
        if stage is EpicStage.INTEGRATING:
            return self._integrating(epic)
        if stage is EpicStage.MERGING:
            return self._merging(epic)
        if stage is EpicStage.EVALUATING:
            return self._evaluating(epic)
        if stage is EpicStage.AWAITING_ANSWERS:
            # A person answers; only the planner that asked may still be finishing.
            if epic.running_planner is not None and self.planner.running(epic.id) is None:
                self.planner.reap_orphan(epic)
                return True
            return False
        # blocked, failed, done: nothing runs for it any more.
        evaluator = self.planner.evaluator
        if self.planner.running(epic.id) is not None:
            self.planner.stop(epic.id, f"the epic is {stage.value}")
            return False
        if evaluator.running(epic.id) is not None:
            evaluator.stop(epic.id, f"the epic is {stage.value}")
            return False
        if epic.running_planner is not None:
            self.planner.reap_orphan(epic)
            return True
        if epic.running_evaluator is not None:
            evaluator.reap_orphan(epic)
            return True
        if stage in (EpicStage.DONE, EpicStage.FAILED):
            self._cleanup(epic)
        return False

    def spawn_veto(self, story: Story) -> str | None:
        """Why an agent may not start for ``story`` now (its epic is blocked or failed)."""
        if story.epic is None or not story.epic.startswith("epic-"):
            return None
        try:
            epic = self.epics.get(story.epic)
        except DomainError:
            return None
        if epic.stage is EpicStage.BLOCKED:
            return f"epic {epic.id} is blocked: {epic.blocked_reason}"
        if epic.stage is EpicStage.FAILED:
            return f"epic {epic.id} failed"
        return None

    # ------------------------------------------------------------------ planning

    def _planning(self, epic: Epic) -> bool:
        if epic.running_planner is not None:
            if self.planner.running(epic.id) is None:
                self.planner.reap_orphan(epic)
                return True
            return False  # the planner is at work; its exit or its plan wakes us
        if self._over_budget(epic):
            return True
        if epic.evolution > 0 and not epic.plan_farmed:
            # An evolution builds on the best integration: after a discarded one the branch
            # goes back to it before the planner looks or any story branches from it.
            self._restore_integration(epic, epic.evolutions[-1]["from_commit"])
        if epic.plan is not None:
            plan = Plan.model_validate(epic.plan)
            # An evolution's one follow-up story is that story, not the whole goal again.
            one_follow_up = epic.evolution > 0 and len(plan.subtasks) == 1
            if epic.single_session_reason is not None and not one_follow_up:
                return self._single_session(
                    epic,
                    RunMode.SINGLE_SESSION,
                    epic.single_session_reason,
                    self._evolution_brief(epic),
                )
            return self._farm_out_plan(epic, plan)
        limit = self.config.epic.max_plan_attempts
        if epic.failed_plan_attempts >= limit:
            problems = "; ".join(epic.last_plan_problems[:5])
            return self._single_session(
                epic,
                RunMode.SINGLE_SESSION,
                f"no usable plan after {limit} attempts ({problems})",
                self._evolution_brief(epic),
            )
        agent = self.config.agent_for("planner")
        if agent is None:
            return self._single_session(
                epic,
                RunMode.SINGLE_SESSION,
                "no planner agent is configured (stage = planner)",
                self._evolution_brief(epic),
            )
        cwd = self._plan_checkout(epic)
        try:
            return self.planner.launch(epic, agent, cwd, self._planner_brief(epic, cwd))
        except AgentConfigError as exc:
            self._record(epic, "block", reason=f"the planner cannot start: {exc}")
            return True

    def _plan_checkout(self, epic: Epic) -> Path:
        if epic.evolution > 0 and epic.integration_commit is not None:
            # Follow-up stories build on the integration: the planner reads that.
            return self.git.checkout_scratch(epic.id, "plan", epic.integration_commit)
        tip = run_git(
            ["rev-parse", "--verify", f"refs/heads/{self.config.base_branch}^{{commit}}"],
            self.project,
        ).stdout.strip()
        return self.git.checkout_scratch(epic.id, "plan", tip)

    def _planner_brief(self, epic: Epic, cwd: Path) -> str:
        listing = run_git(["ls-files"], cwd, check=False).stdout.split("\n")
        files = [f for f in listing if f][:MAX_LAYOUT_ENTRIES]
        more = len([f for f in listing if f]) - len(files)
        parts = [epic.goal.strip(), "## Repository layout", "\n".join(files) or "(empty)"]
        if more > 0:
            parts[-1] += f"\n... and {more} more files"
        interview = self._interview_brief(epic)
        if interview:
            parts.append(interview)
        evolution = self._evolution_brief(epic)
        if evolution:
            parts.append(evolution)
        if len(epic.interview) < self.epics.policy.max_interviews:
            parts.append(
                "## When the goal is too vague to plan\n"
                "Instead of a plan you may ask the person who owns the goal clarifying "
                "questions (the storyline MCP tool `ask_questions`, or POST "
                '`{"event": "ask_questions", "data": {"attempt": $STORYLINE_ATTEMPT, '
                '"questions": [...]}}` to $STORYLINE_URL/epics/$STORYLINE_STORY_ID/transitions)'
                ", then exit: the next planner gets the answers."
            )
        if epic.last_plan_problems:
            problems = "\n".join(f"- {p}" for p in epic.last_plan_problems[:30])
            parts += [
                "## Your previous plan was refused",
                f"Fix these problems and submit again:\n{problems}",
            ]
        return "\n\n".join(parts)

    def _interview_brief(self, epic: Epic) -> str:
        """Every question the planners asked so far, with the person's answers."""
        rounds = [r for r in epic.interview if r.get("answers")]
        if not rounds:
            return ""
        lines = [
            "## Your questions and the answers",
            "You (or an earlier planner attempt) asked before planning; a person answered. "
            "Plan with these answers.",
        ]
        for r in rounds:
            for i, question in enumerate(r["questions"]):
                answer = r["answers"][i] if i < len(r["answers"]) else "(no answer)"
                lines += [f"Q{r['round']}.{i + 1}: {question}", f"A{r['round']}.{i + 1}: {answer}"]
        return "\n".join(lines)

    def _evolution_brief(self, epic: Epic) -> str:
        """For an evolution's planner: the evaluation that fell short and its gaps."""
        if epic.evolution == 0 or not epic.evolutions:
            return ""
        evolution = epic.evolutions[-1]
        min_score = self.epics.policy.min_score
        lines = [
            f"## Evolution {evolution['evolution']}: the evaluation fell short",
            f"The integrated work of this epic was evaluated against its acceptance criteria: "
            f"score {evolution['after_score']:.2f} (best so far {evolution['best_score']:.2f}, "
            f"needed {min_score:.2f} with every criterion met). The best integration so far "
            f"({str(evolution['from_commit'])[:12]}) stays on the epic's branch.",
            "Propose follow-up stories for the gaps below only: they build on that "
            "integration, so do not redo what is already there.",
            "### Unmet criteria and the evaluator's evidence",
        ]
        for gap in evolution["gaps"]:
            evidence = _tail(str(gap.get("evidence", "")), MAX_EVIDENCE_SHOWN).strip()
            met = "met" if gap.get("met") else "unmet"
            lines += [
                f"- Criterion {gap.get('criterion')}: {gap.get('text', '')} "
                f"({met}, score {float(gap.get('score', 0.0)):.2f})",
                f"  Evidence: {evidence}",
            ]
        summary = next(
            (e.get("summary") for e in reversed(epic.evaluations) if e.get("summary")), None
        )
        if summary:
            lines.append(f"The evaluator's summary: {_tail(str(summary), MAX_EVIDENCE_SHOWN)}")
        return "\n".join(lines)

    def _farm_out_plan(self, epic: Epic, plan: Plan) -> bool:
        number = {s.name: i + 1 for i, s in enumerate(plan.subtasks)}
        # An evolution's stories are numbered in their own space: <epic>.e<n>.<k>.
        prefix = f"{epic.id}.e{epic.evolution}" if epic.evolution > 0 else epic.id
        stories = [
            NewStory(
                story_id=f"{prefix}.{number[s.name]}",
                name=s.name,
                description=self._subtask_description(epic, s.description, s.footprint),
                acceptance_criteria=list(s.acceptance_criteria),
                depends_on=[f"{prefix}.{number[d]}" for d in s.depends_on],
            )
            for s in plan.subtasks
        ]
        what = f"evolution {epic.evolution}: " if epic.evolution > 0 else ""
        return self._farm_out(
            epic,
            RunMode.PARALLEL,
            stories,
            f"{what}{len(stories)} subtasks farmed out in parallel",
        )

    def _subtask_description(self, epic: Epic, description: str, footprint: list[str]) -> str:
        parts = [
            description.strip(),
            f"Part of epic {epic.id} ({epic.name}). Its goal:\n{epic.goal}",
        ]
        if epic.evolution > 0:
            parts.append(
                f"A follow-up of evolution {epic.evolution}: the epic's integrated work so far "
                "is on your branch already; add what the evaluation found missing."
            )
        if footprint:
            parts.append("Expected to touch: " + ", ".join(footprint))
        return "\n\n".join(parts)

    def _single_session(self, epic: Epic, mode: RunMode, why: str, extra: str = "") -> bool:
        prefix = f"{epic.id}.e{epic.evolution}.s" if epic.evolution > 0 else f"{epic.id}.s"
        number = sum(1 for s in epic.stories if s.startswith(prefix)) + 1
        description = epic.goal.strip()
        if extra:
            description += "\n\n" + extra
        story = NewStory(
            story_id=f"{prefix}{number}",
            name=epic.name,
            description=description,
            acceptance_criteria=list(epic.acceptance_criteria),
        )
        return self._farm_out(epic, mode, [story], f"the whole goal as one session: {why}")

    def _farm_out(
        self,
        epic: Epic,
        mode: RunMode,
        stories: list[NewStory],
        reason: str,
        kept: list[str] | None = None,
        tip: str | None = None,
    ) -> bool:
        start = self.git.ensure_integration_branch(epic.id)
        fork = epic.fork_point or start
        try:
            self.epics.farm_out(
                epic.id,
                actor=ACTOR,
                mode=mode,
                stories=stories,
                fork_point=fork,
                integration_tip=tip or self.git.integration_tip(epic.id) or start,
                expected_version=epic.version,
                kept=kept or [],
                reason=reason,
            )
        except (VersionConflict, IllegalTransition):
            return False
        self._changed(epic)
        return True

    # ------------------------------------------------------------------ running

    def _round(self, epic: Epic) -> list[Story]:
        found: list[Story] = []
        for sid in epic.round_stories:
            try:
                found.append(self.app.get_story(sid))
            except DomainError:
                continue
        return found

    def _running(self, epic: Epic) -> bool:
        if self._over_budget(epic):
            return True
        stories = self._round(epic)
        if len(stories) < len(epic.round_stories):
            return False
        started = False
        for story in stories:
            # Stories with dependencies are started by the scheduler when those finish.
            if story.stage is Stage.BACKLOG and not story.depends_on:
                started |= self._start(story, epic)
        if started:
            return True
        if not all(s.stage in FINISHED_STAGES for s in stories):
            return False
        if not any(s.stage is Stage.DONE for s in stories):
            return self._record(
                epic, "fail", reason="every story of the round was archived: nothing to integrate"
            )
        tip = self.git.integration_tip(epic.id)
        if tip is None:
            return self._record(epic, "block", reason=f"epic/{epic.id} disappeared")
        done = ", ".join(s.id for s in stories if s.stage is Stage.DONE)
        return self._record(
            epic,
            "start_integration",
            reason=f"every story of round {epic.round} is finished ({done})",
            data={"commit": tip},
        )

    def _start(self, story: Story, epic: Epic) -> bool:
        try:
            self.app.transition(
                story.id,
                "start_coding",
                actor=ACTOR,
                expected_version=story.version,
                reason=f"farmed out by epic {epic.id} (round {epic.round})",
            )
        except (VersionConflict, IllegalTransition):
            return False
        return True

    # ------------------------------------------------------------------ integrating

    def _integrating(self, epic: Epic) -> bool:
        if epic.union is None:
            return self._judge_union(epic)
        if epic.union["passed"]:
            return False  # judge_union moved it to merging; a stale read
        if epic.implicated is None:
            return self._blame(epic)
        return self._recover(epic)

    def _gates_on(self, epic: Epic, name: str, commit: str) -> tuple[bool, str, str]:
        path = self.git.checkout_scratch(epic.id, name, commit)
        run = self.git.run_union_gates(self.config.epic.union_gates, path, epic.id)
        return run.passed, run.output, self._tree(commit)

    def _tree(self, commit: str) -> str:
        return run_git(["rev-parse", f"{commit}^{{tree}}"], self.project).stdout.strip()

    def _judge_union(self, epic: Epic) -> bool:
        commit = epic.integration_commit or self.git.integration_tip(epic.id)
        assert commit is not None
        passed, output, tree = self._gates_on(epic, "union", commit)
        return self._record(
            epic,
            "judge_union",
            data={
                "commit": commit,
                "tree": tree,
                "passed": passed,
                "output": output,
                "evaluate": self._evaluates(epic),
            },
        )

    def _evaluates(self, epic: Epic) -> bool:
        """The epic's own ``review`` flag, or the project's ``[review] enabled``."""
        return epic.review if epic.review is not None else self.config.review.enabled

    def _story_commits(self, epic: Epic, stories: list[Story]) -> dict[str, str]:
        """Each done story of the round -> its squash commit on the integration branch."""
        return {s.id: s.merge_commit for s in stories if s.stage is Stage.DONE and s.merge_commit}

    def _blame(self, epic: Epic) -> bool:
        stories = self._round(epic)
        commits = self._story_commits(epic, stories)
        order = [s for s in epic.round_stories if s in commits]
        if epic.mode is not RunMode.PARALLEL or len(order) < 2:
            return self._record(
                epic,
                "conclude_blame",
                reason="nothing to localise: the round had one story"
                if len(order) < 2
                else f"a {epic.mode.value if epic.mode else ''} round is blamed as a whole",
                data={"implicated": order or list(epic.round_stories)},
            )
        probed = {tuple(sorted(p["excluded"])) for p in epic.probes}
        budget = self.config.epic.max_blame_probes
        for sid in order[:budget]:
            if (sid,) in probed:
                continue
            rest = [commits[o] for o in order if o != sid]
            assert epic.round_start_tip is not None
            candidate = self.git.build_candidate(epic.id, "probe", epic.round_start_tip, rest)
            if not candidate.ok or candidate.commit is None:
                return self._record(
                    epic,
                    "record_probe",
                    data={"excluded": [sid], "result": "conflict", "output": candidate.output},
                )
            run = self.git.run_union_gates(self.config.epic.union_gates, candidate.path, epic.id)
            return self._record(
                epic,
                "record_probe",
                data={
                    "excluded": [sid],
                    "result": "passed" if run.passed else "failed",
                    "commit": candidate.commit,
                    "tree": candidate.tree,
                    "output": run.output,
                },
            )
        # Leave-one-out: a story is implicated when the union passes without it.
        implicated = [p["excluded"][0] for p in epic.probes if p["result"] == "passed"]
        if not implicated:
            return self._record(
                epic,
                "conclude_blame",
                reason="no single story's removal fixes the union: every story is implicated",
                data={"implicated": order},
            )
        return self._record(
            epic,
            "conclude_blame",
            reason=f"the union passes without each of {', '.join(implicated)}",
            data={"implicated": implicated},
        )

    def _recover(self, epic: Epic) -> bool:
        implicated = list(epic.implicated or [])
        clean = [s for s in epic.clean_stories]
        union_output = _tail(str(epic.union["output"])) if epic.union else ""
        if epic.mode is RunMode.PARALLEL and clean and implicated:
            return self._regional_replan(epic, clean, implicated, union_output)
        if self.config.epic.recover_via_single_session and epic.mode in (
            RunMode.PARALLEL,
            RunMode.REGIONAL_REPLAN,
        ):
            if not self._rebuild(epic, [], "start the whole goal again from the fork point"):
                return False
            epic = self.epics.get(epic.id)
            extra = (
                "A parallel attempt at this goal failed its integration gates. Their output:\n"
                f"```\n{union_output}\n```"
            )
            return self._single_session(
                epic,
                RunMode.PARALLEL_THEN_SINGLE_SESSION,
                "the union failed and blame could not localise it",
                extra,
            )
        mode = epic.mode.value if epic.mode else "?"
        why = (
            f"the union gates failed in {mode} mode on {str(epic.union['commit'])[:12]}"
            if epic.union
            else "the union gates failed"
        )
        if epic.mode in (RunMode.PARALLEL, RunMode.REGIONAL_REPLAN):
            why += "; recover_via_single_session is off"
        return self._record(epic, "fail", reason=f"{why}; implicated: {', '.join(implicated)}")

    def _rebuild(self, epic: Epic, keep: list[str], why: str) -> bool:
        """Move the integration branch to the round's start plus ``keep``'s commits."""
        if epic.rebuilt_tip is not None:
            return True
        tip = self.git.integration_tip(epic.id)
        assert tip is not None and epic.round_start_tip is not None
        judged = epic.union["commit"] if epic.union else tip
        # An evolution's round starts again from its own start (the best integration so
        # far), never from the fork point: that would drop the work the evaluation kept.
        whole = epic.fork_point if epic.evolution == 0 else None
        onto = epic.round_start_tip if keep else (whole or epic.round_start_tip)
        if tip != judged:
            # Moved since the verdict: nothing merges into the branch while the epic
            # integrates, so this runner moved it before it died. Record that.
            new = tip
        else:
            commits = self._story_commits(epic, self._round(epic))
            picks = [commits[s] for s in epic.round_stories if s in keep and s in commits]
            if keep:
                candidate = self.git.build_candidate(epic.id, "rebuild", onto, picks)
                if not candidate.ok or candidate.commit is None:
                    # Recorded as the epic's failure; the caller must not go on to replan.
                    self._record(
                        epic,
                        "fail",
                        reason="the clean stories do not apply together without the implicated "
                        f"ones: {candidate.output[:500]}",
                    )
                    return False
                new = candidate.commit
            else:
                new = onto
            if not self.git.reset_integration(epic.id, tip, new):
                return False
        return self._record(
            epic,
            "rebuild_integration",
            reason=why,
            data={"old_tip": judged, "new_tip": new, "kept": keep},
        )

    def _regional_replan(
        self, epic: Epic, clean: list[str], implicated: list[str], union_output: str
    ) -> bool:
        if not self._rebuild(epic, clean, f"keep the clean stories {', '.join(clean)}"):
            return False
        epic = self.epics.get(epic.id)
        if epic.stage is not EpicStage.INTEGRATING:
            return True
        regions = []
        for sid in implicated:
            try:
                done = self.app.get_story(sid)
            except DomainError:
                continue
            listed = "\n".join(f"  - {c}" for c in done.acceptance_criteria)
            regions.append(f"### {done.name} ({sid})\n{done.description}\n{listed}")
        number = sum(1 for s in epic.stories if s.startswith(f"{epic.id}.r")) + 1
        criteria = list(
            dict.fromkeys(
                [c for sid in implicated for c in self._criteria(sid)] + epic.acceptance_criteria
            )
        )
        description = "\n\n".join(
            [
                f"Redo one region of epic {epic.id} ({epic.name}). Its goal:\n{epic.goal}",
                "The other stories' work is already on the branch and passed on its own. "
                "Together with the stories below, the integrated result failed the epic's "
                f"gates:\n```\n{union_output}\n```",
                "## The region to redo (these stories' work was taken out)",
                *regions,
            ]
        )
        replan = NewStory(
            story_id=f"{epic.id}.r{number}",
            name=f"Replan: {epic.name}"[:200],
            description=description[:20_000],
            acceptance_criteria=criteria[:100],
        )
        keep = [*epic.kept_stories, *clean]
        return self._farm_out(
            epic,
            RunMode.REGIONAL_REPLAN,
            [replan],
            f"blame implicates {', '.join(implicated)}; redo only that region",
            kept=keep,
            tip=epic.rebuilt_tip,
        )

    def _criteria(self, sid: str) -> list[str]:
        try:
            return list(self.app.get_story(sid).acceptance_criteria)
        except DomainError:
            return []

    # ------------------------------------------------------------------ evaluating

    def _evaluating(self, epic: Epic) -> bool:
        evaluator = self.planner.evaluator
        if epic.running_evaluator is not None:
            if evaluator.running(epic.id) is None:
                evaluator.reap_orphan(epic)
                return True
            return False  # the evaluator is at work; its verdict or its exit wakes us
        if epic.pending_evaluation is not None:
            # The verdict is in and its evaluator gone: conclude it. Once concluded there is
            # no pending verdict, so a restarted runner never concludes (or asks) twice.
            return self._record(
                epic,
                "conclude_evaluation",
                reason=f"conclude evaluator attempt {epic.pending_evaluation}'s verdict",
            )
        review = self.config.review
        if epic.evaluator_failed_runs >= review.max_failed_runs:
            return self._record(
                epic,
                "block",
                reason=f"the evaluator ran {epic.evaluator_failed_runs} times without a verdict "
                f"(max_failed_runs {review.max_failed_runs}); look at its logs, then unblock",
            )
        if epic.evaluator_aborts >= self.config.abort_respawn_cap:
            return self._record(
                epic,
                "block",
                reason=f"the evaluator could not run {epic.evaluator_aborts} times in a row "
                f"(abort_respawn_cap {self.config.abort_respawn_cap}): stopping to avoid a "
                "respawn loop",
            )
        if self._over_budget(epic):
            return True
        agent = self.config.agent_for("evaluator")
        if agent is None:
            return self._record(
                epic,
                "block",
                reason="the epic is to be evaluated but no evaluator agent is configured "
                "(an [[agent]] with stage = evaluator); configure one and unblock",
            )
        commit = epic.integration_commit
        if commit is None:
            return self._record(epic, "block", reason="there is no integration to evaluate")
        cwd = self.git.checkout_scratch(epic.id, "evaluate", commit)
        try:
            return evaluator.launch(epic, agent, cwd, self._evaluator_brief(epic, commit))
        except AgentConfigError as exc:
            self._record(epic, "block", reason=f"the evaluator cannot start: {exc}")
            return True

    def _evaluator_brief(self, epic: Epic, commit: str) -> str:
        fork = epic.fork_point or commit
        criteria = "\n".join(f"{i}. {c}" for i, c in enumerate(epic.acceptance_criteria))
        parts = [
            epic.goal.strip(),
            f"## What you evaluate (evolution {epic.evolution})\n"
            f"Commit {commit} of the epic's integration branch epic/{epic.id}, checked out "
            f"(detached) in your working directory. Its union gates passed. It forked from "
            f"{self.config.base_branch} at {fork}.",
            "## The epic's acceptance criteria (judge each, by its number from 0)\n" + criteria,
        ]
        if epic.evaluations:
            earlier = "\n".join(
                f"- evolution {e['evolution']}: score {float(e['score']):.2f}"
                for e in epic.evaluations
            )
            parts.append("## Earlier evaluations of this epic\n" + earlier)
        diff = run_git(["diff", "--stat", "--patch", fork, commit], self.project, check=False)
        text = cut_diff(diff.stdout, f"git diff {fork} HEAD")
        parts.append(
            f"## The integration's diff from the fork point (`git diff {fork[:12]} HEAD`)\n"
            f"```diff\n{text.strip() or '(empty diff)'}\n```"
        )
        return "\n\n".join(parts)

    def _restore_integration(self, epic: Epic, keep: str) -> None:
        """Move the integration branch back to ``keep`` (the best integration) if it is
        elsewhere. Idempotent: once the branch is there nothing happens, so a runner killed
        between the discard and the move does it on the next step."""
        tip = self.git.integration_tip(epic.id)
        if tip is None or tip == keep:
            return
        if not self.git.reset_integration(epic.id, tip, keep):
            raise GitError(f"epic/{epic.id} moved while it was restored to {keep}")
        logger.info("epic %s: integration branch back from %s to %s", epic.id, tip, keep)

    # ------------------------------------------------------------------ merging

    def _merging(self, epic: Epic) -> bool:
        landed = self.git.landed_commit(epic.id)
        if landed is not None:
            return self._landed(epic, landed)
        assert epic.fork_point is not None
        chosen: str | None = None
        if epic.evaluation_final is not None:
            # The evaluation chose what lands (the best integration): the branch goes back
            # to it if a discarded evolution is still on it, and exactly its tree lands.
            chosen = str(epic.evaluation_final["commit"])
            self._restore_integration(epic, chosen)
        message = (
            f"{epic.name} (epic {epic.id})\n\nSquash-merged by storyline from "
            f"epic/{epic.id}: stories {', '.join(self._landing_stories(epic))}."
        )
        if epic.evaluation_final is not None:
            final = epic.evaluation_final
            message += (
                f"\nEvaluation: score {float(final['score']):.2f} (evolution "
                f"{final['best_evolution']} of {final['evolutions']}"
                f"{', max_evolutions reached' if final['max_reached'] else ''})."
            )
        result = self.git.squash_for_landing(epic.id, epic.fork_point, message, tip=chosen)
        for _ in range(CAS_ATTEMPTS):
            if result.outcome == "conflict":
                return self._record(
                    epic,
                    "landing_failed",
                    reason=f"landing on {self.config.base_branch} conflicts in "
                    f"{', '.join(result.conflicts[:10])}; resolve and unblock",
                    data={
                        "kind": "conflict",
                        "details": result.output,
                        "conflicts": result.conflicts,
                    },
                )
            if result.outcome != "merged" or result.commit_sha is None:
                return self._record(
                    epic,
                    "landing_failed",
                    reason=f"landing failed ({result.outcome})",
                    data={"kind": "other", "details": result.output or result.outcome},
                )
            gates = self.config.merge_gates
            run = run_gates(
                gates.commands,
                self.git.landing_path(epic.id),
                timeout_secs=gates.timeout_secs,
                pidfile=self.project / ".storyline" / "run" / f"gate-{epic.id}.pid",
            )
            if not run.passed:
                return self._record(
                    epic,
                    "landing_failed",
                    reason="the merge gates failed on the landing commit",
                    data={"kind": "gates_failed", "details": run.output},
                )
            if self.git.advance_base(result.base_sha, result.commit_sha):
                return self._landed(epic, result.commit_sha)
            result = self.git.rebase_landing(epic.id)
        return self._record(
            epic,
            "landing_failed",
            reason=f"{self.config.base_branch} kept moving while the epic landed",
            data={"kind": "other", "details": ""},
        )

    def _landing_stories(self, epic: Epic) -> list[str]:
        if epic.evolution == 0 and not epic.discarded:
            return epic.kept_stories + epic.round_stories
        # Every story whose work is in the landing integration: not those of a discarded
        # evolution (their work was taken off the branch).
        gone = {f"{epic.id}.e{d['evolution']}." for d in epic.discarded}
        return [s for s in epic.stories if not any(s.startswith(g) for g in gone)]

    def _landed(self, epic: Epic, commit: str) -> bool:
        return self._record(
            epic, "land", data={"merge_commit": commit, "base_branch": self.config.base_branch}
        )

    # ------------------------------------------------------------------ budget

    def _over_budget(self, epic: Epic) -> bool:
        cap = epic.max_budget_usd
        if cap is None:
            return False
        spent = self.epics.ledger(epic).cost_usd
        if spent < cap:
            return False
        return self._record(
            epic,
            "block",
            reason=f"budget: spent ${spent:.2f} of ${cap:.2f}; no new agent runs for this epic "
            "(unblock with a higher max_budget_usd to go on)",
        )

    # ------------------------------------------------------------------ helpers

    def _record(
        self,
        epic: Epic,
        event: str,
        *,
        reason: str | None = None,
        data: dict[str, object] | None = None,
    ) -> bool:
        try:
            self.epics.transition(
                epic.id,
                event,
                actor=ACTOR,
                expected_version=epic.version,
                reason=reason,
                data=data,
            )
        except (VersionConflict, IllegalTransition):
            return False
        self._changed(epic)
        return True

    def _changed(self, epic: Epic) -> None:
        if self.on_change is not None:
            self.on_change(epic.id)

    def _cleanup(self, epic: Epic) -> None:
        try:
            self.git.remove_scratch(epic.id)
        except GitError:
            logger.warning("could not remove the scratch worktrees of %s", epic.id)
