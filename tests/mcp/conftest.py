"""A real ``storyline serve`` process and real ``storyline mcp`` processes driven by the MCP
SDK's own stdio client: the same path a runner-spawned agent's CLI takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from domain.stages import AgentRole
from service.agent_tokens import AgentTokens
from service.application import StorylineApplication
from service.settings import Database
from tests.api.test_serve import free_port, run_serve, wait_until_up

ADMIN_TOKEN = "mcp-admin-token-0123456789"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    url: str
    app: StorylineApplication
    process: subprocess.Popen[str]

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def agent_token(self, story_id: str, role: AgentRole = AgentRole.MERGEMASTER) -> str:
        return AgentTokens(self.app).issue(story_id, 1, role)


@pytest.fixture
def server(database: Database, tmp_path: Path) -> Iterator[Server]:
    """``storyline serve --no-runners`` with one admin token: nobody acts anonymously."""
    url_arg = f"sqlite:///{database.sqlite_path}" if database.kind == "sqlite" else None
    port = free_port()
    process = run_serve(
        "--project",
        str(tmp_path),
        "--database-url",
        url_arg or database.sqlalchemy_url,
        "--port",
        str(port),
        "--no-runners",
        "--log-level",
        "warning",
        env={"STORYLINE_TOKENS": f"{ADMIN_TOKEN}=user:admin:admin"},
    )
    url = f"http://127.0.0.1:{port}"
    app = StorylineApplication(database)
    try:
        wait_until_up(process, url)
        yield Server(url, app, process)
    finally:
        process.terminate()
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        app.close()


def mcp_params(env: dict[str, str], *args: str) -> StdioServerParameters:
    """``storyline mcp`` as the agent's CLI starts it: config in the environment only."""
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "api.cli", "mcp", *args],
        env={"PYTHONPATH": str(ROOT), **env},
        cwd=str(ROOT),
    )


@asynccontextmanager
async def mcp_session(env: dict[str, str], *args: str) -> AsyncIterator[ClientSession]:
    with open(os.devnull, "w") as errlog:
        async with (
            stdio_client(mcp_params(env, *args), errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session


def agent_env(server: Server, story_id: str, token: str | None) -> dict[str, str]:
    env = {"STORYLINE_URL": server.url, "STORYLINE_STORY_ID": story_id}
    if token is not None:
        env["STORYLINE_TOKEN"] = token
    return env


async def call(session: ClientSession, tool: str, **arguments: Any) -> tuple[bool, Any]:
    """(is_error, answer): the structured answer, or the error text the model reads."""
    result = await session.call_tool(tool, arguments)
    text = "".join(getattr(block, "text", "") for block in result.content)
    if result.is_error:
        return True, text
    if result.structured_content is not None:
        return False, result.structured_content
    return False, json.loads(text)
