"""Row 10: scale-out, stories per minute with 1, 2 and 3 worker runner processes.

Each run is a fresh cluster (:mod:`bench.cluster`): a bare git remote, one merger process
and N worker processes (``python -m runners --remote``, each with its own clone) on one
scratch PostgreSQL database. ``STORIES`` stories are started at once; the scripted coder
takes ``AGENT_SECS`` (2 s; 1 s with ``--quick``) and ``max_coders`` is 2 per worker.

* ``10``  the coding part: stories per minute from the first ``CodingStarted`` to the last
  story leaving the worker stages (its ``GatesPassed``), which is what the workers do;
* ``10t`` end to end: to the last ``MergeSucceeded`` (the one merger lands them serially).

Target (issue 18): 3 workers >= 2.5x one worker on the coding part. All processes share
this machine's two cores, so the ratio also measures how little CPU a worker spends per
story beyond its agents (which only sleep).
"""

from __future__ import annotations

import time

from bench.cluster import Cluster, create_stories, story_ids
from bench.common import Measurement, Settings, scratch_database

STORIES = 24
LABEL = "scale-out: {n} stories, scripted coder {secs:g} s, max_coders 2 per worker, {what}"


def _scenario(settings: Settings, workers: int, agent_secs: float) -> dict[str, float]:
    from domain.stages import Stage
    from service.application import StorylineApplication

    stories = story_ids(STORIES)
    root = settings.workdir / f"scale-out-{workers}-{time.monotonic_ns()}"
    with scratch_database(settings, "postgres") as db:
        cluster = Cluster.create(
            root, db.url, stories, agent_secs=agent_secs, max_coders=2, lease_ttl=10.0
        )
        app = StorylineApplication(db)
        try:
            create_stories(app, stories)
            cluster.start("merger", role="merger")
            for i in range(1, workers + 1):
                cluster.start(f"worker{i}")
            # Every worker registered before the clock starts: their start-up (imports, a
            # clone) is not what is measured.
            from service.workers import Workers

            registry = Workers(app)
            deadline = time.monotonic() + 120
            while sum(1 for w in registry.rows() if w.alive) < workers + 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"workers did not register:\n{cluster.log_tail()}")
                time.sleep(0.1)
            for sid in stories:
                app.transition(sid, "start_coding", actor="user:bench")
            deadline = time.monotonic() + 60 + STORIES * agent_secs * 3
            while any(app.get_story(s).stage is not Stage.DONE for s in stories):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not every story landed:\n{cluster.log_tail()}")
                for name, proc in cluster.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited:\n{cluster.log_tail()}")
                time.sleep(0.2)
        finally:
            cluster.stop_all()
        first = last_gated = last_landed = None
        for sid in stories:
            for e in app.history(sid):
                t = e.timestamp.timestamp()
                if e.type == "CodingStarted":
                    first = t if first is None else min(first, t)
                elif e.type == "GatesPassed":
                    last_gated = t if last_gated is None else max(last_gated, t)
                elif e.type == "MergeSucceeded":
                    last_landed = t if last_landed is None else max(last_landed, t)
        spawns = len(cluster.agents())
        app.close()
    assert first is not None and last_gated is not None and last_landed is not None
    return {
        "coding": last_gated - first,
        "total": last_landed - first,
        "spawns": float(spawns),
    }


def run(settings: Settings) -> list[Measurement]:
    agent_secs = 1.0 if settings.quick else 2.0
    results: list[Measurement] = []
    for workers in (1, 2, 3):
        found = _scenario(settings, workers, agent_secs)
        note = (
            f"coding {found['coding']:.1f} s, end to end {found['total']:.1f} s, "
            f"{found['spawns']:.0f} agent processes"
        )
        for row, what, secs in (
            ("10", "stories/min, coding part", found["coding"]),
            ("10t", "stories/min, end to end (one merger)", found["total"]),
        ):
            results.append(
                Measurement(
                    row,
                    LABEL.format(n=STORIES, secs=agent_secs, what=what),
                    "postgres",
                    workers,
                    STORIES * 60.0 / secs,
                    "stories/min",
                    note=note,
                )
            )
    return results
