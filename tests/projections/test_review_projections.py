"""The review stage in the read models, on SQLite and PostgreSQL: one passed and one failed
review counted exactly (board, history, agent runs, merge queue, metrics and /metrics text),
and a rebuild equal to live following on a workload that reviews stories both ways."""

from __future__ import annotations

import random

from projections import ProjectionRunner, ReadModels
from projections.read_models import render_prometheus
from projections.workload import drive_app
from service.application import StorylineApplication
from tests.projections.conftest import dump_projection_tables

ACTOR = "runner:test"
CRITERIA = ["429 after 10 req/s", "the limit is configurable"]


def reviewed(app: StorylineApplication, name: str, judged: list[tuple[bool, float]]) -> str:
    """A story coded, gated into review, judged once and concluded."""
    sid = app.create_story(
        name=name, description="d", acceptance_criteria=CRITERIA, depends_on=[], actor="user:a"
    ).story.id
    step = app.transition
    step(sid, "start_coding", actor=ACTOR)
    step(sid, "spawn_agent", actor=ACTOR, data={"agent": "claude", "runtime": "claude-code"})
    step(sid, "agent_started", actor=ACTOR, data={"attempt": 1, "pid": 4242})
    step(sid, "agent_exited", actor=ACTOR, data={"attempt": 1, "outcome": "completed"})
    step(sid, "start_gates", actor=ACTOR, data={"commits_ahead": 1})
    gates = {"feature_branch": f"story/{sid}", "commits_ahead": 1, "review": True}
    step(sid, "gates_passed", actor=ACTOR, data=gates)
    evaluator = {"role": "evaluator", "agent": "judge", "runtime": "claude-code"}
    step(sid, "spawn_agent", actor=ACTOR, data={**evaluator, "purpose": "review"})
    step(sid, "agent_started", actor=ACTOR, data={"role": "evaluator", "attempt": 1, "pid": 7})
    criteria = [
        {"criterion": i, "met": met, "score": score, "evidence": f"evidence {i}"}
        for i, (met, score) in enumerate(judged)
    ]
    verdict = {"attempt": 1, "criteria": criteria, "summary": "judged"}
    step(sid, "submit_review", actor="agent:judge", data=verdict)
    exited = {"role": "evaluator", "attempt": 1, "outcome": "completed", "cost_usd": 0.5}
    step(sid, "agent_exited", actor=ACTOR, data=exited)
    step(sid, "conclude_review", actor=ACTOR)
    return sid


def test_one_passed_and_one_failed_review_are_counted_exactly(
    app: StorylineApplication, runner: ProjectionRunner, read_models: ReadModels
) -> None:
    good = reviewed(app, "good", [(True, 0.9), (True, 1.0)])  # 0.95: bucket 1.0
    bad = reviewed(app, "bad", [(True, 0.9), (False, 0.4)])  # 0.65: bucket 0.7
    runner.run_once()

    good_row, bad_row = read_models.board_row(good), read_models.board_row(bad)
    assert good_row is not None and bad_row is not None
    assert (good_row["stage"], good_row["review_passed"], good_row["review_score"]) == (
        "merge",
        True,
        0.95,
    )
    assert good_row["queue_position"] == 1 and good_row["evaluator_attempts"] == 1
    assert (bad_row["stage"], bad_row["review_passed"], bad_row["review_score"]) == (
        "coding",
        False,
        0.65,
    )
    assert bad_row["retry_count"] == 1 and bad_row["pending_review"] is None
    assert bad_row["last_event"] == "ReviewFailed" and bad_row["last_actor"] == ACTOR
    assert "unmet: #1" in (bad_row["last_reason"] or "")
    assert [q["story_id"] for q in read_models.merge_queue()] == [good]
    for sid in (good, bad):
        snapshot = app.get_story(sid).snapshot()
        row = read_models.board_row(sid)
        assert row is not None
        for key in ("evaluator_attempts", "pending_review", "retry_count", "stage"):
            assert row[key] == snapshot[key], key

    history = {e["type"]: e for e in read_models.history(bad, limit=100)}
    submitted = history["ReviewSubmitted"]
    assert submitted["actor"] == "agent:judge"
    assert submitted["reason"] == "1 of 2 criteria met, score 0.65"
    assert (submitted["from_stage"], submitted["to_stage"]) == ("review", "review")
    assert [c["met"] for c in submitted["data"]["criteria"]] == [True, False]
    failed = history["ReviewFailed"]
    assert (failed["from_stage"], failed["to_stage"]) == ("review", "coding")
    assert failed["reason"] and failed["data"]["gaps"][0]["criterion"] == 1
    (run,) = [r for r in read_models.agent_runs(bad) if r["role"] == "evaluator"]
    assert (run["attempt"], run["agent"], run["purpose"], run["outcome"]) == (
        1,
        "judge",
        "review",
        "completed",
    )
    assert run["cost_usd"] == 0.5

    metrics = read_models.metrics()
    assert metrics["reviews_total"] == {"passed": 1, "failed": 1}
    assert metrics["review_pass_rate"] == 0.5
    assert metrics["review_score_count"] == 2
    assert metrics["review_score_sum"] == 1.6
    expected = {f"{k / 10:.1f}": 0 for k in range(1, 11)}
    expected.update({"0.7": 1, "1.0": 1})
    assert metrics["review_score_buckets"] == expected
    assert metrics["stage_entries_total"]["review"] == 2
    text = render_prometheus(metrics, read_models.status())
    assert 'storyline_reviews_total{result="passed"} 1\n' in text
    assert 'storyline_reviews_total{result="failed"} 1\n' in text
    assert 'storyline_review_score_bucket{le="0.6"} 0\n' in text
    assert 'storyline_review_score_bucket{le="0.7"} 1\n' in text
    assert 'storyline_review_score_bucket{le="0.9"} 1\n' in text
    assert 'storyline_review_score_bucket{le="1.0"} 2\n' in text
    assert 'storyline_review_score_bucket{le="+Inf"} 2\n' in text
    assert "storyline_review_score_sum 1.6\n" in text
    assert "storyline_review_score_count 2\n" in text

    # Counted once: a rebuild gives the same rows, and the follower adds nothing more.
    live = dump_projection_tables(read_models)
    assert live["review_metrics"] == [("failed", 7, 1, 6500), ("passed", 10, 1, 9500)]
    runner.rebuild()
    assert dump_projection_tables(read_models) == live
    runner.run_once()
    assert read_models.metrics()["reviews_total"] == {"passed": 1, "failed": 1}


def test_no_review_means_zero_counts_and_no_pass_rate(read_models: ReadModels) -> None:
    metrics = read_models.metrics()
    assert metrics["reviews_total"] == {"passed": 0, "failed": 0}
    assert metrics["review_pass_rate"] is None
    text = render_prometheus(metrics, read_models.status())
    assert 'storyline_reviews_total{result="passed"} 0\n' in text
    assert 'storyline_review_score_bucket{le="+Inf"} 0\n' in text


def test_a_reviewing_workload_rebuilds_into_the_live_rows(
    app: StorylineApplication, runner: ProjectionRunner, read_models: ReadModels
) -> None:
    drive_app(app, random.Random(5), stories=12, steps=500)
    runner.run_once()
    everything = read_models.history(limit=10_000)
    types = {e["type"] for e in everything}
    # Evidence: the workload reviewed stories both ways, through evaluator runs.
    assert {"ReviewSubmitted", "ReviewPassed", "ReviewFailed"} <= types
    assert any(r["role"] == "evaluator" for r in read_models.agent_runs(limit=1000))
    passed = sum(1 for e in everything if e["type"] == "ReviewPassed")
    failed = sum(1 for e in everything if e["type"] == "ReviewFailed")
    assert read_models.metrics()["reviews_total"] == {"passed": passed, "failed": failed}

    live = dump_projection_tables(read_models)
    assert runner.check() == {}
    runner.rebuild()
    assert dump_projection_tables(read_models) == live
