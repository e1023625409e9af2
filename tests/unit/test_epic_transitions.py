"""The epic's state machine on the pure model: every row of its table, every guard, and replay."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.epic import MAX_OUTPUT, Epic
from domain.epic_commands import EPIC_COMMANDS, EpicPolicy, apply_epic_named
from domain.epic_events import (
    ACTIVE_EPIC_STAGES,
    EpicStage,
    PlanAccepted,
    PlannerExited,
    PlanRejected,
    RunMode,
)
from domain.epic_transitions import (
    EPIC_EVENT_NAMES,
    EPIC_TRANSITIONS,
    PERSON_EVENTS,
    PLANNER_EVENTS,
    legal_epic_events_from,
)
from domain.errors import DomainError, EpicIllegalTransition, InvalidCommand, UnknownEvent
from domain.stages import AgentOutcome
from service.codec import OrjsonTranscoder, PydanticMapper

ACTOR = "user:test"
RUNNER = "runner:epic"
PLANNER = "agent:planner"
EPIC = "epic-1"
S1, S2, S3 = f"{EPIC}.1", f"{EPIC}.2", f"{EPIC}.3"
R1 = f"{EPIC}.r1"
REASON = "because the test says so"
MAPPER = PydanticMapper(transcoder=OrjsonTranscoder())


def subtask(name: str, footprint: list[str], depends_on: list[str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"The {name}.",
        "acceptance_criteria": [f"{name} works"],
        "depends_on": depends_on or [],
        "footprint": footprint,
    }


PLAN: dict[str, Any] = {
    "subtasks": [
        subtask("parser", ["src/parse.py"]),
        subtask("printer", ["src/print.py"]),
        subtask("cli", ["src/cli.py", "src/parse.py"], ["parser", "printer"]),
    ],
    "rationale": "parser and printer are independent",
}
BAD_PLAN: dict[str, Any] = {
    "subtasks": [subtask("a", ["x.py"], ["b"]), subtask("b", ["y.py"], ["a"])],
}

# Valid data for each named event, so that a refusal can only come from a guard.
DATA: dict[str, dict[str, Any]] = {
    "spawn_planner": {"agent": "planner", "runtime": "cli"},
    "planner_started": {"attempt": 1, "pid": 4242},
    "planner_exited": {"attempt": 1, "outcome": "completed"},
    "submit_plan": {"plan": PLAN},
    "start_integration": {"commit": "aaaa1111"},
    "judge_union": {"commit": "aaaa1111", "tree": "bbbb2222", "passed": False, "output": "FAIL"},
    "record_probe": {"excluded": [S1], "result": "failed"},
    "conclude_blame": {"implicated": [S2]},
    "rebuild_integration": {"old_tip": "aaaa1111", "new_tip": "cccc3333", "kept": [S1, S3]},
    "land": {"merge_commit": "dddd4444", "base_branch": "main"},
    "landing_failed": {"kind": "conflict", "details": "CONFLICT in a.py", "conflicts": ["a.py"]},
    "ask_questions": {"attempt": 1, "questions": ["Which output format?"]},
    "answer_questions": {"answers": ["Markdown"]},
    "spawn_evaluator": {"agent": "evaluator", "runtime": "cli"},
    "evaluator_started": {"attempt": 1, "pid": 4343},
    "evaluator_exited": {"attempt": 1, "outcome": "completed"},
    "submit_evaluation": {
        "attempt": 1,
        "criteria": [{"criterion": 0, "met": True, "score": 0.9, "evidence": "make check"}],
    },
}


def new_epic(**fields: Any) -> Epic:
    return Epic.create(
        epic_id=EPIC,
        name="Pretty printer",
        goal="Read a file and print it prettily.",
        acceptance_criteria=["the CLI prints the sample prettily"],
        actor=ACTOR,
        **fields,
    )


def send(epic: Epic, event: str, **overrides: Any) -> object:
    return apply_epic_named(
        epic,
        event,
        actor=overrides.pop("actor", ACTOR),
        reason=overrides.pop("reason", REASON),
        data=overrides.pop("data", DATA.get(event, {})),
        policy=EpicPolicy(max_plan_attempts=overrides.pop("max_attempts", 3)),
    )


def farm_out(
    epic: Epic,
    stories: list[str] | None = None,
    mode: RunMode = RunMode.PARALLEL,
    kept: list[str] | None = None,
) -> None:
    epic.farm_out(
        actor=RUNNER,
        mode=mode,
        stories=[S1, S2, S3] if stories is None else stories,
        fork_point="ffff0000",
        integration_tip="ffff0000" if epic.round == 0 else "cccc3333",
        kept=kept,
        reason="the plan's subtasks",
    )


def state(epic: Epic) -> dict[str, Any]:
    """Everything the aggregate holds except the library's list of unsaved events."""
    return copy.deepcopy({k: v for k, v in epic.__dict__.items() if k != "_pending_events"})


def spawn(epic: Epic, **overrides: Any) -> int:
    attempt = send(epic, "spawn_planner", actor=RUNNER, **overrides)
    assert isinstance(attempt, int)
    return attempt


def start(epic: Epic, attempt: int) -> None:
    send(epic, "planner_started", actor=RUNNER, data={"attempt": attempt, "pid": 4000 + attempt})


def exit_planner(epic: Epic, attempt: int, outcome: str = "completed", **usage: Any) -> None:
    send(
        epic,
        "planner_exited",
        actor=RUNNER,
        reason=None,
        data={"attempt": attempt, "outcome": outcome, **usage},
    )


def submit(epic: Epic, plan: object = PLAN, max_attempts: int = 3) -> list[str]:
    problems = send(
        epic, "submit_plan", actor=PLANNER, data={"plan": plan}, max_attempts=max_attempts
    )
    assert isinstance(problems, list)
    return problems


def planned(epic: Epic) -> Epic:
    attempt = spawn(epic)
    start(epic, attempt)
    assert submit(epic) == []
    exit_planner(epic, attempt)
    return epic


def failed_union(epic: Epic) -> Epic:
    send(epic, "start_integration")
    send(epic, "judge_union")
    return epic


# ---------------------------------------------------------------------- epics in each stage


def in_planning() -> Epic:
    return new_epic()


def in_planning_with_planner() -> Epic:
    epic = new_epic()
    spawn(epic)
    return epic


def in_planning_planned() -> Epic:
    return planned(new_epic())


def in_running() -> Epic:
    epic = planned(new_epic())
    farm_out(epic)
    return epic


def in_integrating() -> Epic:
    epic = in_running()
    send(epic, "start_integration")
    return epic


def in_integrating_failed() -> Epic:
    return failed_union(in_running())


def in_integrating_blamed() -> Epic:
    epic = in_integrating_failed()
    send(epic, "conclude_blame")
    return epic


def in_merging() -> Epic:
    epic = in_integrating()
    send(epic, "judge_union", data={**DATA["judge_union"], "passed": True})
    return epic


def in_evaluating() -> Epic:
    epic = in_integrating()
    send(epic, "judge_union", data={**DATA["judge_union"], "passed": True, "evaluate": True})
    return epic


def in_evaluating_with_evaluator() -> Epic:
    epic = in_evaluating()
    send(epic, "spawn_evaluator", actor=RUNNER)
    return epic


def in_evaluating_judged() -> Epic:
    epic = in_evaluating_with_evaluator()
    send(epic, "evaluator_started", actor=RUNNER)
    send(epic, "submit_evaluation")
    send(epic, "evaluator_exited", actor=RUNNER)
    return epic


def in_blocked_with_evaluator() -> Epic:
    epic = in_evaluating_with_evaluator()
    send(epic, "block")
    return epic


def in_awaiting_answers() -> Epic:
    epic = in_planning_with_planner()
    send(epic, "ask_questions", actor=PLANNER)
    return epic


def in_done() -> Epic:
    epic = in_merging()
    send(epic, "land")
    return epic


def in_failed() -> Epic:
    epic = new_epic()
    send(epic, "fail")
    return epic


def in_failed_with_planner() -> Epic:
    epic = in_planning_with_planner()
    send(epic, "fail")
    return epic


def in_blocked() -> Epic:
    epic = new_epic()
    send(epic, "block")
    return epic


def in_blocked_with_planner() -> Epic:
    epic = in_planning_with_planner()
    send(epic, "block")
    return epic


def in_blocked_from_merging() -> Epic:
    epic = in_merging()
    send(epic, "landing_failed")
    return epic


BUILDERS: dict[str, Callable[[], Epic]] = {
    f.__name__: f
    for f in (
        in_planning,
        in_planning_with_planner,
        in_planning_planned,
        in_running,
        in_integrating,
        in_integrating_failed,
        in_integrating_blamed,
        in_merging,
        in_evaluating,
        in_evaluating_with_evaluator,
        in_evaluating_judged,
        in_blocked_with_evaluator,
        in_awaiting_answers,
        in_done,
        in_failed,
        in_failed_with_planner,
        in_blocked,
        in_blocked_with_planner,
        in_blocked_from_merging,
    )
}


def test_the_builders_reach_every_stage() -> None:
    assert {b().stage for b in BUILDERS.values()} == set(EpicStage)


# ---------------------------------------------------------------------- the table's rows

# (builder, event, stage expected after) for every legal row of the table.
ROWS: list[tuple[str, str, EpicStage]] = [
    ("in_planning", "spawn_planner", EpicStage.PLANNING),
    ("in_planning_with_planner", "planner_started", EpicStage.PLANNING),
    ("in_planning_with_planner", "planner_exited", EpicStage.PLANNING),
    ("in_blocked_with_planner", "planner_exited", EpicStage.BLOCKED),
    ("in_failed_with_planner", "planner_exited", EpicStage.FAILED),
    ("in_planning", "submit_plan", EpicStage.PLANNING),
    ("in_planning_planned", "farm_out", EpicStage.RUNNING),
    ("in_integrating_failed", "farm_out", EpicStage.RUNNING),
    ("in_running", "start_integration", EpicStage.INTEGRATING),
    ("in_integrating", "judge_union", EpicStage.INTEGRATING),
    ("in_integrating_failed", "record_probe", EpicStage.INTEGRATING),
    ("in_integrating_failed", "conclude_blame", EpicStage.INTEGRATING),
    ("in_integrating_blamed", "rebuild_integration", EpicStage.INTEGRATING),
    ("in_merging", "land", EpicStage.DONE),
    ("in_planning_with_planner", "ask_questions", EpicStage.AWAITING_ANSWERS),
    ("in_awaiting_answers", "answer_questions", EpicStage.PLANNING),
    ("in_awaiting_answers", "planner_exited", EpicStage.AWAITING_ANSWERS),
    ("in_evaluating", "spawn_evaluator", EpicStage.EVALUATING),
    ("in_evaluating_with_evaluator", "evaluator_started", EpicStage.EVALUATING),
    ("in_evaluating_with_evaluator", "evaluator_exited", EpicStage.EVALUATING),
    ("in_blocked_with_evaluator", "evaluator_exited", EpicStage.BLOCKED),
    ("in_evaluating_with_evaluator", "submit_evaluation", EpicStage.EVALUATING),
    ("in_evaluating_judged", "conclude_evaluation", EpicStage.MERGING),
    ("in_evaluating", "fail", EpicStage.FAILED),
    ("in_awaiting_answers", "fail", EpicStage.FAILED),
    ("in_evaluating", "block", EpicStage.BLOCKED),
    ("in_awaiting_answers", "block", EpicStage.BLOCKED),
    ("in_merging", "landing_failed", EpicStage.BLOCKED),
    ("in_planning", "fail", EpicStage.FAILED),
    ("in_running", "fail", EpicStage.FAILED),
    ("in_integrating", "fail", EpicStage.FAILED),
    ("in_merging", "fail", EpicStage.FAILED),
    ("in_blocked", "fail", EpicStage.FAILED),
    ("in_planning", "block", EpicStage.BLOCKED),
    ("in_running", "block", EpicStage.BLOCKED),
    ("in_integrating", "block", EpicStage.BLOCKED),
    ("in_merging", "block", EpicStage.BLOCKED),
    ("in_blocked", "unblock", EpicStage.PLANNING),
    ("in_blocked_from_merging", "unblock", EpicStage.MERGING),
    *[(name, "add_note", builder().stage) for name, builder in BUILDERS.items()],
]


def _send_any(epic: Epic, event: str) -> None:
    if event == "farm_out":
        farm_out(epic, [R1] if epic.round else None)
    else:
        send(epic, event)


@pytest.mark.parametrize(("builder", "event", "target"), ROWS, ids=str)
def test_legal_row(builder: str, event: str, target: EpicStage) -> None:
    epic = BUILDERS[builder]()
    stage, version = epic.stage, epic.version
    _send_any(epic, event)
    assert epic.stage is target
    assert epic.version == version + 1
    last = epic.pending_events[-1]
    assert last.from_stage is stage  # type: ignore[attr-defined]
    assert last.to_stage is target  # type: ignore[attr-defined]
    assert last.actor in (ACTOR, RUNNER)  # type: ignore[attr-defined]
    assert stage in EPIC_TRANSITIONS[event][1]


def test_every_named_event_has_a_row_and_a_handler() -> None:
    assert {event for _, event, _ in ROWS} == set(EPIC_EVENT_NAMES)
    assert set(EPIC_COMMANDS) == set(EPIC_EVENT_NAMES) - {"farm_out"}
    assert not (PERSON_EVENTS | PLANNER_EVENTS) - set(EPIC_EVENT_NAMES)
    for stage in EpicStage:
        assert "add_note" in legal_epic_events_from(stage)


REFUSED = [
    (builder, event)
    for builder, make in BUILDERS.items()
    for event in EPIC_EVENT_NAMES
    if make().stage not in EPIC_TRANSITIONS[event][1]
]


@pytest.mark.parametrize(("builder", "event"), REFUSED, ids=str)
def test_refused_transition_changes_nothing(builder: str, event: str) -> None:
    epic = BUILDERS[builder]()
    stage = epic.stage
    before = state(epic)
    pending = len(epic.pending_events)
    with pytest.raises(EpicIllegalTransition) as info:
        _send_any(epic, event)
    assert state(epic) == before
    assert len(epic.pending_events) == pending
    error = info.value
    assert error.story_id == EPIC and error.details["epic_id"] == EPIC
    assert (error.stage, error.event) == (stage.value, event)
    assert error.legal == legal_epic_events_from(stage)
    assert error.details["legal_events"] == legal_epic_events_from(stage)
    assert f"epic '{EPIC}' is in stage '{stage.value}'" in error.message
    assert f"legal events from '{stage.value}': " + ", ".join(error.legal) in error.message


def test_unknown_event_and_bad_data_are_refused() -> None:
    epic = new_epic()
    before = state(epic)
    with pytest.raises(UnknownEvent):
        send(epic, "teleport")
    with pytest.raises(UnknownEvent):
        send(epic, "farm_out")  # only the service farms out (it creates the stories too)
    with pytest.raises(InvalidCommand, match="agent"):
        send(epic, "spawn_planner", data={"runtime": "cli"})
    with pytest.raises(InvalidCommand, match=r"[Ee]xtra"):
        send(epic, "block", data={"surprise": 1})
    with pytest.raises(InvalidCommand, match="reason"):
        send(epic, "block", reason="nul\x00")
    assert state(epic) == before and len(epic.pending_events) == 1  # its creation


# ---------------------------------------------------------------------- the planner


def test_one_planner_at_a_time() -> None:
    epic = new_epic()
    assert spawn(epic) == 1
    assert epic.running_planner == {"attempt": 1, "agent": "planner", "pid": None}
    with pytest.raises(EpicIllegalTransition, match="planner attempt 1 runs"):
        spawn(epic)
    with pytest.raises(EpicIllegalTransition, match="planner attempt 2 is not running"):
        start(epic, 2)
    start(epic, 1)
    assert epic.running_planner == {"attempt": 1, "agent": "planner", "pid": 4001}
    with pytest.raises(EpicIllegalTransition, match="planner attempt 2 is not running"):
        exit_planner(epic, 2)
    exit_planner(epic, 1, "failed", tokens_in=10, tokens_out=5, cost_usd=0.25)
    assert epic.running_planner is None
    with pytest.raises(EpicIllegalTransition, match="planner attempt 1 is not running"):
        exit_planner(epic, 1)  # an exit is recorded once
    assert spawn(epic) == 2
    start(epic, 2)
    exit_planner(epic, 2, tokens_in=1, tokens_out=2, cost_usd=0.5)
    assert (epic.planner_tokens_in, epic.planner_tokens_out) == (11, 7)
    assert epic.planner_cost_usd == pytest.approx(0.75)
    assert epic.planner_attempts == 2


def test_a_planner_exit_without_a_plan_uses_an_attempt() -> None:
    epic = new_epic()
    attempt = spawn(epic)
    send(
        epic,
        "planner_exited",
        actor=RUNNER,
        reason="the CLI crashed",
        data={"attempt": attempt, "outcome": "failed"},
    )
    assert epic.failed_plan_attempts == 1
    assert epic.last_plan_problems == [
        "planner attempt 1 ended (failed) without submitting a plan: the CLI crashed"
    ]
    assert epic.plan_problems() == epic.last_plan_problems


def test_the_attempts_cap_counts_rejections_and_exits_without_a_plan() -> None:
    """What counts: each rejected plan, and each run that ended without submitting any.

    A run that submitted a rejected plan does not count again when it exits; a run that
    submitted two rejected plans counts twice (each rejection is one attempt)."""
    epic = new_epic()
    # Run 1 ends without submitting: one attempt.
    first = spawn(epic, max_attempts=4)
    exit_planner(epic, first, "timed_out")
    assert epic.failed_plan_attempts == 1
    # Run 2 submits one bad plan and exits: one attempt, not two.
    second = spawn(epic, max_attempts=4)
    assert submit(epic, BAD_PLAN, max_attempts=4) == ["dependency cycle: a -> b -> a"]
    assert (epic.failed_plan_attempts, epic.rejections_this_attempt) == (2, 1)
    exit_planner(epic, second)
    assert epic.failed_plan_attempts == 2
    assert epic.last_plan_problems == ["dependency cycle: a -> b -> a"]  # kept for the prompt
    # Run 3 submits two bad plans: two attempts; its exit adds nothing, and the cap is reached.
    third = spawn(epic, max_attempts=4)
    assert epic.rejections_this_attempt == 0
    assert submit(epic, {"subtasks": []}, max_attempts=4)
    assert submit(epic, None, max_attempts=4)
    assert epic.failed_plan_attempts == 4
    with pytest.raises(EpicIllegalTransition, match="4 plan attempts are used up"):
        submit(epic, PLAN, max_attempts=4)
    exit_planner(epic, third)
    assert (epic.failed_plan_attempts, epic.planner_attempts) == (4, 3)
    before = state(epic)
    with pytest.raises(EpicIllegalTransition, match="4 plan attempts are used up"):
        spawn(epic, max_attempts=4)
    assert state(epic) == before
    # A larger cap (a changed config) lets the runner try again.
    assert spawn(epic, max_attempts=5) == 4


def test_an_accepted_plan_is_final() -> None:
    epic = new_epic()
    attempt = spawn(epic)
    assert submit(epic) == []
    assert epic.plan is not None and epic.plan_model() is not None
    assert [s["name"] for s in epic.plan["subtasks"]] == ["parser", "printer", "cli"]
    assert epic.single_session_reason is None
    accepted = epic.pending_events[-1]
    assert isinstance(accepted, PlanAccepted)
    assert accepted.reason == "3 subtasks to farm out" and accepted.actor == PLANNER
    with pytest.raises(EpicIllegalTransition, match="already accepted"):
        submit(epic)
    exit_planner(epic, attempt)
    assert epic.failed_plan_attempts == 0  # the run delivered
    with pytest.raises(EpicIllegalTransition, match="already accepted"):
        spawn(epic)
    assert epic.plan_problems() == []


def test_a_plan_accepted_after_a_rejection_clears_the_problems() -> None:
    epic = new_epic()
    spawn(epic)
    assert submit(epic, BAD_PLAN)
    rejected = epic.pending_events[-1]
    assert isinstance(rejected, PlanRejected)
    assert rejected.plan == BAD_PLAN and rejected.problems == ["dependency cycle: a -> b -> a"]
    assert "1 problems" in (rejected.reason or "")
    assert submit(epic) == []
    assert epic.last_plan_problems == [] and epic.failed_plan_attempts == 1


def test_a_rejected_plan_is_kept_only_when_small_and_a_mapping() -> None:
    epic = new_epic()
    spawn(epic, max_attempts=9)
    huge = {"subtasks": [subtask("a", ["x.py"]) | {"description": "d" * (MAX_OUTPUT + 1)}]}
    for plan in (huge, ["not", "a", "plan"], "text"):
        assert submit(epic, plan, max_attempts=9)
        rejected = epic.pending_events[-1]
        assert isinstance(rejected, PlanRejected) and rejected.plan is None


def test_a_single_session_plan_is_accepted_with_its_reason() -> None:
    epic = new_epic()
    spawn(epic)
    assert submit(epic, {"subtasks": [], "prefer_single_session": True}) == []
    assert epic.single_session_reason is not None
    assert "prefer_single_session" in epic.single_session_reason
    accepted = epic.pending_events[-1]
    assert isinstance(accepted, PlanAccepted)
    assert accepted.single_session_reason == epic.single_session_reason == accepted.reason


def test_a_planner_start_is_refused_once_the_epic_is_blocked() -> None:
    epic = in_blocked_with_planner()
    with pytest.raises(EpicIllegalTransition, match="'planner_started' is not allowed"):
        start(epic, 1)
    exit_planner(epic, 1, "aborted_before_session")  # its exit is still recorded
    assert epic.running_planner is None and epic.stage is EpicStage.BLOCKED


# ---------------------------------------------------------------------- rounds


def test_farm_out_from_planning_happens_once() -> None:
    epic = in_planning_planned()
    with pytest.raises(EpicIllegalTransition, match="at least one story"):
        farm_out(epic, [])
    farm_out(epic)
    assert (epic.stage, epic.mode, epic.round) == (EpicStage.RUNNING, RunMode.PARALLEL, 1)
    assert epic.stories == epic.round_stories == [S1, S2, S3]
    assert (epic.fork_point, epic.round_start_tip) == ("ffff0000", "ffff0000")
    with pytest.raises(EpicIllegalTransition, match="'farm_out' is not allowed"):
        farm_out(epic, [R1])
    # No command leads back to planning after a round; the guard stands behind the table.
    epic.stage = EpicStage.PLANNING
    with pytest.raises(EpicIllegalTransition, match="already farmed out"):
        farm_out(epic, [R1])


def test_farm_out_waits_for_the_planner_to_exit() -> None:
    epic = new_epic()
    attempt = spawn(epic)
    start(epic, attempt)
    assert submit(epic) == []
    with pytest.raises(EpicIllegalTransition, match="planner attempt 1 runs"):
        farm_out(epic)
    exit_planner(epic, attempt, cost_usd=0.5)
    farm_out(epic)
    assert epic.running_planner is None and epic.planner_cost_usd == 0.5


def test_a_single_session_round_needs_no_plan() -> None:
    """When every plan attempt failed, the goal still runs whole (never give up untried)."""
    epic = new_epic()
    for _ in range(3):
        exit_planner(epic, spawn(epic), "failed")
    assert epic.plan is None and epic.failed_plan_attempts == 3
    farm_out(epic, [f"{EPIC}.s1"], RunMode.SINGLE_SESSION)
    assert (epic.stage, epic.mode, epic.round_stories) == (
        EpicStage.RUNNING,
        RunMode.SINGLE_SESSION,
        [f"{EPIC}.s1"],
    )


def test_another_round_only_after_a_failed_union_and_with_new_stories() -> None:
    epic = in_integrating()
    with pytest.raises(EpicIllegalTransition, match="only a failed union"):
        farm_out(epic, [R1])
    failed_union(epic := in_running())
    before = state(epic)
    with pytest.raises(EpicIllegalTransition, match=f"stories {S2} were farmed out before"):
        farm_out(epic, [R1, S2], RunMode.REGIONAL_REPLAN)
    assert state(epic) == before
    farm_out(epic, [R1], RunMode.REGIONAL_REPLAN, kept=[S1, S3])
    assert (epic.round, epic.mode) == (2, RunMode.REGIONAL_REPLAN)
    assert epic.round_stories == [R1] and epic.kept_stories == [S1, S3]
    assert epic.stories == [S1, S2, S3, R1]
    assert epic.fork_point == "ffff0000" and epic.round_start_tip == "cccc3333"
    assert epic.union is None and epic.probes == [] and epic.implicated is None
    assert len(epic.union_verdicts) == 1  # the evidence of earlier rounds stays


def test_the_union_is_judged_once_per_round() -> None:
    epic = in_integrating()
    assert epic.integration_commit == "aaaa1111"
    send(epic, "judge_union", data={**DATA["judge_union"], "output": "x" * (MAX_OUTPUT + 10)})
    assert epic.stage is EpicStage.INTEGRATING
    assert epic.union is not None and epic.union["passed"] is False and epic.union["round"] == 1
    assert len(epic.union["output"]) == MAX_OUTPUT  # its tail
    before = state(epic)
    for passed in (False, True):
        with pytest.raises(EpicIllegalTransition, match="already judged"):
            send(epic, "judge_union", data={**DATA["judge_union"], "passed": passed})
    assert state(epic) == before
    farm_out(epic, [R1], RunMode.REGIONAL_REPLAN)
    send(epic, "start_integration", data={"commit": "eeee5555"})
    send(epic, "judge_union", data={**DATA["judge_union"], "commit": "eeee5555", "passed": True})
    assert epic.stage is EpicStage.MERGING
    assert [(v["round"], v["passed"]) for v in epic.union_verdicts] == [(1, False), (2, True)]


def test_probes_follow_a_failed_union_once_per_excluded_set() -> None:
    epic = in_integrating()
    with pytest.raises(EpicIllegalTransition, match="after a failed union"):
        send(epic, "record_probe")  # not judged yet
    failed_union(epic := in_running())
    send(epic, "record_probe", data={"excluded": [S1, S2], "result": "failed", "output": "E"})
    send(epic, "record_probe", data={"excluded": [S3], "result": "conflict"})
    before = state(epic)
    with pytest.raises(EpicIllegalTransition, match=f"without {S2}, {S1} is recorded"):
        send(epic, "record_probe", data={"excluded": [S2, S1], "result": "passed"})
    for excluded in ([R1], [S1, "epic-2.1"], []):
        with pytest.raises(InvalidCommand):
            send(epic, "record_probe", data={"excluded": excluded, "result": "passed"})
    with pytest.raises(InvalidCommand, match="passed, failed or conflict"):
        epic.record_probe(actor=RUNNER, excluded=[S2], result="maybe")
    with pytest.raises(InvalidCommand, match="current round"):
        epic.record_probe(actor=RUNNER, excluded=[], result="passed")
    assert state(epic) == before
    assert [(p["excluded"], p["result"]) for p in epic.probes] == [
        ([S1, S2], "failed"),
        ([S3], "conflict"),
    ]
    assert epic.pending_events[-1].reason == f"union without {S3}: conflict"  # type: ignore[attr-defined]


def test_probes_leave_out_only_the_current_rounds_stories() -> None:
    epic = in_integrating_failed()
    farm_out(epic, [R1], RunMode.REGIONAL_REPLAN, kept=[S1, S3])
    failed_union(epic)
    with pytest.raises(InvalidCommand, match="current round"):
        send(epic, "record_probe", data={"excluded": [S1], "result": "passed"})
    send(epic, "record_probe", data={"excluded": [R1], "result": "passed"})
    assert epic.probes[0]["excluded"] == [R1]


def test_no_probe_after_a_passed_union_or_after_the_verdict() -> None:
    epic = in_merging()
    with pytest.raises(EpicIllegalTransition):
        send(epic, "record_probe")
    epic = in_integrating_blamed()
    with pytest.raises(EpicIllegalTransition, match="before its verdict"):
        send(epic, "record_probe", data={"excluded": [S3], "result": "passed"})


def test_blame_concludes_once_on_the_rounds_stories() -> None:
    epic = in_integrating()
    with pytest.raises(EpicIllegalTransition, match="after a failed union"):
        send(epic, "conclude_blame")
    failed_union(epic := in_running())
    with pytest.raises(EpicIllegalTransition, match="after blame"):
        send(epic, "rebuild_integration")
    for implicated in ([S2, R1], ["epic-2.1"]):
        with pytest.raises(InvalidCommand, match="part of the round"):
            send(epic, "conclude_blame", data={"implicated": implicated})
    with pytest.raises(InvalidCommand, match="non-empty"):
        epic.conclude_blame(actor=RUNNER, implicated=[], reason="none")
    send(epic, "conclude_blame", data={"implicated": [S2, S3]}, reason="leave-one-out")
    assert epic.implicated == [S2, S3] and epic.clean_stories == [S1]
    assert epic.pending_events[-1].reason == "leave-one-out"  # type: ignore[attr-defined]
    with pytest.raises(EpicIllegalTransition, match="concludes once"):
        send(epic, "conclude_blame")
    send(epic, "rebuild_integration", data={**DATA["rebuild_integration"], "kept": [S1]})
    assert epic.rebuilt_tip == "cccc3333" and epic.stage is EpicStage.INTEGRATING


def test_blame_may_implicate_every_story() -> None:
    epic = in_integrating_failed()
    send(epic, "conclude_blame", data={"implicated": [S1, S2, S3]})
    assert epic.clean_stories == []
    send(epic, "fail", reason="every story is implicated and recovery is off")
    assert epic.stage is EpicStage.FAILED
    assert epic.failed_reason == "every story is implicated and recovery is off"
    assert epic.union is not None and epic.implicated == [S1, S2, S3]  # the evidence stays


# ---------------------------------------------------------------------- the end


def test_landing_records_the_merge() -> None:
    epic = in_merging()
    send(epic, "land", data={"merge_commit": "0123456789abcdef0123", "base_branch": "main"})
    assert epic.stage is EpicStage.DONE and epic.merge_commit == "0123456789abcdef0123"
    assert epic.pending_events[-1].reason == "landed on main as 0123456789ab"  # type: ignore[attr-defined]
    assert not epic.active


def test_a_failed_landing_blocks_and_unblock_returns_to_merging() -> None:
    epic = in_merging()
    send(epic, "landing_failed", reason="base moved: conflict in a.py")
    assert epic.stage is EpicStage.BLOCKED
    assert epic.blocked_from is EpicStage.MERGING
    assert epic.blocked_reason == "base moved: conflict in a.py"
    assert epic.landing_failures == [
        {"kind": "conflict", "details": "CONFLICT in a.py", "conflicts": ["a.py"]}
    ]
    with pytest.raises(EpicIllegalTransition):
        send(epic, "land")
    send(epic, "unblock", reason="rebased by hand")
    assert epic.stage is EpicStage.MERGING
    assert epic.blocked_from is None and epic.blocked_reason is None
    send(epic, "land")
    assert epic.stage is EpicStage.DONE


@pytest.mark.parametrize("event", ["block", "fail"])
def test_block_and_fail_need_a_reason(event: str) -> None:
    epic = in_running()
    before = state(epic)
    for reason in (None, "", "  \n"):
        with pytest.raises(InvalidCommand, match="needs a reason"):
            send(epic, event, reason=reason)
    assert state(epic) == before and epic.stage is EpicStage.RUNNING


@pytest.mark.parametrize("builder", ["in_running", "in_integrating_failed", "in_merging"])
def test_unblock_returns_to_the_stage_it_left(builder: str) -> None:
    epic = BUILDERS[builder]()
    stage = epic.stage
    send(epic, "block", reason="budget cap reached")
    assert (epic.stage, epic.blocked_from) == (EpicStage.BLOCKED, stage)
    assert epic.blocked_reason == "budget cap reached"
    send(epic, "unblock", reason=None)  # like a story's, an unblock's reason is optional
    assert epic.stage is stage and epic.blocked_from is None


def test_unblock_may_raise_the_budget() -> None:
    epic = new_epic(max_budget_usd=5)
    assert epic.max_budget_usd == 5.0
    send(epic, "block", reason="budget cap reached")
    before = state(epic)
    for bad in (0, -1, 1_000_001, float("inf"), float("nan"), "lots"):
        with pytest.raises(InvalidCommand, match="max_budget_usd"):
            send(epic, "unblock", data={"max_budget_usd": bad})
        with pytest.raises(InvalidCommand, match="max_budget_usd"):
            epic.unblock(actor=ACTOR, reason="more", max_budget_usd=bad)  # type: ignore[arg-type]
    assert state(epic) == before
    send(epic, "unblock", data={"max_budget_usd": 12.5}, reason="raised the cap")
    assert epic.max_budget_usd == 12.5 and epic.stage is EpicStage.PLANNING
    send(epic, "block", reason="again")
    send(epic, "unblock")  # without a new cap the old one stays
    assert epic.max_budget_usd == 12.5


def test_fail_from_blocked_and_nothing_after_the_end() -> None:
    epic = in_blocked()
    send(epic, "fail", reason="no longer wanted")
    assert epic.stage is EpicStage.FAILED and not epic.active
    # a running planner or evaluator may end
    assert epic.legal_events == ["planner_exited", "evaluator_exited", "add_note"]
    assert in_done().legal_events == ["add_note"]
    for stage_epic in (epic, in_done()):
        for event in ("fail", "block", "unblock"):
            with pytest.raises(EpicIllegalTransition):
                send(stage_epic, event)


def test_notes_need_text_and_change_no_stage() -> None:
    epic = in_integrating_failed()
    with pytest.raises(InvalidCommand, match="needs text"):
        send(epic, "add_note", reason=" ")
    send(epic, "add_note", reason="blame is slow today")
    assert epic.notes == 1 and epic.stage is EpicStage.INTEGRATING
    assert epic.last_event == "EpicNoteAdded"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"epic_id": "7"}, "epic"),
        ({"epic_id": "epic-1/../x"}, "epic"),
        ({"name": " "}, "name"),
        ({"name": "bell\x07"}, "control"),
        ({"goal": ""}, "goal"),
        ({"acceptance_criteria": []}, "at least one"),
        ({"acceptance_criteria": [" "]}, "empty"),
        ({"max_budget_usd": 0}, "max_budget_usd"),
        ({"max_budget_usd": 2_000_000}, "max_budget_usd"),
    ],
)
def test_bad_epic_fields_are_refused(fields: dict[str, Any], match: str) -> None:
    values: dict[str, Any] = {
        "epic_id": EPIC,
        "name": "n",
        "goal": "g",
        "acceptance_criteria": ["c"],
        "actor": ACTOR,
    }
    with pytest.raises(DomainError, match=match):
        Epic.create(**(values | fields))


# ---------------------------------------------------------------------- replay


def replay(events: list[Any], *, stored: bool) -> Epic:
    epic: Epic | None = None
    for event in events:
        if stored:
            event = MAPPER.to_domain_event(MAPPER.to_stored_event(event))
        epic = event.mutate(epic)
    assert epic is not None
    return epic


def full_run() -> Epic:
    """planning -> parallel round -> failed union -> probes -> blame -> rebuild -> regional
    round -> passed union -> landing failed -> unblocked -> landed."""
    epic = new_epic(max_budget_usd=5)
    first = spawn(epic)
    start(epic, first)
    assert submit(epic, BAD_PLAN)
    exit_planner(epic, first, tokens_in=100, tokens_out=50, cost_usd=0.1)
    second = spawn(epic)
    start(epic, second)
    assert submit(epic) == []
    exit_planner(epic, second, tokens_in=200, tokens_out=70, cost_usd=0.2)
    send(epic, "add_note", reason="plan looks good")
    farm_out(epic)
    send(epic, "start_integration")
    send(epic, "judge_union")
    for excluded, result in (([S1], "failed"), ([S2], "failed"), ([S3], "failed")):
        send(epic, "record_probe", data={"excluded": excluded, "result": result})
    send(epic, "record_probe", data={"excluded": [S2, S3], "result": "passed"})
    send(epic, "conclude_blame", data={"implicated": [S2, S3]}, reason="only without both")
    send(epic, "rebuild_integration", data={**DATA["rebuild_integration"], "kept": [S1]})
    farm_out(epic, [R1], RunMode.REGIONAL_REPLAN, kept=[S1])
    send(epic, "block", reason="budget cap reached")
    send(epic, "unblock", data={"max_budget_usd": 9.0})
    send(epic, "start_integration", data={"commit": "eeee5555"})
    send(epic, "judge_union", data={**DATA["judge_union"], "commit": "eeee5555", "passed": True})
    send(epic, "landing_failed", reason="base moved")
    send(epic, "unblock")
    send(epic, "land")
    return epic


@pytest.mark.parametrize("stored", [False, True], ids=["events", "stored-events"])
def test_replay_of_a_full_run_gives_the_same_state(stored: bool) -> None:
    epic = full_run()
    assert epic.stage is EpicStage.DONE
    assert (epic.mode, epic.round) == (RunMode.REGIONAL_REPLAN, 2)
    assert epic.stories == [S1, S2, S3, R1] and epic.kept_stories == [S1]
    assert epic.implicated is None  # the regional round was not blamed
    assert epic.clean_stories == [S1] and epic.rebuilt_tip == "cccc3333"
    assert [v["passed"] for v in epic.union_verdicts] == [False, True]
    assert (epic.planner_attempts, epic.failed_plan_attempts) == (2, 1)
    assert epic.planner_cost_usd == pytest.approx(0.3)
    assert epic.max_budget_usd == 9.0 and epic.notes == 1
    assert len(epic.landing_failures) == 1 and epic.merge_commit == "dddd4444"
    events = list(epic.collect_events())
    assert [e.originator_version for e in events] == list(range(1, len(events) + 1))
    replayed = replay(events, stored=stored)
    assert state(replayed) == state(epic)
    assert replayed.version == epic.version == len(events)
    assert type(replayed.stage) is EpicStage and type(replayed.mode) is RunMode


def test_replay_never_reruns_a_guard() -> None:
    """A replayed exit counts its attempt from the event, whatever the config says now."""
    epic = new_epic()
    for _ in range(3):
        exit_planner(epic, spawn(epic), "failed")
    events = list(epic.collect_events())
    assert sum(isinstance(e, PlannerExited) for e in events) == 3
    replayed = replay(events, stored=True)
    assert replayed.failed_plan_attempts == 3
    with pytest.raises(EpicIllegalTransition, match="used up"):
        spawn(replayed)


# ---------------------------------------------------------------------- random sequences

STORIES = [S1, S2, S3, R1, f"{EPIC}.r2", f"{EPIC}.s1"]


def _random_step(epic: Epic, draw: Any) -> None:
    event = draw(st.sampled_from([*EPIC_EVENT_NAMES, "farm_out"]), label="event")
    running = epic.running_planner or {}
    attempt = draw(st.sampled_from([running.get("attempt") or 1, 1, 2]))
    some_stories = st.lists(st.sampled_from(STORIES), min_size=0, max_size=3, unique=True)
    if event == "farm_out":
        epic.farm_out(
            actor=RUNNER,
            mode=draw(st.sampled_from(RunMode)),
            stories=draw(some_stories),
            fork_point="ffff0000",
            integration_tip="aaaa1111",
            kept=draw(some_stories),
        )
        return
    data = dict(DATA.get(event, {}))
    match event:
        case "planner_started" | "planner_exited" | "ask_questions":
            data["attempt"] = attempt
        case "evaluator_started" | "evaluator_exited":
            data["attempt"] = (epic.running_evaluator or {}).get("attempt") or 1
        case "submit_evaluation":
            data["attempt"] = (epic.running_evaluator or {}).get("attempt") or 1
            data["criteria"] = [
                {
                    "criterion": 0,
                    "met": draw(st.booleans()),
                    "score": draw(st.sampled_from([0.1, 0.5, 0.9, 1.0])),
                    "evidence": "e",
                }
            ]
        case "submit_plan":
            data["plan"] = draw(st.sampled_from([PLAN, BAD_PLAN, None, {"subtasks": []}]))
        case "judge_union":
            data["passed"] = draw(st.booleans())
            data["evaluate"] = draw(st.booleans())
        case "record_probe":
            data["excluded"] = draw(some_stories)
            data["result"] = draw(st.sampled_from(["passed", "failed", "conflict"]))
        case "conclude_blame":
            data["implicated"] = draw(some_stories)
    send(
        epic,
        event,
        actor=RUNNER,
        reason=draw(st.sampled_from([None, "", "because"])),
        data=data,
        max_attempts=draw(st.integers(1, 3)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_sequences_refuse_cleanly_and_replay_exactly(data: st.DataObject) -> None:
    epic = new_epic()
    events = list(epic.collect_events())
    for _ in range(data.draw(st.integers(5, 60), label="length")):
        before = state(epic)
        try:
            _random_step(epic, data.draw)
        except DomainError:
            assert state(epic) == before, "a refused command changed the epic"
            assert not epic.pending_events
            continue
        new = epic.collect_events()
        # One event per command; a worse evolution's discard comes with its conclusion.
        assert len(new) == 1 or type(new[0]).__name__ == "EvolutionDiscarded"
        events.extend(new)
        # Invariants of every reachable state.
        assert epic.stage in EpicStage
        assert len(set(epic.stories)) == len(epic.stories)
        assert set(epic.round_stories) <= set(epic.stories)
        if epic.stage in (EpicStage.RUNNING, EpicStage.INTEGRATING, EpicStage.MERGING):
            assert epic.round >= 1 and epic.round_stories
        if epic.stage is EpicStage.MERGING:
            assert epic.union is not None and epic.union["passed"]
        if epic.stage is EpicStage.BLOCKED:
            assert epic.blocked_from in ACTIVE_EPIC_STAGES
        if epic.implicated is not None:
            assert set(epic.implicated) <= set(epic.round_stories)
        if epic.stage not in (EpicStage.PLANNING, EpicStage.AWAITING_ANSWERS):
            assert epic.running_planner is None or epic.stage in (
                EpicStage.BLOCKED,
                EpicStage.FAILED,
            ), "a planner outlived planning: its exit could never be recorded"
        if epic.stage is not EpicStage.EVALUATING:
            assert epic.running_evaluator is None or epic.stage in (
                EpicStage.BLOCKED,
                EpicStage.FAILED,
            ), "an evaluator outlived evaluation: its exit could never be recorded"
    replayed = replay(events, stored=True)
    assert state(replayed) == state(epic)
    assert replayed.version == len(events)


def test_agent_outcomes_are_the_stories() -> None:
    # The planner's exit uses the agents' outcome vocabulary, so the runner reports both alike.
    epic = new_epic()
    for outcome in AgentOutcome:
        exit_planner(epic, spawn(epic, max_attempts=99), outcome.value)
    assert epic.failed_plan_attempts == len(AgentOutcome)
