"""The epic's service layer on both backends: create, the named transitions, a round saved
with its stories in one transaction, history and as-of views, and the cost ledger."""

from __future__ import annotations

import pytest

from domain.epic_events import EpicStage, RunMode
from domain.errors import (
    EpicIllegalTransition,
    EpicNotFound,
    InvalidCommand,
    InvalidStoryId,
    StoryNotFound,
    VersionConflict,
)
from service.application import StorylineApplication
from service.epics import EpicService, NewStory

PLAN = {
    "subtasks": [
        {
            "name": "parser",
            "description": "Parse the input format.",
            "acceptance_criteria": ["parses the sample"],
            "footprint": ["src/parse.py"],
        },
        {
            "name": "printer",
            "description": "Print the result.",
            "acceptance_criteria": ["prints the sample"],
            "footprint": ["src/print.py"],
        },
        {
            "name": "cli",
            "description": "Wire both into the CLI.",
            "acceptance_criteria": ["cli runs"],
            "depends_on": ["parser", "printer"],
            "footprint": ["src/cli.py", "src/parse.py"],
        },
    ]
}


def _epic(epics: EpicService) -> str:
    return epics.create(
        name="Pretty printer",
        goal="Read a file and print it prettily.",
        acceptance_criteria=["the CLI prints the sample prettily"],
        actor="user:alice",
        max_budget_usd=5.0,
    ).epic.id


def test_create_allocates_ids_and_reads_back(app: StorylineApplication) -> None:
    epics = EpicService(app)
    first, second = _epic(epics), _epic(epics)
    assert (first, second) == ("epic-1", "epic-2")
    epic = epics.get(first)
    assert epic.stage is EpicStage.PLANNING
    assert epic.max_budget_usd == 5.0
    assert epics.ids() == [first, second]
    # An epic is not a story, and a story is not an epic.
    with pytest.raises(StoryNotFound):
        app.get_story(first)
    app.create_story(name="s", description="", acceptance_criteria=["a"], actor="user:a")
    assert "1" in app.story_ids()
    with pytest.raises(EpicNotFound):
        epics.get("1")
    with pytest.raises(EpicNotFound):
        epics.get("../etc")


def test_story_ids_of_the_epic_form_are_refused(app: StorylineApplication) -> None:
    with pytest.raises(InvalidStoryId, match="epics"):
        app.create_story(
            name="s", description="", acceptance_criteria=["a"], actor="user:a", story_id="epic-7"
        )


def test_bad_input_is_refused_and_changes_nothing(app: StorylineApplication) -> None:
    epics = EpicService(app)
    for kwargs in (
        {"goal": "  "},
        {"acceptance_criteria": []},
        {"max_budget_usd": -1.0},
        {"name": "a\x1bb"},
    ):
        args = {
            "name": "n",
            "goal": "g",
            "acceptance_criteria": ["c"],
            "actor": "user:a",
            **kwargs,
        }
        with pytest.raises(InvalidCommand):
            epics.create(**args)  # type: ignore[arg-type]
    assert epics.ids() == []


def test_plan_rejected_then_accepted_and_farmed_out_atomically(app: StorylineApplication) -> None:
    epics = EpicService(app)
    eid = _epic(epics)
    bad = {"subtasks": [{**PLAN["subtasks"][0], "depends_on": ["nothing"]}]}
    rejected = epics.transition(eid, "submit_plan", actor="agent:planner", data={"plan": bad})
    assert rejected.result and "lacks" in rejected.result[0]  # type: ignore[index]
    assert rejected.epic.failed_plan_attempts == 1
    accepted = epics.transition(eid, "submit_plan", actor="agent:planner", data={"plan": PLAN})
    assert accepted.result == []
    assert accepted.epic.plan is not None and accepted.epic.single_session_reason is None
    # A second plan is refused with the legal events listed.
    with pytest.raises(EpicIllegalTransition, match="already accepted"):
        epics.transition(eid, "submit_plan", actor="agent:planner", data={"plan": PLAN})

    version = epics.get(eid).version
    new = [
        NewStory(f"{eid}.{i + 1}", s["name"], s["description"], s["acceptance_criteria"])
        for i, s in enumerate(PLAN["subtasks"])
    ]
    done = epics.farm_out(
        eid,
        actor="runner:epic",
        mode=RunMode.PARALLEL,
        stories=new,
        fork_point="a" * 40,
        integration_tip="a" * 40,
        expected_version=version,
    )
    assert done.epic.stage is EpicStage.RUNNING
    for s in new:
        story = app.get_story(s.story_id)
        assert story.epic == eid and story.target_branch == f"epic/{eid}"
    # The same round again: refused, and no story is created twice.
    with pytest.raises((VersionConflict, EpicIllegalTransition)):
        epics.farm_out(
            eid,
            actor="runner:epic",
            mode=RunMode.PARALLEL,
            stories=new,
            fork_point="a" * 40,
            integration_tip="a" * 40,
            expected_version=version,
        )
    assert sorted(s for s in app.story_ids() if s.startswith(eid)) == [s.story_id for s in new]


def test_history_and_as_of_show_every_step(app: StorylineApplication) -> None:
    epics = EpicService(app)
    eid = _epic(epics)
    epics.transition(eid, "block", actor="user:bob", reason="waiting for the API design")
    at_block = epics.history(eid)[-1].position
    epics.transition(eid, "unblock", actor="user:bob", reason="design agreed")
    history = epics.history(eid)
    assert [h.type for h in history] == ["EpicCreated", "EpicBlocked", "EpicUnblocked"]
    assert history[1].actor == "user:bob" and history[1].reason == "waiting for the API design"
    assert epics.get_as_of(eid, position=at_block).stage is EpicStage.BLOCKED
    assert epics.get(eid).stage is EpicStage.PLANNING
    with pytest.raises(InvalidCommand, match="reason"):
        epics.transition(eid, "block", actor="user:bob")
