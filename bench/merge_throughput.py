"""Row 9: merge throughput, the speculative merge queue (issue 17) against one merge at a time.

12 stories wait in the merge queue (feature branches each adding a file, walked into the
queue with the named events, as in tests/runners/test_speculative_queue.py); a real
supervisor (production poll and sweep intervals) lands them on a real git repository with
a merge gate that is a real process taking ``GATE_SECS`` (3 s; 1 s with ``--quick``). The
time to land all is measured from the supervisor's start to the last story's outcome
(the timestamp of its MergeSucceeded / MergeFailed event):

* ``9``  all pass, ``max_merge_slots`` = 1 (today's behaviour) and = 4;
* ``9b`` all pass, k = 4 with ``[merge_queue] batch = 3``;
* ``9f`` story 5 of 12 fails its merge gate (ejected), k = 1 and k = 4;
* ``9o`` storyline's own time per landed story, gate time excluded: (time to land all
  - the time some gate process was running) / stories landed, with k = 1 (serial, so the
  two do not overlap); ``9o`` with k = 4: the same for the stacked run (where storyline's
  work overlaps the gates, so this is the time no gate was running).

Targets (issue 17): k=1 / k=4 >= 3 all passing, >= 2 with the failure; 9o < 0.5 s.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any

from bench.common import Measurement, Settings, scratch_database

STORIES = 12
FAILING = 5
LABEL = "merge throughput: 12 queued stories landed, {what}"

GATE = r"""
import json, pathlib, sys, time
out = pathlib.Path(sys.argv[1])
started = time.time()
time.sleep(float(sys.argv[2]))
broken = sorted(p.name for p in pathlib.Path.cwd().glob("BROKEN-*"))
with (out / "gate-times.jsonl").open("a") as log:
    log.write(json.dumps([started, time.time()]) + "\n")
if broken:
    print("integration suite: 1 failed:", ", ".join(broken))
    sys.exit(1)
print("integration suite: ok")
"""


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least one gate process ran (the union of the intervals)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def _scenario(
    settings: Settings,
    backend: str,
    k: int,
    batch: int,
    failing: bool,
    gate_secs: float,
    stories: int = STORIES,
) -> dict[str, Any]:
    from domain.commands import Policy
    from runners.supervisor import Supervisor
    from service.application import StorylineApplication
    from service.container import Service
    from tests.pipeline_support import make_config, make_repo
    from tests.runners.spec_support import queue

    tag = f"k{k}-b{batch}-{'f' if failing else 'p'}-{time.monotonic_ns()}"
    tmp = settings.workdir / tag
    tmp.mkdir(parents=True)
    out = tmp / "gate-out"
    out.mkdir()
    script = tmp / "gate.py"
    script.write_text(GATE)
    gate = [sys.executable, str(script), str(out), str(gate_secs)]
    config = make_config(
        tmp,
        {},
        max_merge_slots=k,
        merge_queue={"batch": batch},
        merge_gates={"commands": [gate], "timeout_secs": 120},
    )
    repo = make_repo(tmp / "repo")
    with scratch_database(settings, backend) as db:
        app = StorylineApplication(db, policy=Policy(max_retries=config.max_retries))
        ids = [f"m{i}" for i in range(1, stories + 1)]
        for i, sid in enumerate(ids, start=1):
            written = {f"s{i}.txt": f"story {i}\n"}
            if failing and i == FAILING:
                written["BROKEN-m5"] = "x\n"
            queue(app, repo, sid, written)
        service = Service(project=repo, db=db, config=config, app=app)
        supervisor = Supervisor(service)
        started = datetime.now().astimezone()
        supervisor.start()
        try:
            deadline = time.monotonic() + 60 + stories * gate_secs * 3
            settled: dict[str, datetime] = {}
            while len(settled) < len(ids):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not all stories settled ({sorted(settled)} did)")
                for sid in ids:
                    if sid in settled:
                        continue
                    story = app.get_story(sid)
                    if story.stage.value in ("done", "merge_failure"):
                        last = [
                            e
                            for e in app.history(sid)
                            if e.type in ("MergeSucceeded", "MergeFailed")
                        ][-1]
                        settled[sid] = last.timestamp
                time.sleep(0.1)
        finally:
            supervisor.stop()
        stages = {sid: app.get_story(sid).stage.value for sid in ids}
        app.close()
    landed = sum(1 for s in stages.values() if s == "done")
    expected = stories - (1 if failing else 0)
    if landed != expected:
        raise RuntimeError(f"{landed} stories landed, expected {expected}: {stages}")
    total = (max(settled.values()) - started).total_seconds()
    lines = (out / "gate-times.jsonl").read_text().splitlines()
    intervals = [tuple(json.loads(line)) for line in lines if line.strip()]
    busy = _busy([(float(a), float(b)) for a, b in intervals])
    return {"total": total, "landed": landed, "gate_runs": len(intervals), "busy": busy}


def run(settings: Settings) -> list[Measurement]:
    gate_secs = 1.0 if settings.quick else 3.0
    backend = settings.backends[0]
    results: list[Measurement] = []

    def row(row: str, what: str, k: int, batch: int, failing: bool) -> dict[str, Any]:
        found = _scenario(settings, backend, k, batch, failing, gate_secs)
        results.append(
            Measurement(
                row,
                LABEL.format(what=what),
                backend,
                k,
                found["total"],
                "s",
                note=(
                    f"{found['landed']} landed, {found['gate_runs']} gate runs of "
                    f"{gate_secs:g} s, gates busy {found['busy']:.1f} s"
                ),
            )
        )
        return found

    serial = row("9", "all pass, max_merge_slots = 1 (one at a time)", 1, 1, False)
    stacked = row("9", "all pass, max_merge_slots = 4 (stacked)", 4, 1, False)
    row("9b", "all pass, max_merge_slots = 4, batch = 3", 4, 3, False)
    row("9f", f"story {FAILING} fails, max_merge_slots = 1", 1, 1, True)
    row("9f", f"story {FAILING} fails, max_merge_slots = 4", 4, 1, True)
    overhead = (serial["total"] - serial["busy"]) / serial["landed"]
    results.append(
        Measurement(
            "9o",
            "merge throughput: storyline's time per landed story, gate time excluded (k = 1)",
            backend,
            None,
            overhead,
            "s",
            note=f"({serial['total']:.1f} s - {serial['busy']:.1f} s gates) / "
            f"{serial['landed']} landed",
        )
    )
    # Stacked, the gates overlap each other and storyline's work: the time no gate ran.
    results.append(
        Measurement(
            "9o",
            "merge throughput: time per landed story when no gate ran (k = 4)",
            backend,
            4,
            (stacked["total"] - stacked["busy"]) / stacked["landed"],
            "s",
            note=f"({stacked['total']:.1f} s - {stacked['busy']:.1f} s gates) / "
            f"{stacked['landed']} landed",
        )
    )
    return results
