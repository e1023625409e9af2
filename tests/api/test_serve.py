"""``storyline serve``: a real process with uvicorn and the projections running inside."""

from __future__ import annotations

import os
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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


def test_serve_runs_api_and_projections(database: Database, tmp_path: Path) -> None:
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
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.05)
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
