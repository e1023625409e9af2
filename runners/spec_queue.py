"""The speculative merge queue (``max_merge_slots`` > 1, or ``[merge_queue] batch`` > 1).

The first ``k`` queued stories are squashed on top of each other, each in its own merge
workspace: story 1 on the base tip B, story 2 on story 1's squash commit, and so on. Their
merge gates run in parallel (each story's merge runs in its own runner step thread). They
land in queue order: when a story passed and everything ahead of it landed, the base moves
by compare-and-swap from its parent (the commit of the story ahead, which is the tip now) to
its own squash commit. So every commit on the base was gated on exactly its own tree, the
base only moves forward (``advance_base`` refuses anything else), and a story lands once.

- A story whose merge gate fails is ejected alone, once everything ahead of it landed
  (``MergeFailed`` gates_failed, reason ``ejected: merge gate failed on base <sha> + <ids>``;
  fix-ups as ever); the builds behind it are dropped (``SpeculationRestarted``, each with its
  reason) and rebuilt on a base without it, in their old queue order.
- A squash that does not apply cleanly on the stack (conflict, nothing to merge, git
  refusing) waits until the stories ahead of it landed (or one was ejected: then it is
  rebuilt); only on the real base does it count (``conflict_detected`` and mergemasters as
  ever). Nothing joins the stack behind a build without a commit.
- A mergemaster's resolution (``resolved_pending``) is merged on its own, by the plain
  path, when the stack is empty; nothing stacks on it.
- Batching (``[merge_queue] batch`` = b > 1): consecutive stories form a group of up to b;
  only the top of a group is gated, and the group lands in one compare-and-swap to the
  top's commit. The group is closed early when no queued story is waiting to join it. A
  failed group is split: each of its stories is rebuilt and gated on its own (in the stack,
  in parallel: that finds the culprit). ``k`` bounds the groups (gate runs) in flight.
- Crash safety: all of it is in memory except the events; a restarted runner finds merging
  stories it does not know, records the success of those whose squash commit reached the
  base, and drops the others' builds back into the queue (the gate verdicts recorded on
  their trees are reused when the same tree is built again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from domain.errors import DomainError, IllegalTransition, VersionConflict
from domain.stages import MergeFailureKind, Stage
from domain.story import Story
from runners.gates import story_gate_pidfile
from runners.git_ops import GitError, SquashResult

if TYPE_CHECKING:
    from runners.merger import MergeReactions

logger = logging.getLogger(__name__)

ACTOR = "runner:merge"
WAIT = 0.25
"""Seconds between re-checks while waiting (changes also notify at once)."""


@dataclass(eq=False)
class _Group:
    """Stories gated by one run on the top one (a single story unless batching)."""

    members: list[_Entry] = field(default_factory=list)
    sealed: bool = False
    top: _Entry | None = None
    verdict: bool | None = None
    output: str = ""
    landed: bool = False


@dataclass(eq=False)
class _Entry:
    story_id: str
    target: str | None
    base_sha: str
    """The base tip when the story joined."""
    parent: str
    """The commit the story is squashed onto (the commit of the story ahead, or the tip)."""
    ahead: list[str]
    group: _Group
    alone: bool = False
    plain: bool = False
    commit: str | None = None
    state: str = "building"
    restart: str | None = None
    """Why the build is dropped (set by another thread), or None."""
    restart_alone: bool = False


class _Restart(Exception):
    pass


class SpeculativeQueue:
    """The stacks (one per target branch) and the rules above; driven by merge steps."""

    def __init__(self, merger: MergeReactions) -> None:
        self.m = merger
        self.k = merger.config.max_merge_slots
        self.batch = merger.config.merge_queue.batch
        self.cond = threading.Condition()
        self.stacks: dict[str | None, list[_Entry]] = {}
        self.busy: set[str] = set()
        self.alone: set[str] = set()
        """Stories split from a failed batch: gated on their own when they next join."""
        self._targets: dict[str, str | None] = {}
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ entry point

    def step(self, story: Story) -> bool:
        with self.cond:
            if story.id in self.busy:
                return False
        if story.merging:
            return self._resume(story)
        entry = self._join(story)
        if entry is None:
            return False
        try:
            self._run(story, entry)
        except GitError as exc:
            self._broken(story, entry, str(exc))
        except Exception as exc:
            # Never leave the builds behind (or a batch) waiting on a thread that is gone.
            logger.exception("speculative merge of %s failed", story.id)
            self._broken(story, entry, f"{type(exc).__name__}: {exc}")
        finally:
            self._leave(entry)
        return True

    def _stopping(self) -> bool:
        return self.m.stopping is not None and self.m.stopping.is_set()

    # ------------------------------------------------------------------ joining

    def _target_of(self, story_id: str) -> str | None:
        if story_id not in self._targets:
            try:
                self._targets[story_id] = self.m.app.get_story(story_id).target_branch
            except DomainError:
                return None
        return self._targets[story_id]

    def _in_stacks(self) -> set[str]:
        return {e.story_id for stack in self.stacks.values() for e in stack}

    def _candidates(self, target: str | None) -> list[str]:
        """Queued stories for ``target`` not in a stack, in queue order (a dropped build
        whose thread is still finishing counts: it is queued again at its old place)."""
        stacked = self._in_stacks()
        return [
            s.story_id
            for s in self.m.index.in_stage(Stage.MERGE.value)
            if s.story_id not in stacked and self._target_of(s.story_id) == target
        ]

    def _join(self, story: Story) -> _Entry | None:
        self.m.index.catch_up(self.m.app)
        target = story.target_branch
        with self.cond:
            if self._stopping():
                return None
            stack = self.stacks.setdefault(target, [])
            candidates = self._candidates(target)
            if not candidates or candidates[0] != story.id:
                if candidates and candidates[0] != story.id and self._stale(candidates[0]):
                    # The story ahead left the queue in an event this runner's index has
                    # not read yet: look again shortly (no event will wake this one).
                    self._wake_later()
                return None  # strict queue order
            live = [e for e in stack if not e.group.landed]
            last = stack[-1] if stack else None
            plain = story.resolved_pending
            if plain and live:
                return None  # a resolution merges on the real base, alone
            if last is not None and (last.plain or last.commit is None):
                return None  # nothing stacks on a build without a commit
            alone = story.id in self.alone
            joins_group = (
                last is not None
                and not last.group.landed
                and self.batch > 1
                and not last.group.sealed
                and not last.alone
                and not alone
                and len(last.group.members) < self.batch
            )
            groups = {id(e.group) for e in live}
            if not joins_group and len(groups) >= self.k:
                return None
            try:
                tip = self.m._base_tip(story)
            except GitError:
                if live:
                    return None
                tip = None
            if tip is None or plain:
                # The plain path (today's merge) records its own start and any failure.
                entry = _Entry(story.id, target, tip or "", tip or "", [], _Group(), plain=True)
            else:
                parent = last.commit if last is not None and last.commit else tip
                ahead = [e.story_id for e in live]
                group = last.group if joins_group and last is not None else _Group()
                entry = _Entry(story.id, target, tip, parent, ahead, group, alone=alone)
            entry.group.members.append(entry)
            stack.append(entry)
            self.busy.add(story.id)
            return entry

    def _stale(self, story_id: str) -> bool:
        if story_id in self.busy:
            return False
        try:
            return self.m.app.get_story(story_id).stage is not Stage.MERGE
        except DomainError:
            return True

    def _wake_later(self, delay: float = 0.5) -> None:
        """One delayed wake of the queue at a time (holding ``cond``)."""
        if self._timer is not None and self._timer.is_alive():
            return

        def wake() -> None:
            if not self._stopping():
                self.m._wake_queue()

        self._timer = threading.Timer(delay, wake)
        self._timer.daemon = True
        self._timer.start()

    def _leave(self, entry: _Entry) -> None:
        with self.cond:
            stack = self.stacks.get(entry.target, [])
            if entry in stack:
                stack.remove(entry)
            self.busy.discard(entry.story_id)
            self.cond.notify_all()
        self.m._wake_queue()

    # ------------------------------------------------------------------ one build

    def _run(self, story: Story, entry: _Entry) -> None:
        if entry.plain:
            self.m._merge(story)
            return
        if not self._start(story, entry):
            return
        try:
            workspaces = self.m._workspaces(story)
            result = workspaces.squash_merge(story.id, self.m._message(story), onto=entry.parent)
            if result.outcome != "merged" or not result.commit_sha:
                self._unclean(story, entry, result)
                return
            with self.cond:
                entry.commit = result.commit_sha
                entry.state = "gating"
                self.cond.notify_all()
            self.m._wake_queue()  # the next story may stack on this commit now
            top = self._gate_role(entry)
            self._update(story, entry, "gating" if top else "batched", commit=entry.commit)
            if top:
                self._gate(story, entry)
            passed = self._await_verdict(entry)
            if passed:
                self._update(story, entry, "passed")
            self._await_ahead(entry)
            if passed:
                self._land(story, entry)
            else:
                self._failed(story, entry)
        except _Restart:
            self._record_restart(story, entry)

    def _start(self, story: Story, entry: _Entry) -> bool:
        what = f"stacked on {', '.join(entry.ahead)}" if entry.ahead else "at the head of the stack"
        try:
            self.m.app.transition(
                story.id,
                "start_merge",
                actor=ACTOR,
                expected_version=story.version,
                reason=f"speculative merge {what} (base {entry.base_sha[:12]})",
                data={
                    "base_sha": entry.base_sha,
                    "ahead": entry.ahead,
                    "speculative_base": entry.parent,
                },
            )
        except (VersionConflict, IllegalTransition):
            return False
        return True

    def _update(self, story: Story, entry: _Entry, state: str, commit: str | None = None) -> None:
        with self.cond:
            entry.state = state
        try:
            self.m.app.transition(
                story.id,
                "update_speculation",
                actor=ACTOR,
                data={"state": state, "commit": commit, "parent": entry.parent if commit else None},
            )
        except DomainError:
            logger.exception("could not record the speculation state of %s", story.id)

    def _wait(self, entry: _Entry, done: Callable[[], bool]) -> None:
        """Wait (holding ``cond``) until ``done()``; raise _Restart when the build is dropped
        or the runner stops (the story stays merging: the next runner drops it)."""
        while True:
            if entry.restart is not None:
                raise _Restart
            if done():
                return
            if self._stopping() and entry.restart is None:
                entry.restart = "the runner stopped during the build; requeued at its old position"
                continue
            self.cond.wait(WAIT)

    def _gate_role(self, entry: _Entry) -> bool:
        """True when this story's own gate run decides its group (it is the group's top)."""
        with self.cond:
            group = entry.group
            if self.batch == 1 or entry.alone or len(group.members) >= self.batch:
                group.sealed, group.top = True, entry
                return True
            if not self._someone_coming(entry):
                group.sealed, group.top = True, entry
                return True

            def decided() -> bool:
                if group.sealed:
                    return True
                stack = self.stacks.get(entry.target, [])
                if entry not in stack or group.members[-1] is not entry:
                    return False
                at = stack.index(entry)
                following = stack[at + 1] if at + 1 < len(stack) else None
                closes = (
                    following.group is not group
                    if following is not None
                    else not self._someone_coming(entry)
                )
                if closes:
                    group.sealed, group.top = True, entry  # nobody joins: close the group
                return closes

            self._wait(entry, decided)
            return group.top is entry

    def _someone_coming(self, entry: _Entry) -> bool:
        """A queued story that would join ``entry``'s group next."""
        candidates = self._candidates(entry.target)
        if not candidates or candidates[0] in self.alone:
            return False
        try:
            return not self.m.app.get_story(candidates[0]).resolved_pending
        except DomainError:
            return False

    def _gate(self, story: Story, entry: _Entry) -> None:
        judge = self.m._judge()
        run = judge.run(
            story,
            "merge_gates",
            self.m.config.merge_gates,
            self.m._workspaces(story).path_for(story.id),
            pidfile=story_gate_pidfile(self.m.project, story.id),
            actor=ACTOR,
        )
        with self.cond:
            entry.group.verdict = run.passed
            entry.group.output = run.output
            self.cond.notify_all()

    def _await_verdict(self, entry: _Entry) -> bool:
        with self.cond:
            self._wait(entry, lambda: entry.group.verdict is not None)
            return bool(entry.group.verdict)

    def _ahead_of(self, entry: _Entry) -> list[_Entry]:
        stack = self.stacks.get(entry.target, [])
        first = entry.group.members[0]
        if first not in stack:
            return []
        return [e for e in stack[: stack.index(first)] if not e.group.landed]

    def _await_ahead(self, entry: _Entry) -> None:
        with self.cond:
            self._wait(entry, lambda: not self._ahead_of(entry))

    # ------------------------------------------------------------------ outcomes

    def _land(self, story: Story, entry: _Entry) -> None:
        group = entry.group
        if group.top is entry:
            gone = self._left_the_merge(group)
            if gone:
                # Blocked or demoted by a person while it was built: it must not land, and
                # every build on top of it holds its changes.
                with self.cond:
                    self._drop_from(
                        entry.target,
                        group.members[0],
                        f"story {gone} left the merge while it was built: rebuilt without it",
                    )
                self._record_restart(story, entry)
                return
            self._update(story, entry, "landing")
            workspaces = self.m._workspaces(story)
            assert entry.commit is not None
            moved = workspaces.advance_base(group.members[0].parent, entry.commit)
            with self.cond:
                if moved:
                    group.landed = True
                else:
                    self._drop_from(
                        entry.target,
                        group.members[0],
                        "the base branch moved under the stack (not by this queue): "
                        "rebuilt on the new tip",
                    )
                self.cond.notify_all()
            if not moved:
                self._record_restart(story, entry)
                return
        else:
            with self.cond:
                # Not given up when the runner stops: the top is moving the base right now,
                # and a story whose commit landed must be recorded as landed.
                while not group.landed and entry.restart is None:
                    self.cond.wait(WAIT)
                if not group.landed:
                    raise _Restart
        assert entry.commit is not None
        self.alone.discard(story.id)
        self.m._succeed(story, entry.commit)

    def _left_the_merge(self, group: _Group) -> str | None:
        for member in group.members:
            try:
                current = self.m.app.get_story(member.story_id)
            except DomainError:
                return member.story_id
            if current.stage is not Stage.MERGE or not current.merging:
                return member.story_id
        return None

    def _failed(self, story: Story, entry: _Entry) -> None:
        group = entry.group
        if len(group.members) > 1:
            with self.cond:
                if group.top is entry:
                    ids = ", ".join(m.story_id for m in group.members)
                    for member in group.members:
                        member.restart_alone = True
                    self._drop_from(
                        entry.target,
                        group.members[0],
                        f"the batch {ids} failed its merge gate on the top "
                        f"({entry.story_id}): split, each story is gated on its own",
                        behind=f"a batch ahead ({ids}) failed its merge gate and is split",
                        group=group,
                    )
                self._wait(entry, lambda: False)  # raises _Restart
            return
        ahead = " + " + ", ".join(entry.ahead) if entry.ahead else ""
        with self.cond:
            self._drop_behind(
                entry,
                f"story {entry.story_id} ahead of it was ejected (its merge gate failed): "
                "rebuilt without it",
            )
        self.alone.discard(story.id)
        try:
            self.m.app.transition(
                story.id,
                "merge_failed",
                actor=ACTOR,
                reason=f"ejected: merge gate failed on base {entry.base_sha[:12]}{ahead}",
                data={
                    "kind": MergeFailureKind.GATES_FAILED.value,
                    "details": entry.group.output,
                    "conflicts": [],
                },
            )
        except DomainError:
            logger.exception("could not record the ejection of %s", story.id)

    def _unclean(self, story: Story, entry: _Entry, result: SquashResult) -> None:
        """The squash did not give a commit: it only counts on the real base."""
        with self.cond:
            group = entry.group
            if len(group.members) > 1:
                # Out of its batch: the stories before it close their group without it.
                group.members.remove(entry)
                if not group.sealed:
                    group.sealed, group.top = True, group.members[-1]
                entry.group = _Group([entry], sealed=True, top=entry)
                self.cond.notify_all()
        if entry.ahead:
            self._update(story, entry, "waiting")
            with self.cond:
                self._wait(entry, lambda: not self._ahead_of(entry))
        tip = self.m._base_tip(story)
        if tip != entry.parent:
            with self.cond:
                entry.restart = "the base branch moved under the stack: squashed again on it"
            raise _Restart
        self.alone.discard(story.id)
        self.m._handle_result(story, result)

    def _broken(self, story: Story, entry: _Entry, why: str) -> None:
        with self.cond:
            reason = f"story {entry.story_id} ahead of it failed to merge: {why}"
            # Its batch too: the others wait for a verdict this story's thread will not give.
            self._drop_from(entry.target, entry.group.members[0], reason)
        try:
            current = self.m.app.get_story(story.id)
        except DomainError:
            return
        if current.stage is Stage.MERGE and current.merging:
            self.m._fail(current, MergeFailureKind.OTHER, why)

    # ------------------------------------------------------------------ dropping builds

    def _drop_behind(self, entry: _Entry, reason: str) -> None:
        """Drop every build behind ``entry`` (holding ``cond``); ``entry`` leaves the stack."""
        stack = self.stacks.get(entry.target, [])
        if entry not in stack:
            return
        at = stack.index(entry)
        for other in stack[at + 1 :]:
            if other.restart is None:
                other.restart = reason
        del stack[at:]
        self.cond.notify_all()

    def _drop_from(
        self,
        target: str | None,
        first: _Entry,
        reason: str,
        *,
        behind: str | None = None,
        group: _Group | None = None,
    ) -> None:
        """Drop ``first`` and every build behind it (holding ``cond``)."""
        stack = self.stacks.get(target, [])
        if first not in stack:
            return
        at = stack.index(first)
        for other in stack[at:]:
            if other.restart is None:
                mine = group is not None and other.group is group
                other.restart = reason if (group is None or mine) else (behind or reason)
        del stack[at:]
        self.cond.notify_all()

    def _record_restart(self, story: Story, entry: _Entry) -> None:
        indexed = self.m.index.get(story.id)
        data: dict[str, object] = {"alone": entry.restart_alone}
        if indexed is not None and indexed.entered_stage_position > 0:
            data["queued_position"] = indexed.entered_stage_position
        try:
            self.m.app.transition(
                story.id,
                "restart_speculation",
                actor=ACTOR,
                reason=f"speculation restarted: {entry.restart or 'dropped'}",
                data=data,
            )
        except DomainError as exc:
            # Blocked or demoted meanwhile: nothing of its merge is left to restart.
            logger.info("no restart recorded for %s: %s", story.id, exc)
            return
        if entry.restart_alone:
            self.alone.add(story.id)

    # ------------------------------------------------------------------ after a crash

    def _resume(self, story: Story) -> bool:
        """A merge recorded as started that no thread here runs: a runner died mid-merge."""
        with self.cond:
            if story.id in self.busy or self._stopping():
                return False
            self.busy.add(story.id)
        try:
            landed = self.m._landed_commit(story)
            if landed is not None:
                self.m._succeed(story, landed)
                return True
            if story.resolved_pending:
                return self.m._resume_merge(story)
            try:
                self.m.app.transition(
                    story.id,
                    "restart_speculation",
                    actor=ACTOR,
                    reason="speculation restarted: the runner stopped during the build; "
                    "requeued at its old position",
                    data=self._queued(story.id),
                )
            except (VersionConflict, IllegalTransition):
                return False
            return True
        finally:
            with self.cond:
                self.busy.discard(story.id)
                self.cond.notify_all()
            self.m._wake_queue()

    def _queued(self, story_id: str) -> dict[str, object]:
        indexed = self.m.index.get(story_id)
        if indexed is not None and indexed.entered_stage_position > 0:
            return {"queued_position": indexed.entered_stage_position}
        return {}
