"""The event store marks an idempotency key in the event's own transaction (both backends).

A command saved with an :class:`IdempotencyMark` writes the story and the event's log
position onto the key's row as the event commits; a save that fails (a lost race) marks
nothing, because the mark rolls back with the insert. This is what lets a retry after a
crash rebuild the first answer (``service.idempotency``, ``Claim("committed")``).
"""

from __future__ import annotations

from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError

from service.application import StorylineApplication
from service.idempotency import MARK_KWARG, ClaimLost, IdempotencyMark, IdempotencyStore
from service.settings import Database
from service.sqlstore import SqlStore

ACTOR = "user:ann"


def key_row(app: StorylineApplication, key: str) -> dict[str, Any]:
    rows = SqlStore(app).query(
        "SELECT story_id, committed_position, status_code FROM storyline_idempotency "
        "WHERE actor = ? AND idem_key = ?",
        (ACTOR, key),
    )
    return dict(rows[0])


def test_a_saved_command_marks_its_key_with_the_events_position(database: Database) -> None:
    app = StorylineApplication(database)
    try:
        store = IdempotencyStore(app)
        assert store.claim(ACTOR, "create", "fp-create").state == "claimed"
        created = app.create_story(
            name="n",
            description="d",
            acceptance_criteria=["a"],
            actor=ACTOR,
            idempotency=IdempotencyMark(ACTOR, "create"),
        )
        row = key_row(app, "create")
        assert row["story_id"] == created.story.id
        assert row["committed_position"] == created.position
        assert row["status_code"] is None  # the answer is the API's second write

        assert store.claim(ACTOR, "move", "fp-move").state == "claimed"
        moved = app.transition(
            created.story.id,
            "start_coding",
            actor=ACTOR,
            idempotency=IdempotencyMark(ACTOR, "move"),
        )
        assert key_row(app, "move")["committed_position"] == moved.position

        claim = store.claim(ACTOR, "move", "fp-move")  # within the lease too
        assert (claim.state, claim.story_id, claim.position) == (
            "committed",
            created.story.id,
            moved.position,
        )
        store.release(ACTOR, "move")  # a failure after the commit must not forget the mark
        assert store.claim(ACTOR, "move", "fp-move").state == "committed"
    finally:
        app.close()


def test_a_save_that_loses_a_race_leaves_its_key_unmarked(database: Database) -> None:
    setup = StorylineApplication(database)
    sid = setup.create_story(
        name="n", description="d", acceptance_criteria=["a"], actor=ACTOR
    ).story.id
    setup.close()
    winner, loser = StorylineApplication(database), StorylineApplication(database)
    try:
        store = IdempotencyStore(winner)
        for key in ("win", "lose"):
            assert store.claim(ACTOR, key, f"fp-{key}").state == "claimed"
        stale = loser.get_story(sid)  # version 1, read before the winner commits
        winner.transition(
            sid, "block", actor=ACTOR, reason="r", idempotency=IdempotencyMark(ACTOR, "win")
        )
        stale.block(actor=ACTOR, reason="r")
        # The insert of version 2 fails on the winner's row: the same transaction's mark
        # must be gone with it.
        with pytest.raises(IntegrityError):
            loser.save(stale, **{MARK_KWARG: IdempotencyMark(ACTOR, "lose")})
        assert key_row(winner, "win")["committed_position"] is not None
        assert key_row(winner, "lose")["committed_position"] is None
        assert [e.type for e in winner.history(sid)] == ["StoryCreated", "StoryBlocked"]
    finally:
        winner.close()
        loser.close()


def test_a_claim_taken_over_from_a_dead_owner_is_not_marked_by_it(database: Database) -> None:
    """The first owner's lock is gone (as when its server dies): another store takes the
    claim over at once, and a late commit under the first owner's mark no longer marks it."""
    app = StorylineApplication(database)
    try:
        first, second = IdempotencyStore(app), IdempotencyStore(app)
        claim = first.claim(ACTOR, "k", "fp")
        assert claim.state == "claimed" and claim.owner is not None
        assert second.claim(ACTOR, "k", "fp").state == "in_progress"  # its owner is alive
        first.close()
        taken = second.claim(ACTOR, "k", "fp")
        assert taken.state == "claimed" and taken.owner not in (None, claim.owner)
        # The first owner's late command is fenced off: it rolls back instead of running
        # beside the new owner's.
        with pytest.raises(ClaimLost):
            app.create_story(
                name="n",
                description="d",
                acceptance_criteria=["a"],
                actor=ACTOR,
                idempotency=IdempotencyMark(ACTOR, "k", claim.owner),
            )
        assert key_row(app, "k")["committed_position"] is None
        assert app.story_ids() == []
        first.release(ACTOR, "k", claim.owner)  # nor can it forget the new owner's claim
        assert second.claim(ACTOR, "k", "fp", seen=True).state == "in_progress"
    finally:
        app.close()
