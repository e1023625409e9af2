"""``storyline epic``: create, list, show and trace epics; block, unblock or fail one.

Registered by the main CLI as a sub-app (``app`` below). Like ``storyline story`` it works
on the local store or, with ``--url``, on a running server (``api.cli_remote``), and fails
in one line on stderr: exit 1 for a refused command, 2 for bad usage or configuration.
Only the person events are here; the runners and the planner send the rest.
"""

from __future__ import annotations

from collections.abc import Callable
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
    fail,
    history_table,
    out,
    print_json,
)

app = typer.Typer(
    help="Epics: a goal a planner splits into stories that land together.",
    no_args_is_help=True,
)

EpicArg = Annotated[str, typer.Argument(metavar="ID", help="The epic, e.g. epic-3.")]
ReasonOpt = Annotated[str, typer.Option("--reason", "-r", help="Why (recorded in the history).")]


def _style(stage: str) -> str:
    return {
        "done": "green",
        "failed": "red",
        "blocked": "red",
        "planning": "cyan",
        "running": "cyan",
        "integrating": "yellow",
        "evaluating": "yellow",
        "awaiting_answers": "bold yellow",
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
    show_interview(view)
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
    show_evaluations(view, view.get("evaluation_final"))
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
        f"${ledger['cost_usd']:.4f} (planner ${ledger['planner_cost_usd']:.4f}"
        + (
            f", evaluator ${ledger['evaluator_cost_usd']:.4f}"
            if ledger.get("evaluator_cost_usd")
            else ""
        )
        + ")"
        + (f" of ${cap:.2f}" if cap is not None else "")
        + f", {ledger['tokens_in']}+{ledger['tokens_out']} tokens",
    )
    _line("legal events", ", ".join(view["legal_events"]) or "none")


def show_interview(view: dict[str, Any]) -> None:
    """The planner's questions: those waiting first (what a person must do next), then every
    round with its answers."""
    waiting = view.get("questions")
    if waiting:
        out.print(
            f"  [bold yellow]waiting for answers[/] ({len(waiting)} question(s); "
            f'reply with: storyline epic answer {escape(view["id"])} "answer 1" ...):'
        )
        for index, question in enumerate(waiting, 1):
            _line(f"question {index}", question)
    for entry in view.get("interview") or []:
        if entry.get("answers") is None:
            continue
        for index, (question, answer) in enumerate(
            zip(entry["questions"], entry["answers"], strict=False), 1
        ):
            _line(f"interview {entry['round']}.{index} Q", question)
            _line(f"interview {entry['round']}.{index} A", answer)


def show_evaluations(body: dict[str, Any], final: dict[str, Any] | None) -> None:
    """Evaluations, evolutions, discarded evolutions and the final verdict (the epic view and
    ``GET /epics/{id}/evaluations`` share these keys)."""
    for e in body.get("evaluations") or []:
        unmet = [f"#{c['criterion']}" for c in e["criteria"] if not c["met"]]
        _line(
            f"evaluation {e['attempt']}",
            f"evolution {e['evolution']}, score {e['score']:.2f} at {e['commit'][:12]}"
            + (f", unmet {' '.join(unmet)}" if unmet else ", all criteria met"),
        )
    for e in body.get("evolutions") or []:
        gaps = ", ".join(f"#{g['criterion']} {g['text']}" for g in e["gaps"])
        _line(
            f"evolution {e['evolution']}",
            f"after score {e['after_score']:.2f} (best {e['best_score']:.2f}), "
            f"from {e['from_commit'][:12]}; gaps: {gaps}",
        )
    for d in body.get("discarded") or []:
        _line(
            f"discarded evolution {d['evolution']}",
            f"score {d['score']:.2f} < evolution {d['kept_evolution']}'s; "
            f"kept {d['kept_commit'][:12]}",
        )
    if final:
        _line(
            "evaluation final",
            f"{'passed' if final['passed'] else 'not passed'}, score {final['score']:.2f} "
            f"(evolution {final['best_evolution']} of {final['evolutions']}), "
            f"max_reached: {'yes' if final['max_reached'] else 'no'}",
        )


ReviewOpt = Annotated[
    bool | None,
    typer.Option(
        "--review/--no-review",
        help="Evaluate the integrated result against the criteria before landing (default: "
        "the project's [review] enabled).",
    ),
]


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
    review: ReviewOpt = None,
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
            review=review,
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
    checked = check_as_of(as_of) if as_of is not None else None
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
    out.print(history_table(events))


@app.command("evaluations")
def epic_evaluations(
    epic_id: EpicArg,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The epic's evaluations (each criterion judged), evolutions and final verdict."""
    with backend(url, token, project, database_url, None) as b:
        body = b.epic_evaluations(epic_id)
    if as_json:
        print_json(body)
        return
    out.print(f"[bold]{escape(body['epic_id'])}[/bold]  stage: {body['stage']}")
    if not body["evaluations"]:
        _line("evaluations", "none yet")
    show_evaluations(body, body.get("final"))
    for e in body["evaluations"]:
        out.print(f"evaluation {e['attempt']} (evolution {e['evolution']}):", markup=False)
        for c in e["criteria"]:
            mark = "met  " if c["met"] else "UNMET"
            _line(f"{mark} #{c['criterion']} {c['score']:.2f}", c["text"])
            _line("      evidence", c["evidence"])


@app.command("answer")
def epic_answer(
    epic_id: EpicArg,
    answers: Annotated[
        list[str],
        typer.Argument(metavar="ANSWER...", help="One answer per question, in order."),
    ],
    reason: Annotated[
        str | None, typer.Option("--reason", "-r", help="Why (recorded in the history).")
    ] = None,
    expected_version: Annotated[
        int | None, typer.Option("--expected-version", help="Refuse if the epic moved on.")
    ] = None,
    actor: ActorOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    project: ProjectOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer the planner's questions (see `storyline epic show`): planning resumes."""
    with backend(url, token, project, database_url, actor) as b:
        view = b.answer_questions(
            epic_id, list(answers), reason=reason, expected_version=expected_version
        )
    if as_json:
        print_json(view)
    else:
        out.print(
            f"epic {view['id']}: answered {len(answers)} question(s) -> {view['stage']} "
            f"(version {view['version']})",
            markup=False,
        )


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


def _person_move(event: str, doc: str) -> Callable[..., None]:
    """``block`` and ``fail``: the same options, only the event and the help differ."""

    def command(
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
        _move(
            event,
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

    command.__name__ = f"epic_{event}"
    command.__doc__ = doc
    return command


app.command("block")(
    _person_move(
        "block",
        "Stop the epic where it is (no new planner or story spawns) until it is unblocked.",
    )
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


app.command("fail")(
    _person_move("fail", "Give the epic up; its plan, verdicts and probes stay in its history.")
)
