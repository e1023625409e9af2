"""Registering ``storyline mcp`` with an agent attempt (Claude Code's ``--mcp-config`` file).

The file names the server, its URL and the story, and refers to the attempt's token only as
``${STORYLINE_TOKEN}``: Claude Code expands that from its own environment (where the runner
put the token) when it starts the server, so the token is in no file and no argv. The
server is started with this interpreter and ``-P`` so that a package in the agent's working
directory (an ``api/`` of the project being coded) can never shadow storyline's own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

SERVER_NAME = "storyline"
"""Claude Code calls the tools ``mcp__storyline__<tool>``; the allowlist rule is
``mcp__storyline`` (see ``domain.config.CLAUDE_CODE_ALLOWED_TOOLS``)."""
MCP_CONFIG_FLAG = "--mcp-config"
TOKEN_REFERENCE = "${STORYLINE_TOKEN:-}"
"""Empty when the runner issued no token (a server without authentication)."""


def server_entry(url: str, story_id: str) -> dict[str, Any]:
    return {
        "type": "stdio",
        "command": sys.executable,
        "args": ["-P", "-m", "api.cli", "mcp", "--url", url, "--story", story_id],
        "env": {"STORYLINE_TOKEN": TOKEN_REFERENCE},
    }


def mcp_config(url: str, story_id: str) -> dict[str, Any]:
    return {"mcpServers": {SERVER_NAME: server_entry(url, story_id)}}


def write_mcp_config(path: Path, *, url: str, story_id: str) -> Path:
    """Write the attempt's config (owner-only, like every file of an attempt) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(mcp_config(url, story_id), indent=2) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(data)
    return path
