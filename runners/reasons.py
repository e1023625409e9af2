"""Machine text made fit for an event's reason.

Runners quote what git, a gate or an agent said when they block a story. A reason is text
for people: the domain refuses NUL in every reason and any control character other than a
newline or a tab in a required one (``domain.story``). A CLI's coloured error line or a
tool's carriage return would otherwise make the block itself fail, and the story would
stay where it was with nobody told why.
"""

from __future__ import annotations

import re

from domain.story import MAX_REASON

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def readable(text: str, limit: int = MAX_REASON) -> str:
    """``text`` without terminal escapes, other control characters shown as U+FFFD, at
    most ``limit`` characters (the end is kept: that is where an error usually is)."""
    cleaned = _ANSI.sub("", text).replace("\r\n", "\n")
    cleaned = _CONTROL.sub("\ufffd", cleaned)
    if len(cleaned) > limit:
        cleaned = "…" + cleaned[-(limit - 1) :]
    return cleaned
