"""``storyline serve``: a real process with uvicorn and the projections running inside."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.settings import Database

SERVE = "import typer; from api.cli_serve import serve; typer.run(serve)"


def free_port() -> int:
    """A port for a server that a test starts in another process.

    Not one the kernel hands out (port 0): those come from the ephemeral range, which every
    outgoing connection of every test draws from too (PostgreSQL connections by the
    hundred), so one could take it before the server binds. Outside that range only
    another test's server could, and it picks at random among ~12,000."""
    low, high = 20000, 32000
    for _ in range(200):
        candidate = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    raise RuntimeError(f"no free port between {low} and {high}")


def database_url(db: Database) -> str:
    return f"sqlite:///{db.sqlite_path}" if db.kind == "sqlite" else db.sqlalchemy_url


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    environment.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", SERVE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def test_refuses_a_public_address_without_tokens(tmp_path: Path) -> None:
    process = run_serve("--project", str(tmp_path), "--host", "0.0.0.0", "--port", "1")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "refusing to serve on '0.0.0.0' without API tokens" in err


def serve_without_runners(
    database: Database, tmp_path: Path, *options: str
) -> tuple[subprocess.Popen[str], str]:
    """``serve --no-runners`` (plus ``options``) on a free port: (process, url)."""
    port = free_port()
    process = run_serve(
        "--project",
        str(tmp_path),
        "--database-url",
        database_url(database),
        "--port",
        str(port),
        "--no-runners",
        "--log-level",
        "warning",
        *options,
    )
    return process, f"http://127.0.0.1:{port}"


def test_serve_runs_api_and_projections(database: Database, tmp_path: Path) -> None:
    process, url = serve_without_runners(database, tmp_path)
    try:
        health = wait_until_up(process, url)
        assert health.status_code == 200
        assert {p["name"] for p in health.json()["projections"]} >= {"board", "history"}
        created = httpx.post(
            f"{url}/stories",
            params={"wait": "true"},
            json={"name": "served", "acceptance_criteria": ["a"]},
            timeout=30,
        )
        assert created.status_code == 201
        assert created.headers["x-storyline-caught-up"] == "true"  # projections run in-process
        listed = httpx.get(f"{url}/stories", timeout=30).json()["stories"]
        assert [row["id"] for row in listed] == [created.json()["id"]]
        assert httpx.get(f"{url}/docs", timeout=30).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "authentication is off" in err


def wait_until_up(process: subprocess.Popen[str], url: str) -> httpx.Response:
    deadline = time.monotonic() + 60
    while True:
        try:
            return httpx.get(f"{url}/healthz", timeout=2)
        except httpx.TransportError:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.05)


def follower_status(url: str) -> dict[str, object]:
    runners = httpx.get(f"{url}/healthz", timeout=10).json()["runners"]
    [status] = [r for r in runners if r.get("component") == "projections"]
    return dict(status)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone as far as work goes; it waits for its parent to reap it.
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return bool(stat) and stat.rpartition(")")[2].split()[0] != "Z"


def eventually(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def create_caught_up(url: str, name: str) -> str:
    created = httpx.post(
        f"{url}/stories",
        params={"wait": "true"},
        json={"name": name, "acceptance_criteria": ["a"]},
        timeout=30,
    )
    assert created.status_code == 201
    assert created.headers["x-storyline-caught-up"] == "true"
    story_id: str = created.json()["id"]
    listed = httpx.get(f"{url}/stories", timeout=30).json()["stories"]
    assert story_id in [row["id"] for row in listed]
    return story_id


def test_projections_in_a_child_process_are_restarted_and_stop_with_the_server(
    database: Database, tmp_path: Path
) -> None:
    process, url = serve_without_runners(database, tmp_path, "--projections", "process")
    try:
        assert wait_until_up(process, url).status_code == 200
        first = follower_status(url)
        assert first["running"] is True and first["restarts"] == 0
        child = int(first["pid"])  # type: ignore[call-overload]
        assert child != process.pid
        create_caught_up(url, "before the crash")

        os.kill(child, signal.SIGKILL)
        eventually(lambda: follower_status(url)["restarts"] == 1)
        second = follower_status(url)
        assert second["running"] is True and second["pid"] != child
        # The new child resumes from the committed positions: nothing is applied twice.
        create_caught_up(url, "after the crash")
        board = httpx.get(f"{url}/stories", timeout=30).json()["stories"]
        assert sorted(row["name"] for row in board) == ["after the crash", "before the crash"]
        replacement = int(second["pid"])  # type: ignore[call-overload]
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "projection worker exited" in err  # the crash is in the server's log
    assert not alive(replacement)


def test_the_projection_child_stops_when_the_server_is_killed(
    database: Database, tmp_path: Path
) -> None:
    process, url = serve_without_runners(database, tmp_path, "--projections", "process")
    try:
        wait_until_up(process, url)
        child = int(follower_status(url)["pid"])  # type: ignore[call-overload]
        process.kill()
        process.communicate(timeout=60)
        eventually(lambda: not alive(child), timeout=20)
    finally:
        if process.poll() is None:
            process.kill()


def test_an_unknown_projections_mode_is_refused(tmp_path: Path) -> None:
    process = run_serve("--project", str(tmp_path), "--projections", "fork", "--port", "1")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "--projections must be auto, thread or process" in err
