"""``storyline workers``: the worker runners (scale-out) and the stories they hold.

Like ``storyline gates`` it reads the local store or, with ``--url``, a running server
(``GET /workers``); the body is the same either way (``--json`` prints it). On a single
machine there are no workers and it says so.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from api.cli_common import (
    DbOpt,
    JsonOpt,
    ProjectOpt,
    TokenOpt,
    UrlOpt,
    cli_backend,
    out,
    print_json,
)
from api.client import StorylineClient
from service.container import Service


def _local(service: Service) -> dict[str, Any]:
    from api.routes_workers import workers_report

    return workers_report(service.app)


def _remote(client: StorylineClient) -> dict[str, Any]:
    body: dict[str, Any] = client._json("GET", "/workers")
    return body


def _state(worker: dict[str, Any]) -> str:
    if worker.get("stopped"):
        return "stopped"
    return "[green]alive[/green]" if worker.get("alive") else "[yellow]stale[/yellow]"


def show(body: dict[str, Any]) -> None:
    workers = body.get("workers") or []
    leases = body.get("leases") or []
    if not workers and not leases:
        out.print("no worker runners (single machine: `storyline runner --remote` adds them)")
        return
    table = Table("worker", "host", "role", "capacity", "held", "merger", "heartbeat", "state")
    for w in workers:
        table.add_row(
            escape(str(w["worker_id"])),
            escape(f"{w['host']} ({w['pid']})"),
            escape(str(w["role"])),
            str(w["capacity"]),
            str(w["held"]),
            "yes" if w.get("merger") else "",
            f"{float(w['heartbeat_age_secs']):.1f} s ago",
            _state(w),
        )
    out.print(table)
    out.print(
        f"{body.get('alive', 0)} alive, {body.get('stale', 0)} stale; capacity "
        f"{body.get('capacity', 0)}, holding {body.get('held', 0)}"
    )
    if leases:
        held = Table("story", "held by", "generation", "expires in")
        for lease in leases:
            held.add_row(
                escape(str(lease["story_id"])),
                escape(str(lease["holder"])),
                str(lease["generation"]),
                f"{float(lease['expires_in_secs']):.1f} s",
            )
        out.print(held)


def workers(
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Worker runners (id, host, capacity, stories held, last heartbeat) and live leases."""
    with cli_backend(url, token, project, database_url, local=_local, remote=_remote) as body:
        pass
    if as_json:
        print_json(body)
    else:
        show(body)


__all__ = ["show", "workers"]
