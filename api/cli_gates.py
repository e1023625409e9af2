"""``storyline gates``: flaky gates found from history, and clearing a quarantined one.

Registered by the main CLI as a sub-app (``app`` below). Like ``storyline story`` it works
on the local store or, with ``--url``, on a running server (``GET /gates/flaky``, ``POST
/gates/clear``), and fails in one line on stderr: exit 1 for a refused command, 2 for bad
usage or configuration.
"""

from __future__ import annotations

import getpass
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.client import ClientError, StorylineClient
from domain.errors import DomainError
from service.config_file import ConfigError
from service.container import Service, open_service
from service.settings import SettingsError

app = typer.Typer(
    help="Gates: flaky verdicts found from history, and quarantined gates.",
    no_args_is_help=True,
)

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

_ACTOR = re.compile(r"[a-z]+:[A-Za-z0-9_.@-]{1,100}")


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def _actor(explicit: str | None) -> str:
    """The same rule as ``storyline story``: ``--actor`` as given, else ``user:<login>``."""
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


class _Local:
    def __init__(self, service: Service, actor: str) -> None:
        self.service = service
        self.actor = actor

    def flaky(self, limit: int) -> dict[str, Any]:
        from runners.gate_verdicts import count_ignored_failures, flaky_report

        report = flaky_report(self.service.app, limit=limit)
        report["failures_ignored"] = count_ignored_failures(self.service.app)
        return report

    def clear(self, gate: str, reason: str) -> dict[str, Any]:
        from runners.gate_verdicts import not_quarantined, quarantined_name
        from service.gate_registry import GateRegistryService

        registry = GateRegistryService(self.service.app)
        quarantined = registry.quarantined()
        name = quarantined_name(gate, quarantined)
        if name is None:
            raise ClientError(404, "gate_not_quarantined", not_quarantined(gate, quarantined))
        try:
            position = registry.clear(actor=self.actor, gate=name, reason=reason)
        except DomainError as exc:
            raise ClientError(422, exc.code, exc.message, exc.details or None) from None
        left = [{"gate": g, **info} for g, info in sorted(registry.quarantined().items())]
        return {"gate": name, "position": position, "quarantined": left}


class _Remote:
    def __init__(self, client: StorylineClient) -> None:
        self.client = client

    def flaky(self, limit: int) -> dict[str, Any]:
        result: dict[str, Any] = self.client._json(
            "GET", "/gates/flaky", params={"limit": str(limit)}
        )
        return result

    def clear(self, gate: str, reason: str) -> dict[str, Any]:
        result: dict[str, Any] = self.client._json(
            "POST", "/gates/clear", json={"gate": gate, "reason": reason}
        )
        return result


@contextmanager
def backend(
    url: str | None,
    token: str | None,
    project: Path | None,
    database_url: str | None,
    actor: str | None,
) -> Iterator[_Local | _Remote]:
    try:
        if url:
            client = StorylineClient(url, token=token)
            try:
                yield _Remote(client)
            finally:
                client.close()
            return
        service = open_service(project, database_url)
        try:
            yield _Local(service, _actor(actor))
        finally:
            service.close()
    except (ConfigError, SettingsError) as exc:
        fail(str(exc), 2)
    except ClientError as exc:
        fail(exc.message if exc.status else f"cannot reach {url}: {exc.message}", 1)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _verdicts(values: list[bool] | None) -> str:
    return " then ".join("pass" if v else "fail" for v in values or [])


@app.command("flaky")
def gates_flaky(
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=1000, help="At most this many detections.")
    ] = 100,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Flaky gate detections (newest first) and the gates quarantined now."""
    with backend(url, token, project, database_url, None) as b:
        report = b.flaky(limit)
    if as_json:
        print_json(report)
        return
    quarantined = report["quarantined"]
    if quarantined:
        table = Table("quarantined gate", "phase", "since", "story", "reason", title="Quarantined")
        for q in quarantined:
            table.add_row(
                escape(str(q["gate"])),
                str(q.get("phase") or ""),
                str(q.get("since") or "")[:19].replace("T", " "),
                escape(str(q.get("story_id") or "-")),
                escape(str(q.get("reason") or "")[:100]),
            )
        out.print(table)
    else:
        out.print("no gate is quarantined")
    detections = report["detections"]
    if not detections:
        out.print("no flaky gate detected")
    else:
        table = Table("when", "gate", "tree", "story", "verdicts", "action", title="Flaky")
        for d in detections:
            table.add_row(
                str(d["at"])[:19].replace("T", " "),
                escape(str(d["gate"])),
                str(d["tree"])[:12],
                escape(str(d["story_id"])),
                _verdicts(d.get("verdicts")),
                str(d["action"]),
            )
        out.print(table)
    out.print(
        f"failures ignored while quarantined: {report.get('failures_ignored', 0)}", markup=False
    )


@app.command("clear")
def gates_clear(
    gate: Annotated[
        str, typer.Argument(metavar="GATE", help="The gate's command line, as listed.")
    ],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (recorded).")],
    actor: ActorOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Clear a quarantined gate: its failures block again."""
    if not reason.strip():
        fail("--reason must not be empty", 2)
    with backend(url, token, project, database_url, actor) as b:
        result = b.clear(gate, reason)
    if as_json:
        print_json(result)
    else:
        out.print(
            f"cleared {result['gate']}: its failures block again (position {result['position']})",
            markup=False,
        )
