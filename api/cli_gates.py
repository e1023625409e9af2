"""``storyline gates``: flaky gates found from history, and clearing a quarantined one.

Registered by the main CLI as a sub-app (``app`` below). Like ``storyline story`` it works
on the local store or, with ``--url``, on a running server (``GET /gates/flaky``, ``POST
/gates/clear``), and fails in one line on stderr: exit 1 for a refused command, 2 for bad
usage or configuration.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from api.cli_common import (
    ActorOpt,
    DbOpt,
    JsonOpt,
    ProjectOpt,
    TokenOpt,
    UrlOpt,
    cli_backend,
    default_actor,
    fail,
    out,
    print_json,
)
from api.client import ClientError, StorylineClient
from domain.errors import DomainError
from service.container import Service

app = typer.Typer(
    help="Gates: flaky verdicts found from history, and quarantined gates.",
    no_args_is_help=True,
)


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


def backend(
    url: str | None,
    token: str | None,
    project: Path | None,
    database_url: str | None,
    actor: str | None,
) -> AbstractContextManager[_Local | _Remote]:
    # The actor is checked once the local store is open; a server takes it from the token.
    return cli_backend(
        url,
        token,
        project,
        database_url,
        local=lambda service: _Local(service, default_actor(actor)),
        remote=_Remote,
    )


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
