"""``GET /gates/flaky``, ``POST /gates/clear`` and the flaky-gate metrics, over real HTTP
(and ``storyline gates ... --url`` against the same server), on each database.

The story's gate events are recorded through the application's own commands, as the
runner records them (tests/runners/test_flaky_gates.py drives the real gates)."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

from typer.testing import CliRunner

from api.cli import main_app
from service.application import StorylineApplication
from service.gate_registry import GateRegistryService
from tests.api.conftest import READ_TOKEN, WRITE_TOKEN, LiveServer, assert_error

GATE = shlex.join([sys.executable, "flaky gate.py"])
WRITTEN = f'{sys.executable} "flaky gate.py"'
"""The same gate as a person may type it."""
TREE = "ab" * 20
FP = "cd" * 32


def _story_in_gates(app: StorylineApplication) -> str:
    sid = app.create_story(
        name="s", description="d", acceptance_criteria=["a"], actor="user:test"
    ).story.id
    actor = "runner:coder"
    app.transition(sid, "start_coding", actor=actor)
    app.transition(sid, "spawn_agent", actor=actor, data={"agent": "coder", "runtime": "cli"})
    app.transition(sid, "agent_started", actor=actor, data={"attempt": 1, "pid": 4242})
    app.transition(sid, "agent_exited", actor=actor, data={"attempt": 1, "outcome": "completed"})
    app.transition(sid, "start_gates", actor="runner:gates", data={"commits_ahead": 1})
    return sid


def _verdict(app: StorylineApplication, sid: str, passed: bool, **extra: Any) -> None:
    data = {"phase": "gates", "gate": GATE, "tree": TREE, "fingerprint": FP, "passed": passed}
    app.transition(
        sid,
        "record_gate_verdict",
        actor="runner:gates",
        reason="a verdict",
        data={**data, "output": "out", **extra},
    )


def _flaky_and_quarantined(app: StorylineApplication) -> str:
    sid = _story_in_gates(app)
    _verdict(app, sid, False)
    _verdict(app, sid, True, rerun=1)
    app.transition(
        sid,
        "flaky_gate_detected",
        actor="runner:gates",
        reason="flaky gate: failed then passed; quarantined",
        data={
            "phase": "gates",
            "gate": GATE,
            "tree": TREE,
            "fingerprint": FP,
            "outputs": ["boom", "fine"],
            "verdicts": [False, True],
            "action": "quarantined",
        },
    )
    GateRegistryService(app).quarantine(
        actor="runner:gates",
        gate=GATE,
        phase="gates",
        reason=f"found flaky in story {sid}",
        story_id=sid,
    )
    _verdict(app, sid, False, ignored=True)  # a later failure that did not block
    return sid


def _metric(text: str, name: str) -> int:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return int(line.split()[1])


def test_flaky_gates_listed_cleared_and_counted(live_auth: LiveServer) -> None:
    app = live_auth.service.app
    sid = _flaky_and_quarantined(app)
    reader, writer = live_auth.client(READ_TOKEN), live_auth.client(WRITE_TOKEN)

    assert_error(live_auth.client().get("/gates/flaky"), 401, "unauthorized")
    listed = reader.get("/gates/flaky")
    assert listed.status_code == 200, listed.text
    body = listed.json()
    (detection,) = body["detections"]
    assert (detection["gate"], detection["story_id"], detection["tree"]) == (GATE, sid, TREE)
    assert detection["action"] == "quarantined" and detection["verdicts"] == [False, True]
    assert [(q["gate"], q["story_id"]) for q in body["quarantined"]] == [(GATE, sid)]
    assert [d["type"] for d in body["decisions"]] == ["GateQuarantined"]
    assert body["failures_ignored"] == 1
    metrics = reader.get("/metrics").text
    assert _metric(metrics, "storyline_gates_quarantined") == 1
    assert _metric(metrics, "storyline_gate_failures_ignored_total") == 1
    history = [e["type"] for e in reader.get(f"/stories/{sid}/history").json()["events"]]
    assert history.count("GateVerdictRecorded") == 3 and "GateFlakyDetected" in history

    # Refusals change nothing.
    request = {"gate": WRITTEN, "reason": "the race is fixed"}
    assert_error(reader.post("/gates/clear", json=request), 403, "forbidden")
    missing = assert_error(
        writer.post("/gates/clear", json={"gate": "no such gate", "reason": "r"}),
        404,
        "gate_not_quarantined",
    )
    assert missing["quarantined"] == [GATE]
    assert_error(writer.post("/gates/clear", json={"gate": GATE}), 422, "validation_error")
    assert_error(writer.post("/gates/clear", json={**request, "extra": 1}), 422, "validation_error")
    assert_error(
        writer.post("/gates/clear", json={"gate": GATE, "reason": "  "}), 422, "invalid_command"
    )
    assert list(GateRegistryService(app).quarantined()) == [GATE]

    # Cleared once, by the gate as a person types it; a retry with the key is a replay.
    headers = {"Idempotency-Key": "clear-1"}
    cleared = writer.post("/gates/clear", json=request, headers=headers)
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["gate"] == GATE and cleared.json()["quarantined"] == []
    again = writer.post("/gates/clear", json=request, headers=headers)
    assert again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == cleared.json()
    decisions = [(e.type, e.actor, e.reason) for e in GateRegistryService(app).history()]
    assert decisions[1:] == [
        ("GateQuarantined", "runner:gates", f"found flaky in story {sid}"),
        ("GateCleared", "user:bob", "the race is fixed"),
    ]
    body = reader.get("/gates/flaky").json()
    assert body["quarantined"] == []
    assert [d["type"] for d in body["decisions"]] == ["GateCleared", "GateQuarantined"]
    metrics = reader.get("/metrics").text
    assert _metric(metrics, "storyline_gates_quarantined") == 0
    assert _metric(metrics, "storyline_gate_failures_ignored_total") == 1  # a counter


def test_the_cli_talks_to_the_server(live_auth: LiveServer) -> None:
    app = live_auth.service.app
    sid = _flaky_and_quarantined(app)
    invoke = CliRunner().invoke
    remote = ["--url", live_auth.url]

    listed = invoke(main_app, ["gates", "flaky", "--json", *remote, "--token", READ_TOKEN])
    assert listed.exit_code == 0, listed.output
    report = json.loads(listed.output)
    assert [(d["gate"], d["story_id"]) for d in report["detections"]] == [(GATE, sid)]
    table = invoke(main_app, ["gates", "flaky", *remote, "--token", READ_TOKEN])
    assert table.exit_code == 0 and "quarantined" in table.output

    read_only = invoke(
        main_app, ["gates", "clear", GATE, "--reason", "r", *remote, "--token", READ_TOKEN]
    )
    assert read_only.exit_code == 1 and "may not clear" in read_only.output
    cleared = invoke(
        main_app, ["gates", "clear", WRITTEN, "-r", "fixed", *remote, "--token", WRITE_TOKEN]
    )
    assert cleared.exit_code == 0, cleared.output
    assert "its failures block again" in cleared.output
    assert GateRegistryService(app).quarantined() == {}
    twice = invoke(
        main_app, ["gates", "clear", GATE, "-r", "fixed", *remote, "--token", WRITE_TOKEN]
    )
    assert twice.exit_code == 1 and "is not quarantined" in twice.output
