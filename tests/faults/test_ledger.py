"""The fault suite's ledger finds each kind of harm it is there to count (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

from service.events_log import LoggedEvent
from tests.faults.support import Command, reconcile


def event(position: int, story_id: str, version: int, reason: str | None) -> LoggedEvent:
    return LoggedEvent(
        position,
        story_id,
        version,
        "StoryBlocked",
        "t",
        datetime.now(UTC),
        "user:t",
        reason,
        None,
        None,
        {},
    )


def acked(key: str, story_id: str, version: int, position: int) -> Command:
    answer = {"id": story_id, "version": version, "position": position}
    return Command(key, "block", story_id, answer=answer)


def test_a_clean_run_balances() -> None:
    ledger = reconcile(
        [acked("a", "1", 1, 1), acked("b", "1", 2, 2)],
        [
            event(1, "1", 1, "a"),
            event(2, "1", 2, "b"),
        ],
    )
    assert (ledger.commands, ledger.acknowledged, ledger.logged) == (2, 2, 2)
    assert (ledger.lost, ledger.duplicated, ledger.disagreeing, ledger.foreign) == (0, 0, 0, 0)


def test_lost_duplicated_disagreeing_and_foreign_events_are_counted() -> None:
    commands = [
        acked("lost", "1", 1, 1),
        acked("twice", "2", 1, 2),
        acked("told-7", "7", 1, 4),  # a second story was created; the client heard of the other
        Command("never-acked", "block", "3"),
    ]
    events = [
        event(2, "2", 1, "twice"),
        event(3, "2", 2, "twice"),
        event(4, "6", 1, "told-7"),
        event(5, "3", 1, "never-acked"),
        event(6, "9", 1, "nobody's"),
    ]
    ledger = reconcile(commands, events)
    assert ledger.lost == 1
    assert ledger.duplicated == 1
    assert ledger.disagreeing == 1
    assert ledger.unresolved == 1 and ledger.unacknowledged_logged == 1
    assert ledger.foreign == 1
