"""The provider breaker's state machine, on an injected clock (no sleeps)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from runners.breaker import PROBE_GRACE_SECS, ProviderBreakers


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breakers(clock: Clock) -> ProviderBreakers:
    return ProviderBreakers(threshold=3, base_secs=10.0, clock=clock)


def fail(b: ProviderBreakers, clock: Clock, story: str = "s1") -> object:
    clock.now += 1
    return b.failure("claude", story, clock.now)


def test_three_consecutive_failures_open_and_block_spawns(
    breakers: ProviderBreakers, clock: Clock
) -> None:
    assert fail(breakers, clock) is None
    assert fail(breakers, clock, "s2") is None
    assert breakers.allow("claude", "s3")
    opening = fail(breakers, clock)
    assert opening is not None
    assert (opening.consecutive_failures, opening.opened_times) == (3, 1)  # type: ignore[attr-defined]
    assert opening.open_until == at(clock.now + 10)  # type: ignore[attr-defined]
    assert breakers.state("claude") == "open"
    assert not breakers.allow("claude", "s1") and not breakers.allow("claude", "s3")
    assert breakers.allow("other-agent", "s1")  # per provider
    clock.now += 9.9
    assert not breakers.allow("claude", "s1")
    assert breakers.seconds_until_due() == pytest.approx(0.1)
    assert not breakers.take_due()


def test_a_success_in_between_resets_the_count(breakers: ProviderBreakers, clock: Clock) -> None:
    fail(breakers, clock)
    fail(breakers, clock)
    clock.now += 1
    assert not breakers.success("claude", "s2", clock.now)
    assert fail(breakers, clock) is None
    assert fail(breakers, clock) is None
    assert fail(breakers, clock) is not None


def test_one_exit_counts_once(breakers: ProviderBreakers, clock: Clock) -> None:
    clock.now += 1
    for _ in range(5):  # the same exit seen by every step of a waiting story
        assert breakers.failure("claude", "s1", clock.now) is None
    assert breakers.snapshot()[0]["failures"] == 1


def test_half_open_gives_one_probe_and_its_success_closes(
    breakers: ProviderBreakers, clock: Clock
) -> None:
    for _ in range(3):
        fail(breakers, clock)
    clock.now += 10
    assert breakers.take_due() and not breakers.take_due()  # announced once
    assert breakers.state("claude") == "half_open"
    assert breakers.allow("claude", "s2")  # the first to ask probes
    assert not breakers.allow("claude", "s1")
    assert breakers.allow("claude", "s2")
    clock.now += 5
    assert not breakers.success("claude", "s1", clock.now)  # not the probe
    assert breakers.state("claude") == "half_open"
    clock.now += 5
    assert breakers.success("claude", "s2", clock.now)
    assert breakers.state("claude") == "closed"
    assert breakers.allow("claude", "s1")
    # Closed again: k starts over, the next opening waits the base back-off.
    for _ in range(3):
        opening = fail(breakers, clock)
    assert opening is not None and opening.opened_times == 1  # type: ignore[attr-defined]


def test_a_failed_probe_reopens_with_doubled_backoff_up_to_five_minutes(
    breakers: ProviderBreakers, clock: Clock
) -> None:
    for _ in range(3):
        fail(breakers, clock)
    waits = [10.0]
    for k in range(2, 8):
        clock.now += 400
        assert breakers.allow("claude", "s1")
        opening = fail(breakers, clock)
        assert opening is not None
        assert opening.opened_times == k  # type: ignore[attr-defined]
        waits.append(opening.open_until.timestamp() - clock.now)  # type: ignore[attr-defined]
    assert waits == [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert breakers.snapshot()[0]["opened_total"] == 7


def test_a_probe_that_never_started_is_given_to_another_story(
    breakers: ProviderBreakers, clock: Clock
) -> None:
    for _ in range(3):
        fail(breakers, clock)
    clock.now += 10
    assert breakers.allow("claude", "s1", running=lambda s: False)
    assert not breakers.allow("claude", "s2", running=lambda s: False)
    clock.now += PROBE_GRACE_SECS
    assert not breakers.allow("claude", "s2", running=lambda s: s == "s1")  # s1 still runs
    assert breakers.allow("claude", "s2", running=lambda s: False)
    breakers.release_probe("claude", "s2")
    assert breakers.allow("claude", "s3")


def test_an_inconclusive_probe_exit_frees_the_probe(
    breakers: ProviderBreakers, clock: Clock
) -> None:
    for _ in range(3):
        fail(breakers, clock)
    clock.now += 10
    assert breakers.allow("claude", "s1")
    clock.now += 1
    breakers.inconclusive("claude", "s1", clock.now)
    assert breakers.state("claude") == "half_open"
    assert breakers.allow("claude", "s2")


def test_restore_from_the_log_neither_forgets_nor_double_opens(clock: Clock) -> None:
    first = ProviderBreakers(threshold=3, base_secs=10.0, clock=clock)
    exits = []
    for story in ("s1", "s2", "s3"):
        clock.now += 1
        exits.append((story, clock.now))
        opening = first.failure("claude", story, clock.now)
    assert opening is not None
    clock.now += 0.5
    recorded_at = at(clock.now)
    first.recorded("claude", recorded_at)
    data = {
        "provider": "claude",
        "consecutive_failures": 3,
        "open_until": opening.open_until.isoformat(),
        "opened_times": 1,
    }
    first.restore("ProviderBreakerOpened", data, recorded_at)  # its own event: no change
    assert first.snapshot()[0]["opened_total"] == 1

    # A restarted runner: the event restores the open breaker.
    clock.now += 2
    second = ProviderBreakers(threshold=3, base_secs=10.0, clock=clock)
    second.restore("ProviderBreakerOpened", data, recorded_at)
    assert second.state("claude") == "open"
    assert not second.allow("claude", "s4")
    # After the back-off, the waiting stories' exits (recorded before the opening) are not
    # counted again; only the probe decides.
    clock.now += 10
    for story, exit_at in exits:
        assert second.failure("claude", story, exit_at) is None
    assert second.state("claude") == "half_open"
    assert second.allow("claude", "s1")
    clock.now += 3
    assert second.success("claude", "s1", clock.now)
    closed_at = at(clock.now + 0.1)
    second.recorded("claude", closed_at)

    # Another restart: the close wins over the earlier opening, and the old exits stay
    # counted out.
    third = ProviderBreakers(threshold=3, base_secs=10.0, clock=clock)
    third.restore("ProviderBreakerOpened", data, recorded_at)
    third.restore("ProviderBreakerClosed", {"provider": "claude"}, closed_at)
    assert third.state("claude") == "closed"
    for story, exit_at in exits:
        assert third.failure("claude", story, exit_at) is None
    assert third.snapshot()[0]["failures"] == 0


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ProviderBreakers(threshold=0, base_secs=1.0)
