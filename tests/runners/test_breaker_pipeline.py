"""The provider circuit breaker end to end: the scripted agent prints the Claude Code CLI's
``system/api_retry`` lines and exits as the CLI does when its provider keeps failing; the
supervisor, real git, the real HTTP API (/healthz, /metrics) and the log."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import uvicorn

from domain.stages import Stage
from runners.supervisor import Supervisor
from service.settings import Database
from tests.pipeline_support import Pipeline, calls, make_config, make_repo, running_pipeline

FIX = [{"write": "app.py", "content": "def add(a, b):\n    return a + b\n"}, {"commit": "fix add"}]
RETRY = {
    "type": "system",
    "subtype": "api_retry",
    "attempt": 1,
    "max_retries": 1,
    "retry_delay_ms": 10,
    "error_status": 529,
    "error": "overloaded",
}
OUTAGE = [{"raw": json.dumps(RETRY)}, {"exit": 1, "result": False}]


@contextmanager
def health_api(pipeline: Pipeline) -> Iterator[str]:
    """The real HTTP API with the supervisor's status behind /healthz and /metrics."""
    from api.app import create_app
    from projections import ReadModels

    supervisor: Supervisor = pipeline.supervisor
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    read_models = ReadModels(pipeline.service.db)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(
                pipeline.service,
                read_models,
                runner_status=lambda: [supervisor.status().as_json()],
            ),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        read_models.close()


def test_three_provider_failures_open_the_breaker_and_the_probe_closes_it(
    tmp_path: Path, database: Database
) -> None:
    repo = make_repo(tmp_path / "repo")
    script = {"s1": {"1": OUTAGE, "2": OUTAGE, "3": OUTAGE, "4": FIX}}
    config = make_config(tmp_path, script, provider_breaker_base_secs=3.0)
    with running_pipeline(repo, database, config) as p, health_api(p) as url:
        p.add("s1")
        p.start("s1")
        p.wait_for("s1", lambda s: "ProviderBreakerOpened" in p.types("s1"), timeout=60)
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        (breaker,) = health["breakers"]
        assert (breaker["provider"], breaker["state"], breaker["failures"]) == ("coder", "open", 3)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'storyline_provider_breaker_open{provider="coder"} 1' in metrics
        assert 'storyline_provider_breaker_opened_total{provider="coder"} 1' in metrics
        waiting = p.story("s1")
        assert waiting.stage is Stage.CODING and waiting.running_agent is None
        story = p.wait_stage("s1", Stage.MERGE, Stage.DONE, Stage.MERGE_FAILURE)
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        assert health["breakers"][0]["state"] == "closed"
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'storyline_provider_breaker_open{provider="coder"} 0' in metrics

    history = p.app.history("s1")
    steps = [(e.type, e.data.get("outcome")) for e in history if e.type != "AgentStarted"]
    assert steps[3:13] == [
        ("AgentSpawnRequested", None),
        ("AgentExited", "provider_unavailable"),
        ("AgentSpawnRequested", None),
        ("AgentExited", "provider_unavailable"),
        ("AgentSpawnRequested", None),
        ("AgentExited", "provider_unavailable"),
        ("ProviderBreakerOpened", None),
        ("AgentSpawnRequested", None),  # the half-open probe
        ("AgentExited", "completed"),
        ("ProviderBreakerClosed", None),
    ]
    opened = next(e for e in history if e.type == "ProviderBreakerOpened")
    assert opened.actor == "runner:breaker" and "failed 3 runs in a row" in (opened.reason or "")
    assert opened.data["provider"] == "coder" and opened.data["opened_times"] == 1
    assert opened.data["consecutive_failures"] == 3
    probe = [e for e in history if e.type == "AgentSpawnRequested"][3]
    # No spawn while open: the probe came after the back-off.
    assert probe.timestamp >= datetime.fromisoformat(str(opened.data["open_until"]))
    closed = next(e for e in history if e.type == "ProviderBreakerClosed")
    assert closed.actor == "runner:breaker" and closed.data["provider"] == "coder"
    assert len(calls(tmp_path)) == 4
    # Provider failures consumed no retry, and waiting on the breaker did not block.
    assert story.retry_count == 0 and "StoryBlocked" not in [e.type for e in history]
    assert story.last_event != "ProviderBreakerClosed"  # not a step


def test_a_restarted_runner_keeps_the_breaker_open_and_does_not_open_it_twice(
    tmp_path: Path, database: Database
) -> None:
    repo = make_repo(tmp_path / "repo")
    script = {"s1": {"1": OUTAGE, "2": OUTAGE, "3": OUTAGE, "4": FIX}}
    config = make_config(tmp_path, script, provider_breaker_base_secs=4.0)
    with running_pipeline(repo, database, config) as p:
        p.add("s1")
        p.start("s1")
        p.wait_for("s1", lambda s: "ProviderBreakerOpened" in p.types("s1"), timeout=60)
    # The runner stopped while the breaker was open; a new one reads it from the log.
    with running_pipeline(repo, database, config) as p:
        p.wait_for("s1", lambda s: p.supervisor.status().breakers != [], timeout=20)
        (breaker,) = p.supervisor.status().breakers
        assert (breaker["state"], breaker["failures"], breaker["opened_times"]) == ("open", 3, 1)
        assert len(calls(tmp_path)) == 3
        story = p.wait_stage("s1", Stage.MERGE, Stage.DONE, Stage.MERGE_FAILURE)
    history = p.app.history("s1")
    types = [e.type for e in history]
    assert types.count("ProviderBreakerOpened") == 1 and types.count("ProviderBreakerClosed") == 1
    opened = next(e for e in history if e.type == "ProviderBreakerOpened")
    probe = [e for e in history if e.type == "AgentSpawnRequested"][3]
    assert probe.timestamp >= datetime.fromisoformat(str(opened.data["open_until"]))
    assert len(calls(tmp_path)) == 4 and story.retry_count == 0
