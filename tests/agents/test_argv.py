"""Prompt and argv building: what the agent CLI actually receives."""

from __future__ import annotations

from pathlib import Path

import pytest

from domain.config import AgentConfig, FixupCaps
from domain.errors import InvalidStoryId
from runners.agents import (
    GATE_FAILURE_HEADER,
    CliRuntime,
    OpenAIRuntime,
    SecretInArgvError,
    build_argv,
    runtime_for,
    tail_bytes,
)
from tests.agents.conftest import SpecFactory

CLAUDE = AgentConfig(name="coder")  # the default: claude -p {{prompt}} stream-json


def flag_values(argv: list[str], flag: str) -> list[str]:
    """Every value given for ``flag``, in either ``--flag v`` or ``--flag=v`` form."""
    values = []
    for i, arg in enumerate(argv):
        if arg == flag:
            values.append(argv[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def prompt_of(argv: list[str]) -> str:
    return argv[argv.index("-p") + 1]


# --- prompt -------------------------------------------------------------------------------


def test_prompt_has_epic_then_agent_prompt_then_story_then_project_file(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    spec = make_spec(
        CLAUDE,
        tmp_path / "wt",
        epic_context="EPIC: all greetings are polite",
        project_prompt="PROJECT: run make check before committing",
    )
    argv = build_argv(spec)
    assert argv[0] == "claude"
    prompt = prompt_of(argv)
    order = [
        prompt.index("EPIC: all greetings are polite"),
        prompt.index(f"story 42 in the git worktree {tmp_path / 'wt'}"),
        prompt.index("Add a greeting"),
        prompt.index("- greeting.txt exists"),
        prompt.index("PROJECT: run make check"),
    ]
    assert order == sorted(order)


def test_prompt_without_epic_or_project_file_has_neither(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    prompt = prompt_of(build_argv(make_spec(CLAUDE, tmp_path)))
    assert "Epic context" not in prompt
    assert prompt.startswith("You are working on story 42")


def test_mergemaster_prompt_carries_the_conflict_details(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    details = "CONFLICT (content): Merge conflict in src/app.py"
    spec = make_spec(CLAUDE, tmp_path, role="mergemaster", conflict_details=details)
    prompt = prompt_of(build_argv(spec))
    assert details in prompt
    assert "merge_resolved" in prompt and "merge_gave_up" in prompt


def test_hostile_story_text_stays_inside_one_argv_element(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    agent = AgentConfig(
        name="c",
        runtime="cli",
        command="agent-cli",
        args=["--cwd", "{{worktree_path}}", "--branch={{base_branch}}", "{{prompt}}"],
    )
    evil = 'x"; rm -rf / #\n--max-turns 99999 $(touch /tmp/pwned) {{story_id}} {{prompt}}'
    cwd = tmp_path / "dir with spaces"
    spec = make_spec(agent, cwd, story=make_spec(agent, cwd).story.__class__(name=evil))
    argv = build_argv(spec)
    assert argv[:4] == ["agent-cli", "--cwd", str(cwd), "--branch=main"]
    assert len(argv) == 5
    # The placeholders inside the user's text are not expanded a second time.
    assert evil in argv[4]
    assert "--max-turns" not in argv


def test_unknown_placeholder_is_left_visible(make_spec: SpecFactory, tmp_path: Path) -> None:
    agent = AgentConfig(name="c", runtime="cli", command="x", args=["{{nope}}", "{{story_id}}"])
    assert build_argv(make_spec(agent, tmp_path))[1:] == ["{{nope}}", "42"]


def test_hostile_story_id_is_refused(make_spec: SpecFactory, tmp_path: Path) -> None:
    with pytest.raises(InvalidStoryId):
        make_spec(CLAUDE, tmp_path, story_id="../../etc")


# --- gate failure injection ---------------------------------------------------------------


def test_gate_failure_adds_a_system_prompt_pair_when_absent(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    spec = make_spec(CLAUDE, tmp_path, gate_failure="error[E0308]: mismatched types")
    values = flag_values(build_argv(spec), "--append-system-prompt")
    assert values == [GATE_FAILURE_HEADER + "error[E0308]: mismatched types"]


@pytest.mark.parametrize(
    "args",
    [
        ["-p", "{{prompt}}", "--append-system-prompt", "Be terse."],
        ["-p", "{{prompt}}", "--append-system-prompt=Be terse."],
    ],
)
def test_gate_failure_is_appended_to_an_existing_system_prompt(
    make_spec: SpecFactory, tmp_path: Path, args: list[str]
) -> None:
    agent = AgentConfig(name="c", args=args)
    argv = build_argv(make_spec(agent, tmp_path, gate_failure="FAILED test_x"))
    values = flag_values(argv, "--append-system-prompt")
    assert values == ["Be terse.\n\n" + GATE_FAILURE_HEADER + "FAILED test_x"]


def test_no_injection_on_an_attempt_without_a_gate_failure(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    argv = build_argv(make_spec(CLAUDE, tmp_path, attempt=1))
    assert "--append-system-prompt" not in argv
    assert "quality gates failed" not in " ".join(argv)


def test_injection_keeps_the_last_3000_bytes_of_the_gate_output(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    output = "EARLY-NOISE\n" + "é" * 5000 + "\nFINAL: 3 tests failed"
    value = flag_values(
        build_argv(make_spec(CLAUDE, tmp_path, gate_failure=output)), "--append-system-prompt"
    )[0]
    tail = value.removeprefix(GATE_FAILURE_HEADER)
    assert tail.endswith("FINAL: 3 tests failed")
    assert "EARLY-NOISE" not in tail
    assert len(tail.encode("utf-8")) <= 3000
    assert output.endswith(tail)


@pytest.mark.parametrize("char", ["é", "€", "🦀", "a"])
@pytest.mark.parametrize("shift", [0, 1, 2, 3])
def test_tail_bytes_never_splits_a_character(char: str, shift: int) -> None:
    text = "x" * shift + char * 4000
    tail = tail_bytes(text, 3000)
    encoded = tail.encode("utf-8")
    assert text.endswith(tail)
    # At most one character's worth of bytes is given up to stay on a boundary.
    assert 3000 - len(char.encode("utf-8")) < len(encoded) <= 3000


def test_tail_bytes_returns_short_text_whole_and_handles_edge_limits() -> None:
    assert tail_bytes("short") == "short"
    assert tail_bytes("") == ""
    assert tail_bytes("abc", 0) == ""
    assert tail_bytes("🦀", 3) == ""  # a 4-byte character does not fit in 3 bytes
    assert tail_bytes("a🦀", 4) == "🦀"


def test_gate_failure_is_injected_even_when_resuming(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    spec = make_spec(CLAUDE, tmp_path, gate_failure="boom", resume_session_id="sess-1")
    argv = build_argv(spec)
    assert flag_values(argv, "--append-system-prompt") == [GATE_FAILURE_HEADER + "boom"]
    assert flag_values(argv, "--resume") == ["sess-1"]


# --- caps ---------------------------------------------------------------------------------


def test_fixup_adds_both_caps_when_absent(make_spec: SpecFactory, tmp_path: Path) -> None:
    argv = build_argv(make_spec(CLAUDE, tmp_path, fixup_pending=True))
    assert flag_values(argv, "--max-turns") == ["20"]
    assert flag_values(argv, "--max-budget-usd") == ["1.0"]


@pytest.mark.parametrize(
    ("args", "turns", "budget"),
    [
        (["--max-turns", "50", "--max-budget-usd", "5"], ["20"], ["1.0"]),  # higher: capped
        (["--max-turns", "5", "--max-budget-usd", "0.25"], ["5"], ["0.25"]),  # lower: kept
        (["--max-turns=50", "--max-budget-usd=5.5"], ["20"], ["1.0"]),  # = form
        (["--max-turns=7", "--max-budget-usd=0.5"], ["7"], ["0.5"]),
        (["--max-turns", "lots", "--max-budget-usd", "nan"], ["20"], ["1.0"]),  # garbage
    ],
)
def test_fixup_caps_only_lower_existing_values(
    make_spec: SpecFactory,
    tmp_path: Path,
    args: list[str],
    turns: list[str],
    budget: list[str],
) -> None:
    agent = AgentConfig(name="c", args=["-p", "{{prompt}}", *args])
    argv = build_argv(make_spec(agent, tmp_path, fixup_pending=True))
    assert flag_values(argv, "--max-turns") == turns
    assert flag_values(argv, "--max-budget-usd") == budget
    assert argv.count("--max-turns") + sum(a.startswith("--max-turns=") for a in argv) == 1


def test_fixup_caps_come_from_config(make_spec: SpecFactory, tmp_path: Path) -> None:
    caps = FixupCaps(max_turns=3, max_budget_usd=0.05)
    argv = build_argv(make_spec(CLAUDE, tmp_path, fixup_pending=True, fixup_caps=caps))
    assert flag_values(argv, "--max-turns") == ["3"]
    assert flag_values(argv, "--max-budget-usd") == ["0.05"]


def test_configured_limits_are_applied_and_then_fixup_capped(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    agent = AgentConfig(name="c", max_turns=200, max_budget_usd=0.5)
    plain = build_argv(make_spec(agent, tmp_path))
    assert flag_values(plain, "--max-turns") == ["200"]
    assert flag_values(plain, "--max-budget-usd") == ["0.5"]
    fixup = build_argv(make_spec(agent, tmp_path, fixup_pending=True))
    assert flag_values(fixup, "--max-turns") == ["20"]
    assert flag_values(fixup, "--max-budget-usd") == ["0.5"]  # already below the $1 cap


def test_no_caps_without_fixup_or_config(make_spec: SpecFactory, tmp_path: Path) -> None:
    argv = build_argv(make_spec(CLAUDE, tmp_path))
    assert "--max-turns" not in argv and "--max-budget-usd" not in argv


# --- model, resume, secrets ---------------------------------------------------------------


def test_model_is_added_once(make_spec: SpecFactory, tmp_path: Path) -> None:
    argv = build_argv(make_spec(AgentConfig(name="c", model="opus"), tmp_path))
    assert flag_values(argv, "--model") == ["opus"]
    templated = AgentConfig(name="c", model="opus", args=["--model={{model}}", "{{prompt}}"])
    argv = build_argv(make_spec(templated, tmp_path))
    assert flag_values(argv, "--model") == ["opus"]
    assert "--model" not in build_argv(make_spec(CLAUDE, tmp_path))


def test_resume_passes_the_session_and_a_short_non_empty_prompt(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    argv = build_argv(make_spec(CLAUDE, tmp_path, resume_session_id="abc-123"))
    assert flag_values(argv, "--resume") == ["abc-123"]
    prompt = prompt_of(argv)
    assert prompt.startswith("Continue your prior work on story 42")
    assert "Add a greeting" not in prompt  # the resumed session already has the story


def test_cold_start_has_no_resume_flag(make_spec: SpecFactory, tmp_path: Path) -> None:
    argv = build_argv(make_spec(CLAUDE, tmp_path))
    assert "--resume" not in argv
    assert "Add a greeting" in prompt_of(argv)


def test_the_story_token_never_appears_in_argv(make_spec: SpecFactory, tmp_path: Path) -> None:
    spec = make_spec(CLAUDE, tmp_path, gate_failure="x", fixup_pending=True)
    token = spec.env["STORYLINE_TOKEN"]
    assert all(token not in arg for arg in build_argv(spec))
    assert token not in repr(spec)


def test_a_template_that_would_leak_a_secret_is_refused(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    agent = AgentConfig(name="c", args=["--token", "tok-scoped-secret-0123456789"])
    with pytest.raises(SecretInArgvError) as excinfo:
        build_argv(make_spec(agent, tmp_path))
    assert "tok-scoped-secret" not in str(excinfo.value)


def test_a_nul_byte_in_story_text_cannot_make_the_story_unspawnable(
    make_spec: SpecFactory, tmp_path: Path
) -> None:
    spec = make_spec(CLAUDE, tmp_path, project_prompt="before\x00after")
    prompt = prompt_of(build_argv(spec))
    assert "\x00" not in prompt and "before\ufffdafter" in prompt


@pytest.mark.parametrize(
    ("field", "value"),
    [("attempt", -1), ("role", "reviewer"), ("inactivity_timeout_secs", 0.0)],
)
def test_an_inconsistent_spawn_spec_is_refused(
    make_spec: SpecFactory, tmp_path: Path, field: str, value: object
) -> None:
    with pytest.raises(ValueError, match=field.split("_")[0]):
        make_spec(CLAUDE, tmp_path, **{field: value})


def test_each_configured_runtime_gets_its_implementation() -> None:
    assert isinstance(runtime_for(AgentConfig(name="a")), CliRuntime)
    assert isinstance(runtime_for(AgentConfig(name="a", runtime="cli")), CliRuntime)
    openai = AgentConfig(name="a", runtime="openai", base_url="http://127.0.0.1:1/v1")
    assert isinstance(runtime_for(openai), OpenAIRuntime)
