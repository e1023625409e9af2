"""The main job end to end: ``storyline demo`` through the public CLI, in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.settings import Database

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def storyline(
    *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def test_demo_runs_the_whole_pipeline(tmp_path: Path, database: Database) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    env["COLUMNS"] = "160"
    if database.kind == "postgres":
        env["STORYLINE_DATABASE_URL"] = database.url
    project = tmp_path / "calc"
    run = storyline("demo", "--dir", str(project), "--keep", env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "replay check: every projection rebuilt from the log equals the live one" in run.stdout
    assert "audit trail of story 'subtract'" in run.stdout

    board = json.loads(
        storyline("story", "list", "--json", "--project", str(project), env=env).stdout
    )
    stages = {row["id"]: row["stage"] for row in board}
    assert stages == {
        "add": "done",
        "subtract": "done",
        "multiply": "done",
        "banner-en": "done",
        "banner-fr": "done",
        "divide": "blocked",
        "mean": "done",
        # The epic's stories: the plan's three, then the regional replan's one.
        "epic-1.1": "done",
        "epic-1.2": "done",
        "epic-1.3": "done",
        "epic-1.r1": "done",
    }

    subjects = subprocess.run(
        ["git", "log", "--format=%s", "main"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert subjects[-1] == "calc: initial project"
    # The epic lands last, as one squash commit; its stories never merged into main.
    assert subjects[0] == "Operator symbols (epic epic-1)"
    merged = sorted(s.rsplit("(story ", 1)[1].rstrip(")") for s in subjects[1:-1])
    assert merged == ["add", "banner-en", "banner-fr", "mean", "multiply", "subtract"]
    assert (project / "calc" / "subtract.py").read_text().strip().endswith("return a - b")

    history = json.loads(
        storyline(
            "story", "history", "subtract", "--json", "--project", str(project), env=env
        ).stdout
    )
    types = [e["type"] for e in history]
    assert types.count("GatesFailed") == 1 and types[-1] == "MergeSucceeded"
    spawns = [e for e in history if e["type"] == "AgentSpawnRequested"]
    assert not any("quality gates failed" in a for a in spawns[0]["data"]["argv"])
    assert any("AssertionError" in a for a in spawns[1]["data"]["argv"])

    fr = json.loads(
        storyline(
            "story", "history", "banner-fr", "--json", "--project", str(project), env=env
        ).stdout
    )
    kinds = [e["data"].get("kind") for e in fr if e["type"] == "MergeFailed"]
    assert kinds == ["conflict_detected"]
    requeued = next(e for e in fr if e["type"] == "MergeRequeued")
    assert requeued["actor"].startswith("agent:mergemaster-banner-fr-")

    divide = json.loads(
        storyline("story", "show", "divide", "--json", "--project", str(project), env=env).stdout
    )
    assert "retries exhausted" in divide["blocked_reason"]
    assert list((project / ".storyline" / "logs" / "subtract").glob("coder-*.log"))

    check_review(project, run.stdout, env)
    check_epic(project, run.stdout, env)


def check_review(project: Path, stdout: str, env: dict[str, str]) -> None:
    """The reviewed story: sent back once with an unmet criterion, then passing."""
    assert "reviews of story 'mean'" in stdout
    history = json.loads(
        storyline("story", "history", "mean", "--json", "--project", str(project), env=env).stdout
    )
    steps = [
        (e["type"], e["to_stage"])
        for e in history
        if e["type"] in ("GatesPassed", "ReviewFailed", "ReviewPassed", "MergeSucceeded")
    ]
    assert steps == [
        ("GatesPassed", "review"),
        ("ReviewFailed", "coding"),
        ("GatesPassed", "review"),
        ("ReviewPassed", "merge"),
        ("MergeSucceeded", "done"),
    ]
    failed = next(e for e in history if e["type"] == "ReviewFailed")
    assert "unmet: #1 mean(1, 2) == 1.5" in failed["reason"]
    submitted = [e for e in history if e["type"] == "ReviewSubmitted"]
    assert [e["actor"] for e in submitted] == [
        "agent:evaluator-mean-1",
        "agent:evaluator-mean-2",
    ]
    # The second coder was told what the evaluator found (its script expects it, too).
    coders = [
        e for e in history if e["type"] == "AgentSpawnRequested" and e["data"]["role"] == "coder"
    ]
    assert len(coders) == 2
    assert any("mean(1, 2) returns 1, not 1.5" in a for a in coders[1]["data"]["argv"])
    assert not any("mean(1, 2) returns 1, not 1.5" in a for a in coders[0]["data"]["argv"])
    assert (project / "calc" / "mean.py").read_text().strip().endswith("return (a + b) / 2")


def check_epic(project: Path, stdout: str, env: dict[str, str]) -> None:
    """The demo's second part: planned, blamed on power and xor, replanned, landed."""
    assert "part 2: an epic ('Operator symbols')" in stdout
    assert re.search(
        r"round 1: failed on \w+: FAILED: operator symbol '\^' is claimed by calc/power.py "
        r"and calc/xor.py\n",
        stdout,
    )
    assert re.search(r"round 2: passed on \w+: ok: 3 operator symbols", stdout)
    assert "implicated by blame: epic-1.1 (power), epic-1.2 (xor)" in stdout
    assert "kept through the replan: epic-1.3 (modulo)" in stdout
    assert "landed on main: " in stdout and "Operator symbols (epic epic-1)" in stdout
    assert "run mode regional_replan" in stdout

    epic = json.loads(
        storyline("epic", "show", "epic-1", "--json", "--project", str(project), env=env).stdout
    )
    assert (epic["stage"], epic["mode"], epic["round"]) == ("done", "regional_replan", 2)
    assert [s["name"] for s in epic["plan"]["subtasks"]] == ["power", "xor", "modulo"]
    assert epic["kept_stories"] == ["epic-1.3"]
    assert [v["passed"] for v in epic["union_verdicts"]] == [False, True]
    head = subprocess.run(
        ["git", "rev-parse", "main"], cwd=project, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert epic["merge_commit"] == head
    # The ledger is the planner's run plus every story's (the scripted agent's usage).
    ledger = epic["ledger"]
    assert ledger["planner_cost_usd"] > 0 and ledger["stories_cost_usd"] > 0
    assert ledger["tokens_in"] == epic["planner"]["tokens_in"] + sum(
        s["tokens_in"] for s in epic["stories"]
    )
    assert f"${ledger['cost_usd']:.4f}" in stdout

    history = json.loads(
        storyline("epic", "history", "epic-1", "--json", "--project", str(project), env=env).stdout
    )
    probes = {
        tuple(e["data"]["excluded"]): e["data"]["result"]
        for e in history
        if e["type"] == "BlameProbed"
    }
    assert probes == {("epic-1.1",): "passed", ("epic-1.2",): "passed", ("epic-1.3",): "failed"}
    blame = [e["data"] for e in history if e["type"] == "BlameConcluded"]
    assert [(b["implicated"], b["clean"]) for b in blame] == [
        (["epic-1.1", "epic-1.2"], ["epic-1.3"])
    ]
    rebuilt = next(e["data"] for e in history if e["type"] == "IntegrationRebuilt")
    assert rebuilt["kept"] == ["epic-1.3"]
    rounds = [e["data"] for e in history if e["type"] == "StoriesFarmedOut"]
    assert [(r["mode"], r["stories"]) for r in rounds] == [
        ("parallel", ["epic-1.1", "epic-1.2", "epic-1.3"]),
        ("regional_replan", ["epic-1.r1"]),
    ]
    assert history[-1]["type"] == "EpicLanded"
    # Every probe the demo printed is one recorded probe.
    assert stdout.count("BlameProbed") == 3
    # On main: modulo kept from round 1, power and xor as the replan redid them.
    power = (project / "calc" / "power.py").read_text()
    assert 'SYMBOL = "**"' in power
    assert 'SYMBOL = "^"' in (project / "calc" / "xor.py").read_text()
    assert 'SYMBOL = "%"' in (project / "calc" / "modulo.py").read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_demo_against_a_separate_server(tmp_path: Path, pg_database: Database) -> None:
    """``demo --prepare``, then ``serve`` in its own process, then ``demo --url``: the
    README's recipe for watching the pipeline on a server started by hand, on PostgreSQL
    (the projection child and the runners beside the API through the whole pipeline).

    PostgreSQL only for now: the SQLite variant failed once in a CI rehearsal with a 500 on
    the demo's first requests, and did not fail again in 27 local runs (some under load);
    the server's log is now printed on failure, and the cause is still open (see the
    closing note of 2026-11-22)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    env["COLUMNS"] = "160"
    env["STORYLINE_DATABASE_URL"] = pg_database.url
    project = tmp_path / "calc"
    prepared = storyline("demo", "--prepare", "--dir", str(project), env=env)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert f"storyline demo --url http://127.0.0.1:8765 --project {project}" in prepared.stdout

    refused = storyline("demo", "--url", "http://127.0.0.1:1", "--project", str(tmp_path), env=env)
    assert refused.returncode == 2 and "is not a demo project" in refused.stderr

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--project", str(project), "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.1)
        run = storyline("demo", "--url", url, "--project", str(project), env=env)
        if run.returncode != 0:
            server.send_signal(signal.SIGINT)
            log = server.communicate(timeout=60)[1]
            raise AssertionError(run.stdout[-3000:] + run.stderr[-3000:] + log[-6000:])
        assert "replay check: skipped (the server's database is not local)" in run.stdout
        rows = httpx.get(f"{url}/stories", params={"limit": 100}).json()["stories"]
        board = {row["id"]: row["stage"] for row in rows}
        epic = httpx.get(f"{url}/epics/epic-1").json()
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err[-3000:]
    assert board == {
        "add": "done",
        "subtract": "done",
        "multiply": "done",
        "banner-en": "done",
        "banner-fr": "done",
        "divide": "blocked",
        "mean": "done",
        "epic-1.1": "done",
        "epic-1.2": "done",
        "epic-1.3": "done",
        "epic-1.r1": "done",
    }
    assert (epic["stage"], epic["mode"]) == ("done", "regional_replan")


def test_the_readme_postgresql_demo_line_works_on_an_empty_database(tmp_path: Path) -> None:
    """The README's PostgreSQL line, as written, on a database with no schema at all."""
    from tests.conftest import create_pg_database, drop_pg_database

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"`STORYLINE_DATABASE_URL=postgresql://… (\./storyline demo[^`]*)`", readme)
    assert found, "the README no longer shows how to run the demo on PostgreSQL"
    command = found.group(1)
    db = create_pg_database()  # empty: not migrated
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
        env["COLUMNS"] = "160"
        env["STORYLINE_DATABASE_URL"] = db.url
        run = subprocess.run(
            ["bash", "-c", command],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "replay check: every projection rebuilt from the log equals the live one" in (
            run.stdout
        )
        # A second run on the same database says what is wrong instead of failing midway.
        again = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
        )
        assert again.returncode == 1
        assert "already holds 11 stories and 1 epic:" in again.stdout + again.stderr
    finally:
        drop_pg_database(db)
