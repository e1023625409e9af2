"""``storyline serve`` stops promptly on SIGTERM and says what it is waiting for."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.api.test_serve import free_port, run_serve, wait_until_up
from tests.pipeline_support import dump_toml, make_config, make_repo

pytestmark = pytest.mark.slow


def test_sigterm_ends_open_event_streams_instead_of_waiting_them_out(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = run_serve("--project", str(tmp_path), "--port", str(port), "--no-runners")
    try:
        wait_until_up(process, url)
        outcome: dict[str, object] = {}
        connected = threading.Event()

        def follow() -> None:
            try:
                with httpx.stream("GET", f"{url}/events/stream", timeout=60) as response:
                    connected.set()
                    for _ in response.iter_lines():
                        pass
                outcome["ended"] = "cleanly"
            except httpx.HTTPError as exc:
                outcome["ended"] = f"{type(exc).__name__}: {exc}"

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        assert connected.wait(30)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
        reader.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # Before: uvicorn waited out its graceful-shutdown timeout for the stream, then
    # cancelled it (a traceback in the log) and cut the client's connection mid-response.
    assert outcome.get("ended") == "cleanly", (outcome, err)
    assert "graceful shutdown exceeded" not in err
    assert "Traceback" not in err
    # uvicorn re-raises the signal it handled once the shutdown is complete.
    assert process.returncode in (0, -signal.SIGTERM)


def test_sigterm_with_an_agent_running_says_which_it_stops(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    config = make_config(tmp_path, {"*": [{"sleep": 120, "interval": 0.2}]})
    (repo / "storyline.toml").write_text(dump_toml(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = run_serve("--project", str(repo), "--port", str(port), "--log-level", "warning")
    try:
        wait_until_up(process, url)
        created = httpx.post(
            f"{url}/stories",
            json={"id": "slow", "name": "slow", "acceptance_criteria": ["a"]},
            timeout=30,
        )
        assert created.status_code == 201, created.text
        moved = httpx.post(
            f"{url}/stories/slow/transitions", json={"event": "start_coding"}, timeout=30
        )
        assert moved.status_code == 200, moved.text
        for _ in range(600):
            story = httpx.get(f"{url}/stories/slow", timeout=30).json()
            if story.get("running_agent"):
                break
            threading.Event().wait(0.05)
        else:
            raise AssertionError(f"the agent never started: {story}")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "stopping 1 agent(s): story slow (coder, attempt 1, pid" in err, err
