"""A story's review verdicts over HTTP on a real server over each database: the review flag
at creation, ``GET /stories/{id}/reviews`` after a review sent the story back and one let it
through, the typed review fields of the story itself, and who may read them."""

from __future__ import annotations

import json
from typing import Any

from domain.config import TokenConfig
from domain.stages import AgentRole
from service.agent_tokens import AgentTokens
from service.application import StorylineApplication
from service.settings import Database
from tests.api.conftest import (
    ADMIN_TOKEN,
    READ_TOKEN,
    TOKENS,
    WRITE_TOKEN,
    LiveServer,
    ServerFactory,
    assert_error,
    new_story,
)
from tests.api.test_serve import database_url
from tests.epics.test_epics_cli import storyline

CRITERIA = ["429 after 10 requests/s", "the limit is configurable"]
RUNNER = "runner:test"


def _auth(serve_api: ServerFactory) -> LiveServer:
    return serve_api(tokens=[TokenConfig(**t) for t in TOKENS])  # type: ignore[arg-type]


def _send(app: StorylineApplication, sid: str, event: str, **data: Any) -> None:
    app.transition(sid, event, actor=RUNNER, data=data)


def _code_and_pass_gates(app: StorylineApplication, sid: str, attempt: int) -> None:
    """One coder attempt, then gates that pass into review."""
    if attempt == 1:
        _send(app, sid, "start_coding")
    _send(app, sid, "spawn_agent", agent="coder", runtime="cli")
    _send(app, sid, "agent_started", attempt=attempt, pid=4000 + attempt)
    _send(app, sid, "agent_exited", attempt=attempt, outcome="completed")
    _send(app, sid, "start_gates", commits_ahead=1)
    _send(
        app,
        sid,
        "gates_passed",
        feature_branch=f"feature/story-{sid}",
        commits_ahead=1,
        review=True,
    )


def _judge(app: StorylineApplication, sid: str, attempt: int, *met: bool) -> None:
    """One evaluator attempt that submits a verdict and exits (not yet concluded)."""
    evaluator = {"role": AgentRole.EVALUATOR.value}
    _send(app, sid, "spawn_agent", agent="evaluator", runtime="cli", **evaluator)
    _send(app, sid, "agent_started", attempt=attempt, pid=5000 + attempt, **evaluator)
    app.transition(
        sid,
        "submit_review",
        actor=f"agent:evaluator-{sid}-{attempt}",
        data={
            "attempt": attempt,
            "criteria": [
                {
                    "criterion": i,
                    "met": ok,
                    "score": 0.9 if ok else 0.3,
                    "evidence": f"tests/test_limit.py::test_{i} {'passed' if ok else 'failed'}",
                }
                for i, ok in enumerate(met)
            ],
            "summary": f"verdict {attempt}",
            "commit": "abcd" * 10,
        },
    )
    _send(app, sid, "agent_exited", attempt=attempt, outcome="completed", **evaluator)


def test_review_flag_at_creation(live: LiveServer) -> None:
    client = live.client()
    assert new_story(client)["review"] is None
    assert new_story(client, review=True)["review"] is True
    story = new_story(client, review=False)
    assert story["review"] is False
    assert client.get(f"/stories/{story['id']}").json()["review"] is False
    bad_flags: list[object] = ["yes", 1, [], {"on": True}]
    for bad in bad_flags:
        response = client.post(
            "/stories", json={"name": "n", "acceptance_criteria": ["a"], "review": bad}
        )
        assert_error(response, 422, "validation_error")
    assert client.get("/stories/4").status_code == 404  # nothing created by a refusal


def test_reviews_of_a_story_sent_back_then_passed(serve_api: ServerFactory) -> None:
    live = _auth(serve_api)
    bob, carol = live.client(WRITE_TOKEN), live.client(READ_TOKEN)
    sid = new_story(bob, acceptance_criteria=CRITERIA, review=True)["id"]
    app = live.service.app

    empty = carol.get(f"/stories/{sid}/reviews")
    assert empty.status_code == 200, empty.text
    assert empty.json() == {
        "story_id": sid,
        "stage": "backlog",
        "review": True,
        "reviews": [],
        "pending_review": None,
        "last_review_failure": None,
    }

    _code_and_pass_gates(app, sid, 1)
    _judge(app, sid, 1, True, False)
    pending = carol.get(f"/stories/{sid}/reviews").json()
    assert pending["stage"] == "review" and pending["pending_review"] == 1
    [first] = pending["reviews"]
    assert first["passed"] is None and first.get("min_score") is None
    assert first["all_met"] is False and first["score"] == 0.6

    _send(app, sid, "conclude_review")
    failed = carol.get(f"/stories/{sid}/reviews").json()
    assert failed["stage"] == "coding" and failed["pending_review"] is None
    [first] = failed["reviews"]
    assert (first["attempt"], first["passed"], first["min_score"]) == (1, False, 0.8)
    assert first["criteria"] == [
        {
            "criterion": 0,
            "text": CRITERIA[0],
            "met": True,
            "score": 0.9,
            "evidence": "tests/test_limit.py::test_0 passed",
        },
        {
            "criterion": 1,
            "text": CRITERIA[1],
            "met": False,
            "score": 0.3,
            "evidence": "tests/test_limit.py::test_1 failed",
        },
    ]
    assert first["summary"] == "verdict 1" and first["commit"] == "abcd" * 10
    assert first["at"].startswith("20")
    failure = failed["last_review_failure"]
    assert failure["attempt"] == 1 and failure["min_score"] == 0.8
    assert [(g["criterion"], g["text"], g["met"]) for g in failure["gaps"]] == [
        (1, CRITERIA[1], False)
    ]

    _code_and_pass_gates(app, sid, 2)
    _judge(app, sid, 2, True, True)
    _send(app, sid, "conclude_review")
    passed = carol.get(f"/stories/{sid}/reviews").json()
    assert passed["stage"] == "merge" and passed["last_review_failure"] is None
    assert [(r["attempt"], r["passed"], r["score"]) for r in passed["reviews"]] == [
        (1, False, 0.6),
        (2, True, 0.9),
    ]

    # The story itself carries the same verdicts, typed like the endpoint's.
    story = carol.get(f"/stories/{sid}").json()
    assert story["reviews"] == passed["reviews"]
    assert story["evaluator_attempts"] == 2 and story["evaluator_failed_runs"] == 0
    assert story["pending_review"] is None and story["review"] is True
    # And as it was when the first review had failed.
    position = max(
        e["position"]
        for e in carol.get(f"/stories/{sid}/history").json()["events"]
        if e["type"] == "ReviewFailed"
    )
    past = carol.get(f"/stories/{sid}", params={"as_of": str(position)}).json()
    assert past["last_review_failure"] == failure and len(past["reviews"]) == 1


def test_who_may_read_reviews_and_refusals(serve_api: ServerFactory) -> None:
    live = _auth(serve_api)
    alice = live.client(ADMIN_TOKEN)
    mine = new_story(alice, review=True)["id"]
    other = new_story(alice)["id"]
    tokens = AgentTokens(live.service.app)
    evaluator = live.client(tokens.issue(mine, 1, AgentRole.EVALUATOR))
    before = live.service.app.max_position()

    assert evaluator.get(f"/stories/{mine}/reviews").status_code == 200
    assert_error(evaluator.get(f"/stories/{other}/reviews"), 403, "forbidden")
    assert_error(live.client().get(f"/stories/{mine}/reviews"), 401, "unauthorized")
    assert_error(
        live.client("not-a-token-at-all").get(f"/stories/{mine}/reviews"), 401, "invalid_token"
    )
    assert live.client(READ_TOKEN).get(f"/stories/{mine}/reviews").status_code == 200

    details = assert_error(alice.get("/stories/424242/reviews"), 404, "story_not_found")
    assert details == {"story_id": "424242"}
    for hostile in ("a..b", "x%00", "nl%0A", "%C3%A9t%C3%A9", "x" * 200):
        response = alice.get(f"/stories/{hostile}/reviews")
        assert response.status_code in (404, 422), (hostile, response.text)
        if response.status_code == 422:
            assert_error(response, 422, response.json()["error"]["code"])
    # An epic id is not a story.
    assert alice.get("/stories/epic-1/reviews").status_code == 404
    assert live.service.app.max_position() == before


def test_story_reviews_on_the_command_line(serve_api: ServerFactory, database: Database) -> None:
    """``storyline story reviews`` (and ``add --review``, ``show``) as a user runs them: on
    the local store and, with ``--url``, against the server."""
    live = _auth(serve_api)
    where = ["--project", str(live.service.project), "--database-url", database_url(database)]
    added = json.loads(
        storyline(
            "story",
            "add",
            "Rate limit",
            "-c",
            CRITERIA[0],
            "-c",
            CRITERIA[1],
            "--review",
            "--json",
            *where,
        ).stdout
    )
    sid = added["id"]
    assert added["review"] is True
    off = json.loads(
        storyline("story", "add", "x", "-c", "y", "--no-review", "--json", *where).stdout
    )
    assert off["review"] is False
    app = live.service.app
    _code_and_pass_gates(app, sid, 1)
    _judge(app, sid, 1, True, False)
    _send(app, sid, "conclude_review")

    local = json.loads(storyline("story", "reviews", sid, "--json", *where).stdout)
    remote = json.loads(
        storyline(
            "story",
            "reviews",
            sid,
            "--json",
            "--url",
            live.url,
            env={"STORYLINE_TOKEN": READ_TOKEN},
        ).stdout
    )
    assert local == remote == live.client(READ_TOKEN).get(f"/stories/{sid}/reviews").json()
    human = storyline("story", "reviews", sid, *where).stdout
    for text in (
        "UNMET #1 0.30  the limit is configurable",
        "evidence: tests/test_limit.py::test_1 failed",
        "met   #0 0.90",
        "summary: verdict 1",
        "last failure: attempt 1, score 0.60 (min 0.80); gaps: #1",
        "failed",
    ):
        assert text in human, human
    shown = storyline("story", "show", sid, *where).stdout
    assert "review gaps (attempt 1): #1 the limit is configurable" in shown, shown
    assert "1 evaluator attempts, 1 verdicts, last score 0.60 (failed)" in shown, shown

    unknown = storyline("story", "reviews", "4242", *where, check=False)
    assert unknown.returncode == 1 and "4242" in unknown.stderr
    assert unknown.stderr.count("\n") == 1
