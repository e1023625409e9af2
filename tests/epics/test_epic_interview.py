"""The interview end to end, on both backends: a scripted planner asks instead of planning,
the epic waits (no planner runs meanwhile), a person answers over HTTP, and the next planner
attempt plans with every question and answer in its prompt."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from domain.epic_events import EpicStage
from service.settings import Database
from tests.epics.epic_support import (
    add_epic,
    epic_config,
    epic_repo,
    epics_of,
    files_on,
    wait_epic,
    wait_epic_stage,
    write,
)
from tests.pipeline_support import calls, running_pipeline

pytestmark = pytest.mark.slow

Q1 = "Which file should hold the goal?"
Q2 = "What should it say?"
Q3 = "Anything else?"


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        result: dict[str, Any] = json.loads(answer.read())
        return result


def test_questions_answered_over_http_then_planning_goes_on_with_the_answers(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo", need_goal=True)
    planner = {
        "*": {
            "1": [{"ask_questions": [Q1, Q2]}],
            # A second round of questions, with the first round's answers already in view.
            "2": [{"expect_in_prompt": "A1.1: goal.txt"}, {"ask_questions": [Q3]}],
            "3": [
                {"expect_in_prompt": f"Q1.1: {Q1}"},
                {"expect_in_prompt": "A1.1: goal.txt"},
                {"expect_in_prompt": f"Q1.2: {Q2}"},
                {"expect_in_prompt": "A1.2: the word done"},
                {"expect_in_prompt": f"Q2.1: {Q3}"},
                {"expect_in_prompt": "A2.1: no"},
                {"submit_plan": {"prefer_single_session": True, "rationale": "one file"}},
            ],
        }
    }
    coder = {"epic-1.s1": [{"expect_in_prompt": "Write the marker files"}, *write("goal.txt")]}
    config = epic_config(tmp_path, coder, planner, epic={"max_interviews": 2})
    with running_pipeline(repo, database, config, with_api=True) as p:
        api = p.supervisor.launcher.api_url
        assert api is not None
        epics = epics_of(p)
        eid = add_epic(epics)

        epic = wait_epic_stage(epics, eid, EpicStage.AWAITING_ANSWERS)
        assert epic.questions == [Q1, Q2]
        assert epic.failed_plan_attempts == 0  # asking is not a failed plan attempt
        shown = json.loads(urllib.request.urlopen(f"{api}/epics/{eid}", timeout=30).read())
        assert shown["stage"] == "awaiting_answers" and shown["questions"] == [Q1, Q2]

        answered = post(f"{api}/epics/{eid}/answers", {"answers": ["goal.txt", "the word done"]})
        assert answered["stage"] == "planning"
        assert answered["interview"][0]["answers"] == ["goal.txt", "the word done"]

        epic = wait_epic(epics, eid, lambda e: e.questions == [Q3] and e.running_planner is None)
        # The second round through the generic transition endpoint (the same event).
        post(
            f"{api}/epics/{eid}/transitions",
            {"event": "answer_questions", "data": {"answers": ["no"]}, "reason": "nothing more"},
        )

        epic = wait_epic_stage(epics, eid, EpicStage.DONE, EpicStage.FAILED, EpicStage.BLOCKED)
        assert epic.stage is EpicStage.DONE, epic.failed_reason or epic.blocked_reason
        assert [r["questions"] for r in epic.interview] == [[Q1, Q2], [Q3]]
        assert [r["answers"] for r in epic.interview] == [["goal.txt", "the word done"], ["no"]]
        history = epics.history(eid)
        types = [e.type for e in history]
        assert types.count("QuestionsAsked") == 2 and types.count("QuestionsAnswered") == 2
        assert types.count("PlannerSpawnRequested") == 3
        assert epic.failed_plan_attempts == 0
        # Nothing started for the epic while it waited for answers.
        waiting = False
        for kind in types:
            if kind == "QuestionsAsked":
                waiting = True
            elif kind == "QuestionsAnswered":
                waiting = False
            assert not (waiting and kind in ("PlannerSpawnRequested", "StoriesFarmedOut")), types
    planner_calls = calls(tmp_path, "planner")
    assert [c["env"]["STORYLINE_ATTEMPT"] for c in planner_calls] == ["1", "2", "3"]
    assert "goal.txt" in files_on(repo, "main")


def test_questions_beyond_max_interviews_are_refused_and_the_planner_must_plan(
    tmp_path: Path, database: Database
) -> None:
    repo = epic_repo(tmp_path / "repo")
    planner = {
        "*": {
            "1": [{"ask_questions": [Q1]}],
            # Its question is refused (the one round is used up); it plans instead.
            "2": [
                {"ask_questions": [Q3], "allow_failure": True},
                {"submit_plan": {"prefer_single_session": True}},
            ],
        }
    }
    coder = {"epic-1.s1": write("one.txt")}
    config = epic_config(tmp_path, coder, planner, epic={"max_interviews": 1})
    with running_pipeline(repo, database, config, with_api=True) as p:
        api = p.supervisor.launcher.api_url
        epics = epics_of(p)
        eid = add_epic(epics)
        wait_epic_stage(epics, eid, EpicStage.AWAITING_ANSWERS)
        post(f"{api}/epics/{eid}/answers", {"answers": ["one.txt"]})
        epic = wait_epic_stage(epics, eid, EpicStage.DONE, EpicStage.FAILED, EpicStage.BLOCKED)
        assert epic.stage is EpicStage.DONE, epic.failed_reason or epic.blocked_reason
        assert len(epic.interview) == 1
    assert "one.txt" in files_on(repo, "main")
