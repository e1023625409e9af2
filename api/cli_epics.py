"""``storyline epic``: create, list, show and trace epics; block, unblock or fail one.

Registered by the main CLI as a sub-app (``app`` below). Like ``storyline story`` it works
on the local store or, with ``--url``, on a running server (``api.cli_remote``), and fails
in one line on stderr: exit 1 for a refused command, 2 for bad usage or configuration.
Only the person events are here; the runners and the planner send the rest.
"""

from __future__ import annotations

import getpass
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.cli_remote import StoryBackend, story_backend
from api.client import ClientError
from service.config_file import ConfigError
from service.settings import SettingsError

app = typer.Typer(
    help="Epics: a goal a planner splits into stories that land together.",
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
EpicArg = Annotated[str, typer.Argument(metavar="ID", help="The epic, e.g. epic-3.")]
ReasonOpt = Annotated[str, typer.Option("--reason", "-r", help="Why (recorded in the history).")]

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


@contextmanager
def backend(
    url: str | None,
    token: str | None,
    project: Path | None,
    database_url: str | None,
    actor: str | None,
) -> Iterator[StoryBackend]:
    try:
        with story_backend(
            url=url,
            token=token,
            project=project,
            database_url=database_url,
            actor=_actor(actor),
        ) as chosen:
            yield chosen
    except (ConfigError, SettingsError) as exc:
        fail(str(exc), 2)
    except ClientError as exc:
        fail(exc.message if exc.status else f"cannot reach {url}: {exc.message}", 1)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _style(stage: str) -> str:
    return {
        "done": "green",
        "failed": "red",
        "blocked": "red",
        "planning": "cyan",
        "running": "cyan",
        "integrating": "yellow",
        "merging": "magenta",
    }.get(stage, "white")


def _line(label: str, value: object) -> None:
    out.print(f"  {label}: {value}", markup=False)


def show_epic(view: dict[str, Any]) -> None:
    stage = str(view["stage"])
    out.print(f"[bold]{escape(view['id'])}[/bold]  {escape(view['name'])}")
    out.print(f"  stage: [{_style(stage)}]{stage}[/]   version: {view['version']}")
    _line("goal", view["goal"])
    for criterion in view["acceptance_criteria"]:
        _line("criterion", criterion)
    if view.get("mode"):
        _line("mode", f"{view['mode']} (round {view['round']})")
    planner = view["planner"]
    _line(
        "planner",
        f"{planner['attempts']} attempts, {planner['failed_attempts']} without a usable plan",
    )
    for problem in view.get("plan_problems") or []:
        _line("plan problem", problem)
    if view.get("single_session_reason"):
        _line("single session", view["single_session_reason"])
    plan = view.get("plan") or {}
    for index, subtask in enumerate(plan.get("subtasks") or [], 1):
        deps = subtask.get("depends_on") or []
        after = f" (after {', '.join(deps)})" if deps else ""
        _line(f"subtask {index}", f"{subtask['name']}{after}")
    for story in view["stories"]:
        marks = [m for m in ("kept", "implicated", "clean") if story.get(m)]
        _line(
            f"story {story['id']}",
            f"{story['stage'] or '(not yet created)'}  {story['name'] or ''}"
            + (f"  [{', '.join(marks)}]" if marks else ""),
        )
    _line("integration branch", view["integration_branch"])
    for verdict in view.get("union_verdicts") or []:
        result = "passed" if verdict["passed"] else "failed"
        _line(f"union round {verdict['round']}", f"{result} at {verdict['commit'][:12]}")
    for probe in view.get("probes") or []:
        _line("blame probe", f"without {', '.join(probe['excluded'])}: {probe['result']}")
    if view.get("implicated") is not None:
        _line("implicated", ", ".join(view["implicated"]) or "none")
    if view.get("merge_commit"):
        _line("merge commit", view["merge_commit"])
    if view.get("blocked_reason"):
        _line("blocked", view["blocked_reason"])
    if view.get("failed_reason"):
        _line("failed", view["failed_reason"])
    ledger = view["ledger"]
    cap = ledger.get("max_budget_usd")
    _line(
        "cost",
        f"${ledger['cost_usd']:.4f} (planner ${ledger['planner_cost_usd']:.4f})"
        + (f" of ${cap:.2f}" if cap is not None else "")
        + f", {ledger['tokens_in']}+{ledger['tokens_out']} tokens",
    )
    _line("legal events", ", ".join(view["legal_events"]) or "none")


@app.command("add")
def epic_add(
    name: Annotated[str, typer.Option("--name", help="Short name of the epic.")],
    goal: Annotated[str, typer.Option("--goal", help="What the epic delivers.")],
    criterion: Annotated[
        list[str] | None,
        typer.Option("--criterion", "-c", help="Acceptance criterion (repeatable, at least one)."),
    ] = None,
    max_budget_usd: Annotated[
        float | None,
        typer.Option("--max-budget-usd", help="Dollar cap: reaching it blocks the epic."),
    ] = None,
    actor: ActorOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an epic; a planner agent splits its goal into stories."""
    if not criterion:
        fail("an epic needs at least one --criterion", 2)
    with backend(url, token, project, database_url, actor) as b:
        view = b.create_epic(
            name=name,
            goal=goal,
            acceptance_criteria=list(criterion),
            max_budget_usd=max_budget_usd,
        )
    if as_json:
        print_json(view)
    else:
        out.print(f"created epic {view['id']} ({view['name']}), {view['stage']}", markup=False)


@app.command("list")
def epic_list(
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every epic with its stage, run mode, stories done and cost."""
    with backend(url, token, project, database_url, None) as b:
        epics = b.list_epics()
    if as_json:
        print_json(epics)
        return
    table = Table("id", "stage", "name", "mode", "stories", "cost $")
    for e in epics:
        table.add_row(
            escape(str(e["id"])),
            f"[{_style(str(e['stage']))}]{e['stage']}[/]",
            escape(str(e["name"])),
            str(e.get("mode") or "-"),
            f"{e['stories_done']}/{e['stories_total']}",
            f"{float(e['cost_usd']):.4f}",
        )
    out.print(table)


def _check_as_of(value: str) -> str:
    if value.isascii() and value.isdigit():  # isdigit alone is true for "²"
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--as-of takes a log position or an ISO time, got {value!r}", 2)
    if moment.tzinfo is None:
        fail("--as-of needs a timezone, e.g. 2026-01-01T12:00:00+00:00", 2)
    return value


@app.command("show")
def epic_show(
    epic_id: EpicArg,
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="Log position or ISO time: the epic back then.")
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """An epic's plan, stories and their stages, integration evidence and cost."""
    checked = _check_as_of(as_of) if as_of is not None else None
    with backend(url, token, project, database_url, None) as b:
        view = b.get_epic(epic_id, as_of=checked)
    if as_json:
        print_json(view)
    else:
        show_epic(view)


@app.command("history")
def epic_history(
    epic_id: EpicArg,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The epic's audit trail: every step with actor, reason and stages (probes included)."""
    with backend(url, token, project, database_url, None) as b:
        events = b.epic_history(epic_id)
    if as_json:
        print_json(events)
        return
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
            escape((e["reason"] or "")[:80]),
        )
    out.print(table)


def _move(
    event: str,
    epic_id: str,
    reason: str,
    *,
    data: dict[str, Any] | None,
    expected_version: int | None,
    actor: str | None,
    url: str | None,
    token: str | None,
    project: Path | None,
    database_url: str | None,
    as_json: bool,
) -> None:
    if not reason.strip():
        fail("--reason must not be empty", 2)
    with backend(url, token, project, database_url, actor) as b:
        view = b.epic_transition(
            epic_id, event, expected_version=expected_version, reason=reason, data=data
        )
    if as_json:
        print_json(view)
    else:
        out.print(
            f"epic {view['id']}: {event} -> {view['stage']} (version {view['version']})",
            markup=False,
        )


ExpectedOpt = Annotated[
    int | None, typer.Option("--expected-version", help="Refuse if the epic moved on.")
]


@app.command("block")
def epic_block(
    epic_id: EpicArg,
    reason: ReasonOpt,
    expected_version: ExpectedOpt = None,
    actor: ActorOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop the epic where it is (no new planner or story spawns) until it is unblocked."""
    _move(
        "block",
        epic_id,
        reason,
        data=None,
        expected_version=expected_version,
        actor=actor,
        url=url,
        token=token,
        project=project,
        database_url=database_url,
        as_json=as_json,
    )


@app.command("unblock")
def epic_unblock(
    epic_id: EpicArg,
    reason: ReasonOpt,
    max_budget_usd: Annotated[
        float | None,
        typer.Option("--max-budget-usd", help="A new dollar cap (after a budget block)."),
    ] = None,
    expected_version: ExpectedOpt = None,
    actor: ActorOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Resume the epic from the stage it was blocked in."""
    _move(
        "unblock",
        epic_id,
        reason,
        data={"max_budget_usd": max_budget_usd} if max_budget_usd is not None else None,
        expected_version=expected_version,
        actor=actor,
        url=url,
        token=token,
        project=project,
        database_url=database_url,
        as_json=as_json,
    )


@app.command("fail")
def epic_fail(
    epic_id: EpicArg,
    reason: ReasonOpt,
    expected_version: ExpectedOpt = None,
    actor: ActorOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give the epic up; its plan, verdicts and probes stay in its history."""
    _move(
        "fail",
        epic_id,
        reason,
        data=None,
        expected_version=expected_version,
        actor=actor,
        url=url,
        token=token,
        project=project,
        database_url=database_url,
        as_json=as_json,
    )
