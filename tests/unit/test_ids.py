"""Identifiers that become paths, branch names and headers: the whole value must match."""

from __future__ import annotations

import pytest

from api.auth import StaticTokens, TokenError
from domain.errors import InvalidStoryId
from domain.ids import feature_branch, validate_branch_name, validate_story_id
from runners.git_base import GitError, check_object_name


@pytest.mark.parametrize("good", ["1", "add", "a.b_c-d", "A" * 64])
def test_safe_story_ids_pass(good: str) -> None:
    assert validate_story_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["nlid\n", "nlid\r\n", "a\nb", "\nx", "x\x00", "x\u2028", "", "a b", "-x", ".x", "x.lock"],
)
def test_story_ids_with_line_breaks_or_other_characters_are_refused(bad: str) -> None:
    with pytest.raises(InvalidStoryId):
        validate_story_id(bad)
    with pytest.raises(InvalidStoryId):
        feature_branch(bad)


@pytest.mark.parametrize("bad", ["main\n", "feature/x\n", "a\tb", "a b", "-x"])
def test_branch_names_with_whitespace_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_branch_name(bad)


def test_object_names_must_be_the_whole_value() -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert check_object_name(sha, "commit") == sha
    with pytest.raises(GitError):
        check_object_name(sha + "\n", "commit")


def test_token_actor_must_be_the_whole_value() -> None:
    assert StaticTokens([("t" * 20, "user:alice", "read")])
    with pytest.raises(TokenError):
        StaticTokens([("t" * 20, "user:alice\n", "read")])
