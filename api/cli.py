"""The ``storyline`` command line.

Human-readable output by default, ``--json`` for scripts; on any error a one-line reason on
stderr and a non-zero exit (1 for a refused command, 2 for bad usage or configuration).
"""

from __future__ import annotations

import json
import sys
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
    backend,
    check_as_of,
    err,
    fail,
    history_table,
    out,
    print_json,
)
from api.cli_epics import app as epic_app
from api.cli_gates import app as gates_app
from api.cli_mcp import mcp
from api.cli_projections import app as projections_app
from api.cli_serve import serve
from api.cli_workers import workers
from api.client import ClientError
from service.config_file import CONFIG_NAME, DEFAULT_CONFIG, ConfigError
from service.settings import SettingsError, project_dir, resolve_database

main_app = typer.Typer(
    name="storyline",
    help="Event-sourced story pipeline for autonomous coding agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(
    help="Create, migrate and inspect the database schema (PostgreSQL needs `db upgrade` once; "
    "SQLite migrates itself).",
    no_args_is_help=True,
)
story_app = typer.Typer(help="Create, inspect and move stories.", no_args_is_help=True)
main_app.add_typer(db_app, name="db")
main_app.add_typer(story_app, name="story")
main_app.add_typer(epic_app, name="epic")
main_app.add_typer(gates_app, name="gates")

# --------------------------------------------------------------------------- init / db


@main_app.command()
def init(
    project: ProjectOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
) -> None:
    """Write a commented storyline.toml and prepare .storyline/ in the project."""
    root = project_dir(project)
    if not root.is_dir():
        fail(f"{root} is not a directory", 2)
    path = root / CONFIG_NAME
    if path.exists() and not force:
        fail(f"{path} already exists (use --force to overwrite)", 1)
    path.write_text(DEFAULT_CONFIG, encoding="utf-8")
    (root / ".storyline").mkdir(exist_ok=True)
    exclude = root / ".git" / "info" / "exclude"
    # Worktrees and the embedded database live in .storyline/: keep them out of git
    # without touching the project's tracked .gitignore.
    if exclude.parent.is_dir():
        existing = exclude.read_text(encoding="utf-8") if exclude.exists() else ""
        if ".storyline/" not in existing.splitlines():
            exclude.write_text(
                existing
                + ("\n" if existing and not existing.endswith("\n") else "")
                + ".storyline/\n",
                encoding="utf-8",
            )
    out.print(f"wrote {path}")


@db_app.command("upgrade")
def db_upgrade(project: ProjectOpt = None, database_url: DbOpt = None) -> None:
    """Create or migrate every table storyline owns (alembic upgrade head)."""
    from service import migrations

    try:
        db = resolve_database(project_dir(project), database_url)
        migrations.upgrade(db)
        revision = migrations.current_revision(db)
    except SettingsError as exc:
        fail(str(exc), 2)
    except Exception as exc:
        fail(db.scrub(f"migration failed: {type(exc).__name__}: {exc}"), 1)
    out.print(f"database {db.display} is at revision {revision}")


@db_app.command("status")
def db_status(project: ProjectOpt = None, database_url: DbOpt = None) -> None:
    """Show the schema revision of the database and the one this code needs."""
    from service import migrations

    try:
        db = resolve_database(project_dir(project), database_url)
        current = migrations.current_revision(db)
    except SettingsError as exc:
        fail(str(exc), 2)
    except Exception as exc:
        fail(db.scrub(f"cannot read {type(exc).__name__}: {exc}"), 1)
    out.print(
        f"{db.display}: revision {current or 'none'} (code needs {migrations.head_revision()})"
    )


# --------------------------------------------------------------------------- stories


def _stage_style(stage: str) -> str:
    return {
        "done": "green",
        "blocked": "red",
        "merge_failure": "red",
        "coding": "cyan",
        "gates": "yellow",
        "merge": "magenta",
    }.get(stage, "white")


def show_story(snapshot: dict[str, Any]) -> None:
    stage = snapshot["stage"]
    out.print(f"[bold]{snapshot['id']}[/bold]  {snapshot['name']}", markup=True)
    out.print(f"  stage: [{_stage_style(stage)}]{stage}[/]   version: {snapshot['version']}")
    if snapshot.get("depends_on"):
        out.print(f"  depends on: {', '.join(snapshot['depends_on'])}")
    if snapshot.get("epic"):
        out.print(f"  epic: {snapshot['epic']}")
    counters = (
        f"retries {snapshot['retry_count']}, aborts {snapshot['abort_respawns']}, "
        f"mergemaster spawns {snapshot['mergemaster_spawns']}"
    )
    out.print(f"  counters: {counters}", markup=False)
    if snapshot.get("fixup_pending"):
        out.print("  fixup pending")
    if snapshot.get("merge_failure_kind"):
        out.print(f"  merge failure: {snapshot['merge_failure_kind']}", markup=False)
    if snapshot.get("blocked_reason"):
        out.print(f"  blocked: {snapshot['blocked_reason']}", markup=False)
    if snapshot.get("merge_commit"):
        out.print(f"  merge commit: {snapshot['merge_commit']}")
    out.print(
        f"  agents: {snapshot['coder_attempts']} coder / {snapshot['mergemaster_attempts']} "
        f"mergemaster attempts, {snapshot['tokens_in']}+{snapshot['tokens_out']} tokens, "
        f"${snapshot['cost_usd']:.4f}",
        markup=False,
    )
    review = snapshot.get("review")
    reviews = snapshot.get("reviews") or []
    if review is not None or reviews or snapshot.get("evaluator_attempts"):
        flag = {True: "on", False: "off", None: "as the project says"}[review]
        last = reviews[-1] if reviews else None
        out.print(
            f"  review: {flag}, {snapshot.get('evaluator_attempts', 0)} evaluator attempts, "
            f"{len(reviews)} verdicts"
            + (f", last score {last['score']:.2f} ({_review_result(last)})" if last else ""),
            markup=False,
        )
    failure = snapshot.get("last_review_failure")
    if failure:
        unmet = ", ".join(f"#{g['criterion']} {g['text']}" for g in failure["gaps"])
        out.print(f"  review gaps (attempt {failure['attempt']}): {unmet}", markup=False)
    out.print(f"  legal events: {', '.join(snapshot['legal_events']) or 'none'}", markup=False)


def _review_result(review: dict[str, Any]) -> str:
    if review.get("passed") is None:
        return "pending"
    return "passed" if review["passed"] else "failed"


def show_reviews(body: dict[str, Any]) -> None:
    """``storyline story reviews``: one row a verdict, then each criterion's judgement."""
    flag = {True: "on", False: "off", None: "as the project says"}[body.get("review")]
    out.print(
        f"[bold]{escape(str(body['story_id']))}[/bold]  stage: {body['stage']}  review: {flag}"
    )
    reviews = body["reviews"]
    if not reviews:
        out.print("  no review verdicts yet", markup=False)
    else:
        table = Table("attempt", "score", "min", "all met", "result", "commit", "at")
        for r in reviews:
            minimum = r.get("min_score")
            table.add_row(
                str(r["attempt"]),
                f"{r['score']:.2f}",
                f"{minimum:.2f}" if minimum is not None else "-",
                "yes" if r["all_met"] else "no",
                _review_result(r),
                escape((r.get("commit") or "-")[:12]),
                str(r["at"])[:19].replace("T", " "),
            )
        out.print(table)
        for r in reviews:
            out.print(f"attempt {r['attempt']}:", markup=False)
            for c in r["criteria"]:
                mark = "met  " if c["met"] else "UNMET"
                out.print(f"  {mark} #{c['criterion']} {c['score']:.2f}  {c['text']}", markup=False)
                out.print(f"        evidence: {c['evidence']}", markup=False)
            if r.get("summary"):
                out.print(f"  summary: {r['summary']}", markup=False)
    if body.get("pending_review") is not None:
        out.print(
            f"verdict of attempt {body['pending_review']} awaits its conclusion", markup=False
        )
    failure = body.get("last_review_failure")
    if failure:
        out.print(
            f"last failure: attempt {failure['attempt']}, score {failure['score']:.2f} "
            f"(min {failure['min_score']:.2f}); gaps: "
            + ", ".join(f"#{g['criterion']}" for g in failure["gaps"]),
            markup=False,
        )


ReviewOpt = Annotated[
    bool | None,
    typer.Option(
        "--review/--no-review",
        help="Review against the acceptance criteria after the gates (default: the "
        "project's [review] enabled).",
    ),
]


@story_app.command("add")
def story_add(
    name: Annotated[str, typer.Argument(help="Short name of the story.")],
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    criterion: Annotated[
        list[str] | None,
        typer.Option("--criterion", "-c", help="Acceptance criterion (repeatable, at least one)."),
    ] = None,
    depends_on: Annotated[
        list[str] | None, typer.Option("--depends-on", help="Story id (repeatable).")
    ] = None,
    epic: Annotated[str | None, typer.Option("--epic")] = None,
    priority: Annotated[int, typer.Option("--priority")] = 0,
    story_id: Annotated[
        str | None, typer.Option("--id", help="Story id (default: next number).")
    ] = None,
    review: ReviewOpt = None,
    actor: ActorOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a story in the backlog."""
    with backend(url, token, project, database_url, actor) as b:
        snapshot = b.create_story(
            story_id=story_id,
            name=name,
            description=description or name,
            acceptance_criteria=list(criterion or []),
            depends_on=list(depends_on or []),
            epic=epic,
            priority=priority,
            review=review,
        )
    if as_json:
        print_json(snapshot)
    else:
        out.print(f"created story {snapshot['id']} ({snapshot['name']}) in backlog", markup=False)


@story_app.command("list")
def story_list(
    stage: Annotated[
        str | None, typer.Option("--stage", help="Only stories in this stage.")
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List stories with their stage and counters."""
    from domain.stages import Stage

    if stage is not None and stage not in {s.value for s in Stage}:
        fail(f"unknown stage {stage!r}; stages: {', '.join(s.value for s in Stage)}", 2)
    with backend(url, token, project, database_url, None) as b:
        stories = b.list_stories(stage=stage)
    if as_json:
        print_json(stories)
        return
    table = Table("id", "stage", "name", "v", "retries", "cost $")
    for s in stories:
        table.add_row(
            str(s["id"]),
            f"[{_stage_style(s['stage'])}]{s['stage']}[/]",
            str(s.get("name", "")),
            str(s.get("version", "")),
            str(s.get("retry_count", 0)),
            f"{float(s.get('cost_usd') or 0):.4f}",
        )
    out.print(table)


@story_app.command("show")
def story_show(
    story_id: Annotated[str, typer.Argument(metavar="ID")],
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="Log position or ISO time: the story back then.")
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a story's current state (or its state as of a position or time)."""
    checked = check_as_of(as_of) if as_of is not None else None
    with backend(url, token, project, database_url, None) as b:
        snapshot = b.get_story(story_id, as_of=checked)
    if as_json:
        print_json(snapshot)
    else:
        show_story(snapshot)


@story_app.command("move")
def story_move(
    story_id: Annotated[str, typer.Argument(metavar="ID")],
    event: Annotated[str, typer.Argument(help="Transition name, e.g. start_coding, block.")],
    reason: Annotated[str | None, typer.Option("--reason", "-r")] = None,
    expected_version: Annotated[
        int | None, typer.Option("--expected-version", help="Refuse if the story moved on.")
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help="JSON object of event data.")] = None,
    actor: ActorOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply a named transition (start_coding, block, unblock, ...) to a story; a refusal
    names the transitions legal from its stage."""
    payload: dict[str, Any] = {}
    if data is not None:
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as exc:
            fail(f"--data is not valid JSON: {exc}", 2)
        if not isinstance(payload, dict):
            fail("--data must be a JSON object", 2)
    with backend(url, token, project, database_url, actor) as b:
        snapshot = b.transition(
            story_id, event, expected_version=expected_version, reason=reason, data=payload
        )
    if as_json:
        print_json(snapshot)
    else:
        out.print(
            f"story {snapshot['id']}: {event} -> {snapshot['stage']} "
            f"(version {snapshot['version']})",
            markup=False,
        )


@story_app.command("history")
def story_history(
    story_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The audit trail of a story: every event with actor, reason and stages."""
    with backend(url, token, project, database_url, None) as b:
        events = b.history(story_id)
    if as_json:
        print_json(events)
        return
    out.print(history_table(events))


@story_app.command("reviews")
def story_reviews(
    story_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The story's review verdicts, oldest first: each criterion met or not, with evidence."""
    with backend(url, token, project, database_url, None) as b:
        body = b.story_reviews(story_id)
    if as_json:
        print_json(body)
    else:
        show_reviews(body)


# --------------------------------------------------------------------------- services


main_app.command("serve")(serve)
main_app.command("mcp")(mcp)
main_app.command("workers")(workers)
main_app.add_typer(projections_app, name="projections")


@main_app.command("demo")
def demo(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Where to create the demo project (default: a temp dir)."),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the demo project to look around.")
    ] = False,
    url: Annotated[
        str | None,
        typer.Option("--url", help="Run against a server serving a --prepare'd project."),
    ] = None,
    project: ProjectOpt = None,
    prepare_only: Annotated[
        bool, typer.Option("--prepare", help="Only write the demo project (for --url).")
    ] = False,
    database_url: DbOpt = None,
    migrate: Annotated[
        bool,
        typer.Option(
            "--migrate",
            help="On PostgreSQL, create the schema first (as `storyline db upgrade` does); "
            "SQLite migrates itself.",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 120.0,
) -> None:
    """Run six stories through the whole pipeline on a throwaway project.

    Starts the real service in this process (API, projections, runners with a scripted
    coding agent) on the embedded SQLite default, or on $STORYLINE_DATABASE_URL (an empty
    database; add --migrate for a new PostgreSQL one)."""
    from api import demo as demo_mod

    if url is not None:
        if project is None:
            fail("--url needs --project: the directory the server was started on", 2)
        target, temporary = project_dir(project), False
        if not (target / ".storyline" / "demo").is_dir():
            fail(f"{target} is not a demo project (create one with --prepare --dir DIR)", 2)
    else:
        target, temporary = demo_mod.demo_directory(directory)
        try:
            demo_mod.prepare(target)
        except (FileExistsError, OSError) as exc:
            fail(f"cannot create the demo project: {exc}", 2)
        if prepare_only:
            out.print(f"demo project ready at {target}")
            out.print(f"serve it:  storyline serve --project {target}")
            out.print(f"then:      storyline demo --url http://127.0.0.1:8765 --project {target}")
            return
    out.print(f"demo project: {target}", markup=False)
    try:
        result = demo_mod.run_demo(
            project=target,
            url=url,
            database_url=database_url,
            console=out,
            timeout=timeout,
            migrate=migrate,
        )
    except (demo_mod.DemoError, ClientError, ConfigError, SettingsError) as exc:
        fail(f"demo failed: {exc} (project left at {target})", 1)
    demo_mod.explain(result, out)
    if keep or url is not None or not temporary:
        out.print(f"the demo project is at {target}", markup=False)
    else:
        demo_mod.cleanup(target, temporary)
        out.print("demo project removed (use --keep to look around)")
    if not result.ok:
        fail("the demo did not end as the scenario says", 1)


@main_app.command("runner")
def runner(
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api-url",
            help="URL of the storyline API the spawned agents report to ($STORYLINE_URL).",
        ),
    ] = None,
    remote: Annotated[
        str | None,
        typer.Option(
            "--remote",
            help="Git URL of the shared repository: run as one of several worker runners "
            "(needs a shared --database-url; see docs/scale-out.md).",
        ),
    ] = None,
    clone_dir: Annotated[
        Path | None, typer.Option("--clone-dir", help="This worker's clone of --remote.")
    ] = None,
    role: Annotated[
        str,
        typer.Option("--role", help="With --remote: worker, merger or all (both; the default)."),
    ] = "all",
    worker_id: Annotated[
        str | None, typer.Option("--worker-id", help="With --remote: this worker's name.")
    ] = None,
    lease_ttl: Annotated[
        float, typer.Option("--lease-ttl", help="With --remote: story lease time, seconds.")
    ] = 15.0,
) -> None:
    """Run the runners without the API: worktrees, coding agents, gates, merges.

    For deployments with several processes on PostgreSQL, beside `serve --no-runners`. On
    one machine a lease in the database lets one runner process act at a time; with
    --remote, workers on several machines share the stories through per-story leases."""
    from runners.__main__ import main as runner_main

    argv: list[str] = []
    if project is not None:
        argv += ["--project", str(project)]
    if database_url is not None:
        argv += ["--database-url", database_url]
    if api_url is not None:
        argv += ["--api-url", api_url]
    if remote is not None:
        argv += ["--remote", remote, "--role", role, "--lease-ttl", str(lease_ttl)]
        if clone_dir is not None:
            argv += ["--clone-dir", str(clone_dir)]
        if worker_id is not None:
            argv += ["--worker-id", worker_id]
    raise typer.Exit(runner_main(argv))


def main() -> None:
    from service.cmdline import hide_database_password

    hide_database_password()
    try:
        main_app()
    except ConfigError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
