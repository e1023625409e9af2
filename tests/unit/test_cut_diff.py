"""The diff an evaluator's prompt carries: whole when small, its head and a note when not."""

from __future__ import annotations

from runners.git_base import cut_diff


def test_a_small_diff_is_shown_whole() -> None:
    assert (
        cut_diff("diff --git a/x b/x\n+1\n", "git diff main...HEAD") == "diff --git a/x b/x\n+1\n"
    )


def test_a_big_diff_keeps_its_head_within_the_byte_limit_and_says_how_to_see_it_all() -> None:
    diff = "stat line\n" + "+é" * 100  # two-byte characters: the cut must not split one
    shown = cut_diff(diff, "git diff abc HEAD", limit=51)
    head, note = shown.split("\n[... ", 1)
    assert diff.startswith(head) and len(head.encode()) <= 51
    assert "51 of 310 bytes shown" in note and "`git diff abc HEAD`" in note
