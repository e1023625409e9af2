"""Parameter types shared by the routers: integers in queries and paths as plain digits.

Pydantic's lax integer parsing accepts " 12 ", "1_2", "+12" and "12.0" from a query
string; a client sending those has a bug worth telling it about, and a log position or a
limit is written with the ASCII digits only. (``str.isdigit`` is no test: it is true for
"²", which ``int`` refuses.)
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_DIGITS = re.compile(r"[0-9]{1,19}")


def ascii_digits(value: object) -> object:
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("must be a whole number written with the digits 0-9 only")
    return value


Digits = BeforeValidator(ascii_digits)
"""Put in ``Annotated[int, Digits, Query(...)]``; the bounds stay in ``Query``."""

Position = Annotated[int, Digits]


def is_position(text: str, max_digits: int = 18) -> bool:
    """``text`` is a log position written with 1 to ``max_digits`` ASCII digits."""
    return 0 < len(text) <= max_digits and _DIGITS.fullmatch(text) is not None


__all__ = ["Digits", "Position", "ascii_digits", "is_position"]
