"""The ``storyline mcp`` command (the server itself is imported only when it runs: the MCP
SDK is heavy and every other command must start fast)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer


def mcp(
    url: Annotated[
        str | None,
        typer.Option("--url", help="The storyline server (default: $STORYLINE_URL)."),
    ] = None,
    story: Annotated[
        str | None,
        typer.Option("--story", help="The story served (default: $STORYLINE_STORY_ID)."),
    ] = None,
) -> None:
    """MCP server (stdio) for an agent working on one story; token from $STORYLINE_TOKEN."""
    from api.mcp_server import run

    try:
        run(url, story)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
