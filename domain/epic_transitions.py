"""The epic's transition table: which named events may be sent from which stage.

Like ``domain.transitions`` for stories: names are the wire names of the API and the
runners; finer guards (a running planner, a plan already accepted, the stories of the round)
are checked by the Epic's command methods, and every refusal lists what is legal here.
"""

from __future__ import annotations

from domain.epic_events import ACTIVE_EPIC_STAGES, EpicStage

_ACTIVE = tuple(sorted(ACTIVE_EPIC_STAGES))
_P, _R, _I, _M = EpicStage.PLANNING, EpicStage.RUNNING, EpicStage.INTEGRATING, EpicStage.MERGING
_E, _Q = EpicStage.EVALUATING, EpicStage.AWAITING_ANSWERS

EPIC_TRANSITIONS: dict[str, tuple[str, tuple[EpicStage, ...]]] = {
    # name: (event class, stages it may be sent from)
    "spawn_planner": ("PlannerSpawnRequested", (_P,)),
    "planner_started": ("PlannerStarted", (_P,)),
    # A planner's exit is recorded whatever happened meanwhile (a person may block the epic).
    "planner_exited": ("PlannerExited", (_P, _Q, EpicStage.BLOCKED, EpicStage.FAILED)),
    "submit_plan": ("PlanAccepted or PlanRejected", (_P,)),
    # The interview: a planner may ask instead of planning; a person's answers resume it.
    "ask_questions": ("QuestionsAsked", (_P,)),
    "answer_questions": ("QuestionsAnswered", (_Q,)),
    "farm_out": ("StoriesFarmedOut", (_P, _I)),
    "start_integration": ("IntegrationStarted", (_R,)),
    "judge_union": ("UnionGatesJudged", (_I,)),
    "record_probe": ("BlameProbed", (_I,)),
    "conclude_blame": ("BlameConcluded", (_I,)),
    "rebuild_integration": ("IntegrationRebuilt", (_I,)),
    # Evaluation of the integrated result, and the evolutions it may start.
    "spawn_evaluator": ("EvaluatorSpawnRequested", (_E,)),
    "evaluator_started": ("EvaluatorStarted", (_E,)),
    "evaluator_exited": ("EvaluatorExited", (_E, EpicStage.BLOCKED, EpicStage.FAILED)),
    "submit_evaluation": ("EvaluationSubmitted", (_E,)),
    "conclude_evaluation": (
        "EvaluationConcluded or EvolutionStarted (after EvolutionDiscarded when worse)",
        (_E,),
    ),
    "land": ("EpicLanded", (_M,)),
    "landing_failed": ("EpicLandingFailed", (_M,)),
    "fail": ("EpicFailed", (*_ACTIVE, EpicStage.BLOCKED)),
    "block": ("EpicBlocked", _ACTIVE),
    "unblock": ("EpicUnblocked", (EpicStage.BLOCKED,)),
    "add_note": ("EpicNoteAdded", tuple(EpicStage)),
}

EPIC_EVENT_NAMES: tuple[str, ...] = tuple(EPIC_TRANSITIONS)

PERSON_EVENTS = frozenset({"block", "unblock", "fail", "add_note", "answer_questions"})
"""What a person (a write token) may send; the rest are the runners' and the planner's."""
PLANNER_EVENTS = frozenset({"submit_plan", "ask_questions", "submit_evaluation", "add_note"})
"""What an agent's token (the planner's or the evaluator's) may send for its own epic; the
epic's guards check that the attempt named is the one running."""


def legal_epic_events_from(stage: EpicStage) -> list[str]:
    return [name for name, (_, stages) in EPIC_TRANSITIONS.items() if stage in stages]
