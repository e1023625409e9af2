"""A worker runner's seat in a scale-out deployment: which stories it holds, and why.

With ``storyline runner --remote <url>``, runner processes on several machines share one
PostgreSQL database and one git remote. Each takes the stories it works on (coding, gates,
review) under a per-story lease (:class:`service.workers.StoryLeases`), at most
``max_coders`` at a time, renews them while it lives, and records every new claim in the
story's log (``WorkerClaimed``), which fences the story's later writes to this worker. A
worker that dies stops renewing; once its leases expire another worker claims the stories
with a higher generation, records the orphaned attempt as lost and respawns it cold from the
branch last pushed to the remote.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from domain.errors import IllegalTransition, VersionConflict
from domain.stages import WORKER_STAGES
from domain.story import Story
from runners.git_ops import GitError
from runners.remote import GitRemote
from service.application import StorylineApplication
from service.workers import StoryLeases, Workers

logger = logging.getLogger(__name__)

Role = Literal["worker", "merger", "all"]


@dataclass(frozen=True)
class ScaleOut:
    """How this runner process takes part in a scale-out deployment."""

    worker_id: str
    remote: GitRemote
    role: Role = "all"
    lease_ttl: float = 15.0
    shared_sessions: bool = False
    """The agents' session directory is shared by every worker (so a coder may resume a
    session another worker's attempt started); by default sessions stay on their machine."""

    @property
    def works(self) -> bool:
        return self.role in ("worker", "all")

    @property
    def merges(self) -> bool:
        return self.role in ("merger", "all")


class WorkerSeat:
    """This worker's story leases: claim within capacity, renew, release, notice a loss."""

    def __init__(
        self,
        app: StorylineApplication,
        options: ScaleOut,
        capacity: int,
        *,
        adopt: Callable[[str], None],
        reap: Callable[[Story, str], None],
        on_lost: Callable[[str], None],
        on_free: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self.options = options
        self.worker = options.worker_id
        self.capacity = capacity
        self.leases = StoryLeases(app, self.worker, ttl_secs=options.lease_ttl)
        self.registry = Workers(app)
        self._adopt = adopt
        self._reap = reap
        self._on_lost = on_lost
        self._on_free = on_free
        self._turned_away = False
        self._held: dict[str, int] = {}
        self._claiming: set[str] = set()
        """Story -> the generation this worker claimed it under (live in the table)."""
        self._lock = threading.Lock()
        self._renewed_at = time.monotonic()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._capacity_at = 0.0
        self._cluster_capacity = 0

    # ------------------------------------------------------------------ queries

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def _fresh(self) -> bool:
        # Renewals happen every third of the lease time; past two thirds without one, the
        # lease may be about to expire in the database's eyes: stop acting before it does.
        return time.monotonic() - self._renewed_at < self.options.lease_ttl * 2 / 3

    # ------------------------------------------------------------------ claiming

    def hold(self, story: Story) -> Story | None:
        """The story, if this worker holds it (claiming it now if it can); else None."""
        if story.stage not in WORKER_STAGES:
            return None
        with self._lock:
            mine = story.id in self._held and self._fresh()
            if mine and story.holder == self.worker:
                return story
            if not mine:
                # Steps run on a thread pool: the slot is taken before the database is
                # asked, or several steps could each see one free slot.
                if len(self._held) + len(self._claiming) >= self.capacity:
                    self._turned_away = True
                    return None
                if story.id in self._claiming:
                    return None
                self._claiming.add(story.id)
        held = None
        try:
            held = self._claim(story)
            return held
        finally:
            with self._lock:
                self._claiming.discard(story.id)
                # A claim lost to another worker gives its slot back: the stories turned
                # away while it was reserved are looked at again now, not at the next sweep.
                retry = held is None and self._turned_away
                if retry:
                    self._turned_away = False
            if retry:
                self._on_free()

    def _claim(self, story: Story) -> Story | None:
        claim = self.leases.claim(story.id, floor=story.holder_generation + 1)
        if claim is None:
            return None  # another worker's lease is live
        with self._lock:
            self._held[story.id] = claim.generation
        if story.holder == self.worker and story.holder_generation == claim.generation:
            return story  # claimed in the log already; the table lease was only renewed
        if claim.generation <= story.holder_generation:
            # The table is behind the log (restored from a backup?): the next claim's floor
            # is the log's generation + 1.
            self.release(story.id)
            return None
        previous = story.holder
        why = f"worker {self.worker} took the story under lease generation {claim.generation}" + (
            f"; {previous} no longer held it" if previous and previous != self.worker else ""
        )
        try:
            committed = self.app.transition(
                story.id,
                "claim",
                actor=f"runner:{self.worker}",
                reason=why,
                data={
                    "worker": self.worker,
                    "generation": claim.generation,
                    "drop_sessions": not self.options.shared_sessions,
                },
            )
        except (VersionConflict, IllegalTransition) as exc:
            logger.info("claim of story %s not recorded: %s", story.id, exc)
            self.release(story.id)
            return None
        story = committed.story
        if previous != self.worker:
            # Whatever this clone has of the story is older than the remote's branch.
            try:
                self._adopt(story.id)
            except GitError as exc:
                logger.warning("story %s: adopting the remote branch failed: %s", story.id, exc)
                self.release(story.id)
                return None
            if story.running_agent is not None:
                attempt = story.running_agent.get("attempt")
                self._reap(
                    story,
                    f"worker {previous or 'unknown'} stopped holding the story while attempt "
                    f"{attempt} ran (its lease expired); respawning on {self.worker}",
                )
                story = self.app.get_story(story.id)
        logger.info("story %s: claimed (generation %d)", story.id, claim.generation)
        return story

    def release(self, story_id: str) -> bool:
        """Give the story's lease back; True if this worker held it (a slot is free)."""
        with self._lock:
            had = self._held.pop(story_id, None)
        if had is None:
            return False
        try:
            self.leases.release(story_id)
        except Exception:
            logger.exception("could not release the lease of story %s", story_id)
        return True

    # ------------------------------------------------------------------ upkeep

    def renew(self) -> None:
        """Extend the live leases; a story whose lease was lost stops here at once."""
        with self._lock:
            # Only leases claimed before the renewal asked can be missing from its answer
            # (a claim commits before it is noted here).
            before = dict(self._held)
            if not before:
                self._renewed_at = time.monotonic()
                return
        still = self.leases.renew()
        with self._lock:
            lost = sorted(
                sid
                for sid, generation in before.items()
                if sid not in still and self._held.get(sid) == generation
            )
            for sid in lost:
                del self._held[sid]
            self._renewed_at = time.monotonic()
        for sid in lost:
            logger.warning("story %s: lease lost (expired); stopping work on it", sid)
            self._on_lost(sid)

    def cluster_capacity(self) -> int:
        """Stories all live workers can hold together (the global limit on how many
        stories the scheduler starts); read at most every couple of seconds."""
        now = time.monotonic()
        if now - self._capacity_at > 2.0:
            try:
                rows = self.registry.rows()
                self._cluster_capacity = sum(w.capacity for w in rows if w.alive)
            except Exception:
                logger.warning("could not read the worker registry", exc_info=True)
            self._capacity_at = now
        return max(self._cluster_capacity, self.capacity if self.options.works else 0)

    def heartbeat(self, *, merger: bool) -> None:
        self.registry.heartbeat(
            self.worker,
            role=self.options.role,
            capacity=self.capacity if self.options.works else 0,
            held=len(self.held()),
            merger=merger,
            remote=self.options.remote.url,
            ttl_secs=self.options.lease_ttl,
        )

    def start(self, merger: Callable[[], bool]) -> None:
        """Renew the leases and beat the heart every third of the lease time, on a thread
        of its own: the supervisor's loop may be slow (a catch-up, a loaded machine), and a
        lease must not lapse because of it."""
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._beat, args=(merger,), name="worker-heartbeat", daemon=True
        )
        self._thread.start()

    def _beat(self, merger: Callable[[], bool]) -> None:
        while not self._stopping.is_set():
            try:
                self.renew()
                self.heartbeat(merger=merger())
            except Exception:
                logger.warning("renewing this worker's leases failed", exc_info=True)
            self._stopping.wait(self.options.lease_ttl / 3)

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            self._held.clear()
        try:
            self.leases.release_all()
            self.registry.stopped(self.worker)
        except Exception:
            logger.exception("could not release this worker's leases")
