"""The epic's evaluation, evolution and interview rules on the pure model (no store, no git).

``conclude_evaluation``: a passing verdict lands; under the threshold an evolution starts with
the gaps; a worse evolution is discarded and the best kept, in the same command as what
follows; ``max_evolutions`` ends it with the best landing and ``max_reached``; 0 evaluates
only; a tie goes to the later evolution. The interview: ``ask_questions`` is capped by
``max_interviews``, the answers must match the questions, and a planner that asked does not
lose a plan attempt.
"""

from __future__ import annotations

from typing import Any

import pytest

from domain.epic import Epic
from domain.epic_commands import EpicPolicy, apply_epic_named
from domain.epic_events import EpicStage, RunMode
from domain.errors import EpicIllegalTransition, InvalidCommand

RUNNER = "runner:epic"
PERSON = "user:test"
EPIC = "epic-1"
CRITERIA = ["the parser reads the sample", "the printer prints it", "the CLI wires both"]
PLAN: dict[str, Any] = {
    "subtasks": [
        {
            "name": name,
            "description": f"the {name}",
            "acceptance_criteria": [f"{name} works"],
            "footprint": [f"src/{name}.py"],
        }
        for name in ("parser", "printer")
    ],
}


def policy(**kw: Any) -> EpicPolicy:
    return EpicPolicy(**{"min_score": 0.8, "max_evolutions": 2, "max_interviews": 2, **kw})


def send(epic: Epic, event: str, data: dict[str, Any] | None = None, **kw: Any) -> object:
    return apply_epic_named(
        epic,
        event,
        actor=kw.pop("actor", RUNNER),
        reason=kw.pop("reason", "the test says so"),
        data=data,
        policy=kw.pop("policy", policy()),
    )


def new_epic() -> Epic:
    return Epic.create(
        epic_id=EPIC,
        name="Pretty printer",
        goal="Read a file and print it prettily.",
        acceptance_criteria=list(CRITERIA),
        actor=PERSON,
        review=True,
    )


def verdict(*scores: float, met: list[bool] | None = None) -> dict[str, Any]:
    met = met if met is not None else [s >= 0.8 for s in scores]
    return {
        "criteria": [
            {"criterion": i, "met": m, "score": s, "evidence": f"criterion {i}: checked"}
            for i, (s, m) in enumerate(zip(scores, met, strict=True))
        ],
        "summary": "judged",
    }


def plan_round(epic: Epic, tip: str, stories: list[str], policy_: EpicPolicy) -> None:
    """Plan (one planner attempt), farm out, integrate at ``tip``, judge the union passed."""
    attempt = send(epic, "spawn_planner", {"agent": "p", "runtime": "cli"}, policy=policy_)
    assert isinstance(attempt, int)
    send(epic, "planner_started", {"attempt": attempt, "pid": 7}, policy=policy_)
    assert send(epic, "submit_plan", {"plan": PLAN}, actor="agent:planner", policy=policy_) == []
    send(epic, "planner_exited", {"attempt": attempt, "outcome": "completed"}, policy=policy_)
    epic.farm_out(
        actor=RUNNER,
        mode=RunMode.PARALLEL,
        stories=stories,
        fork_point="f0f0f0f0",
        integration_tip=epic.integration_commit or "f0f0f0f0",
    )
    send(epic, "start_integration", {"commit": tip}, policy=policy_)
    send(
        epic,
        "judge_union",
        {"commit": tip, "tree": "eeee" + tip[4:], "passed": True, "output": "", "evaluate": True},
        policy=policy_,
    )
    assert epic.stage is EpicStage.EVALUATING


def evaluate(epic: Epic, judged: dict[str, Any], policy_: EpicPolicy) -> int:
    """One evaluator attempt that gives ``judged`` and exits."""
    attempt = send(epic, "spawn_evaluator", {"agent": "e", "runtime": "cli"}, policy=policy_)
    assert isinstance(attempt, int)
    send(epic, "evaluator_started", {"attempt": attempt, "pid": 8}, policy=policy_)
    send(
        epic,
        "submit_evaluation",
        {"attempt": attempt, **judged},
        actor="agent:evaluator",
        policy=policy_,
    )
    send(epic, "evaluator_exited", {"attempt": attempt, "outcome": "completed"}, policy=policy_)
    return attempt


def conclude(epic: Epic, policy_: EpicPolicy) -> tuple[object, list[str]]:
    epic.collect_events()  # what came before; only this command's events are left
    result = send(epic, "conclude_evaluation", policy=policy_)
    return result, [type(e).__name__ for e in epic.collect_events()]


def evaluated(p: EpicPolicy, *scores: float) -> Epic:
    epic = new_epic()
    plan_round(epic, "aaaa0000", [f"{EPIC}.1", f"{EPIC}.2"], p)
    evaluate(epic, verdict(*scores), p)
    return epic


# ---------------------------------------------------------------------- conclude_evaluation


def test_a_passing_evaluation_lands_the_integration() -> None:
    p = policy()
    epic = evaluated(p, 0.9, 1.0, 0.8)
    result, events = conclude(epic, p)
    assert result == "landing" and events == ["EvaluationConcluded"]
    assert epic.stage is EpicStage.MERGING
    assert epic.integration_commit == "aaaa0000"
    assert epic.evaluation_final == {
        "passed": True,
        "score": pytest.approx(0.9),
        "best_evolution": 0,
        "commit": "aaaa0000",
        "max_reached": False,
        "evolutions": 0,
    }
    assert epic.pending_evaluation is None


def test_every_criterion_met_but_under_min_score_evolves() -> None:
    p = policy(min_score=0.95)
    epic = evaluated(p, 0.9, 0.9, 0.9)
    result, events = conclude(epic, p)
    assert result == "evolving" and events == ["EvolutionStarted"]
    # Nothing unmet: the lowest-scored criteria are the gaps.
    assert len(epic.evolutions[-1]["gaps"]) == 3


def test_under_the_threshold_an_evolution_starts_with_the_gaps() -> None:
    p = policy()
    epic = evaluated(p, 1.0, 0.3, 0.5)
    result, events = conclude(epic, p)
    assert result == "evolving" and events == ["EvolutionStarted"]
    assert epic.stage is EpicStage.PLANNING
    assert epic.evolution == 1
    assert epic.plan is None and not epic.plan_farmed
    assert epic.failed_plan_attempts == 0
    evolution = epic.evolutions[-1]
    assert evolution["from_commit"] == "aaaa0000"
    assert evolution["after_score"] == pytest.approx(0.6)
    assert [g["criterion"] for g in evolution["gaps"]] == [1, 2]
    assert evolution["gaps"][0]["text"] == CRITERIA[1]
    assert evolution["gaps"][0]["evidence"] == "criterion 1: checked"
    # The evolution's planner may run although the first round used up no attempts.
    assert isinstance(send(epic, "spawn_planner", {"agent": "p", "runtime": "cli"}), int)


def test_a_worse_evolution_is_discarded_and_the_best_kept_in_one_command() -> None:
    p = policy(max_evolutions=3)
    epic = evaluated(p, 1.0, 0.5, 0.6)  # 0.7
    conclude(epic, p)
    plan_round(epic, "bbbb0000", [f"{EPIC}.e1.1", f"{EPIC}.e1.2"], p)
    evaluate(epic, verdict(1.0, 0.2, 0.3), p)  # 0.5: worse
    result, events = conclude(epic, p)
    assert result == "evolving"
    assert events == ["EvolutionDiscarded", "EvolutionStarted"]
    assert epic.integration_commit == "aaaa0000"  # the runner moves the branch back here
    assert epic.discarded == [
        {
            "evolution": 1,
            "score": pytest.approx(0.5),
            "commit": "bbbb0000",
            "kept_evolution": 0,
            "kept_commit": "aaaa0000",
        }
    ]
    evolution = epic.evolutions[-1]
    assert evolution["evolution"] == 2
    assert evolution["from_commit"] == "aaaa0000"
    assert evolution["best_score"] == pytest.approx(0.7)
    # The gaps are the worse round's own (what its follow-up stories still miss).
    assert [g["criterion"] for g in evolution["gaps"]] == [1, 2]
    assert epic.best is not None and epic.best["commit"] == "aaaa0000"


def test_a_worse_last_evolution_is_discarded_then_the_best_lands() -> None:
    p = policy(max_evolutions=1)
    epic = evaluated(p, 1.0, 0.5, 0.6)  # 0.7
    conclude(epic, p)
    plan_round(epic, "bbbb0000", [f"{EPIC}.e1.1", f"{EPIC}.e1.2"], p)
    evaluate(epic, verdict(1.0, 0.2, 0.3), p)  # 0.5
    result, events = conclude(epic, p)
    assert result == "landing"
    assert events == ["EvolutionDiscarded", "EvaluationConcluded"]
    assert epic.stage is EpicStage.MERGING
    assert epic.integration_commit == "aaaa0000"
    final = epic.evaluation_final
    assert final is not None
    assert final["commit"] == "aaaa0000" and final["best_evolution"] == 0
    assert final["score"] == pytest.approx(0.7)
    assert final["max_reached"] is True and final["passed"] is False
    assert final["evolutions"] == 1


def test_max_evolutions_reached_lands_the_best_with_max_reached() -> None:
    p = policy(max_evolutions=1)
    epic = evaluated(p, 1.0, 0.2, 0.3)  # 0.5
    conclude(epic, p)
    plan_round(epic, "bbbb0000", [f"{EPIC}.e1.1"], p)
    evaluate(epic, verdict(1.0, 0.5, 0.6), p)  # 0.7: better, still short
    result, events = conclude(epic, p)
    assert result == "landing" and events == ["EvaluationConcluded"]
    final = epic.evaluation_final
    assert final is not None
    assert final["commit"] == "bbbb0000" and final["best_evolution"] == 1
    assert final["score"] == pytest.approx(0.7)
    assert final["max_reached"] is True and final["passed"] is False
    assert epic.integration_commit == "bbbb0000"


def test_max_evolutions_zero_evaluates_only() -> None:
    p = policy(max_evolutions=0)
    epic = evaluated(p, 0.1, 0.2, 0.3)
    result, events = conclude(epic, p)
    assert result == "landing" and events == ["EvaluationConcluded"]
    final = epic.evaluation_final
    assert final is not None
    assert final["max_reached"] is False and final["passed"] is False
    assert final["score"] == pytest.approx(0.2)
    assert epic.evolutions == [] and epic.evolution == 0


def test_a_tie_goes_to_the_later_evolution() -> None:
    p = policy(max_evolutions=1)
    epic = evaluated(p, 1.0, 0.5, 0.6)  # 0.7
    conclude(epic, p)
    plan_round(epic, "bbbb0000", [f"{EPIC}.e1.1"], p)
    evaluate(epic, verdict(0.6, 1.0, 0.5), p)  # 0.7 as well
    result, events = conclude(epic, p)
    assert result == "landing" and events == ["EvaluationConcluded"]  # nothing discarded
    final = epic.evaluation_final
    assert final is not None and final["commit"] == "bbbb0000" and final["best_evolution"] == 1


def test_conclusion_needs_a_verdict_and_no_running_evaluator_and_happens_once() -> None:
    p = policy()
    epic = new_epic()
    plan_round(epic, "aaaa0000", [f"{EPIC}.1"], p)
    with pytest.raises(EpicIllegalTransition, match="no verdict"):
        send(epic, "conclude_evaluation", policy=p)
    attempt = send(epic, "spawn_evaluator", {"agent": "e", "runtime": "cli"}, policy=p)
    send(epic, "submit_evaluation", {"attempt": attempt, **verdict(1.0, 1.0, 1.0)}, policy=p)
    with pytest.raises(EpicIllegalTransition, match="still running"):
        send(epic, "conclude_evaluation", policy=p)
    # A second verdict for the same attempt is refused.
    with pytest.raises(EpicIllegalTransition, match="already gave its verdict"):
        send(epic, "submit_evaluation", {"attempt": attempt, **verdict(0.0, 0.0, 0.0)}, policy=p)
    send(epic, "evaluator_exited", {"attempt": attempt, "outcome": "lost"}, policy=p)
    # Its verdict stands: a lost exit after it is not a failed run.
    assert epic.evaluator_failed_runs == 0 and epic.evaluator_aborts == 0
    send(epic, "conclude_evaluation", policy=p)
    with pytest.raises(EpicIllegalTransition):
        send(epic, "conclude_evaluation", policy=p)
    assert len(epic.evaluations) == 1


def test_evaluator_runs_without_a_verdict_are_counted() -> None:
    p = policy()
    epic = new_epic()
    plan_round(epic, "aaaa0000", [f"{EPIC}.1"], p)
    for outcome in ("completed", "aborted_before_session", "failed"):
        attempt = send(epic, "spawn_evaluator", {"agent": "e", "runtime": "cli"}, policy=p)
        send(epic, "evaluator_exited", {"attempt": attempt, "outcome": outcome}, policy=p)
    assert epic.evaluator_failed_runs == 2 and epic.evaluator_aborts == 1
    assert epic.evaluator_attempts == 3
    # Blocked for them, a person's unblock gives the evaluator fresh tries.
    send(epic, "block", reason="the evaluator keeps failing", policy=p)
    send(epic, "unblock", reason="fixed its config", policy=p)
    assert epic.stage is EpicStage.EVALUATING
    assert epic.evaluator_failed_runs == 0 and epic.evaluator_aborts == 0


# ---------------------------------------------------------------------- the interview


def asking(p: EpicPolicy) -> tuple[Epic, int]:
    epic = new_epic()
    attempt = send(epic, "spawn_planner", {"agent": "p", "runtime": "cli"}, policy=p)
    assert isinstance(attempt, int)
    send(epic, "planner_started", {"attempt": attempt, "pid": 7}, policy=p)
    return epic, attempt


def test_questions_wait_for_answers_and_do_not_cost_a_plan_attempt() -> None:
    p = policy(max_plan_attempts=1)
    epic, attempt = asking(p)
    send(epic, "ask_questions", {"attempt": attempt, "questions": ["Which format?"]}, policy=p)
    assert epic.stage is EpicStage.AWAITING_ANSWERS
    assert epic.questions == ["Which format?"]
    send(epic, "planner_exited", {"attempt": attempt, "outcome": "completed"}, policy=p)
    assert epic.failed_plan_attempts == 0
    send(epic, "answer_questions", {"answers": ["Markdown"]}, actor=PERSON, policy=p)
    assert epic.stage is EpicStage.PLANNING and epic.questions is None
    assert epic.interview[0]["questions"] == ["Which format?"]
    assert epic.interview[0]["answers"] == ["Markdown"]
    assert epic.interview[0]["answered_by"] == PERSON
    # With max_plan_attempts 1 the next planner may still run: asking was not a failure.
    assert send(epic, "spawn_planner", {"agent": "p", "runtime": "cli"}, policy=p) == 2


def test_ask_questions_is_capped_by_max_interviews() -> None:
    p = policy(max_interviews=1)
    epic, attempt = asking(p)
    send(epic, "ask_questions", {"attempt": attempt, "questions": ["Which format?"]}, policy=p)
    send(epic, "planner_exited", {"attempt": attempt, "outcome": "completed"}, policy=p)
    send(epic, "answer_questions", {"answers": ["Markdown"]}, actor=PERSON, policy=p)
    second = send(epic, "spawn_planner", {"agent": "p", "runtime": "cli"}, policy=p)
    send(epic, "planner_started", {"attempt": second, "pid": 9}, policy=p)
    version = epic.version
    with pytest.raises(EpicIllegalTransition, match="1 rounds of questions are used up"):
        send(epic, "ask_questions", {"attempt": second, "questions": ["And?"]}, policy=p)
    assert epic.version == version and epic.stage is EpicStage.PLANNING


def test_answers_must_match_the_questions() -> None:
    p = policy()
    epic, attempt = asking(p)
    questions = ["Which format?", "Which width?"]
    send(epic, "ask_questions", {"attempt": attempt, "questions": questions}, policy=p)
    version = epic.version
    for answers in (["Markdown"], ["Markdown", "80", "extra"], ["Markdown", "   "]):
        with pytest.raises(InvalidCommand):
            send(epic, "answer_questions", {"answers": answers}, actor=PERSON, policy=p)
    assert epic.version == version and epic.stage is EpicStage.AWAITING_ANSWERS
    send(epic, "answer_questions", {"answers": ["Markdown", "80"]}, actor=PERSON, policy=p)
    assert epic.stage is EpicStage.PLANNING


def test_only_the_running_planner_may_ask_and_not_after_a_plan() -> None:
    p = policy()
    epic, attempt = asking(p)
    with pytest.raises(EpicIllegalTransition, match="not running"):
        send(epic, "ask_questions", {"attempt": attempt + 1, "questions": ["?"]}, policy=p)
    assert send(epic, "submit_plan", {"plan": PLAN}, policy=p) == []
    with pytest.raises(EpicIllegalTransition, match="already accepted"):
        send(epic, "ask_questions", {"attempt": attempt, "questions": ["?"]}, policy=p)
    assert epic.interview == []
