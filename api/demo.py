"""``storyline demo``: the whole pipeline on a throwaway project, live in the terminal.

Locally it starts the real service in this process (API on a loopback port, projections,
runners) on the embedded SQLite default (or ``STORYLINE_DATABASE_URL``), then drives six
stories through the HTTP API exactly as any client would, and then one epic (``api.demo_epic``:
planned into three stories, two of which clash in the union, blamed, replanned, landed).
With ``--url`` the same scenario runs against a server started elsewhere on a project
prepared by ``--prepare``.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from api.client import ClientError, StorylineClient
from api.demo_epic import EXPECTED_EPIC, EpicDemoError, epic_summary, run_epic_part
from api.demo_project import STORIES, create_project, git

EXPECTED_FINAL = {
    "add": "done",
    "subtract": "done",
    "multiply": "done",
    "banner-en": "done",
    "banner-fr": "done",
    "divide": "blocked",
    "mean": "done",
}
STAGE_STYLE = {
    "done": "green",
    "blocked": "red",
    "merge_failure": "red",
    "coding": "cyan",
    "gates": "yellow",
    "review": "blue",
    "merge": "magenta",
    "backlog": "white",
}


class DemoError(Exception):
    """The demo could not run or did not end as the scenario says."""


@dataclass
class DemoResult:
    project: Path
    final: dict[str, str]
    seconds: float
    replay_equal: bool | None
    merge_commits: list[str]
    epic: dict[str, Any]
    """The demo's epic as it ended (its ``GET /epics/{id}`` view)."""
    epic_history: list[dict[str, Any]]
    epic_landing: str | None
    """The epic's landing commit on main as ``git log`` shows it (None if it did not land)."""

    @property
    def epic_ok(self) -> bool:
        return all(self.epic.get(key) == want for key, want in EXPECTED_EPIC.items())

    @property
    def ok(self) -> bool:
        return self.final == EXPECTED_FINAL and self.epic_ok and self.replay_equal is not False


# --------------------------------------------------------------------------- local server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def local_server(project: Path, database_url: str | None) -> Iterator[tuple[str, Any]]:
    """The real service for ``project`` in this process; yields its URL and the Service."""
    import uvicorn

    from api.auth import StaticTokens
    from api.cli_serve import make_app
    from service.container import open_service

    service = open_service(project, database_url)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    app, read_models = make_app(service, tokens=StaticTokens(), api_url=url)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="demo-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise DemoError("the storyline server did not start")
        time.sleep(0.02)
    try:
        yield url, service
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        read_models.close()
        service.close()


# --------------------------------------------------------------------------- scenario


def create_stories(client: StorylineClient) -> None:
    for story in STORIES:
        client.create_story(
            story_id=story.id,
            name=story.name,
            description=story.description,
            acceptance_criteria=story.criteria,
            depends_on=story.depends_on,
            review=story.review,
        )
    for story in STORIES:
        if not story.depends_on:  # dependants start by themselves when ready
            client.transition(story.id, "start_coding", reason="demo: go")


def board_rows(client: StorylineClient) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = client.list_stories(limit=200, cursor=cursor)
        rows.extend(page["stories"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    order = {s.id: i for i, s in enumerate(STORIES)}
    return sorted(rows, key=lambda r: order.get(str(r["id"]), 99))


def render_board(rows: list[dict[str, Any]], elapsed: float, title: str) -> Table:
    table = Table(title=f"{title}  ({elapsed:4.1f}s)", title_justify="left", expand=False)
    for column in ("story", "stage", "detail", "retries", "agents", "tokens", "last event"):
        table.add_column(column)
    for row in rows:
        stage = str(row.get("stage"))
        detail = ""
        if row.get("merge_failure_kind"):
            detail = str(row["merge_failure_kind"])
        elif row.get("queue_position"):
            detail = f"queue #{row['queue_position']}"
        elif row.get("fixup_pending"):
            detail = "fix-up"
        if row.get("final"):
            detail += " (final)"
        table.add_row(
            str(row["id"]),
            Text(stage, style=STAGE_STYLE.get(stage, "white")),
            detail,
            str(row.get("retry_count", 0)),
            str(row.get("coder_attempts", row.get("attempts", "")) or ""),
            str(int(row.get("tokens_in") or 0) + int(row.get("tokens_out") or 0)),
            f"{row.get('last_event', '')} by {row.get('last_actor', '')}",
        )
    return table


def finished(rows: list[dict[str, Any]]) -> bool:
    stages = {str(r["id"]): str(r["stage"]) for r in rows}
    return all(stages.get(sid) in ("done", "blocked", "archived") for sid in EXPECTED_FINAL)


def watch(client: StorylineClient, console: Console, timeout: float) -> dict[str, str]:
    """Show the board live until every story settled; returns their final stages."""
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with Live(console=console, refresh_per_second=8, transient=False) as live:
        while True:
            try:
                rows = board_rows(client)
            except ClientError:
                rows = rows or []
            elapsed = time.monotonic() - started
            live.update(render_board(rows, elapsed, "storyline demo: live board"))
            if rows and finished(rows):
                break
            if elapsed > timeout:
                raise DemoError(f"the demo did not settle within {timeout:.0f}s")
            time.sleep(0.15)
    return {str(r["id"]): str(r["stage"]) for r in rows}


def audit_trail(client: StorylineClient, story_id: str) -> Table:
    table = Table(title=f"audit trail of story {story_id!r}", title_justify="left")
    for column in ("pos", "event", "actor", "stages", "reason / detail"):
        table.add_column(column, overflow="fold")
    for e in client.history(story_id):
        stages = (
            f"{e['from_stage'] or '-'} -> {e['to_stage']}"
            if e["from_stage"] != e["to_stage"]
            else ""
        )
        detail = e["reason"] or ""
        data = e["data"]
        if e["type"] == "GatesFailed":
            lines = [ln for ln in str(data.get("output", "")).splitlines() if ln.strip()]
            telling = [ln for ln in lines if "Error" in ln or "FAILED" in ln] or lines[-2:]
            detail += "\n" + "\n".join(telling[-3:])
        elif e["type"] == "AgentSpawnRequested":
            argv = data.get("argv") or []
            injected = "--append-system-prompt" in argv and any(
                "quality gates failed" in arg for arg in argv
            )
            detail += f"\ngate failure injected into the prompt: {'yes' if injected else 'no'}"
        elif e["type"] == "AgentExited":
            detail += (
                f"outcome {data.get('outcome')}, {data.get('turns')} turns, "
                f"{int(data.get('tokens_in') or 0) + int(data.get('tokens_out') or 0)} tokens"
            )
        table.add_row(str(e["position"]), e["type"], e["actor"], stages, Text(detail.strip()))
    return table


def review_table(client: StorylineClient, story_id: str) -> Table:
    """Each review verdict of ``story_id``: per criterion met or not, its score, its evidence."""
    table = Table(title=f"reviews of story {story_id!r}", title_justify="left")
    for column in ("attempt", "verdict", "criterion", "met", "score", "evidence"):
        table.add_column(column, overflow="fold")
    for review in client.story_reviews(story_id)["reviews"]:
        passed = review.get("passed")
        verdict = "passed" if passed else ("sent back" if passed is False else "pending")
        for i, judged in enumerate(review["criteria"]):
            table.add_row(
                str(review["attempt"]) if i == 0 else "",
                f"{verdict}, score {review['score']:.2f}" if i == 0 else "",
                str(judged["text"]),
                Text("yes", style="green") if judged["met"] else Text("no", style="red"),
                f"{judged['score']:.2f}",
                str(judged["evidence"]),
            )
    return table


def replay_check(project: Path, database_url: str | None) -> bool:
    """Rebuild every projection from the log into scratch tables and compare."""
    from projections import ProjectionRunner
    from service.container import open_service

    service = open_service(project, database_url)
    try:
        runner = ProjectionRunner(service.db, service.app)
        differences = runner.check()
    finally:
        service.close()
    return not any(differences.values())


def prepare_database(project: Path, database_url: str | None, *, migrate: bool) -> None:
    """Make the demo's database ready, or say in one line why it is not.

    SQLite migrates itself. On PostgreSQL processes never create tables by themselves, but
    the demo owns its data: ``migrate`` creates or upgrades the schema as ``storyline db
    upgrade`` does. The scenario's story ids are fixed, so the database must hold none yet.
    """
    from service import migrations
    from service.settings import resolve_database

    db = resolve_database(project, database_url)
    if db.kind == "sqlite":
        return
    if migrate:
        migrations.upgrade(db)
    elif migrations.current_revision(db) != migrations.head_revision():
        raise DemoError(
            f"the database {db.display} has no storyline schema (or an old one): run the demo "
            "with --migrate, or `storyline db upgrade` first"
        )
    from service.application import StorylineApplication
    from service.epics import EpicService

    app = StorylineApplication(db, pool_size=1)
    try:
        held = len(app.story_ids())
        epics = len(EpicService(app).ids())
    finally:
        app.close()
    if held or epics:
        raise DemoError(
            f"the demo needs an empty database, and {db.display} already holds {held} "
            f"stories and {epics} epic{'' if epics == 1 else 's'}: point STORYLINE_DATABASE_URL "
            "at a new database"
        )


def run_demo(
    *,
    project: Path,
    url: str | None,
    database_url: str | None,
    console: Console,
    timeout: float = 120.0,
    migrate: bool = False,
) -> DemoResult:
    started = time.monotonic()

    def drive(server: str) -> tuple[dict[str, str], dict[str, Any], list[dict[str, Any]]]:
        client = StorylineClient(server)
        try:
            create_stories(client)
            final = watch(client, console, timeout)
            console.print()
            console.print(audit_trail(client, "subtract"))
            console.print(review_table(client, "mean"))
            # The second part starts once the stories settled: its landing on main then
            # cannot race the stories' merges, and each part reads on its own.
            try:
                epic, history = run_epic_part(client, console, timeout)
            except EpicDemoError as exc:
                raise DemoError(str(exc)) from exc
        finally:
            client.close()
        return final, epic, history

    if url is None:
        prepare_database(project, database_url, migrate=migrate)
        with local_server(project, database_url) as (server_url, _service):
            final, epic, history = drive(server_url)
        replay: bool | None = replay_check(project, database_url)
    else:
        final, epic, history = drive(url)
        replay = None
    merges = git(project, "log", "--format=%h %s", "main").splitlines()
    landing = None
    if epic.get("merge_commit"):
        landing = git(project, "log", "-1", "--format=%h %s", str(epic["merge_commit"]))
    return DemoResult(
        project, final, time.monotonic() - started, replay, merges, epic, history, landing
    )


def explain(result: DemoResult, console: Console) -> None:
    table = Table(title="what each story showed", title_justify="left")
    for column in ("story", "final stage", "expected", "what it shows"):
        table.add_column(column)
    for story in STORIES:
        got = result.final.get(story.id, "?")
        want = EXPECTED_FINAL[story.id]
        style = "green" if got == want else "red"
        table.add_row(story.id, Text(got, style=style), want, story.expect)
    console.print(table)
    epic_summary(result.epic, result.epic_history, result.epic_landing, console)
    console.print("[bold]merge commits on main[/bold] (newest first):")
    for line in result.merge_commits:
        console.print(f"  {line}", markup=False)
    logs = result.project / ".storyline" / "logs"
    console.print(f"[bold]agent logs[/bold]: {logs} (one file per attempt)")
    if result.replay_equal is None:
        console.print("replay check: skipped (the server's database is not local)")
    elif result.replay_equal:
        console.print(
            "[green]replay check: every projection rebuilt from the log equals the live one[/green]"
        )
    else:
        console.print("[red]replay check: a rebuilt projection differs from the live one[/red]")
    console.print(f"finished in {result.seconds:.1f}s")


def demo_directory(explicit: Path | None) -> tuple[Path, bool]:
    """The project directory and whether it is a temporary one."""
    if explicit is not None:
        return explicit.resolve(), False
    return Path(tempfile.mkdtemp(prefix="storyline-demo-")) / "calc", True


def prepare(project: Path) -> Path:
    return create_project(project)


def cleanup(project: Path, temporary: bool) -> None:
    shutil.rmtree(project.parent if temporary else project, ignore_errors=True)
