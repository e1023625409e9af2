"""Machine text quoted in a block reason never makes the block itself fail."""

from __future__ import annotations

from domain.stages import Stage
from domain.story import MAX_REASON, Story
from runners.reasons import readable

COLOURED = "\x1b[31merror:\x1b[0m cannot lock ref\r\nfatal: bad\x07 object\x00"


def new_story() -> Story:
    return Story.create(
        story_id="s1",
        name="n",
        description="d",
        acceptance_criteria=["a"],
        depends_on=[],
        epic=None,
        priority=0,
        actor="user:test",
        reason=None,
    )


def test_a_coloured_git_error_is_a_valid_block_reason() -> None:
    story = new_story()
    story.start_coding(actor="user:test", reason=None, dependency_stages={})
    reason = readable(COLOURED)
    assert reason == "error: cannot lock ref\nfatal: bad\ufffd object\ufffd"
    story.block(actor="runner:coder", reason=reason)
    assert story.stage is Stage.BLOCKED


def test_a_long_text_keeps_its_end() -> None:
    text = "x" * (MAX_REASON * 2) + "the error"
    cut = readable(text)
    assert len(cut) == MAX_REASON and cut.endswith("the error") and cut.startswith("…")
