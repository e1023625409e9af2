"""What the ``storyline`` sub-commands share: options, actor, output and exit codes.

Kept apart from ``api.cli`` so the sub-apps it registers (``epic``, ``gates``) can use the
same helpers without importing it back. Errors end in one line on stderr: exit 1 for a
refused command, 2 for bad usage or configuration.
"""

from __future__ import annotations

import getpass
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.cli_remote import LocalBackend, RemoteBackend, StoryBackend, open_backend
from api.client import ClientError, StorylineClient
from service.config_file import ConfigError
from service.container import Service
from service.settings import SettingsError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ProjectOpt = Annotated[
    Path | None,
    typer.Option("--project", "-C", help="Project directory (default: $STORYLINE_PROJECT or .)"),
]
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url", help="Database URL (default: $STORYLINE_DATABASE_URL or embedded SQLite)"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
UrlOpt = Annotated[
    str | None,
    typer.Option("--url", help="Talk to a running server instead of the local store."),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="STORYLINE_TOKEN", help="API token for --url."),
]
ActorOpt = Annotated[
    str | None, typer.Option("--actor", help="Actor recorded on events (default user:<login>).")
]

L = TypeVar("L")
R = TypeVar("R")

_ACTOR = re.compile(r"[a-z]+:[A-Za-z0-9_.@-]{1,100}")


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def default_actor(explicit: str | None) -> str:
    """``--actor`` as given, else ``user:<login>``."""
    if explicit:
        if not _ACTOR.fullmatch(explicit):
            fail(f"actor must look like user:<name>, got {explicit!r}", 2)
        return explicit
    try:
        login = getpass.getuser()
    except Exception:
        login = "unknown"
    login = re.sub(r"[^A-Za-z0-9_.@-]", "_", login)[:100] or "unknown"
    return f"user:{login}"


@contextmanager
def refusals(url: str | None) -> Iterator[None]:
    """Configuration errors exit 2, the store's or the server's refusals exit 1."""
    try:
        yield
    except (ConfigError, SettingsError) as exc:
        fail(str(exc), 2)
    except ClientError as exc:
        fail(exc.message if exc.status else f"cannot reach {url}: {exc.message}", 1)


@contextmanager
def cli_backend(
    url: str | None,
    token: str | None,
    project: Path | None,
    database_url: str | None,
    *,
    local: Callable[[Service], L],
    remote: Callable[[StorylineClient], R],
) -> Iterator[L | R]:
    """``remote`` over the server at ``url`` when given, else ``local`` over the project's
    store, with the refusals mapped to exit codes."""
    with (
        refusals(url),
        open_backend(
            url=url,
            token=token,
            project=project,
            database_url=database_url,
            local=local,
            remote=remote,
        ) as chosen,
    ):
        yield chosen


def backend(
    url: str | None,
    token: str | None,
    project: Path | None,
    database_url: str | None,
    actor: str | None,
) -> AbstractContextManager[StoryBackend]:
    """The local store, or a running server with ``--url``; refusals exit 1 in one line."""
    recorded = default_actor(actor)
    return cli_backend(
        url,
        token,
        project,
        database_url,
        local=lambda service: LocalBackend(service, recorded),
        remote=RemoteBackend,
    )


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def check_as_of(value: str) -> str:
    if value.isascii() and value.isdigit():  # isdigit alone is true for "²"
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--as-of takes a log position or an ISO time, got {value!r}", 2)
    if moment.tzinfo is None:
        fail("--as-of needs a timezone, e.g. 2026-01-01T12:00:00+00:00", 2)
    return value


def history_table(events: list[dict[str, Any]]) -> Table:
    """A story's or an epic's audit trail, one event a row."""
    table = Table("pos", "v", "time", "event", "actor", "stage", "reason")
    for e in events:
        stages = (
            f"{e['from_stage'] or '-'} -> {e['to_stage']}"
            if e["from_stage"] != e["to_stage"]
            else (e["to_stage"] or "")
        )
        table.add_row(
            str(e["position"]),
            str(e["version"]),
            e["timestamp"][:19].replace("T", " "),
            e["type"],
            escape(e["actor"]),
            stages,
            # A reason is free text: unescaped, "[/x]" in it would crash the table.
            escape((e["reason"] or "")[:80]),
        )
    return table
