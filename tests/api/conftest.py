"""A real uvicorn server on 127.0.0.1 (ephemeral port, own thread) over each database."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from api.app import create_app
from api.routes_common import ApiState
from domain.config import StorylineConfig
from service.application import StorylineApplication
from service.container import Service
from service.settings import Database

ADMIN_TOKEN = "admin-token-0123456789"
WRITE_TOKEN = "write-token-0123456789"
READ_TOKEN = "read-token-01234567890"
TOKENS = [
    {"actor": "user:alice", "role": "admin", "token": ADMIN_TOKEN},
    {"actor": "user:bob", "role": "write", "token": WRITE_TOKEN},
    {"actor": "user:carol", "role": "read", "token": READ_TOKEN},
]


@dataclass
class LiveServer:
    url: str
    service: Service
    api: FastAPI
    read_models: Any
    server: uvicorn.Server
    thread: threading.Thread
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def state(self) -> ApiState:
        state: ApiState = self.api.state.storyline
        return state

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        for client in self.clients:
            client.close()
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def make_service(
    database: Database, project: Path, config: StorylineConfig | None = None
) -> Service:
    cfg = config or StorylineConfig()
    return Service(
        project=project, db=database, config=cfg, app=StorylineApplication(database, pool_size=10)
    )


def start_server(service: Service, read_models: Any, **app_kwargs: Any) -> LiveServer:
    api = create_app(service, read_models, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        api, log_level="warning", lifespan="on", timeout_graceful_shutdown=2, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return LiveServer(f"http://127.0.0.1:{port}", service, api, read_models, server, thread)


ServerFactory = Callable[..., LiveServer]


@pytest.fixture
def serve_api(database: Database, tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers over ``database`` (each with its own application, as after a restart).

    Keyword arguments go to ``create_app``; ``projections=True`` runs the projection runner
    in the server (only tests that read a projection need it: stopping it takes a moment).
    """
    from projections import ProjectionRunner, ReadModels

    started: list[tuple[LiveServer, Any]] = []

    def start(projections: bool = False, **kwargs: Any) -> LiveServer:
        service = make_service(database, tmp_path)
        read_models = ReadModels(database)
        components = [ProjectionRunner(database, service.app)] if projections else []
        components += kwargs.pop("components", [])
        kwargs.setdefault("tokens", [])
        live = start_server(service, read_models, components=components, **kwargs)
        started.append((live, read_models))
        return live

    yield start
    for live, read_models in reversed(started):
        try:
            live.stop()
        finally:
            read_models.close()
            live.service.close()


@pytest.fixture
def live(serve_api: ServerFactory) -> LiveServer:
    """An unauthenticated server (no tokens: everyone is user:local, admin)."""
    return serve_api()


@pytest.fixture
def live_auth(serve_api: ServerFactory) -> LiveServer:
    from domain.config import TokenConfig

    return serve_api(tokens=[TokenConfig(**t) for t in TOKENS])  # type: ignore[arg-type]


def new_story(client: httpx.Client, **overrides: Any) -> dict[str, Any]:
    body = {"name": "Rate limit uploads", "acceptance_criteria": ["429 after 10 req/s"]}
    body.update(overrides)
    response = client.post("/stories", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The one error shape, with the expected status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    details: dict[str, Any] = body["error"]["details"]
    return details
