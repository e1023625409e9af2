"""Plan validation (domain.plan): what a planner may submit, and what makes a plan runnable."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.plan import (
    MAX_FOOTPRINT,
    MAX_SUBTASKS,
    Plan,
    all_coupled,
    normal_path,
    parse_plan,
    plan_problems,
    single_session_reason,
)


def subtask(
    name: str, *, depends_on: list[str] | None = None, footprint: list[str] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"Do the {name} part.",
        "acceptance_criteria": [f"{name} works"],
        "depends_on": depends_on or [],
        "footprint": footprint or [],
    }


def plan(*subtasks: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"subtasks": list(subtasks), **fields}


def problems_of(data: object) -> list[str]:
    _, problems = parse_plan(data)
    return problems


# ---------------------------------------------------------------------- valid plans


def test_three_subtasks_with_a_dependency_farm_out() -> None:
    parsed, problems = parse_plan(
        plan(
            subtask("parser", footprint=["src/parse.py"]),
            subtask("printer", footprint=["./src/print.py"]),
            subtask("cli", depends_on=["parser", "printer"], footprint=["src/cli.py"]),
            rationale="parser and printer are independent",
        )
    )
    assert problems == []
    assert parsed is not None
    assert [s.name for s in parsed.subtasks] == ["parser", "printer", "cli"]
    assert parsed.subtasks[1].footprint == ["src/print.py"]  # normalised
    assert parsed.subtasks[2].depends_on == ["parser", "printer"]
    assert single_session_reason(parsed) is None
    assert not all_coupled(parsed)


def test_independent_subtasks_without_footprints_are_parallel() -> None:
    parsed, problems = parse_plan(plan(subtask("a"), subtask("b")))
    assert problems == [] and parsed is not None
    assert single_session_reason(parsed) is None


def test_an_accepted_plan_round_trips_through_its_json_form() -> None:
    parsed, problems = parse_plan(
        plan(
            subtask("a", footprint=["src/", "./docs//x.md"]),
            subtask("b", depends_on=["a"], footprint=["src/a.py"]),
        )
    )
    assert problems == [] and parsed is not None
    again = Plan.model_validate(parsed.model_dump(mode="json"))
    assert again == parsed
    assert plan_problems(again) == []


# ---------------------------------------------------------------------- structural problems


def test_an_empty_plan_is_refused() -> None:
    for data in ({}, plan()):
        parsed, problems = parse_plan(data)
        assert parsed is not None  # well formed, but not runnable
        assert len(problems) == 1 and "no subtasks" in problems[0]
        assert "prefer_single_session" in problems[0]


def test_duplicate_names_are_refused() -> None:
    problems = problems_of(plan(subtask("a"), subtask("b"), subtask("a")))
    assert problems == ["two subtasks are named 'a'; names must be unique"]


def test_names_are_compared_after_trimming() -> None:
    problems = problems_of(plan(subtask("a"), subtask("  a ")))
    assert problems == ["two subtasks are named 'a'; names must be unique"]


def test_an_unknown_dependency_is_refused() -> None:
    problems = problems_of(plan(subtask("a"), subtask("b", depends_on=["a", "ghost"])))
    assert problems == ["subtask 'b' depends on 'ghost', which the plan lacks"]


def test_a_dependency_listed_twice_is_refused() -> None:
    problems = problems_of(plan(subtask("a"), subtask("b", depends_on=["a", "a"])))
    assert problems == ["subtask 'b' lists a dependency twice"]


def test_a_self_dependency_is_refused() -> None:
    problems = problems_of(plan(subtask("a", depends_on=["a"]), subtask("b")))
    assert "subtask 'a' depends on itself" in problems


def test_a_two_cycle_is_named() -> None:
    problems = problems_of(plan(subtask("a", depends_on=["b"]), subtask("b", depends_on=["a"])))
    assert problems == ["dependency cycle: a -> b -> a"]


def test_a_three_cycle_is_named() -> None:
    problems = problems_of(
        plan(
            subtask("root"),
            subtask("a", depends_on=["root", "b"]),
            subtask("b", depends_on=["c"]),
            subtask("c", depends_on=["a"]),
        )
    )
    assert len(problems) == 1
    assert problems[0].startswith("dependency cycle: ")
    cycle = problems[0].removeprefix("dependency cycle: ").split(" -> ")
    assert cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["a", "b", "c"]
    assert "root" not in cycle


def test_a_cycle_is_refused_even_with_prefer_single_session() -> None:
    problems = problems_of(
        plan(
            subtask("a", depends_on=["b"]),
            subtask("b", depends_on=["a"]),
            prefer_single_session=True,
        )
    )
    assert problems == ["dependency cycle: a -> b -> a"]


# ---------------------------------------------------------------------- footprints


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        (["src/a.py"], ["src/a.py"], "src/a.py"),
        (["src/"], ["src/a.py"], "src/"),
        (["src/a.py"], ["src/"], "src/"),
        (["lib/"], ["./lib/x/y.py", "README.md"], "lib/"),
    ],
)
def test_concurrent_subtasks_with_overlapping_footprints_are_refused(
    first: list[str], second: list[str], shared: str
) -> None:
    problems = problems_of(
        plan(
            subtask("one", footprint=first),
            subtask("two", footprint=second),
            subtask("three", footprint=["docs/three.md"]),
        )
    )
    assert len(problems) == 1
    assert "'one'" in problems[0] and "'two'" in problems[0]
    assert shared in problems[0]
    assert "three" not in problems[0]


def test_similar_but_separate_paths_do_not_overlap() -> None:
    problems = problems_of(
        plan(
            subtask("one", footprint=["src/"]),
            subtask("two", footprint=["srcx/a.py", "src"]),  # "src" is a file, not src/
        )
    )
    assert problems == []


def test_dependent_subtasks_may_overlap() -> None:
    problems = problems_of(
        plan(
            subtask("a", footprint=["src/a.py"]),
            subtask("b", depends_on=["a"], footprint=["src/"]),
            subtask("c", depends_on=["b"], footprint=["src/a.py"]),  # transitively after a
            subtask("d", footprint=["docs/"]),
        )
    )
    assert problems == []


def test_only_the_concurrent_pair_is_named() -> None:
    problems = problems_of(
        plan(
            subtask("a", footprint=["src/a.py"]),
            subtask("b", depends_on=["a"], footprint=["src/a.py"]),
            subtask("c", footprint=["src/a.py", "x.py"]),
            subtask("d", footprint=["y.py"]),
        )
    )
    # a and c, b and c run side by side; a before b is fine.
    assert len(problems) == 2
    assert "'a' and 'c'" in problems[0] and "'b' and 'c'" in problems[1]


def test_all_coupled_subtasks_are_valid_as_one_session() -> None:
    parsed, problems = parse_plan(
        plan(
            subtask("a", footprint=["src/core.py", "a.py"]),
            subtask("b", footprint=["src/"]),
            subtask("c", footprint=["src/core.py"]),
        )
    )
    assert problems == [] and parsed is not None
    assert all_coupled(parsed)
    reason = single_session_reason(parsed)
    assert reason is not None and "overlap" in reason


def test_one_subtask_runs_as_one_session() -> None:
    parsed, problems = parse_plan(plan(subtask("everything", footprint=["src/"])))
    assert problems == [] and parsed is not None
    assert not all_coupled(parsed)
    assert single_session_reason(parsed) == "the plan has a single subtask"


def test_prefer_single_session_wins_over_farming_out() -> None:
    parsed, problems = parse_plan(
        plan(
            subtask("a", footprint=["x.py"]),
            subtask("b", footprint=["x.py"]),
            prefer_single_session=True,
        )
    )
    assert problems == [] and parsed is not None
    reason = single_session_reason(parsed)
    assert reason is not None and "prefer_single_session" in reason
    parsed, problems = parse_plan(plan(prefer_single_session=True, rationale="one module"))
    assert problems == [] and parsed is not None and parsed.subtasks == []
    assert single_session_reason(parsed) is not None


# ---------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("src/a.py", "src/a.py"),
        ("./src//a.py", "src/a.py"),
        ("src/./b/", "src/b/"),
        ("win\\style\\x.py", "win/style/x.py"),
        ("  spaced.py ", "spaced.py"),
        ("...", "..."),
    ],
)
def test_footprint_paths_are_normalised(path: str, normal: str) -> None:
    assert normal_path(path) == normal


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/etc/passwd", "absolute"),
        ("//server/share", "absolute"),
        ("C:\\Windows", "absolute"),
        ("c:/x", "absolute"),
        ("../outside", "leaves the repository"),
        ("src/../../x", "leaves the repository"),
        ("src/..", "leaves the repository"),
        ("..\\x", "leaves the repository"),
        ("a\x00b", "control character (0x00)"),
        ("a\nb", "control character (0x0a)"),
        ("esc\x1b[2J", "control character (0x1b)"),
        ("del\x7f", "control character (0x7f)"),
        ("", "must name"),
        ("   ", "must name"),
        (".", "must name"),
        ("./", "must name"),
        ("/", "must name"),
    ],
)
def test_hostile_footprint_paths_are_refused_with_their_location(path: str, why: str) -> None:
    parsed, problems = parse_plan(plan(subtask("a"), subtask("b", footprint=["ok.py", path])))
    assert parsed is None
    assert len(problems) == 1
    assert problems[0].startswith("subtasks.1.footprint: ")
    assert why in problems[0]


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("name", "x" * 201, "subtasks.0.name"),
        ("name", "", "subtasks.0.name"),
        ("name", "   ", "subtasks.0.name"),
        ("name", "bell\x07", "subtasks.0.name"),
        ("name", "two\nlines", "subtasks.0.name"),
        ("description", "d" * 20_001, "subtasks.0.description"),
        ("description", "nul\x00", "subtasks.0.description"),
        ("description", " \n ", "subtasks.0.description"),
        ("acceptance_criteria", [], "subtasks.0.acceptance_criteria"),
        ("acceptance_criteria", ["c"] * 51, "subtasks.0.acceptance_criteria"),
        ("acceptance_criteria", ["c" * 5_001], "subtasks.0.acceptance_criteria.0"),
        ("acceptance_criteria", ["ok", "  "], "subtasks.0.acceptance_criteria"),
        ("acceptance_criteria", ["esc\x1b"], "subtasks.0.acceptance_criteria"),
        ("depends_on", ["b"] * (MAX_SUBTASKS + 1), "subtasks.0.depends_on"),
        ("depends_on", ["b" * 201], "subtasks.0.depends_on.0"),
        ("depends_on", [""], "subtasks.0.depends_on.0"),
        ("footprint", [f"f{i}.py" for i in range(MAX_FOOTPRINT + 1)], "subtasks.0.footprint"),
        ("footprint", ["d/" * 2_049], "subtasks.0.footprint.0"),
        ("footprint", "src/a.py", "subtasks.0.footprint"),
        ("footprint", [7], "subtasks.0.footprint.0"),
        ("surprise", 1, "subtasks.0.surprise"),
    ],
)
def test_bad_subtask_fields_are_refused_with_their_location(
    field: str, value: Any, where: str
) -> None:
    first = subtask("a")
    first[field] = value
    parsed, problems = parse_plan(plan(first, subtask("b")))
    assert parsed is None
    assert problems and problems[0].startswith(f"{where}: ")
    # The problems are bounded whatever the planner sent.
    assert sum(len(p) for p in problems) < 10_000


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (plan(*[subtask(f"s{i}") for i in range(MAX_SUBTASKS + 1)]), "subtasks"),
        (plan(subtask("a"), rationale="r" * 10_001), "rationale"),
        (plan(subtask("a"), rationale="clear\x1b[2J"), "rationale"),
        (plan(subtask("a"), prefer_single_session="maybe"), "prefer_single_session"),
        (plan(subtask("a"), extra=True), "extra"),
        ({"subtasks": "a,b"}, "subtasks"),
        ({"subtasks": [None]}, "subtasks.0"),
    ],
)
def test_bad_plan_fields_are_refused_with_their_location(data: Any, where: str) -> None:
    parsed, problems = parse_plan(data)
    assert parsed is None
    assert problems and problems[0].startswith(f"{where}: ")


def test_a_rationale_may_have_several_lines() -> None:
    parsed, problems = parse_plan(plan(subtask("a"), rationale="first\n\tsecond"))
    assert problems == [] and parsed is not None


def test_validation_problems_are_capped() -> None:
    many = [subtask(f"s{i}", footprint=["/abs"]) | {"name": ""} for i in range(MAX_SUBTASKS)]
    parsed, problems = parse_plan(plan(*many))
    assert parsed is None
    assert 0 < len(problems) <= 50


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        [],
        [1, 2],
        "a plan",
        "",
        42,
        3.5,
        True,
        {1: 2},
        {"subtasks": {"a": 1}},
        {"subtasks": [[]]},
        {"subtasks": [{"name": {"nested": ["junk"]}}]},
        {"subtasks": [subtask("a") | {"depends_on": [None, 3]}]},
        {"subtasks": [subtask("a") | {"footprint": [[["deep"]]]}]},
        {"subtasks": [subtask("a")], "prefer_single_session": None},
        {"rationale": ["not", "text"]},
        object(),
    ],
)
def test_parse_plan_refuses_garbage_without_raising(garbage: object) -> None:
    parsed, problems = parse_plan(garbage)
    assert parsed is None
    assert problems and all(isinstance(p, str) and p for p in problems)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["src/", "../x", "/abs", "a", "b", "name", "subtasks"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "subtasks",
                    "name",
                    "description",
                    "acceptance_criteria",
                    "depends_on",
                    "footprint",
                    "prefer_single_session",
                    "rationale",
                    "other",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=6,
        )
    ),
    max_leaves=40,
)

NAMES = st.sampled_from(["a", "b", "c", "d", " a", "e\x07", ""])
PATHS = st.sampled_from(["src/", "src/a.py", "src/b.py", "docs/", "../x", "/abs", "x\x00", "."])
SUBTASK = st.fixed_dictionaries(
    {
        "name": NAMES,
        "description": st.sampled_from(["d", " ", "line\nline"]),
        "acceptance_criteria": st.lists(st.sampled_from(["c", " "]), max_size=2),
        "depends_on": st.lists(NAMES, max_size=3),
        "footprint": st.lists(PATHS, max_size=3),
    }
)
PLAN_LIKE = st.fixed_dictionaries(
    {"subtasks": st.lists(SUBTASK, max_size=5)},
    optional={"prefer_single_session": st.booleans(), "rationale": st.text(max_size=20)},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=JSON | PLAN_LIKE)
def test_parse_plan_never_raises(data: object) -> None:
    parsed, problems = parse_plan(data)
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
    if parsed is None:
        assert problems  # a refusal always says why
    if parsed is not None and not problems:
        # A usable plan stays usable through its stored form, and it runs one way or another.
        again = Plan.model_validate(parsed.model_dump(mode="json"))
        assert again == parsed and plan_problems(again) == []
        names = [s.name for s in parsed.subtasks]
        assert len(names) == len(set(names))
        for s in parsed.subtasks:
            assert set(s.depends_on) <= set(names) - {s.name}
            for path in s.footprint:
                assert not path.startswith("/") and ".." not in path.split("/")
        if single_session_reason(parsed) is None:
            assert len(parsed.subtasks) >= 2
