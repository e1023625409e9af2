"""An epic's evaluation and evolutions end to end, on both backends: real git, real gate and
agent processes, the real API, a scripted planner, coders and evaluator.

The epic's criteria are two: "a.txt and b.txt exist" (criterion 0) and "c.txt exists"
(criterion 1). The scripted evaluator gives the scores each test sets per attempt, and says
which file is missing as its evidence, which the evolution's planner must see.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from domain.config import AgentConfig, StorylineConfig
from domain.epic_events import EpicStage
from domain.stages import Stage
from runners.agents import process_alive
from service.epics import EpicService
from service.settings import Database
from tests.epics.epic_support import (
    add_epic,
    epic_config,
    epic_repo,
    epics_of,
    files_on,
    subtask,
    wait_epic_stage,
    write,
)
from tests.epics.test_epic_crash import crash_setup, wait_until
from tests.pipeline_support import calls, git, running_pipeline, scripted_agent

pytestmark = pytest.mark.slow

CRITERIA = ["a.txt and b.txt exist", "c.txt exists"]
ROUND0 = {"subtasks": [subtask("a", ["a.txt"]), subtask("b", ["b.txt"])]}


def verdict(first: float, second: float, evidence: str = "c.txt is missing") -> dict[str, Any]:
    return {
        "submit_evaluation": {
            "criteria": [
                {"criterion": 0, "met": first >= 0.8, "score": first, "evidence": "ls: a b"},
                {"criterion": 1, "met": second >= 0.8, "score": second, "evidence": evidence},
            ],
            "summary": f"scored {first} and {second}",
        }
    }


def follow_up(name: str, path: str) -> dict[str, Any]:
    """An evolution's planner: it must see the evaluation, then plans one story."""
    return {
        "*": {
            "1": [{"submit_plan": ROUND0}],
            "2": [
                {"expect_in_prompt": "Evolution 1: the evaluation fell short"},
                {"expect_in_prompt": "Criterion 1: c.txt exists"},
                {"expect_in_prompt": "c.txt is missing"},
                {"submit_plan": {"subtasks": [subtask(name, [path])], "rationale": "the gap"}},
            ],
        }
    }


def with_evaluator(
    tmp: Path, config: StorylineConfig, script: dict[str, Any], **review: Any
) -> StorylineConfig:
    path = tmp / "evaluator-script.json"
    path.write_text(json.dumps(script))
    agent = AgentConfig.model_validate(
        scripted_agent("evaluator", path, tmp / "evaluator-calls.jsonl")
    )
    raw = config.model_dump(mode="json", exclude_none=True)
    raw["agent"] = [*raw["agent"], agent.model_dump(mode="json", exclude_none=True)]
    # Off for the project unless asked: the epics are created with review=True, so only
    # they are evaluated, not each of their stories.
    raw["review"] = {"enabled": False, "min_score": 0.8, "max_evolutions": 2, **review}
    return StorylineConfig.model_validate(raw)


def coders(**extra: list[dict[str, Any]]) -> dict[str, Any]:
    return {"epic-1.1": write("a.txt"), "epic-1.2": write("b.txt"), **extra}


def done(epics: EpicService, eid: str) -> Any:
    epic = wait_epic_stage(epics, eid, EpicStage.DONE, EpicStage.FAILED, EpicStage.BLOCKED)
    assert epic.stage is EpicStage.DONE, epic.failed_reason or epic.blocked_reason
    return epic


def test_an_evolution_improves_the_score_then_the_epic_lands(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    base = git(repo, "rev-parse", "main")
    evaluator = {
        "*": {
            "1": [{"expect_in_prompt": "1. c.txt exists"}, verdict(1.0, 0.0)],
            # The second evaluator judges the evolution's integration (c.txt in its diff).
            "2": [{"expect_in_prompt": "+++ b/c.txt"}, verdict(1.0, 1.0, "c.txt: present")],
        }
    }
    coder = coders(
        **{"epic-1.e1.1": [{"expect_in_prompt": "follow-up of evolution 1"}, *write("c.txt")]}
    )
    config = with_evaluator(
        tmp_path, epic_config(tmp_path, coder, follow_up("c", "c.txt")), evaluator
    )
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics, acceptance_criteria=CRITERIA, review=True)
        epic = done(epics, eid)
        assert epic.stories == ["epic-1.1", "epic-1.2", "epic-1.e1.1"]
        follow = p.story("epic-1.e1.1")
        assert follow.stage is Stage.DONE and follow.target_branch == f"epic/{eid}"
        assert epic.evolution == 1
        assert [e["score"] for e in epic.evaluations] == [0.5, 1.0]
        assert epic.evaluation_final == {
            "passed": True,
            "score": 1.0,
            "best_evolution": 1,
            "commit": epic.evaluations[1]["commit"],
            "max_reached": False,
            "evolutions": 1,
        }
        assert epic.discarded == []
        types = Counter(e.type for e in epics.history(eid))
        assert types["EvolutionStarted"] == 1 and types["EvaluationConcluded"] == 1
        assert types["EvaluationSubmitted"] == 2 and types["UnionGatesJudged"] == 2
        assert types["EpicLanded"] == 1
        # The evaluator's runs are in the epic's ledger.
        assert epic.evaluator_cost_usd > 0
        ledger = epics.ledger(epic)
        assert ledger.evaluator_cost_usd == epic.evaluator_cost_usd
        assert ledger.cost_usd >= epic.planner_cost_usd + epic.evaluator_cost_usd
    assert git(repo, "rev-parse", "main~1") == base
    assert {"a.txt", "b.txt", "c.txt"} <= files_on(repo, "main")
    assert git(repo, "rev-parse", "main^{tree}") == git(
        repo, "rev-parse", f"{epic.evaluation_final['commit']}^{{tree}}"
    )
    evaluator_calls = calls(tmp_path, "evaluator")
    assert [c["env"]["STORYLINE_ATTEMPT"] for c in evaluator_calls] == ["1", "2"]
    # Each evaluator was told the integration commit it judged, and ran in a scratch
    # checkout (gone now that the epic is done).
    for call, evaluation in zip(evaluator_calls, epic.evaluations, strict=True):
        assert f"Commit {evaluation['commit']} of the epic's integration" in call["prompt"]
        assert call["cwd"].endswith("/scratch/evaluate")
    assert len(calls(tmp_path, "planner")) == 2


def test_a_worse_evolution_is_discarded_and_the_best_integration_lands(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    evaluator = {
        "*": {
            "1": [verdict(1.0, 0.4)],  # 0.7
            "2": [verdict(0.6, 0.2, "c.txt is still missing; worse.txt broke a and b")],  # 0.4
        }
    }
    coder = coders(**{"epic-1.e1.1": write("worse.txt")})
    config = with_evaluator(
        tmp_path,
        epic_config(tmp_path, coder, follow_up("worse", "worse.txt")),
        evaluator,
        max_evolutions=1,
    )
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics, acceptance_criteria=CRITERIA, review=True)
        epic = done(epics, eid)
        first, second = epic.evaluations
        assert first["evolution"] == 0 and second["evolution"] == 1
        assert epic.discarded == [
            {
                "evolution": 1,
                "score": 0.4,
                "commit": second["commit"],
                "kept_evolution": 0,
                "kept_commit": first["commit"],
            }
        ]
        final = epic.evaluation_final
        assert final is not None
        assert final["commit"] == first["commit"] and final["best_evolution"] == 0
        assert final["score"] == 0.7 and final["max_reached"] is True
        assert final["passed"] is False
        history = [e.type for e in epics.history(eid)]
        at = history.index("EvolutionDiscarded")
        assert history[at + 1] == "EvaluationConcluded"
    # The landed tree is exactly the kept integration's; the worse story's file is not there.
    kept_tree = git(repo, "rev-parse", f"{first['commit']}^{{tree}}")
    assert git(repo, "rev-parse", "main^{tree}") == kept_tree
    assert "worse.txt" not in files_on(repo, "main")
    assert {"a.txt", "b.txt"} <= files_on(repo, "main")
    # The integration branch went back to the kept commit before the landing.
    assert git(repo, "rev-parse", f"epic/{eid}") == first["commit"]


def test_max_evolutions_reached_records_the_final_score_and_lands_the_best(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    passed = {"criterion": 0, "met": True, "score": 1.0, "evidence": "the file is there"}
    evaluator = {
        "epic-1": {
            "1": [verdict(1.0, 0.0)],  # 0.5
            "2": [verdict(1.0, 0.5, "c.txt exists but is empty")],  # 0.75: better, still short
        },
        # [review] enabled: each story is reviewed too (by the same agent), and passes.
        "*": [{"submit_review": {"criteria": [passed], "summary": "fine"}}],
    }
    coder = coders(**{"epic-1.e1.1": write("c.txt", "")})
    config = with_evaluator(
        tmp_path,
        epic_config(tmp_path, coder, follow_up("c", "c.txt")),
        evaluator,
        max_evolutions=1,
        enabled=True,
    )
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics, acceptance_criteria=CRITERIA)  # review None: [review] decides
        epic = done(epics, eid)
        final = epic.evaluation_final
        assert final is not None
        assert final["max_reached"] is True and final["passed"] is False
        assert final["score"] == 0.75 and final["best_evolution"] == 1
        assert final["evolutions"] == 1
        assert final["commit"] == epic.evaluations[1]["commit"]
        assert epic.discarded == []
        concluded = next(e for e in epics.history(eid) if e.type == "EvaluationConcluded")
        assert concluded.reason is not None and "max_evolutions (1) reached" in concluded.reason
        # No third evaluation, no second evolution.
        assert len(epic.evaluations) == 2 and len(epic.evolutions) == 1
        reviewed = [s for s in epic.stories if p.story(s).reviews]
        assert reviewed == epic.stories
    assert {"a.txt", "b.txt", "c.txt"} <= files_on(repo, "main")
    epic_runs = [c for c in calls(tmp_path, "evaluator") if c["env"]["STORYLINE_STORY_ID"] == eid]
    assert len(epic_runs) == 2


def test_a_runner_killed_after_an_evolutions_verdict_concludes_it_once(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    evaluator = {
        "*": {
            "1": [verdict(1.0, 0.0)],
            # The verdict is in, the evaluator still runs (silent: an orphan that prints dies
            # of the broken pipe): the runner dies now. Left alive, a late second verdict of
            # this attempt would show.
            "2": [
                verdict(1.0, 1.0, "c.txt: present"),
                {"silent": 30},
                {**verdict(0.0, 0.0), "allow_failure": True},
            ],
            "3": [verdict(0.0, 0.0)],
        }
    }
    coder = coders(**{"epic-1.e1.1": write("c.txt")})
    config = with_evaluator(
        tmp_path, epic_config(tmp_path, coder, follow_up("c", "c.txt")), evaluator
    )
    with crash_setup(tmp_path, repo, database, config) as crash:
        eid = add_epic(crash.epics, acceptance_criteria=CRITERIA, review=True)
        wait_until(
            "the evolution's verdict while its evaluator runs",
            lambda: (
                crash.epics.get(eid).pending_evaluation == 2
                and (crash.epics.get(eid).running_evaluator or {}).get("pid") is not None
            ),
            crash.log,
        )
        evaluator_pid = calls(tmp_path, "evaluator")[1]["pid"]
        assert crash.epics.get(eid).stage is EpicStage.EVALUATING
        crash.kill_and_restart(evaluator_pid)
        crash.wait_done(eid)
        assert not process_alive(evaluator_pid), "the orphaned evaluator was not killed"
        epic = crash.epics.get(eid)
        history = crash.epics.history(eid)
        submitted = [e.data["attempt"] for e in history if e.type == "EvaluationSubmitted"]
        assert submitted == [1, 2]
        exits = [
            (e.data["attempt"], e.data["outcome"]) for e in history if e.type == "EvaluatorExited"
        ]
        assert exits == [(1, "completed"), (2, "lost")]
        assert [e.type for e in history].count("EvaluationConcluded") == 1
        assert epic.evaluator_failed_runs == 0 and epic.evaluator_aborts == 0
        assert epic.evaluation_final is not None and epic.evaluation_final["passed"] is True
        assert epic.evaluation_final["best_evolution"] == 1
    assert len(calls(tmp_path, "evaluator")) == 2
    assert "c.txt" in files_on(repo, "main")


def test_an_evaluator_without_a_verdict_blocks_the_epic_after_max_failed_runs(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    evaluator = {"*": [{"say": "looked around, judged nothing"}]}
    config = with_evaluator(
        tmp_path,
        epic_config(tmp_path, coders(), {"*": [{"submit_plan": ROUND0}]}),
        evaluator,
        max_failed_runs=2,
    )
    base = git(repo, "rev-parse", "main")
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics, acceptance_criteria=CRITERIA, review=True)
        epic = wait_epic_stage(epics, eid, EpicStage.BLOCKED, EpicStage.DONE)
        assert epic.stage is EpicStage.BLOCKED and epic.blocked_from is EpicStage.EVALUATING
        assert epic.blocked_reason is not None
        assert "2 times without a verdict" in epic.blocked_reason
        assert epic.evaluator_failed_runs == 2 and epic.evaluations == []
    assert len(calls(tmp_path, "evaluator")) == 2
    assert git(repo, "rev-parse", "main") == base  # nothing landed unevaluated


def test_an_epic_to_evaluate_without_an_evaluator_agent_is_blocked(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    config = epic_config(tmp_path, coders(), {"*": [{"submit_plan": ROUND0}]})
    with running_pipeline(repo, database, config, with_api=True) as p:
        epics = epics_of(p)
        eid = add_epic(epics, acceptance_criteria=CRITERIA, review=True)
        epic = wait_epic_stage(epics, eid, EpicStage.BLOCKED, EpicStage.DONE)
        assert epic.stage is EpicStage.BLOCKED and epic.blocked_from is EpicStage.EVALUATING
        assert epic.blocked_reason is not None
        assert "no evaluator agent is configured" in epic.blocked_reason
        assert epic.evaluator_attempts == 0
