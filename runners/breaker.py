"""A circuit breaker per model provider: a provider outage stops spawns instead of burning runs.

After ``threshold`` consecutive ``provider_unavailable`` exits a provider's breaker opens:
no agent of it is spawned for ``min(base * 2^(k-1), cap)`` seconds (``k``: openings without
a close in between). Then it is half-open: one story gets the probe spawn; the probe's run
reaching the provider closes it, another provider failure opens it again with ``k + 1``.

The provider key is the ``[[agent]]`` name: it is the unit a spawn is made for and the name
an operator sees in events and ``/healthz``; two agents with different keys, models or
endpoints fail independently, and one that shares another's endpoint may still differ in
what the provider accepts (a key's rate limit, a model's capacity).

Openings and closings are recorded as events on a story (the coder reactions do that); a
restarted runner restores the last state from them (:meth:`restore`). An exit is counted
once: by the story and the time it was recorded, and only if it was recorded after the
breaker's last recorded change, so a restart neither forgets an open breaker nor counts
the exits that opened it a second time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

BreakerState = Literal["closed", "open", "half_open"]

MAX_OPEN_SECS = 300.0
"""The longest an open breaker stays open (5 min), however often it re-opened."""

PROBE_GRACE_SECS = 30.0
"""A probe granted to a story that has not started its agent yet is kept this long, so two
stories stepping at once do not both probe."""


@dataclass(frozen=True)
class Opening:
    provider: str
    consecutive_failures: int
    open_until: datetime
    opened_times: int


@dataclass
class _Breaker:
    failures: int = 0
    opened_times: int = 0
    open_until: float | None = None
    probe: str | None = None
    probe_granted: float = 0.0
    since: float = 0.0
    """When the last recorded change happened: exits recorded before it are not counted."""
    counted: set[tuple[str, float]] = field(default_factory=set)
    due_announced: bool = False
    opened_total: int = 0


class ProviderBreakers:
    def __init__(
        self,
        *,
        threshold: int,
        base_secs: float,
        max_secs: float = MAX_OPEN_SECS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if threshold < 1:
            raise ValueError("a breaker threshold is at least 1")
        self.threshold = threshold
        self.base_secs = base_secs
        self.max_secs = max_secs
        self.clock = clock
        self._breakers: dict[str, _Breaker] = {}
        self._lock = threading.Lock()

    def _get(self, provider: str) -> _Breaker:
        return self._breakers.setdefault(provider, _Breaker())

    def _state(self, b: _Breaker, now: float) -> BreakerState:
        if b.open_until is None:
            return "closed"
        return "open" if now < b.open_until else "half_open"

    def state(self, provider: str) -> BreakerState:
        with self._lock:
            return self._state(self._get(provider), self.clock())

    def backoff(self, opened_times: int) -> float:
        return float(min(self.base_secs * 2 ** (opened_times - 1), self.max_secs))

    # ------------------------------------------------------------------ spawns

    def allow(
        self, provider: str, story_id: str, running: Callable[[str], bool] = lambda _s: False
    ) -> bool:
        """May ``story_id`` spawn an agent of ``provider`` now? In half-open state only the
        story holding the probe may (the first to ask gets it; a holder whose agent is not
        running after the grace period loses it)."""
        with self._lock:
            b = self._get(provider)
            now = self.clock()
            state = self._state(b, now)
            if state == "closed":
                return True
            if state == "open":
                return False
            if b.probe == story_id:
                return True
            held = b.probe is not None and (
                running(b.probe) or now - b.probe_granted < PROBE_GRACE_SECS
            )
            if held:
                return False
            b.probe, b.probe_granted = story_id, now
            return True

    def release_probe(self, provider: str, story_id: str) -> None:
        """The probe's spawn did not happen (no free slot, the story moved)."""
        with self._lock:
            b = self._get(provider)
            if b.probe == story_id:
                b.probe = None

    # ------------------------------------------------------------------ exits

    def _fresh(self, b: _Breaker, story_id: str, exit_at: float) -> bool:
        key = (story_id, exit_at)
        if exit_at <= b.since or key in b.counted:
            return False
        b.counted.add(key)
        if len(b.counted) > 10_000:
            b.counted = {k for k in b.counted if k[1] > b.since}
        return True

    def failure(self, provider: str, story_id: str, exit_at: float) -> Opening | None:
        """A ``provider_unavailable`` exit; the opening to record when it opens the breaker."""
        with self._lock:
            b = self._get(provider)
            if not self._fresh(b, story_id, exit_at):
                return None
            now = self.clock()
            state = self._state(b, now)
            if state == "open":
                return None  # a run spawned before the opening: the outage is known
            if state == "closed":
                b.failures += 1
                if b.failures < self.threshold:
                    return None
            else:
                b.failures += 1  # half-open: the probe (or a late run) met the outage again
            b.opened_times += 1
            b.open_until = now + self.backoff(b.opened_times)
            b.probe = None
            b.due_announced = False
            b.opened_total += 1
            return Opening(
                provider=provider,
                consecutive_failures=b.failures,
                open_until=datetime.fromtimestamp(b.open_until, UTC),
                opened_times=b.opened_times,
            )

    def success(self, provider: str, story_id: str, exit_at: float) -> bool:
        """A run that reached the provider; True when it was the probe and closed the breaker."""
        with self._lock:
            b = self._get(provider)
            if not self._fresh(b, story_id, exit_at):
                return False
            state = self._state(b, self.clock())
            if state == "closed":
                b.failures = 0
                return False
            if state == "half_open" and b.probe == story_id:
                self._close(b)
                return True
            return False

    def inconclusive(self, provider: str, story_id: str, exit_at: float) -> None:
        """A run that says nothing about the provider (lost, crashed before a session): a
        probe that ended so gives the probe to whichever story asks next."""
        with self._lock:
            b = self._get(provider)
            if self._fresh(b, story_id, exit_at) and b.probe == story_id:
                b.probe = None

    def _close(self, b: _Breaker) -> None:
        b.failures = 0
        b.opened_times = 0
        b.open_until = None
        b.probe = None

    # ------------------------------------------------------------------ the log

    def recorded(self, provider: str, at: datetime) -> None:
        """The change just made was recorded at ``at``: exits before it are not counted
        again, and reading the event back from the log changes nothing."""
        with self._lock:
            b = self._get(provider)
            b.since = max(b.since, at.timestamp())

    def restore(self, event_type: str, data: dict[str, Any], at: datetime) -> None:
        """Fold a ``ProviderBreakerOpened``/``Closed`` event read from the log (at start-up,
        or written by a runner that held the lease before this one)."""
        provider = str(data.get("provider") or "")
        if not provider:
            return
        with self._lock:
            b = self._get(provider)
            stamp = at.timestamp()
            if stamp <= b.since:
                return  # this runner recorded it, or something newer is known
            b.since = stamp
            if event_type == "ProviderBreakerClosed":
                self._close(b)
                return
            until = data.get("open_until")
            if isinstance(until, str):
                until_at = datetime.fromisoformat(until)
            elif isinstance(until, datetime):
                until_at = until
            else:
                return
            b.failures = int(data.get("consecutive_failures") or self.threshold)
            b.opened_times = int(data.get("opened_times") or 1)
            b.open_until = until_at.timestamp()
            b.probe = None
            b.due_announced = False

    # ------------------------------------------------------------------ timers and views

    def take_due(self) -> bool:
        """True once per opening, when its back-off has ended (the waiting stories must be
        looked at again: nothing else would wake them)."""
        with self._lock:
            now = self.clock()
            due = False
            for b in self._breakers.values():
                if b.open_until is not None and now >= b.open_until and not b.due_announced:
                    b.due_announced = True
                    due = True
            return due

    def seconds_until_due(self) -> float | None:
        with self._lock:
            now = self.clock()
            waits = [
                b.open_until - now
                for b in self._breakers.values()
                if b.open_until is not None and not b.due_announced
            ]
        return max(0.0, min(waits)) if waits else None

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            now = self.clock()
            return [
                {
                    "provider": name,
                    "state": self._state(b, now),
                    "open_until": datetime.fromtimestamp(b.open_until, UTC).isoformat()
                    if b.open_until is not None
                    else None,
                    "failures": b.failures,
                    "opened_times": b.opened_times,
                    "opened_total": b.opened_total,
                }
                for name, b in sorted(self._breakers.items())
            ]
