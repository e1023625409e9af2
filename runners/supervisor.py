"""The supervisor: follows the log, holds the lease, and runs each story's next step.

It is level-triggered: an event only says *which* stories to look at; what to do is decided
from each story's recorded state. So a restart, a missed wake-up or a duplicate one all end
the same way. Steps for one story never run concurrently; steps for different stories run
on a small thread pool (gates and merges take seconds to minutes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from domain.errors import DomainError, StoryNotFound
from domain.fencing import worker_fence
from domain.ids import is_epic_id
from domain.stages import WORKER_STAGES, AgentRole, Stage
from domain.story import Story
from runners.agents import AgentResult
from runners.breaker import ProviderBreakers
from runners.coder import CoderReactions
from runners.epic_git import EpicGit
from runners.epic_runner import EpicReactions
from runners.gate_verdicts import GateJudge, VerdictIndex, VerdictMemory
from runners.launcher import AgentLauncher
from runners.lease import Lease
from runners.merger import MergeReactions
from runners.planner import PlannerLauncher
from runners.reviewer import ReviewReactions
from runners.worker_seat import ScaleOut, WorkerSeat
from service.agent_tokens import AgentTokens
from service.container import Service
from service.epics import EpicService
from service.policies import epic_policy

logger = logging.getLogger(__name__)

ACTIVE_STAGES = (
    Stage.BACKLOG.value,
    Stage.CODING.value,
    Stage.GATES.value,
    Stage.REVIEW.value,
    Stage.MERGE.value,
    Stage.MERGE_FAILURE.value,
)


@dataclass
class SupervisorStatus:
    running: bool
    lease_held: bool
    position: int
    coders: int
    mergemasters: int
    errors: list[str] = field(default_factory=list)
    breakers: list[dict[str, object]] = field(default_factory=list)
    worker: dict[str, object] | None = None
    """Scale-out: this runner's worker id, role, capacity and the stories it holds."""

    def as_json(self) -> dict[str, object]:
        return {
            "name": "runners",
            "running": self.running,
            "lease_held": self.lease_held,
            "worker": self.worker,
            "position": self.position,
            "coders": self.coders,
            "mergemasters": self.mergemasters,
            "errors": self.errors[-5:],
            "breakers": self.breakers,
        }


class Supervisor:
    def __init__(
        self,
        service: Service,
        *,
        api_url: str | None = None,
        use_agent_tokens: bool = True,
        poll_interval: float = 1.0,
        full_sweep_interval: float = 10.0,
        workers: int = 8,
        lease_ttl: float = 15.0,
        scale_out: ScaleOut | None = None,
    ) -> None:
        self.service = service
        self.app = service.app
        self.config = service.config
        self.poll_interval = poll_interval
        self.full_sweep_interval = full_sweep_interval
        # The index folds every event in: the gate verdicts among them rebuild the memory
        # that flaky gates are judged from (the whole log at start, then each catch-up).
        self.verdicts = VerdictMemory()
        self.index = VerdictIndex(verdicts=self.verdicts)
        self._engine = None
        if service.db.kind == "postgres":
            from sqlalchemy import create_engine

            from projections.log import EventReader

            # PostgreSQL may commit positions out of order: read like the projections do.
            # Pre-ping: after a PostgreSQL restart the pooled connections are dead, and
            # SQLAlchemy replaces the whole pool on the first failed ping.
            self._engine = create_engine(service.db.sqlalchemy_url, pool_size=2, pool_pre_ping=True)
            self.index.reader = EventReader(service.db, self._engine, gap_timeout=5.0)
        self.scale_out = scale_out
        if scale_out is None:
            self.lease = Lease(self.app, ttl_secs=lease_ttl)
        else:
            # Workers act on the stories they hold; one of them at a time also merges.
            self.lease = Lease(
                self.app, "merger", holder=scale_out.worker_id, ttl_secs=scale_out.lease_ttl
            )
            self.app.fence = worker_fence(scale_out.worker_id)
        tokens = AgentTokens(self.app) if use_agent_tokens else None
        self.launcher = AgentLauncher(
            self.app,
            self.config,
            service.project,
            api_url=api_url,
            tokens=tokens,
            on_exit=self._agent_exited,
        )
        self.breakers = ProviderBreakers(
            threshold=self.config.provider_breaker_failures,
            base_secs=self.config.provider_breaker_base_secs,
        )
        self.coder = CoderReactions(
            self.app, self.config, service.project, self.index, self.launcher, self.breakers
        )
        self.coder.on_breaker_closed = lambda: self.slot_freed(Stage.CODING.value)
        self.merger = MergeReactions(
            self.app,
            self.config,
            service.project,
            self.index,
            self.launcher,
            on_slot_freed=lambda: self.slot_freed(Stage.MERGE.value),
        )
        self.reviewer = ReviewReactions(
            self.app, self.config, service.project, self.launcher, self.coder.worktrees
        )
        self.gate_judge = GateJudge(self.app, self.verdicts)
        self.gate_judge.reuse_by_default = self.merger.spec is not None
        self.coder.gate_judge = self.gate_judge
        self.merger.gate_judge = self.gate_judge
        self.epics = EpicService(self.app, epic_policy(self.config))
        self.planner = PlannerLauncher(
            self.epics,
            self.config,
            self.launcher,
            api_url=api_url,
            tokens=tokens,
            on_exit=lambda epic_id: self.look_at({epic_id}),
        )
        # Built with the remote: its landing workspaces are made here, not on first use.
        epic_git = EpicGit(
            service.project,
            self.config.base_branch,
            remote=scale_out.remote if scale_out is not None else None,
        )
        self.epic_runner = EpicReactions(
            self.epics, self.config, service.project, self.planner, git=epic_git
        )
        self.launcher.spawn_veto = self.epic_runner.spawn_veto
        self.seat: WorkerSeat | None = None
        if scale_out is not None:
            remote = scale_out.remote
            self.coder.worktrees.remote = remote
            self.merger.workspaces.remote = remote
            self.launcher.extra_env["STORYLINE_WORKER"] = scale_out.worker_id
            self.seat = WorkerSeat(
                self.app,
                scale_out,
                self.config.max_coders,
                adopt=self.coder.worktrees.adopt,
                reap=lambda story, why: self.launcher.reap_orphan(story, why=why),
                on_lost=self._lease_lost,
                on_free=self._worker_slot_freed,
            )
            self.coder.cluster_capacity = self.seat.cluster_capacity
        self._merger_held = scale_out is None
        self._settled_epics: set[str] = set()
        """Epics found done or failed and cleaned up (not looked at again by sweeps)."""
        # A stacked merge holds its step thread while it waits for the stories ahead of it:
        # the speculative queue's depth is added so other stories' steps are not starved.
        stacked = self.merger.spec is not None
        extra = self.config.max_merge_slots * self.config.merge_queue.batch if stacked else 0
        self._pool = ThreadPoolExecutor(max_workers=workers + extra, thread_name_prefix="runner")
        self._wake = threading.Condition()
        self._woken = False
        self._busy: set[str] = set()
        self._pending: set[str] = set()
        self._again: set[str] = set()
        self._busy_lock = threading.Lock()
        self._stop = threading.Event()
        self.merger.stopping = self._stop
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._errors: list[str] = []
        self._last_sweep = 0.0
        self._renewed_at = 0.0
        self.after_step: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.app.add_commit_listener(lambda _position: self.wake())
        # Commits made by other processes (a separate API, the CLI) must wake this one too,
        # not wait for the next poll: measured, a separate runner took ~950 ms to react
        # with the 1 s poll alone (BENCHMARKS.md, row 6x).
        self._listener = threading.Thread(
            target=self._listen, name="supervisor-listen", daemon=True
        )
        self._listener.start()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()
        if self.seat is not None:
            self.seat.start(lambda: self._merger_held)

    def stop(self, kill_agents: bool = True) -> None:
        self._stop.set()
        self.wake()
        with self._busy_lock:
            busy = sorted(self._busy)
        if busy:
            logger.warning(
                "shutting down: waiting for the step in progress on %s "
                "(a gate or merge command finishes first)",
                ", ".join(f"story {sid}" for sid in busy),
            )
        agents = self.launcher.describe() if kill_agents else []
        if agents:
            logger.warning(
                "shutting down: stopping %d agent(s): %s", len(agents), "; ".join(agents)
            )
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._listener is not None:
            self._listener.join(timeout=5)
        if kill_agents:
            self.planner.stop_all("the runner is shutting down")
            self.launcher.stop_all("the runner is shutting down")
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.seat is not None:
            self.seat.close()
        try:
            self.lease.release()
        except Exception:
            logger.exception("could not release the runner lease")
        if self._engine is not None:
            self._engine.dispose()

    def wake(self) -> None:
        with self._wake:
            self._woken = True
            self._wake.notify_all()

    def status(self) -> SupervisorStatus:
        return SupervisorStatus(
            running=self._thread is not None and self._thread.is_alive(),
            lease_held=self.lease.held,
            position=self.index.position,
            coders=self.launcher.count(AgentRole.CODER),
            mergemasters=self.launcher.count(AgentRole.MERGEMASTER),
            errors=list(self._errors),
            breakers=list(self.breakers.snapshot()),
            worker=None
            if self.seat is None or self.scale_out is None
            else {
                "worker_id": self.scale_out.worker_id,
                "role": self.scale_out.role,
                "capacity": self.seat.capacity,
                "held": self.seat.held(),
                "merger": self._merger_held,
                "remote": self.scale_out.remote.url,
            },
        )

    def idle(self) -> bool:
        """True when no story step is queued or running (agents may still run)."""
        with self._busy_lock:
            return not self._busy

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:
                logger.exception("runner tick failed")
                self._errors.append(f"{type(exc).__name__}: {exc}")
                self._errors[:] = self._errors[-20:]
                self._stop.wait(self.poll_interval)
            with self._wake:
                if not self._woken:
                    # An open breaker's back-off ends on a timer, not with an event.
                    due = self.breakers.seconds_until_due()
                    wait = self.poll_interval if due is None else min(self.poll_interval, due)
                    self._wake.wait(wait)
                self._woken = False

    def _tick(self) -> None:
        if self.seat is None:
            if not self.lease.ensure():
                return  # another runner process holds the lease
        else:
            assert self.scale_out is not None
            self._merger_held = self.scale_out.merges and self.lease.ensure()
        touched = self.index.catch_up(self.app)
        for event in self.index.take_breaker_events():
            # Openings and closings in the log (a restart, or another runner before this
            # one): this runner's own are known already and change nothing.
            self.breakers.restore(event.type, event.data, event.timestamp)
        for event in self.index.take_project_events():
            # The gate registry's decisions: read fresh by every gate run, nothing to redo.
            logger.info("gate registry: %s of %r", event.type, event.data.get("gate"))
        if self.breakers.take_due():
            # A back-off ended: the stories waiting on it get their probe spawn.
            touched |= {s.story_id for s in self.index.in_stage(Stage.CODING.value)}
        with self._busy_lock:
            touched |= self._pending
            self._pending.clear()
        now = time.monotonic()
        touched |= self.index.take_epics()
        if now - self._last_sweep >= self.full_sweep_interval:
            self._last_sweep = now
            touched |= {s.story_id for s in self.index.in_stage(*ACTIVE_STAGES)}
            # From the index, which folded every event: no scan of the store per sweep.
            with self.index.lock:
                touched |= self.index.all_epics - self._settled_epics
        # Renew well before expiry; a long tick must not let another runner take over. On
        # a clock, not on every tick: every commit anywhere wakes this loop, and a lease
        # write per wake-up would add a commit to every command.
        if now - self._renewed_at >= self.lease.ttl_secs / 6 and self._merger_held:
            self._renewed_at = now
            self._merger_held = self.lease.acquire()
        for sid in sorted(touched, key=self._order):
            self._submit(sid)

    def _order(self, story_id: str) -> tuple[int, str]:
        story = self.index.get(story_id)
        return (story.entered_stage_position if story else 0, story_id)

    def _submit(self, story_id: str) -> None:
        with self._busy_lock:
            if story_id in self._busy:
                self._again.add(story_id)
                return
            self._busy.add(story_id)
        self._pool.submit(self._step_loop, story_id)

    def _step_loop(self, story_id: str) -> None:
        try:
            for _ in range(50):  # bounded: a step that keeps recording is a bug, not a loop
                if self._stop.is_set():
                    break
                try:
                    progressed = self._step(story_id)
                except DomainError as exc:
                    logger.info("step for %s refused: %s", story_id, exc)
                    progressed = False
                except Exception as exc:
                    logger.exception("step for %s failed", story_id)
                    self._errors.append(f"{story_id}: {type(exc).__name__}: {exc}")
                    self._errors[:] = self._errors[-20:]
                    progressed = False
                with self._busy_lock:
                    again = story_id in self._again
                    self._again.discard(story_id)
                if not progressed and not again:
                    break
        finally:
            with self._busy_lock:
                self._busy.discard(story_id)
                again = story_id in self._again
                self._again.discard(story_id)
            if again:
                self._submit(story_id)
            if self.after_step is not None:
                self.after_step(story_id)

    def _step(self, story_id: str) -> bool:
        if is_epic_id(story_id):
            if not self._merger_held:
                return False  # epics are the merger's (their git lives in its clone)
            return self._step_epic(story_id)
        try:
            story = self.app.get_story(story_id)
        except StoryNotFound:
            return False
        if self.seat is not None:
            seated = self._seat_story(story)
            if seated is None:
                return False
            story = seated
        stage = story.stage
        if stage is Stage.BACKLOG:
            self.coder.schedule(story)
            return False
        if stage is Stage.CODING:
            return self.coder.step(story)
        if stage is Stage.GATES:
            # Gates started but never finished: the runner died mid-run. Run them again.
            if self.launcher.running(story_id) is None:
                self.coder.run_gates(story)
                return True
            return False
        if stage is Stage.REVIEW:
            return self.reviewer.step(story)
        if stage in (Stage.MERGE, Stage.MERGE_FAILURE):
            return self.merger.step(story)
        # blocked, done, archived: nothing may keep running for it.
        if self.launcher.running(story_id) is not None:
            self.launcher.stop(story_id, f"the story is {stage.value}")
            return False
        if story.running_agent is not None and self._may_reap(story):
            self.launcher.reap_orphan(story)
            return True
        if stage in (Stage.DONE, Stage.ARCHIVED):
            self.coder.cleanup(story)
            self.merger.cleanup(story)
            self.reviewer.cleanup(story)
        return False

    # ------------------------------------------------------------------ scale-out

    def _seat_story(self, story: Story) -> Story | None:
        """Scale-out: the story to step, if this worker is the one to step it now."""
        assert self.seat is not None and self.scale_out is not None
        if story.stage in WORKER_STAGES:
            if not self.scale_out.works:
                return None
            held = self.seat.hold(story)
            if held is None and self.launcher.running(story.id) is not None:
                # Held by another worker now: this one's attempt must not go on.
                self.launcher.stop(story.id, "another worker holds the story now")
            return held
        if self.seat.release(story.id):
            self._worker_slot_freed()
        if story.stage in (Stage.MERGE, Stage.MERGE_FAILURE) and not self._merger_held:
            return None
        return story

    def _worker_slot_freed(self) -> None:
        # The stories waiting for a slot are looked at now, not at the next sweep
        # (measured: that wait alone halved the scale-out throughput).
        self.slot_freed(*(s.value for s in WORKER_STAGES))

    def _may_reap(self, story: Story) -> bool:
        """Whose job it is to record a finished story's leftover attempt as lost: the
        worker that held it, or the merger for one whose worker is gone."""
        if self.scale_out is None:
            return True
        return self._merger_held or story.holder == self.scale_out.worker_id

    def _lease_lost(self, story_id: str) -> None:
        if self.launcher.running(story_id) is not None:
            self.launcher.stop(story_id, "this worker's lease on the story expired")
        self.look_at({story_id})

    def _step_epic(self, epic_id: str) -> bool:
        epic = self.epics.get(epic_id)
        progressed = self.epic_runner.step(epic)
        settled = (
            epic.stage.value in ("done", "failed")
            and epic.running_planner is None
            and epic.running_evaluator is None
        )
        if not progressed and settled:
            self._settled_epics.add(epic_id)
        return progressed

    def _listen(self) -> None:
        if self.app.db.kind == "postgres":
            self._listen_postgres()
        else:
            self._watch_sqlite()

    def _watch_sqlite(self, interval: float = 0.025) -> None:
        """Wake when another connection commits: SQLite has no NOTIFY, but a connection's
        ``PRAGMA data_version`` changes whenever any other connection (in any process) has
        committed, and reading it costs about 10 us."""
        import sqlite3

        path = self.app.db.sqlite_path
        while not self._stop.is_set():
            try:
                conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
                try:
                    seen = conn.execute("PRAGMA data_version").fetchone()[0]
                    while not self._stop.wait(interval):
                        version = conn.execute("PRAGMA data_version").fetchone()[0]
                        if version != seen:
                            seen = version
                            self.wake()
                finally:
                    conn.close()
            except Exception:
                logger.warning("watching %s for commits failed; polling", path)
                self._stop.wait(self.poll_interval)

    def _listen_postgres(self) -> None:
        import psycopg

        from service.application import events_table

        db = self.app.db
        params: dict[str, object] = {
            "host": db.host,
            "port": db.port,
            "user": db.user,
            "dbname": db.dbname,
            "connect_timeout": 10,
        }
        if db.password:
            params["password"] = db.password
        while not self._stop.is_set():
            try:
                with psycopg.connect(autocommit=True, **params) as conn:  # type: ignore[arg-type]
                    conn.execute(f'LISTEN "{events_table(db)}"')
                    # Whatever was committed while nobody listened is picked up now.
                    self.wake()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self.wake()
            except Exception:
                logger.warning("LISTEN for the runner failed; polling until it is back")
                self._stop.wait(self.poll_interval)

    # ------------------------------------------------------------------ agent exits

    def look_at(self, story_ids: set[str]) -> None:
        """Have the loop step these stories after it folded in the latest events.

        Going through the loop (instead of submitting at once) matters: a step decides from
        the index, which must already hold the event that freed the slot.
        """
        with self._busy_lock:
            self._pending |= story_ids
        self.wake()

    def slot_freed(self, *stages: str) -> None:
        self.look_at({s.story_id for s in self.index.in_stage(*stages)})

    def _agent_exited(self, story_id: str, role: AgentRole, _result: AgentResult | None) -> None:
        # A freed slot may let another story go: look at every story waiting for one.
        if role is AgentRole.MERGEMASTER:
            self.merger.note_mergemaster_exit(story_id)
        waiting = {
            AgentRole.CODER: (Stage.CODING.value,),
            # An evaluator's exit: its story concludes or respawns, and a freed evaluator
            # slot lets another story in review start its evaluator.
            AgentRole.EVALUATOR: (Stage.REVIEW.value,),
        }.get(role, (Stage.MERGE_FAILURE.value, Stage.MERGE.value))
        self.look_at({story_id} | {s.story_id for s in self.index.in_stage(*waiting)})
