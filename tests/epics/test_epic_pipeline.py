"""Epics end to end, on both backends: real git, real gate processes, the real API, the
scripted planner and coders. One test per run mode of the issue, plus the budget cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from domain.epic_events import EpicStage, RunMode
from domain.stages import Stage
from service.settings import Database
from tests.epics.epic_support import (
    THREE,
    add_epic,
    epic_config,
    epic_repo,
    epics_of,
    files_on,
    subtask,
    wait_epic_stage,
    write,
)
from tests.pipeline_support import calls, git, running_pipeline

pytestmark = pytest.mark.slow


def _planner(plan: object) -> dict[str, object]:
    return {"*": [{"submit_plan": plan}]}


def test_parallel_epic_lands_the_union_once(tmp_path: Path, database: Database) -> None:
    repo = epic_repo(tmp_path / "repo")
    base_before = git(repo, "rev-parse", "main")
    plan = {
        "subtasks": [
            subtask("a", ["a.txt"]),
            subtask("b", ["b.txt"]),
            subtask("c", ["c.txt", "a.txt"], depends_on=["a"]),
        ]
    }
    coder = {
        "epic-1.1": write("a.txt"),
        "epic-1.2": write("b.txt"),
        # A dependant starts from the integration branch, so it sees a.txt already.
        "epic-1.3": [{"expect_in_prompt": "Expected to touch"}, *write("c.txt")],
    }
    config = epic_config(tmp_path, coder, _planner(plan))
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics)
        epic = wait_epic_stage(epics, eid, EpicStage.DONE, EpicStage.FAILED, EpicStage.BLOCKED)
        assert epic.stage is EpicStage.DONE, epic.failed_reason or epic.blocked_reason
        assert epic.mode is RunMode.PARALLEL
        assert epic.stories == ["epic-1.1", "epic-1.2", "epic-1.3"]
        assert p.story("epic-1.3").depends_on == ["epic-1.1"]
        assert all(p.story(s).stage is Stage.DONE for s in epic.stories)
        assert epic.union is not None and epic.union["passed"]
        history = [e.type for e in epics.history(eid)]
        assert history.count("PlanAccepted") == 1
        assert history.count("StoriesFarmedOut") == 1
        assert history[-1] == "EpicLanded"
    # The base gained exactly one commit, the epic's squash, holding the union.
    assert git(repo, "rev-parse", "main~1") == base_before
    assert {"a.txt", "b.txt", "c.txt"} <= files_on(repo, "main")
    assert epic.merge_commit == git(repo, "rev-parse", "main")
    # The stories merged into the integration branch, never into main directly.
    assert git(repo, "rev-list", "--count", f"{base_before}..epic/{eid}") == "3"
    planner_calls = calls(tmp_path, "planner")
    assert len(planner_calls) == 1
    assert "union_check.py" in planner_calls[0]["prompt"]  # the repository layout


def test_invalid_plans_fall_back_to_one_session(tmp_path: Path, database: Database) -> None:
    cyclic = {
        "subtasks": [
            subtask("p", ["p.txt"], depends_on=["q"]),
            subtask("q", ["q.txt"], depends_on=["p"]),
        ]
    }
    planner = {
        "*": {
            "1": [{"submit_plan": cyclic}],
            "2": [{"expect_in_prompt": "dependency cycle"}, {"submit_plan": {"subtasks": []}}],
        }
    }
    coder = {"epic-1.s1": write("goal.txt")}
    repo = epic_repo(tmp_path / "repo", need_goal=True)
    config = epic_config(tmp_path, coder, planner, epic={"max_plan_attempts": 2})
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics)
        epic = wait_epic_stage(epics, eid, EpicStage.DONE, EpicStage.FAILED, EpicStage.BLOCKED)
        assert epic.stage is EpicStage.DONE, epic.failed_reason
        assert epic.mode is RunMode.SINGLE_SESSION
        assert epic.stories == ["epic-1.s1"]
        rejected = [e for e in epics.history(eid) if e.type == "PlanRejected"]
        assert len(rejected) == 2
        farmed = next(e for e in epics.history(eid) if e.type == "StoriesFarmedOut")
        assert farmed.reason is not None and "no usable plan after 2 attempts" in farmed.reason
    assert "goal.txt" in files_on(repo, "main")
    assert len(calls(tmp_path, "planner")) == 2


def test_prefer_single_session(tmp_path: Path, database: Database) -> None:
    repo = epic_repo(tmp_path / "repo")
    coder = {"epic-1.s1": [{"expect_in_prompt": "Write the marker files"}, *write("one.txt")]}
    planner = _planner({"prefer_single_session": True, "rationale": "tiny"})
    config = epic_config(tmp_path, coder, planner)
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics)
        epic = wait_epic_stage(epics, eid, EpicStage.DONE, EpicStage.FAILED, EpicStage.BLOCKED)
        assert epic.stage is EpicStage.DONE, epic.failed_reason
        assert epic.mode is RunMode.SINGLE_SESSION
        assert epic.single_session_reason is not None
        assert "prefer_single_session" in epic.single_session_reason
    assert "one.txt" in files_on(repo, "main")


def test_union_failure_blamed_on_a_subset_then_regional_replan(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    coder = {
        "epic-1.1": write("x.txt"),
        "epic-1.2": write("y.txt"),
        "epic-1.3": write("c.txt"),
        # The replan starts from the clean work (c.txt, no x or y) and redoes the region.
        "epic-1.r1": [
            {"expect_in_prompt": "x.txt and y.txt clash"},
            *write("x.txt"),
            *write("y.txt"),
            *write("fix.txt"),
        ],
    }
    config = epic_config(tmp_path, coder, _planner(THREE))
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics)
        epic = wait_epic_stage(epics, eid, EpicStage.DONE, EpicStage.FAILED, EpicStage.BLOCKED)
        assert epic.stage is EpicStage.DONE, epic.failed_reason
        assert epic.mode is RunMode.REGIONAL_REPLAN
        assert sorted(epic.kept_stories) == ["epic-1.3"]
        history = epics.history(eid)
        probes = {
            tuple(e.data["excluded"]): e.data["result"] for e in history if e.type == "BlameProbed"
        }
        assert probes == {("epic-1.1",): "passed", ("epic-1.2",): "passed", ("epic-1.3",): "failed"}
        blame = next(e for e in history if e.type == "BlameConcluded")
        assert sorted(blame.data["implicated"]) == ["epic-1.1", "epic-1.2"]
        rebuilt = next(e for e in history if e.type == "IntegrationRebuilt")
        assert rebuilt.data["kept"] == ["epic-1.3"]
        verdicts = [e.data["passed"] for e in history if e.type == "UnionGatesJudged"]
        assert verdicts == [False, True]
        # Every step says who and why.
        assert all(e.actor and (e.reason or e.type == "EpicCreated") for e in history), [
            (e.type, e.reason) for e in history if not e.reason
        ]
    assert {"c.txt", "x.txt", "y.txt", "fix.txt"} <= files_on(repo, "main")


def test_union_implicating_everything_fails_with_evidence_when_recovery_is_off(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo", need_goal=True)
    coder = {"epic-1.1": write("x.txt"), "epic-1.2": write("y2.txt"), "epic-1.3": write("c.txt")}
    config = epic_config(tmp_path, coder, _planner(THREE))
    base = git(repo, "rev-parse", "main")
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics)
        epic = wait_epic_stage(epics, eid, EpicStage.DONE, EpicStage.FAILED, EpicStage.BLOCKED)
        assert epic.stage is EpicStage.FAILED
        assert (
            epic.failed_reason is not None
            and "recover_via_single_session is off" in epic.failed_reason
        )
        assert sorted(epic.implicated or []) == ["epic-1.1", "epic-1.2", "epic-1.3"]
        assert epic.union is not None and "goal.txt is missing" in epic.union["output"]
        assert len(epic.probes) == 3 and all(p_["result"] == "failed" for p_ in epic.probes)
    assert git(repo, "rev-parse", "main") == base  # nothing landed
    assert "c.txt" in files_on(repo, f"epic/{eid}")  # the evidence stays


def test_union_implicating_everything_recovers_via_single_session(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo", need_goal=True)
    coder = {
        "epic-1.1": write("x.txt"),
        "epic-1.2": write("y2.txt"),
        "epic-1.3": write("c.txt"),
        "epic-1.s1": [{"expect_in_prompt": "goal.txt is missing"}, *write("goal.txt")],
    }
    config = epic_config(
        tmp_path, coder, _planner(THREE), epic={"recover_via_single_session": True}
    )
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics)
        epic = wait_epic_stage(epics, eid, EpicStage.DONE, EpicStage.FAILED, EpicStage.BLOCKED)
        assert epic.stage is EpicStage.DONE, epic.failed_reason
        assert epic.mode is RunMode.PARALLEL_THEN_SINGLE_SESSION
        assert epic.round_stories == ["epic-1.s1"]
    files = files_on(repo, "main")
    # The single session started from the fork point: the parallel work is not in it.
    assert "goal.txt" in files and "c.txt" not in files


def test_budget_cap_blocks_the_epic_and_stops_spawns(tmp_path: Path, database: Database) -> None:
    repo = epic_repo(tmp_path / "repo")
    expensive = [{"say": "thinking", "cost_usd": 0.6}, *write("a.txt")]
    coder = {"epic-1.1": expensive, "epic-1.2": write("b.txt")}
    plan = {"subtasks": [subtask("a", ["a.txt"]), subtask("b", ["b.txt"], depends_on=["a"])]}
    config = epic_config(tmp_path, coder, _planner(plan))
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics, max_budget_usd=0.5)
        epic = wait_epic_stage(epics, eid, EpicStage.BLOCKED, EpicStage.DONE)
        assert epic.stage is EpicStage.BLOCKED
        assert epic.blocked_reason is not None and "budget" in epic.blocked_reason
        p.wait_stage("epic-1.1", Stage.DONE)
        # The second story never got an agent while the epic is blocked.
        assert not any(c["env"].get("STORYLINE_STORY_ID") == "epic-1.2" for c in calls(tmp_path))
        assert epics.ledger(epics.get(eid)).cost_usd >= 0.5
