"""The runner lease: one holder at a time, taken over only after it lapses."""

from __future__ import annotations

import time

from runners.lease import Lease
from service.application import StorylineApplication


def test_one_holder_until_the_lease_lapses(app: StorylineApplication) -> None:
    first = Lease(app, holder="runner-a", ttl_secs=0.6)
    second = Lease(app, holder="runner-b", ttl_secs=0.6)
    assert first.acquire()
    assert not second.acquire()
    assert second.current_holder() == "runner-a"
    assert first.acquire()  # renewing is fine
    time.sleep(0.7)  # runner-a stopped renewing (crashed)
    assert second.acquire()
    assert not first.acquire()
    assert first.current_holder() == "runner-b"


def test_release_hands_over_at_once(app: StorylineApplication) -> None:
    first = Lease(app, holder="runner-a", ttl_secs=60)
    second = Lease(app, holder="runner-b", ttl_secs=60)
    assert first.acquire()
    first.release()
    assert not first.held
    assert second.acquire()
    assert second.ensure()
