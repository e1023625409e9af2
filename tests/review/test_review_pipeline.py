"""The story review stage end to end: real git, the supervisor, the HTTP API, and scripted
coder and evaluator processes (the evaluator reports its verdict over the API with its own
attempt's token), on both backends.

The repository's gate always passes: what the evaluator judges is whether the story did what
its criteria say (``a.txt`` written, and documented in ``README.md``), which no gate checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from domain.config import StorylineConfig
from domain.stages import Stage
from runners.agents import kill_process_group, process_alive
from runners.launcher import NO_VERDICT
from runners.lease import TABLE as LEASE_TABLE
from runners.supervisor import Supervisor
from service.application import StorylineApplication
from service.container import Service
from service.policies import story_policy
from service.settings import Database
from service.sqlstore import SqlStore
from tests.pipeline_support import (
    Pipeline,
    api_server,
    calls,
    dump_toml,
    git,
    make_repo,
    scripted_agent,
)
from tests.runners.test_runner_crash import stop_runner

ROOT = Path(__file__).resolve().parents[2]
CRITERIA = ["a.txt holds the greeting", "README.md documents a.txt"]
CODE = [{"write": "a.txt", "content": "hello\n"}, {"commit": "write a.txt"}]
DOCUMENT = [{"write": "README.md", "content": "a.txt: the greeting\n"}, {"commit": "document"}]
GAP_EVIDENCE = "README.md does not exist: `cat README.md` says No such file"


def judge(*met: bool, evidence: str = "checked with cat") -> dict[str, Any]:
    criteria = [
        {
            "criterion": i,
            "met": ok,
            "score": 1.0 if ok else 0.2,
            "evidence": evidence if ok else GAP_EVIDENCE,
        }
        for i, ok in enumerate(met)
    ]
    return {"submit_review": {"criteria": criteria, "summary": f"{sum(met)} of {len(met)} met"}}


PASS = judge(True, True)
FAIL = judge(True, False)


def review_config(
    tmp: Path,
    coder: dict[str, Any],
    evaluator: dict[str, Any] | None,
    **overrides: Any,
) -> StorylineConfig:
    agents = []
    for stage, script in (("coder", coder), ("evaluator", evaluator)):
        if script is None:
            continue
        path = tmp / f"{stage}-script.json"
        path.write_text(json.dumps(script))
        agents.append(scripted_agent(stage, path, tmp / f"{stage}-calls.jsonl"))
    raw: dict[str, Any] = {
        "base_branch": "main",
        "max_coders": 2,
        "max_retries": 2,
        "inactivity_timeout_secs": 30,
        "gates": {"commands": [[sys.executable, "check.py"]], "timeout_secs": 60},
        "merge_gates": {"commands": [[sys.executable, "check.py"]], "timeout_secs": 60},
        "agent": agents,
        "review": {"enabled": True},
    }
    raw.update(overrides)
    return StorylineConfig.model_validate(raw)


def repo_at(tmp: Path) -> Path:
    return make_repo(tmp / "repo", {"check.py": "print('ok: gates pass')\n"})


@contextmanager
def pipeline(repo: Path, db: Database, config: StorylineConfig) -> Iterator[Pipeline]:
    """The supervisor and the API in this process; the app's policy from the config (its
    ``[review] min_score`` is what ``conclude_review`` judges by)."""
    app = StorylineApplication(db, policy=story_policy(config))
    service = Service(project=repo, db=db, config=config, app=app)
    with ExitStack() as stack:
        url = stack.enter_context(api_server(service))
        supervisor = Supervisor(service, api_url=url, poll_interval=0.2, full_sweep_interval=1.0)
        supervisor.start()
        stack.callback(supervisor.stop)
        yield Pipeline(service, supervisor)


def add(app: StorylineApplication, sid: str, review: bool | None = None) -> None:
    app.create_story(
        story_id=sid,
        name=f"greeting {sid}",
        description="Write the greeting to a.txt and document it.",
        acceptance_criteria=CRITERIA,
        actor="user:test",
        review=review,
    )
    app.transition(sid, "start_coding", actor="user:test")


def events(p: Pipeline, sid: str, kind: str) -> list[Any]:
    return [e for e in p.app.history(sid) if e.type == kind]


def evaluator_exits(p: Pipeline, sid: str) -> list[tuple[int, str]]:
    return [
        (e.data["attempt"], e.data["outcome"])
        for e in events(p, sid, "AgentExited")
        if e.data["role"] == "evaluator"
    ]


def test_a_review_that_passes_merges_and_the_evaluators_edits_are_discarded(
    tmp_path: Path, database: Database
) -> None:
    repo = repo_at(tmp_path)
    # The evaluator writes and commits a file of its own before judging: neither may land.
    meddle = [{"write": "evil.txt", "content": "x\n"}, {"commit": "evaluator commit"}]
    config = review_config(
        tmp_path, {"s1": [*CODE, *DOCUMENT]}, {"s1": [*meddle, {"write": "junk.txt"}, PASS]}
    )
    with pipeline(repo, database, config) as p:
        add(p.app, "s1")
        story = p.wait_stage("s1", Stage.DONE, Stage.BLOCKED, Stage.MERGE_FAILURE)
    assert story.stage is Stage.DONE, story.blocked_reason
    types = p.types("s1")
    order = ["GatesPassed", "ReviewSubmitted", "ReviewPassed", "MergeStarted", "MergeSucceeded"]
    assert [t for t in types if t in order] == order
    (gates,) = events(p, "s1", "GatesPassed")
    assert gates.to_stage == "review"
    (submitted,) = events(p, "s1", "ReviewSubmitted")
    assert submitted.actor == "agent:evaluator-s1-1" and submitted.data["attempt"] == 1
    assert [c["met"] for c in submitted.data["criteria"]] == [True, True]
    assert story.reviews[0]["passed"] is True and story.retry_count == 0
    files = set(git(repo, "ls-tree", "-r", "--name-only", "main").split())
    assert {"a.txt", "README.md"} <= files and "evil.txt" not in files
    assert "evaluator commit" not in git(repo, "log", "--format=%s", "main")

    (call,) = calls(tmp_path, "evaluator")
    assert call["cwd"] == str(repo / ".storyline" / "worktrees" / "s1")
    assert call["env"]["STORYLINE_ATTEMPT"] == "1" and call["token_present"]
    prompt = call["prompt"]
    for text in ("0. a.txt holds the greeting", "1. README.md documents a.txt", "submit_review"):
        assert text in prompt, text
    assert "+hello" in prompt and "git diff main...HEAD" in prompt  # the diff itself
    spawn = next(e for e in events(p, "s1", "AgentSpawnRequested") if e.data["role"] == "evaluator")
    assert spawn.data["log_path"].endswith("evaluator-1.log")


def test_a_failed_review_sends_the_gaps_to_the_next_coder_then_passes(
    tmp_path: Path, database: Database
) -> None:
    repo = repo_at(tmp_path)
    coder = {
        "s1": {
            "1": CODE,
            "2": [
                {"expect_in_prompt": "Criterion 1: README.md documents a.txt"},
                {"expect_in_prompt": GAP_EVIDENCE},
                *DOCUMENT,
            ],
        }
    }
    config = review_config(tmp_path, coder, {"s1": {"1": [FAIL], "2": [PASS]}})
    with pipeline(repo, database, config) as p:
        add(p.app, "s1")
        story = p.wait_stage("s1", Stage.DONE, Stage.BLOCKED, Stage.MERGE_FAILURE)
    assert story.stage is Stage.DONE, story.blocked_reason
    assert story.retry_count == 1
    (failed,) = events(p, "s1", "ReviewFailed")
    assert failed.to_stage == "coding" and failed.data["attempt"] == 1
    assert [g["criterion"] for g in failed.data["gaps"]] == [1]
    first, second = calls(tmp_path, "coder")
    assert GAP_EVIDENCE not in first["prompt"]
    # The recorded prompt of the second coder has the unmet criterion and the evidence.
    assert "README.md documents a.txt" in second["prompt"] and GAP_EVIDENCE in second["prompt"]
    coder_spawns = [
        e.data["purpose"]
        for e in events(p, "s1", "AgentSpawnRequested")
        if e.data["role"] == "coder"
    ]
    assert coder_spawns == ["code", "retry"]
    assert [r["passed"] for r in story.reviews] == [False, True]
    assert story.last_review_failure is None


def test_reviews_that_keep_failing_block_the_story_with_the_unmet_criteria(
    tmp_path: Path, database: Database
) -> None:
    repo = repo_at(tmp_path)
    # A person unblocks it: the third coder still gets what the review found.
    coder = {"s1": {"1": CODE, "2": CODE, "3": [{"expect_in_prompt": GAP_EVIDENCE}, *DOCUMENT]}}
    evaluator = {"s1": {"1": [FAIL], "2": [FAIL], "3": [PASS]}}
    config = review_config(tmp_path, coder, evaluator, max_retries=1)
    with pipeline(repo, database, config) as p:
        add(p.app, "s1")
        story = p.wait_stage("s1", Stage.BLOCKED, Stage.DONE)
        assert story.stage is Stage.BLOCKED
        assert story.retry_count == 2
        reason = story.blocked_reason or ""
        assert "retries exhausted" in reason and "#1 README.md documents a.txt" in reason
        assert [e.to_stage for e in events(p, "s1", "ReviewFailed")] == ["coding", "blocked"]
        assert len(calls(tmp_path, "evaluator")) == 2
        assert "MergeStarted" not in p.types("s1")
        p.app.transition("s1", "unblock", actor="user:test", reason="README is wanted")
        story = p.wait_stage("s1", Stage.DONE, Stage.BLOCKED)
    assert story.stage is Stage.DONE, story.blocked_reason
    third = calls(tmp_path, "coder")[2]
    assert GAP_EVIDENCE in third["prompt"]


def test_an_evaluator_crash_before_a_session_consumes_no_retry(
    tmp_path: Path, database: Database
) -> None:
    repo = repo_at(tmp_path)
    evaluator = {"s1": {"1": [{"crash_before_session": True}], "2": [PASS]}}
    config = review_config(tmp_path, {"s1": [*CODE, *DOCUMENT]}, evaluator)
    with pipeline(repo, database, config) as p:
        add(p.app, "s1")
        story = p.wait_stage("s1", Stage.DONE, Stage.BLOCKED, Stage.MERGE_FAILURE)
    assert story.stage is Stage.DONE, story.blocked_reason
    assert story.retry_count == 0 and story.evaluator_failed_runs == 0
    assert evaluator_exits(p, "s1") == [(1, "aborted_before_session"), (2, "completed")]
    purposes = [
        e.data["purpose"]
        for e in events(p, "s1", "AgentSpawnRequested")
        if e.data["role"] == "evaluator"
    ]
    assert purposes == ["review", "review_respawn"]
    assert len(calls(tmp_path, "evaluator")) == 2 and len(calls(tmp_path, "coder")) == 1


def test_an_evaluator_without_a_verdict_is_a_failed_run_and_capped(
    tmp_path: Path, database: Database
) -> None:
    repo = repo_at(tmp_path)
    config = review_config(
        tmp_path,
        {"s1": CODE},
        {"s1": [{"say": "looks fine to me"}]},
        review={"enabled": True, "max_failed_runs": 2},
    )
    with pipeline(repo, database, config) as p:
        add(p.app, "s1")
        story = p.wait_stage("s1", Stage.BLOCKED, Stage.DONE)
    assert story.stage is Stage.BLOCKED
    assert "2 times in a row without giving a verdict" in (story.blocked_reason or "")
    assert "max_failed_runs is 2" in (story.blocked_reason or "")
    assert evaluator_exits(p, "s1") == [(1, "failed"), (2, "failed")]
    exits = [e for e in events(p, "s1", "AgentExited") if e.data["role"] == "evaluator"]
    assert all(NO_VERDICT in (e.reason or "") for e in exits)
    assert story.evaluator_failed_runs == 2 and story.retry_count == 0
    assert story.reviews == []


def test_a_story_that_opts_out_skips_review_in_a_reviewing_project(
    tmp_path: Path, database: Database
) -> None:
    repo = repo_at(tmp_path)
    # No evaluator is configured at all: a story that went to review would be blocked.
    other_file = [{"write": "b.txt", "content": "b\n"}, {"commit": "write b.txt"}]
    config = review_config(tmp_path, {"s1": CODE, "s2": other_file}, None)
    with pipeline(repo, database, config) as p:
        add(p.app, "s1", review=False)
        story = p.wait_stage("s1", Stage.DONE, Stage.BLOCKED, Stage.MERGE_FAILURE)
        assert story.stage is Stage.DONE, story.blocked_reason
        add(p.app, "s2")  # the project's [review] enabled decides for this one
        other = p.wait_stage("s2", Stage.DONE, Stage.BLOCKED, Stage.MERGE_FAILURE)
    (gates,) = events(p, "s1", "GatesPassed")
    assert gates.to_stage == "merge"
    assert not any(t.startswith("Review") for t in p.types("s1"))
    assert other.stage is Stage.BLOCKED
    assert other.blocked_reason == 'no [[agent]] with stage = "evaluator" is configured'


def test_a_story_recoded_after_leaving_review_keeps_its_new_commits(
    tmp_path: Path, database: Database
) -> None:
    """The reviewed commit is put back only after the evaluator that was shown it: a story
    blocked while its evaluator ran, then demoted and coded again, reaches review with its
    new commits, and those are what the next evaluator judges and what merges."""
    repo = repo_at(tmp_path)
    more = [{"write": "b.txt", "content": "b\n"}, {"commit": "write b.txt"}]
    config = review_config(
        tmp_path,
        {"s1": {"1": [*CODE, *DOCUMENT], "2": more}},
        {"s1": {"1": [{"silent": 120}], "2": [PASS]}},
    )
    with pipeline(repo, database, config) as p:
        add(p.app, "s1")
        # The evaluator process is up (it records its call first thing).
        p.wait_for("s1", lambda s: bool(s.running_agent and calls(tmp_path, "evaluator")))
        p.app.transition("s1", "block", actor="user:test", reason="wait, one more file")
        p.wait_stage("s1", Stage.BLOCKED)
        p.app.transition("s1", "demote", actor="user:test", reason="one more file")
        p.app.transition("s1", "start_coding", actor="user:test")
        story = p.wait_stage("s1", Stage.DONE, Stage.BLOCKED, Stage.MERGE_FAILURE)
    assert story.stage is Stage.DONE, story.blocked_reason
    assert "b.txt" in git(repo, "ls-tree", "-r", "--name-only", "main").split()
    first, second = calls(tmp_path, "evaluator")
    assert "b.txt" not in first["prompt"] and "+b" in second["prompt"]
    assert [r["attempt"] for r in story.reviews] == [2]


# ---------------------------------------------------------------------- a killed runner


def start_runner(repo: Path, db: Database, url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    argv = [sys.executable, "-m", "runners", "--project", str(repo), "--database-url", db.url]
    return subprocess.Popen(
        [*argv, "--api-url", url, "--poll-interval", "0.2"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )


def wait_for(app: StorylineApplication, sid: str, predicate: Any, log: Path) -> Any:
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        story = app.get_story(sid)
        if predicate(story):
            return story
        time.sleep(0.05)
    history = [(e.type, e.reason) for e in app.history(sid)]
    raise AssertionError(f"{history}\nrunner log:\n{log.read_text()[-5000:]}")


@pytest.mark.slow
def test_a_runner_killed_after_the_verdict_concludes_it_without_a_second_one(
    tmp_path: Path, database: Database
) -> None:
    repo = repo_at(tmp_path)
    # Silent after its verdict: a talkative agent would die of a broken pipe with the runner,
    # and the next runner would find nothing to reap.
    evaluator = {"s1": [PASS, {"write": "leftover.txt"}, {"silent": 120}]}
    config = review_config(tmp_path, {"s1": [*CODE, *DOCUMENT]}, evaluator)
    (repo / "storyline.toml").write_text(dump_toml(config))
    app = StorylineApplication(database, policy=story_policy(config))
    service = Service(project=repo, db=database, config=config, app=app)
    log = tmp_path / "runner.log"
    evaluator_pid = None
    with api_server(service) as url:
        runner = start_runner(repo, database, url, log)
        try:
            add(app, "s1")
            wait_for(app, "s1", lambda s: s.pending_review == 1 and s.running_agent, log)
            evaluator_pid = calls(tmp_path, "evaluator")[0]["pid"]
            assert process_alive(evaluator_pid)
            runner.send_signal(signal.SIGKILL)
            runner.wait(timeout=10)
            assert process_alive(evaluator_pid), "the evaluator died with its runner"
            # The dead runner's lease would expire by itself (15 s): expire it now.
            SqlStore(app).write(
                f"UPDATE {LEASE_TABLE} SET expires_at = 0 WHERE name = ?", ("runners",)
            )
            runner = start_runner(repo, database, url, log)
            story = wait_for(
                app, "s1", lambda s: s.stage in (Stage.DONE, Stage.BLOCKED, Stage.CODING), log
            )
        finally:
            stop_runner(runner, log)
            if evaluator_pid is not None and process_alive(evaluator_pid):
                kill_process_group(evaluator_pid, grace_secs=1.0)
                raise AssertionError("the orphaned evaluator was not killed")
    assert story.stage is Stage.DONE, story.blocked_reason
    history = app.history("s1")
    verdicts = [e.data["attempt"] for e in history if e.type == "ReviewSubmitted"]
    assert verdicts == [1], f"a second verdict was asked for: {verdicts}"
    assert [e.data["attempt"] for e in history if e.type == "ReviewPassed"] == [1]
    exits = [(e.data["attempt"], e.data["outcome"]) for e in history if e.type == "AgentExited"]
    assert exits[-1] == (1, "lost")
    assert len(calls(tmp_path, "evaluator")) == 1
    # What the evaluator left in the worktree did not land.
    assert "leftover.txt" not in git(repo, "ls-tree", "-r", "--name-only", "main").split()
    app.close()
