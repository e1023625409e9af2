"""Row 6: runner reaction latency, the commit of CodingStarted to the agent process running.

A real supervisor (``runners.supervisor.Supervisor``, production defaults) on a real git
repository, with the scripted agent (``python -m runners.scripted_agent``, the stand-in for
the Claude Code CLI used by the tests). One story at a time: create it, let the runner see
it, ``start_coding``, wait for the agent, then ``block`` it (the runner kills the agent and
records the exit) and wait until the runner is idle again, so samples never overlap.

The latency of a sample is ``AgentStarted.timestamp - CodingStarted.timestamp``:

* CodingStarted's timestamp is taken when the event is created, just *before* its commit,
  so the figure is an upper bound on "commit to running" by the commit time (~1 ms);
* AgentStarted's timestamp is taken by the runner right after ``subprocess.Popen`` returned
  for the agent, and Popen returns only once the child has exec'd the agent executable
  (CPython waits on its exec error pipe): the agent process is running. Its interpreter
  start-up that follows is the agent's own business and not counted.

In between, the runner did everything production does: wake on the commit, read the log,
schedule the step, create the worktree (``git worktree add``), record WorktreeReady, issue
the agent's API token, render argv, record AgentSpawnRequested, spawn, write the pid file.
The breakdown (medians) is given in the note.

Modes: ``6`` the supervisor runs in the process that commits (as in ``storyline serve``:
woken by the application's commit listener); ``6x`` the supervisor is a separate
``python -m runners`` process (``storyline runner``), woken by whatever reaches across
processes (polling, or LISTEN/NOTIFY on PostgreSQL).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from bench.common import ROOT, Measurement, Settings, percentile, scratch_database
from service.settings import Database

LABEL_IN = "runner reaction: CodingStarted commit -> agent running (runner in-process)"
LABEL_X = "runner reaction: CodingStarted commit -> agent running (separate runner process)"
AGENT_SCRIPT = {"*": [{"silent": 600}]}


@dataclass
class Sample:
    total: float
    worktree: float
    spawn_recorded: float
    started: float


def _config(tmp: Path) -> Any:
    from tests.pipeline_support import make_config

    return make_config(
        tmp,
        AGENT_SCRIPT,
        max_coders=4,
        inactivity_timeout_secs=3600,
    )


def _events(app: Any, story_id: str) -> dict[str, Any]:
    """The first event of each type in the story's history."""
    seen: dict[str, Any] = {}
    for event in app.history(story_id):
        seen.setdefault(event.type, event)
    return seen


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _drive(app: Any, samples: int, warmup: int, prefix: str) -> list[Sample]:
    out: list[Sample] = []
    for i in range(warmup + samples):
        sid = f"{prefix}{i}"
        app.create_story(
            story_id=sid,
            name=f"reaction {i}",
            description="measure the runner",
            acceptance_criteria=["an agent starts"],
            actor="user:bench",
        )
        time.sleep(0.05)  # the runner sees the creation first, as in real use
        app.transition(sid, "start_coding", actor="user:bench")

        def started(sid: str = sid) -> bool:
            return "AgentStarted" in _events(app, sid)

        def exited(sid: str = sid) -> bool:
            return app.get_story(sid).running_agent is None

        _wait(started, 60, f"{sid} to start")
        seen = _events(app, sid)
        app.transition(sid, "block", actor="user:bench", reason="sample taken")
        _wait(exited, 60, f"{sid}'s agent to exit")
        time.sleep(0.05)
        if i < warmup:
            continue
        t0 = seen["CodingStarted"].timestamp
        out.append(
            Sample(
                total=(seen["AgentStarted"].timestamp - t0).total_seconds(),
                worktree=(seen["WorktreeReady"].timestamp - t0).total_seconds(),
                spawn_recorded=(seen["AgentSpawnRequested"].timestamp - t0).total_seconds(),
                started=(seen["AgentStarted"].timestamp - t0).total_seconds(),
            )
        )
    return out


def _measurement(
    row: str, label: str, backend: str, samples: list[Sample], note: str
) -> Measurement:
    totals = [s.total * 1000 for s in samples]
    worktree = median(s.worktree for s in samples) * 1000
    spawn = median(s.spawn_recorded - s.worktree for s in samples) * 1000
    popen = median(s.started - s.spawn_recorded for s in samples) * 1000
    breakdown = (
        f"{len(samples)} samples; medians: wake+worktree {worktree:.0f} ms, "
        f"token+argv+record spawn {spawn:.0f} ms, Popen+record start {popen:.0f} ms"
    )
    return Measurement(
        row,
        label,
        backend,
        1,
        median(totals),
        "ms (median)",
        p50_ms=percentile(totals, 50),
        p99_ms=percentile(totals, 99),
        note=f"{breakdown}{'; ' + note if note else ''}",
        extra={"samples": totals},
    )


def _project(settings: Settings, name: str) -> tuple[Path, Any]:
    from tests.pipeline_support import make_repo

    base = settings.workdir / f"{name}-{uuid.uuid4().hex[:6]}"
    base.mkdir(parents=True)
    repo = make_repo(base / "repo")
    return repo, _config(base)


def in_process(settings: Settings, db: Database, samples: int, warmup: int) -> list[Sample]:
    from domain.commands import Policy
    from runners.supervisor import Supervisor
    from service.application import StorylineApplication
    from service.container import Service

    repo, config = _project(settings, "reaction-in")
    app = StorylineApplication(db, policy=Policy(max_retries=config.max_retries))
    supervisor = Supervisor(Service(project=repo, db=db, config=config, app=app))
    supervisor.start()
    try:
        return _drive(app, samples, warmup, "r")
    finally:
        supervisor.stop()
        app.close()


def separate_process(settings: Settings, db: Database, samples: int, warmup: int) -> list[Sample]:
    from service.application import StorylineApplication
    from tests.pipeline_support import dump_toml

    repo, config = _project(settings, "reaction-x")
    (repo / "storyline.toml").write_text(dump_toml(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    # A file, not a pipe: the runner logs every step and must never block on a full pipe.
    log_path = repo.parent / "runner.log"
    with open(log_path, "wb") as log:
        runner = subprocess.Popen(
            [sys.executable, "-m", "runners", "--project", str(repo), "--database-url", db.url],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    app = StorylineApplication(db)
    try:
        _wait(
            lambda: (
                "runner started" in log_path.read_text(errors="replace")
                or runner.poll() is not None
            ),
            60,
            "the runner to start",
        )
        if runner.poll() is not None:
            raise RuntimeError(f"the runner exited: {log_path.read_text()[-2000:]}")
        return _drive(app, samples, warmup, "x")
    finally:
        runner.terminate()
        try:
            runner.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            runner.kill()
        app.close()


def run(settings: Settings) -> list[Measurement]:
    samples = 12 if settings.quick else 60
    out: list[Measurement] = []
    for backend in settings.backends:
        with scratch_database(settings, backend) as db:
            out.append(
                _measurement("6", LABEL_IN, backend, in_process(settings, db, samples, 2), "")
            )
    for backend in settings.backends:
        x_samples = max(6, samples // 2)
        with scratch_database(settings, backend) as db:
            out.append(
                _measurement(
                    "6x", LABEL_X, backend, separate_process(settings, db, x_samples, 1), ""
                )
            )
    return out
