"""What the epic page adds to the epic's view: its interview and its evaluations.

The planner's waiting questions (stage ``awaiting_answers``), every round of questions with
the answers given, each evaluation of the integrated result (criteria met or unmet with
evidence and a score), the evolutions it started, the ones discarded for scoring worse, and
the final score with whether the maximum of evolutions was reached. Read from the epic
aggregate (the event store), as the rest of the epic page is. Functions here block.
"""

from __future__ import annotations

from typing import Any

from api.schemas_epics import load_epic_view
from domain.epic import Epic
from domain.epic_events import EpicStage
from service.epics import EpicService

_READS = 5
"""Reads of the epic and its view before giving up on seeing both at one version."""


def review_view(epic: Epic) -> dict[str, Any]:
    """The interview and evaluation of ``epic``, as plain data for the template."""
    waiting = epic.stage is EpicStage.AWAITING_ANSWERS and bool(epic.questions)
    return {
        "awaiting_answers": waiting,
        "questions": list(epic.questions or []) if waiting else [],
        "interview": [dict(round_) for round_ in epic.interview],
        "evaluations": [
            {**e, "criteria": [dict(c) for c in e.get("criteria", [])]} for e in epic.evaluations
        ],
        "evolution": epic.evolution,
        "evolutions": [
            {**e, "gaps": [dict(g) for g in e.get("gaps", [])]} for e in epic.evolutions
        ],
        "discarded": [dict(d) for d in epic.discarded],
        "best": dict(epic.best) if epic.best else None,
        "final": dict(epic.evaluation_final) if epic.evaluation_final else None,
        "evaluator": {
            "attempts": epic.evaluator_attempts,
            "running": dict(epic.running_evaluator) if epic.running_evaluator else None,
            "pending": epic.pending_evaluation,
        },
    }


def epic_page(epics: EpicService, epic_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The epic's view and its review view at the same version.

    The view (``load_epic_view``) reads the epic itself; the epic is read again for the
    review fields, and both are read again when a command committed in between, so the
    page never mixes two versions (after a few tries the newer review is shown)."""
    view = load_epic_view(epics, epic_id)
    epic = epics.get(epic_id)
    for _ in range(_READS):
        if epic.version == view["version"]:
            break
        view = load_epic_view(epics, epic_id)
        epic = epics.get(epic_id)
    return view, review_view(epic)


__all__ = ["epic_page", "review_view"]
