"""Parameter types shared by the routers: integers in queries and paths as plain digits.

Pydantic's lax integer parsing accepts " 12 ", "1_2", "+12" and "12.0" from a query
string; a client sending those has a bug worth telling it about, and a log position or a
limit is written with the ASCII digits only. (``str.isdigit`` is no test: it is true for
"²", which ``int`` refuses.)
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Path
from pydantic import BeforeValidator

from domain.ids import STORY_ID_MAX, STORY_ID_PATTERN

_DIGITS = re.compile(r"[0-9]{1,19}")


def ascii_digits(value: object) -> object:
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("must be a whole number written with the digits 0-9 only")
    return value


Digits = BeforeValidator(ascii_digits)
"""Put after the parameter: ``Annotated[int, Query(ge=0), Digits]`` (before it, FastAPI
writes the bounds into the schema as "ge"/"le" instead of "minimum"/"maximum")."""

Position = Annotated[int, Digits]


StoryIdPath = Annotated[
    str,
    Path(
        description="A story id: letters, digits, '.', '_', '-'; see the pattern.",
        # Documented, not enforced here: the domain refuses a bad id as 422 invalid_story_id.
        json_schema_extra={"pattern": STORY_ID_PATTERN, "maxLength": STORY_ID_MAX},
    ),
]


def is_position(text: str, max_digits: int = 18) -> bool:
    """``text`` is a log position written with 1 to ``max_digits`` ASCII digits."""
    return 0 < len(text) <= max_digits and _DIGITS.fullmatch(text) is not None


__all__ = ["Digits", "Position", "StoryIdPath", "ascii_digits", "is_position"]
