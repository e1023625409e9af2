"""``storyline projections``: status, rebuild and check of the read models.

Registered by the main CLI as a sub-app (``app`` below). Exit codes: 0 fine, 1 a projection
is failed (status), could not be rebuilt (rebuild), is failed, behind the head of the log or
differs from its rebuild (check), or cannot skip that event (skip), 2 bad usage or an
unreachable/unmigrated database.
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from projections.names import PROJECTION_NAMES
from service.container import Service, open_service

app = typer.Typer(
    help="Read models built from the event log: show their status, rebuild them by replay, "
    "and check that they equal a fresh rebuild.",
    no_args_is_help=True,
)

console = Console()
err_console = Console(stderr=True)

ProjectOption = Annotated[
    Path | None,
    typer.Option("--project", help="Project directory (default: $STORYLINE_PROJECT or cwd)."),
]
DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database-url", help="Database URL (default: $STORYLINE_DATABASE_URL or the project's)."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
NameArgument = Annotated[
    str | None,
    typer.Argument(help=f"One projection ({', '.join(PROJECTION_NAMES)}); default: all."),
]


@contextmanager
def _service(project: Path | None, database_url: str | None) -> Iterator[Service]:
    try:
        service = open_service(project, database_url)
    except Exception as exc:  # config errors and unreachable databases alike
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    try:
        yield service
    finally:
        service.close()


def _check_name(name: str | None) -> None:
    if name is not None and name not in PROJECTION_NAMES:
        err_console.print(
            f"[red]error:[/red] unknown projection {name!r}; known: {', '.join(PROJECTION_NAMES)}"
        )
        raise typer.Exit(2)


def _print_json(value: object) -> None:
    typer.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


@app.command()
def status(
    project: ProjectOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Position, lag and errors of every projection."""
    with _service(project, database_url) as service:
        from projections import ReadModels

        read_models = ReadModels(service.db)
        try:
            statuses = read_models.status()
        finally:
            read_models.close()
    if as_json:
        _print_json([s.as_json() for s in statuses])
    else:
        table = Table(title=f"projections of {service.db.display}")
        for column in ("projection", "position", "head", "lag", "state", "updated"):
            table.add_column(
                column, justify="right" if column in ("position", "head", "lag") else "left"
            )
        for s in statuses:
            state = (
                f"[red]failed at {s.error_position}[/red]: {escape(s.error or '')}"
                if s.failed
                else "[green]ok[/green]"
            )
            if s.skipped:
                state += f" [yellow]({s.skipped} skipped)[/yellow]"
            table.add_row(
                s.name, str(s.position), str(s.head), str(s.lag), state, s.updated_at or "-"
            )
        console.print(table)
    if any(s.failed for s in statuses):
        raise typer.Exit(1)


@app.command()
def rebuild(
    name: NameArgument = None,
    project: ProjectOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
    batch_size: Annotated[int, typer.Option(help="Events per transaction.")] = 20000,
) -> None:
    """Drop a projection (or all) and replay the whole log into it."""
    _check_name(name)
    with _service(project, database_url) as service:
        from projections import ProjectionFailed, ProjectionRunner

        runner = ProjectionRunner(service.db, rebuild_batch_size=batch_size)
        started = time.perf_counter()
        error: ProjectionFailed | None = None
        try:
            if as_json:
                applied = runner.rebuild(name)
            else:
                with Progress(
                    TextColumn(f"rebuilding {name or 'all projections'}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TaskProgressColumn(),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    console=console,
                    transient=False,
                ) as progress:
                    task = progress.add_task("replay", total=None)

                    def report(position: int, head: int) -> None:
                        progress.update(task, completed=position, total=max(head, 1))

                    applied = runner.rebuild(name, progress=report)
        except ProjectionFailed as exc:
            error = exc
            applied = 0
        finally:
            runner.close()
    seconds = time.perf_counter() - started
    rate = applied / seconds if seconds > 0 else 0.0
    if as_json:
        _print_json(
            {
                "projections": [name] if name else list(PROJECTION_NAMES),
                "events": applied,
                "seconds": round(seconds, 3),
                "events_per_second": round(rate, 1),
                "error": str(error) if error else None,
            }
        )
    elif error is None:
        console.print(
            f"rebuilt {name or 'all projections'}: {applied} events "
            f"in {seconds:.2f} s ({rate:,.0f} events/s)"
        )
    if error is not None:
        if not as_json:
            err_console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1)


@app.command()
def check(
    name: NameArgument = None,
    project: ProjectOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
    wait: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=600.0,
            help="Seconds a projection behind the head of the log may take to reach it "
            "before it counts as behind (a live follower lags a fresh commit briefly).",
        ),
    ] = 5.0,
) -> None:
    """Check that every projection is at the head of the log, not failed, and equal to a
    rebuild into scratch tables (exit 1 naming each one that is not)."""
    _check_name(name)
    with _service(project, database_url) as service:
        from projections import ProjectionRunner

        runner = ProjectionRunner(service.db)
        try:
            standing = runner.problems(name, wait=wait)
            differences = runner.check(name)
        finally:
            runner.close()
    names = [name] if name else list(PROJECTION_NAMES)
    found = {n: ([standing[n]] if n in standing else []) + differences.get(n, []) for n in names}
    if as_json:
        _print_json(found)
    else:
        for n in names:
            if not found[n]:
                console.print(f"[green]ok[/green]   {n}")
                continue
            label = "FAILED" if n in standing and "failed" in standing[n] else None
            label = label or ("BEHIND" if n in standing else "DIFF")
            console.print(f"[red]{label}[/red] {n}")
            for line in found[n]:
                console.print(f"       {line}", markup=False, highlight=False)
    if any(found.values()):
        raise typer.Exit(1)


@app.command()
def skip(
    name: Annotated[str, typer.Argument(help="The projection that failed.")],
    position: Annotated[
        int, typer.Option("--position", min=1, help="The position it failed at (see status).")
    ],
    reason: Annotated[str, typer.Option("--reason", help="Why it may go without this event.")],
    actor: Annotated[
        str | None, typer.Option(help="Who decides (default: operator:<login name>).")
    ] = None,
    project: ProjectOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Move a failed projection past the event it fails on, recording who and why.

    The event stays in the log; every later replay of this projection (rebuild, check)
    leaves it out too, and status counts what each projection skipped.
    """
    _check_name(name)
    who = actor or f"operator:{getpass.getuser()}"
    with _service(project, database_url) as service:
        from projections import ProjectionRunner
        from projections.runner import SkipRefused

        runner = ProjectionRunner(service.db, names=[name])
        try:
            runner.skip(name, position, reason=reason, actor=who)
        except SkipRefused as exc:
            err_console.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from None
        finally:
            runner.close()
    console.print(
        f"{name} skips the event at position {position} (recorded for {who}); it goes on from there"
    )
