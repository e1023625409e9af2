"""``service.events_log.decode``: a stored event as the read side sees it, without pydantic."""

from __future__ import annotations

from domain.commands import Policy, apply_named
from domain.story import Story
from service.codec import OrjsonTranscoder, PydanticMapper
from service.events_log import decode

MAPPER = PydanticMapper(transcoder=OrjsonTranscoder())


def story_events() -> list[object]:
    story = Story.create(
        story_id="s-1",
        name="decode me",
        description="d",
        acceptance_criteria=["a"],
        depends_on=[],
        actor="user:ann",
    )
    apply_named(
        story, "block", actor="user:bob", reason="waiting on review", data=None, policy=Policy()
    )
    return list(story.collect_events())


def test_decode_lifts_the_common_fields_out_of_the_payload() -> None:
    created, blocked = story_events()
    stored = [MAPPER.to_stored_event(e) for e in (created, blocked)]  # type: ignore[arg-type]
    first = decode(7, "s-1", 1, stored[0].topic, stored[0].state)
    # The recorder hands out memoryviews on some paths: decoded the same, without a copy.
    second = decode(8, "s-1", 2, stored[1].topic, memoryview(stored[1].state))

    assert (first.position, first.story_id, first.version, first.type) == (
        7,
        "s-1",
        1,
        "StoryCreated",
    )
    assert first.actor == "user:ann" and first.to_stage == "backlog"
    assert first.data["name"] == "decode me"
    assert (second.type, second.actor, second.reason) == (
        "StoryBlocked",
        "user:bob",
        "waiting on review",
    )
    assert (second.from_stage, second.to_stage) == ("backlog", "blocked")
    assert second.timestamp == blocked.timestamp  # type: ignore[attr-defined]
    for event in (first, second):
        assert not {"timestamp", "actor", "reason", "from_stage", "to_stage"} & event.data.keys()
        assert "originator_topic" not in event.data and "class_version" not in event.data
    assert second.as_json()["reason"] == "waiting on review"


def test_an_unknown_topic_still_decodes_with_a_readable_type() -> None:
    created, _ = story_events()
    stored = MAPPER.to_stored_event(created)  # type: ignore[arg-type]
    event = decode(1, "s-1", 1, "storyline.SomethingNew.v1", stored.state)
    assert event.type == "SomethingNew"
    assert event.actor == "user:ann"
