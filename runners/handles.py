"""The running attempts of one launcher: who runs, stopping one, stopping all at shutdown.

Shared by the story launcher (coders, mergemasters) and the planner launcher (epics), whose
attempts differ in what they record but not in how they are held and stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from eventsourcing.persistence import InterfaceError, OperationalError

from domain.errors import DomainError, VersionConflict
from runners.agents import RunningAgent

logger = logging.getLogger(__name__)


def exit_reason(reason: str | None) -> str | None:
    """An attempt's own words as an exit reason: bounded, and no NUL (a reason may hold none)."""
    return (reason or None) and reason[:2000].replace("\x00", "\ufffd")


class Stoppable(Protocol):
    running: RunningAgent
    stop_reason: str | None


H = TypeVar("H", bound=Stoppable)


class Handles(Generic[H]):
    """Attempts by key (a story or an epic id), thread-safe."""

    def __init__(self) -> None:
        self._handles: dict[str, H] = {}
        self._lock = threading.Lock()
        self.closing = threading.Event()
        """Set by :meth:`stop_all`: exits not recorded by now wait for the next runner."""

    def get(self, key: str) -> H | None:
        with self._lock:
            return self._handles.get(key)

    def items(self, keep: Callable[[H], bool] = lambda _h: True) -> list[tuple[str, H]]:
        with self._lock:
            return [(key, h) for key, h in self._handles.items() if keep(h)]

    def put(self, key: str, handle: H) -> None:
        with self._lock:
            self._handles[key] = handle

    def discard(self, key: str, handle: H) -> None:
        """Forget ``handle`` if it is still the one held for ``key``."""
        with self._lock:
            if self._handles.get(key) is handle:
                del self._handles[key]

    def stop(self, key: str, why: str) -> None:
        """Kill the attempt (its whole process group); its exit is recorded as usual."""
        handle = self.get(key)
        if handle is not None:
            handle.stop_reason = why
            handle.running.kill()

    def stop_all(self, why: str, wait_secs: float = 10.0) -> None:
        self.closing.set()
        for _key, handle in self.items():
            handle.stop_reason = why
            handle.running.kill()
        deadline = time.monotonic() + wait_secs
        while time.monotonic() < deadline:
            if not self.items():
                return
            time.sleep(0.05)

    def record_exit(self, record: Callable[[], object], what: str) -> bool:
        """Record an attempt's exit; False if it could not be before shutdown.

        A concurrent writer (the agent's own API call) is retried at once; a database
        outage is waited out, since an exit left unrecorded would leave the attempt
        "running" in this process until it restarts (the pid file then tells the next one).
        """
        conflicts = 0
        pause = 0.5
        while conflicts < 20:
            try:
                record()
                return True
            except VersionConflict:
                conflicts += 1
                time.sleep(0.01)
            except DomainError:
                logger.exception("could not record %s", what)
                return True
            except (InterfaceError, OperationalError) as exc:
                if self.closing.is_set():
                    return False
                logger.warning("%s waits for the database: %s", what, exc)
                self.closing.wait(pause)
                pause = min(pause * 2, 5.0)
        return True
