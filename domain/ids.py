"""Validation of identifiers that end up in paths, branch names and URLs."""

from __future__ import annotations

import re

from domain.errors import InvalidStoryId

STORY_ID_MAX = 64
_STORY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

_PART = "[A-Za-z0-9_-]"
_NOT_LOCK = (
    f"{_PART}{{1,3}}|{_PART}{{5,}}|[A-Za-km-z0-9_-]{_PART}{{3}}|l[A-Za-np-z0-9_-]{_PART}{{2}}"
    f"|lo[A-Zabd-z0-9_-]{_PART}|loc[A-Za-jl-z0-9_-]"
)
STORY_ID_PATTERN = rf"^[A-Za-z0-9]{_PART}*(?:(?:\.{_PART}+)*\.(?:{_NOT_LOCK}))?$"
""":func:`validate_story_id` as one regular expression (with ``maxLength`` 64), for the
OpenAPI schema: no look-arounds, so JSON Schema (ECMA), Rust and Python engines agree. Dots
only between non-empty parts (no "..", no final "."), and the last part is not "lock"."""
_BRANCH_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def validate_story_id(value: object) -> str:
    """Return ``value`` if it is a safe story id, else raise :class:`InvalidStoryId`.

    A story id becomes a directory name (``.storyline/worktrees/<id>``), part of a branch
    name (``feature/story-<id>``) and a URL path segment, so only a conservative alphabet is
    accepted: letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, no
    ``..``, at most 64 characters, and not ending in ``.lock`` or ``.``.
    """
    if not isinstance(value, str):
        raise InvalidStoryId(repr(value), "a story id must be a string")
    shown = value if len(value) <= STORY_ID_MAX else value[:STORY_ID_MAX] + "..."
    shown = shown.encode("unicode_escape").decode("ascii")
    if not value:
        raise InvalidStoryId(shown, "a story id must not be empty")
    if len(value) > STORY_ID_MAX:
        raise InvalidStoryId(shown, f"a story id is at most {STORY_ID_MAX} characters")
    # fullmatch: with match() and "$", "nlid\n" passed (the "$" matches before a final
    # newline) and broke the Location header and the branch name.
    if not _STORY_ID.fullmatch(value):
        raise InvalidStoryId(
            shown,
            "a story id may hold only letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit",
        )
    if ".." in value or value.endswith(".") or value.endswith(".lock"):
        raise InvalidStoryId(shown, "a story id must not contain '..' or end in '.' or '.lock'")
    return value


def validate_branch_name(value: str) -> str:
    """Reject branch names git would refuse or that could be read as options."""
    if (
        not value
        or value.startswith("-")
        or value.startswith("/")
        or value.endswith("/")
        or value.endswith(".lock")
        or value.endswith(".")
        or ".." in value
        or "//" in value
        or "@{" in value
        or _BRANCH_FORBIDDEN.search(value)
    ):
        raise ValueError(f"not a valid git branch name: {value!r}")
    return value


def feature_branch(story_id: str) -> str:
    return f"feature/story-{validate_story_id(story_id)}"


EPIC_ID_PATTERN = r"^epic-[1-9][0-9]{0,17}$"
_EPIC_ID = re.compile(r"epic-[1-9][0-9]{0,17}")


def is_epic_id(value: str) -> bool:
    """Whether ``value`` names an epic (``epic-<n>``).

    Epics and stories share one event log (so that an epic and the stories it farms out are
    saved in one transaction); this is how a reader of the log tells them apart without
    decoding. Story ids of this form are refused (see ``Story.create``)."""
    return bool(_EPIC_ID.fullmatch(value))


def validate_epic_id(value: object) -> str:
    if not isinstance(value, str) or not is_epic_id(value):
        shown = repr(value)[:80]
        raise InvalidStoryId(shown, "an epic id is 'epic-' followed by a number, e.g. epic-3")
    return value


def integration_branch(epic_id: str) -> str:
    """The branch an epic's stories merge into before the epic lands on the base branch."""
    return f"epic/{validate_epic_id(epic_id)}"
