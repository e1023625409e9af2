"""The web board shows review: the review column, a story's verdicts (each criterion met or
unmet with evidence and score), an epic's waiting questions and interview, its evaluations,
evolutions, discarded evolution and final score, the metrics page's pass rate and score
chart, and ``/metrics``'s review families. The states are made with the model itself
(``app.transition``, the epic aggregate saved as the runner would), on both databases."""

from __future__ import annotations

from typing import Any

from api.routes_epics import epics_of
from domain.epic import Epic
from domain.epic_commands import EpicPolicy, apply_epic_named
from domain.epic_events import EpicStage
from service.application import StorylineApplication
from tests.api.conftest import ADMIN_TOKEN, READ_TOKEN, LiveServer
from tests.unit.test_epic_transitions import (
    R1,
    RUNNER,
    farm_out,
    in_evaluating_with_evaluator,
    planned,
    send,
)
from tests.web.test_web_fragments import (
    Serve,
    column,
    fragment,
    serve,  # noqa: F401
)

ACTOR = "runner:test"
CRITERIA = ["429 after 10 req/s", "the limit is configurable"]


def new_story(app: StorylineApplication, name: str) -> str:
    committed = app.create_story(
        name=name,
        description="d",
        acceptance_criteria=CRITERIA,
        depends_on=[],
        actor="user:alice",
    )
    return committed.story.id


def to_review(app: StorylineApplication, sid: str) -> int:
    """Coded, gates passed with review: the story waits in ``review``."""
    step = app.transition
    step(sid, "start_coding", actor=ACTOR)
    step(sid, "spawn_agent", actor=ACTOR, data={"agent": "claude", "runtime": "claude-code"})
    step(sid, "agent_started", actor=ACTOR, data={"attempt": 1, "pid": 4242})
    step(sid, "agent_exited", actor=ACTOR, data={"attempt": 1, "outcome": "completed"})
    step(sid, "start_gates", actor=ACTOR, data={"commits_ahead": 1})
    data = {"feature_branch": f"story/{sid}", "commits_ahead": 1, "review": True}
    return step(sid, "gates_passed", actor=ACTOR, data=data).position


def review(app: StorylineApplication, sid: str, judged: list[tuple[bool, float, str]]) -> int:
    """One evaluator attempt judging every criterion, then the runner's conclusion."""
    step = app.transition
    evaluator = {"role": "evaluator", "agent": "evaluator", "runtime": "claude-code"}
    attempt = app.get_story(sid).evaluator_attempts + 1
    step(sid, "spawn_agent", actor=ACTOR, data={**evaluator, "purpose": "review"})
    step(
        sid, "agent_started", actor=ACTOR, data={"role": "evaluator", "attempt": attempt, "pid": 7}
    )
    criteria = [
        {"criterion": i, "met": met, "score": score, "evidence": evidence}
        for i, (met, score, evidence) in enumerate(judged)
    ]
    verdict = {"attempt": attempt, "criteria": criteria, "summary": f"attempt {attempt}"}
    step(sid, "submit_review", actor="agent:evaluator", data=verdict)
    exited = {"role": "evaluator", "attempt": attempt, "outcome": "completed"}
    step(sid, "agent_exited", actor=ACTOR, data=exited)
    return step(sid, "conclude_review", actor=ACTOR).position


def caught_up(live: LiveServer, position: int) -> None:
    assert live.read_models.wait_for(position, timeout=30)


def test_the_review_column_and_a_storys_verdicts(serve: Serve) -> None:  # noqa: F811
    live = serve()
    app = live.service.app
    reader = live.client(READ_TOKEN)
    sid = new_story(app, "Rate limit uploads")
    caught_up(live, to_review(app, sid))

    board = fragment(reader, "/ui/fragments/board")
    stages = [s.attrs["data-stage"] for s in board.all("section", class_="column")]
    assert stages.index("review") == stages.index("gates") + 1 == stages.index("merge") - 1
    cards = column(board, "review").all("article", data_story_id=sid)
    assert len(cards) == 1
    page = fragment(reader, f"/ui/fragments/stories/{sid}")
    assert page.one(data_role="reviews").one("p", class_="empty")

    # Sent back: criterion 1 unmet, with the evaluator's evidence.
    failed = [(True, 0.9, "tests/test_limit.py::test_429 passes"), (False, 0.2, "hard-coded 10")]
    caught_up(live, review(app, sid, failed))
    card = fragment(reader, f"/ui/fragments/card/{sid}").one("article")
    assert card.attrs["data-stage"] == "coding"
    assert card.one(data_field="review").attrs["data-result"] == "failed"
    assert card.one(data_field="review").text.startswith("0.55")
    assert card.one(data_field="retries").text == "1"

    caught_up(live, to_review_again(app, sid))
    passed = [(True, 1.0, "tests/test_limit.py::test_429 passes"), (True, 0.9, "LIMIT in cfg")]
    caught_up(live, review(app, sid, passed))
    card = fragment(reader, f"/ui/fragments/card/{sid}").one("article")
    assert card.attrs["data-stage"] == "merge"
    assert card.one(data_field="queue-rank").text == "#1"

    page = fragment(reader, f"/ui/fragments/stories/{sid}")
    articles = page.one(data_role="reviews").all("article", class_="review")
    assert [(a.attrs["data-attempt"], a.attrs["data-result"]) for a in articles] == [
        ("2", "passed"),
        ("1", "failed"),
    ]
    first = articles[1]
    assert first.one(data_field="review-score").text == "0.55"
    rows = first.all("tr", data_criterion=True)
    assert [(r.attrs["data-criterion"], r.attrs["data-met"]) for r in rows] == [
        ("0", "true"),
        ("1", "false"),
    ]
    unmet = rows[1]
    assert unmet.one(data_col="text").text == CRITERIA[1]
    assert unmet.one(data_col="met").text == "unmet"
    assert unmet.one(data_col="score").text == "0.20"
    assert unmet.one(data_col="evidence").text == "hard-coded 10"
    assert articles[0].one(data_field="review-score").text == "0.95"

    # The audit trail names each review event with its actor and reason.
    audit = {
        row.one(data_col="event").text: row
        for row in page.one("table", id="audit").all("tr", data_position=True)
    }
    assert audit["ReviewSubmitted"].one(data_col="actor").text == "agent:evaluator"
    assert "criteria met" in audit["ReviewSubmitted"].one(data_col="reason").text
    assert audit["ReviewPassed"].one(data_col="to").text == "merge"
    assert "review passed" in audit["ReviewPassed"].one(data_col="reason").text
    assert "unmet: #1" in audit["ReviewFailed"].one(data_col="reason").text
    # The evaluator's runs are agent attempts like any other.
    attempts = page.one("table", id="attempts").all("tr", data_role_name="evaluator")
    assert sorted(r.attrs["data-attempt"] for r in attempts) == ["1", "2"]


def to_review_again(app: StorylineApplication, sid: str) -> int:
    """Back from review to coding: the coder runs again and the gates pass again."""
    step = app.transition
    step(sid, "spawn_agent", actor=ACTOR, data={"agent": "claude", "runtime": "claude-code"})
    step(sid, "agent_started", actor=ACTOR, data={"attempt": 2, "pid": 4243})
    step(sid, "agent_exited", actor=ACTOR, data={"attempt": 2, "outcome": "completed"})
    step(sid, "start_gates", actor=ACTOR, data={"commits_ahead": 1})
    data = {"feature_branch": f"story/{sid}", "commits_ahead": 1, "review": True}
    return step(sid, "gates_passed", actor=ACTOR, data=data).position


def test_metrics_count_one_passed_and_one_failed_review(serve: Serve) -> None:  # noqa: F811
    live = serve()
    app = live.service.app
    reader = live.client(READ_TOKEN)
    good, bad = new_story(app, "good"), new_story(app, "bad")
    to_review(app, good)
    to_review(app, bad)
    review(app, good, [(True, 0.9, "ok"), (True, 1.0, "ok")])  # 0.95: bucket 1.0
    caught_up(live, review(app, bad, [(True, 0.9, "ok"), (False, 0.4, "no")]))  # 0.65: 0.7

    text = reader.get("/metrics").text
    lines = set(text.splitlines())
    assert 'storyline_reviews_total{result="passed"} 1' in lines
    assert 'storyline_reviews_total{result="failed"} 1' in lines
    assert "# TYPE storyline_review_score histogram" in lines
    cumulative = {f"{k / 10:.1f}": (0 if k < 7 else 1 if k < 10 else 2) for k in range(1, 11)}
    for bound, n in cumulative.items():
        assert f'storyline_review_score_bucket{{le="{bound}"}} {n}' in lines, bound
    assert 'storyline_review_score_bucket{le="+Inf"} 2' in lines
    assert "storyline_review_score_sum 1.6" in lines
    assert "storyline_review_score_count 2" in lines
    assert 'storyline_stories{stage="review"} 0' in lines

    page = fragment(reader, "/ui/fragments/metrics")
    summary = page.one(data_role="review-summary")
    assert summary.attrs["data-reviews"] == "2"
    assert summary.one(data_field="review-pass-rate").text == "50%"
    assert summary.one(data_field="review-mean-score").text == "0.80"
    chart = page.one("svg", data_chart="review-scores")
    titles = [t.text for t in chart.all("title")]
    assert "≤0.7: 1" in titles and "≤1.0: 1" in titles and "≤0.5: 0" in titles


def save(app: StorylineApplication, epic: Epic) -> int:
    recordings = app.save(epic)
    return int(recordings[-1].notification.id)


def test_an_epic_shows_its_waiting_questions_and_interview(serve: Serve) -> None:  # noqa: F811
    live = serve()
    admin = live.client(ADMIN_TOKEN)
    reader = live.client(READ_TOKEN)
    created = admin.post(
        "/epics",
        json={
            "name": "Pretty <printer>",
            "goal": "Print it prettily.",
            "acceptance_criteria": ["x"],
        },
    )
    assert created.status_code == 201, created.text
    epic_id = created.json()["id"]
    epics = epics_of(live.state)
    epics.transition(epic_id, "spawn_planner", actor=RUNNER, data={"agent": "p", "runtime": "c"})
    epics.transition(epic_id, "planner_started", actor=RUNNER, data={"attempt": 1, "pid": 9})
    questions = ["Which output format?", "Colours <on> or off?"]
    asked = {"attempt": 1, "questions": questions}
    epics.transition(epic_id, "ask_questions", actor="agent:planner", data=asked)

    page = fragment(reader, f"/ui/fragments/epics/{epic_id}")
    assert page.one(data_field="stage").text == EpicStage.AWAITING_ANSWERS.value
    waiting = page.one("ol", id="epic-questions").all("li")
    assert [q.text for q in waiting] == questions  # escaped, read back as text
    rounds = page.one(data_role="interview").all("article", class_="interview-round")
    assert [r.attrs["data-answered"] for r in rounds] == ["false"]

    epics.transition(
        epic_id, "answer_questions", actor="user:alice", data={"answers": ["md", "off"]}
    )
    page = fragment(reader, f"/ui/fragments/epics/{epic_id}")
    assert page.one(data_field="stage").text == "planning"
    assert page.all("ol", id="epic-questions") == []
    (answered,) = page.one(data_role="interview").all("article", class_="interview-round")
    assert answered.attrs["data-answered"] == "true"
    pairs = [
        (qa.one(data_col="question").text, qa.one(data_col="answer").text)
        for qa in answered.all("div")
    ]
    assert pairs == [(questions[0], "md"), (questions[1], "off")]


def evolved_epic() -> Epic:
    """Evaluated at 0.5 (evolution 1 started), evaluated again at 0.3: discarded, and with
    ``max_evolutions`` 1 the best (evolution 0) lands with the maximum reached."""
    epic = in_evaluating_with_evaluator()
    send(epic, "evaluator_started", actor=RUNNER)
    first = [{"criterion": 0, "met": False, "score": 0.5, "evidence": "prints <raw> text"}]
    send(epic, "submit_evaluation", data={"attempt": 1, "criteria": first, "summary": "meh"})
    send(epic, "evaluator_exited", actor=RUNNER)
    send(epic, "conclude_evaluation", actor=RUNNER)
    planned(epic)
    farm_out(epic, stories=[R1])
    send(epic, "start_integration", data={"commit": "eeee5555"})
    union: dict[str, Any] = {"commit": "eeee5555", "tree": "bbbb2222", "passed": True}
    send(epic, "judge_union", data={**union, "output": "ok", "evaluate": True})
    send(epic, "spawn_evaluator", actor=RUNNER)
    send(epic, "evaluator_started", actor=RUNNER, data={"attempt": 2, "pid": 5})
    second = [{"criterion": 0, "met": False, "score": 0.3, "evidence": "worse"}]
    send(epic, "submit_evaluation", data={"attempt": 2, "criteria": second})
    send(epic, "evaluator_exited", actor=RUNNER, data={"attempt": 2, "outcome": "completed"})
    policy = EpicPolicy(max_evolutions=1)
    apply_epic_named(epic, "conclude_evaluation", actor=RUNNER, reason=None, data={}, policy=policy)
    return epic


def test_an_epic_shows_its_evaluations_evolutions_and_final_score(serve: Serve) -> None:  # noqa: F811
    live = serve()
    reader = live.client(READ_TOKEN)
    epic = evolved_epic()
    assert epic.stage is EpicStage.MERGING
    save(live.service.app, epic)

    page = fragment(reader, f"/ui/fragments/epics/{epic.id}")
    section = page.one(data_role="evaluation")
    final = section.one(data_role="evaluation-final")
    assert (final.attrs["data-passed"], final.attrs["data-max-reached"]) == ("false", "true")
    assert final.one(data_field="final-score").text == "0.50"
    assert final.one(data_field="max-reached")
    verdicts = section.all("article", class_="review evaluation-verdict")
    assert [(v.attrs["data-evolution"], v.attrs["data-attempt"]) for v in verdicts] == [
        ("1", "2"),
        ("0", "1"),
    ]
    assert [v.one(data_field="evaluation-score").text for v in verdicts] == ["0.30", "0.50"]
    (row,) = verdicts[1].all("tr", data_criterion=True)
    assert row.attrs["data-met"] == "false"
    assert row.one(data_col="evidence").text == "prints <raw> text"
    (evolution,) = section.one("table", id="evolutions").all("tr", data_evolution=True)
    assert evolution.attrs["data-evolution"] == "1"
    assert evolution.one(data_col="after-score").text == "0.50"
    assert "prints <raw> text" in evolution.one(data_col="gaps").text
    (gone,) = section.one("table", id="discarded").all("tr", data_evolution=True)
    assert gone.one(data_col="score").text == "0.30"
    assert "evolution 0" in gone.one(data_col="kept").text
