"""The OpenAPI patterns say exactly what the domain accepts, under every regex engine a
client may use: Python's ``re`` (full match), Rust's (pydantic; search semantics, like JSON
Schema) and, by construction, ECMA (no look-arounds, ``$`` only at the very end)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import Field, TypeAdapter, ValidationError

from api.schemas import CRITERION_PATTERN, LINE_PATTERN, NAME_PATTERN, TEXT_PATTERN
from domain.errors import DomainError
from domain.ids import STORY_ID_MAX, STORY_ID_PATTERN, validate_story_id
from domain.story import Story

# Characters near every rule's edge: the id alphabet, dots, "lock", white space Python's
# strip() removes and JSON Schema's \s does not (and the reverse), control characters.
EDGES = "aAzZ09_-.lockLOCK \t\n\r\x0b\x0c\x1c\x1f\x00\x07\x7f\x85\xa0\u2028\u3000\ufeff\u200bé/"
texts = st.text(alphabet=EDGES, max_size=70) | st.text(max_size=20)


def python_says(pattern: str) -> Callable[[str], bool]:
    compiled = re.compile(pattern)
    return lambda value: compiled.fullmatch(value) is not None


def rust_says(pattern: str) -> Callable[[str], bool]:
    adapter = TypeAdapter(Annotated[str, Field(pattern=pattern)])

    def accepts(value: str) -> bool:
        try:
            adapter.validate_python(value)
        except ValidationError:
            return False
        return True

    return accepts


def domain_accepts(check: Callable[[str], object]) -> Callable[[str], bool]:
    def accepts(value: str) -> bool:
        try:
            check(value)
        except DomainError:
            return False
        return True

    return accepts


def create(**fields: object) -> None:
    values: dict[str, object] = {
        "story_id": "s",
        "name": "n",
        "description": "",
        "acceptance_criteria": ["a"],
        "depends_on": [],
        "actor": "user:t",
    }
    values.update(fields)
    Story.create(**values)  # type: ignore[arg-type]


RULES: dict[str, tuple[str, Callable[[str], object], int]] = {
    "story id": (STORY_ID_PATTERN, validate_story_id, STORY_ID_MAX),
    "name": (NAME_PATTERN, lambda v: create(name=v), 200),
    "criterion": (CRITERION_PATTERN, lambda v: create(acceptance_criteria=[v]), 20_000),
    "description": (TEXT_PATTERN, lambda v: create(description=v), 20_000),
    "epic": (LINE_PATTERN, lambda v: create(epic=v), 200),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_pattern_equals_the_domain_rule(rule: str) -> None:
    pattern, check, max_length = RULES[rule]
    python, rust, domain = python_says(pattern), rust_says(pattern), domain_accepts(check)

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(value=texts)
    @example(value="nlid\n")
    @example(value="a.lock")
    @example(value="a.loc")
    @example(value="a..b")
    @example(value=" ")
    @example(value="\u3000x")
    @example(value="x\r")
    def agree(value: str) -> None:
        schema = len(value) <= max_length and python(value)
        assert schema == rust(value), value
        assert schema == domain(value), value

    agree()
