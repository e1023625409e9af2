"""The demo's second part: one epic, from a goal to a landing on ``main``.

A scripted planner splits the goal into three stories; two of them pass their own gates but
clash in the union (both claim the operator symbol ``^``); leave-one-out blame implicates
exactly those two, the integration branch is rebuilt from the clean one and a replan story
redoes the region; the union passes and the epic lands. It is driven through the HTTP API
like the stories, and everything it prints is read back from the epic's recorded events and
state (its history, its stories' histories and its view), never from the script.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from api.client import ClientError, StorylineClient
from api.demo_project import EPIC, EPIC_ID

EXPECTED_EPIC = {"stage": "done", "mode": "regional_replan"}
SETTLED = ("done", "failed", "blocked")
STORY_STYLE = {"done": "green", "blocked": "red", "coding": "cyan", "gates": "yellow"}


class EpicDemoError(Exception):
    """The epic part could not start (the scenario's scripts expect the first epic)."""


def create_epic(client: StorylineClient) -> str:
    created = client.create_epic(
        name=EPIC.name,
        goal=EPIC.goal,
        acceptance_criteria=EPIC.criteria,
        reason="demo: part 2",
    )
    epic_id = str(created["id"])
    if epic_id != EPIC_ID:
        raise EpicDemoError(
            f"the server gave the demo's epic the id {epic_id}, and the scripted agents are "
            f"written for {EPIC_ID}: run the demo on an empty database"
        )
    return epic_id


def settled(epic: dict[str, Any]) -> bool:
    if epic["stage"] in SETTLED and epic["planner"]["running"] is None:
        return True
    # A blocked story of the round waits for a person: nothing else will move.
    return epic["stage"] == "running" and any(
        s["current_round"] and s["stage"] == "blocked" for s in epic["stories"]
    )


def render_epic(epic: dict[str, Any], elapsed: float) -> Table:
    stage = str(epic["stage"])
    title = (
        f"storyline demo: epic {epic['id']} ({epic['name']})  stage "
        f"{stage}, mode {epic['mode'] or '-'}, round {epic['round']}  ({elapsed:4.1f}s)"
    )
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("story", "name", "stage", "round", "merged into epic branch", "tokens"):
        table.add_column(column)
    if epic["planner"]["running"] is not None:
        table.add_row("(planner)", "", Text("planning", style="cyan"), "", "", "")
    for row in epic["stories"]:
        where = "current" if row["current_round"] else "kept" if row["kept"] else "taken out"
        table.add_row(
            str(row["id"]),
            str(row["name"] or ""),
            Text(str(row["stage"]), style=STORY_STYLE.get(str(row["stage"]), "white")),
            where,
            str(row["merge_commit"] or "")[:10],
            str(int(row["tokens_in"]) + int(row["tokens_out"])),
        )
    return table


def watch_epic(
    client: StorylineClient, console: Console, epic_id: str, timeout: float
) -> dict[str, Any]:
    """Show the epic live until it settles; returns its final view."""
    started = time.monotonic()
    epic: dict[str, Any] | None = None
    with Live(console=console, refresh_per_second=8, transient=False) as live:
        while True:
            with contextlib.suppress(ClientError):  # a slow answer: try again
                epic = client.get_epic(epic_id)
            elapsed = time.monotonic() - started
            if epic is not None:
                live.update(render_epic(epic, elapsed))
                if settled(epic):
                    return epic
            if elapsed > timeout:
                raise EpicDemoError(f"the epic did not settle within {timeout:.0f}s")
            time.sleep(0.15)


# --------------------------------------------------------------------------- the account


def telling(output: str, limit: int = 2) -> list[str]:
    """The lines of a gate's output a reader wants: its verdict lines, else its last ones."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    verdicts = [ln for ln in lines if ln.startswith(("FAILED", "ok:"))]
    return (verdicts or lines)[-limit:]


def _short(sha: object) -> str:
    return str(sha or "")[:10]


def _named(sid: str, names: dict[str, str]) -> str:
    return f"{sid} ({names[sid]})" if names.get(sid) else sid


def _listed(ids: list[str], names: dict[str, str]) -> str:
    return ", ".join(_named(s, names) for s in ids) or "none"


def describe_epic_event(event: dict[str, Any], names: dict[str, str]) -> str | None:
    """One epic event in words, from its recorded data; None for events left out."""
    kind = event["type"]
    data: dict[str, Any] = event["data"]
    if kind == "EpicCreated":
        return f"goal: {data['goal']}"
    if kind == "PlannerSpawnRequested":
        return f"planner attempt {data['attempt']} ({data['agent']}, {data['runtime']})"
    if kind == "PlannerExited":
        tokens = int(data.get("tokens_in") or 0) + int(data.get("tokens_out") or 0)
        return f"planner attempt {data['attempt']}: {data['outcome']}, {tokens} tokens"
    if kind == "PlanRejected":
        return "plan refused: " + "; ".join(data.get("problems") or [])
    if kind == "PlanAccepted":
        plan = data["plan"]
        lines = [f"plan: {len(plan['subtasks'])} subtasks ({plan.get('rationale') or '-'})"]
        for i, sub in enumerate(plan["subtasks"], 1):
            deps = ", ".join(sub.get("depends_on") or []) or "none"
            touches = ", ".join(sub.get("footprint") or [])
            lines.append(f"  {i}. {sub['name']}: touches {touches}; depends on {deps}")
        if data.get("single_session_reason"):
            lines.append(f"  runs as one session: {data['single_session_reason']}")
        return "\n".join(lines)
    if kind == "StoriesFarmedOut":
        line = f"mode {data['mode']}: stories {_listed(data['stories'], names)}"
        if data.get("kept"):
            line += f"; kept from earlier: {_listed(data['kept'], names)}"
        return line + f"; from {_short(data['integration_tip'])}"
    if kind == "IntegrationStarted":
        return f"union gates on {_short(data['commit'])}"
    if kind == "UnionGatesJudged":
        verdict = "PASSED" if data["passed"] else "FAILED"
        return "\n".join([f"union {verdict} on {_short(data['commit'])}", *telling(data["output"])])
    if kind == "BlameProbed":
        without = _listed(data["excluded"], names)
        lines = [f"probe without {without}: union {data['result']}"]
        return "\n".join(lines + [f"  {ln}" for ln in telling(data.get("output") or "", 1)])
    if kind == "BlameConcluded":
        return (
            f"implicated: {_listed(data['implicated'], names)}; "
            f"clean: {_listed(data['clean'], names)}"
        )
    if kind == "IntegrationRebuilt":
        return (
            f"epic branch rebuilt {_short(data['old_tip'])} -> {_short(data['new_tip'])}, "
            f"keeping {_listed(data['kept'], names)}"
        )
    if kind == "EpicLanded":
        return f"landed on {data['base_branch']} as {_short(data['merge_commit'])}"
    if kind == "EpicLandingFailed":
        return f"landing failed ({data['kind']})"
    if kind in ("EpicFailed", "EpicBlocked", "EpicUnblocked", "EpicNoteAdded"):
        return ""  # the reason column says it
    return None


def describe_story_event(event: dict[str, Any], names: dict[str, str]) -> str | None:
    kind = event["type"]
    data: dict[str, Any] = event["data"]
    who = _named(str(event["story_id"]), names)
    if kind == "GatesPassed":
        return f"{who}: its own gates passed"
    if kind == "GatesFailed":
        return f"{who}: its own gates failed"
    if kind == "MergeSucceeded":
        return f"{who}: squash-merged into {data['base_branch']} as {_short(data['merge_commit'])}"
    if kind == "MergeFailed":
        return f"{who}: merge failed ({data.get('kind')})"
    if kind == "StoryBlocked":
        return f"{who}: blocked"
    return None


def account_rows(
    epic_history: list[dict[str, Any]],
    story_histories: dict[str, list[dict[str, Any]]],
    names: dict[str, str],
) -> list[tuple[int, str, str, str, str]]:
    """``(position, event, actor, what, reason)`` for the epic's events and its stories'
    gate and merge events, in log order."""
    rows: list[tuple[int, str, str, str, str]] = []
    for e in epic_history:
        what = describe_epic_event(e, names)
        if what is not None:
            rows.append((int(e["position"]), e["type"], e["actor"], what, e["reason"] or ""))
    for events in story_histories.values():
        for e in events:
            what = describe_story_event(e, names)
            if what is not None:
                rows.append((int(e["position"]), e["type"], e["actor"], what, e["reason"] or ""))
    return sorted(rows)


def account_table(
    epic_id: str,
    epic_history: list[dict[str, Any]],
    story_histories: dict[str, list[dict[str, Any]]],
    names: dict[str, str],
) -> Table:
    table = Table(
        title=f"how epic {epic_id!r} went (its history and its stories' gates and merges)",
        title_justify="left",
    )
    for column in ("pos", "event", "actor", "what", "why"):
        table.add_column(column, overflow="fold")
    for position, kind, actor, what, reason in account_rows(epic_history, story_histories, names):
        table.add_row(str(position), kind, actor, Text(what), Text(reason))
    return table


def ledger_table(epic: dict[str, Any]) -> Table:
    ledger = epic["ledger"]
    cap = ledger["max_budget_usd"]
    table = Table(
        title=f"cost ledger of epic {epic['id']!r} (cap: {'none' if cap is None else f'${cap}'})",
        title_justify="left",
    )
    for column in ("who", "tokens in", "tokens out", "cost"):
        table.add_column(column)
    planner = epic["planner"]
    table.add_row(
        f"planner ({planner['attempts']} run(s))",
        str(planner["tokens_in"]),
        str(planner["tokens_out"]),
        f"${planner['cost_usd']:.4f}",
    )
    for row in epic["stories"]:
        table.add_row(
            f"{row['id']} ({row['name']})",
            str(row["tokens_in"]),
            str(row["tokens_out"]),
            f"${row['cost_usd']:.4f}",
        )
    table.add_row(
        Text("total", style="bold"),
        str(ledger["tokens_in"]),
        str(ledger["tokens_out"]),
        f"${ledger['cost_usd']:.4f}",
    )
    return table


def show_account(
    client: StorylineClient, console: Console, epic: dict[str, Any]
) -> list[dict[str, Any]]:
    """Print the epic's account and ledger; returns the epic's history."""
    names = {str(s["id"]): str(s["name"] or "") for s in epic["stories"]}
    history = client.epic_history(str(epic["id"]))
    stories = {sid: client.history(sid) for sid in names}
    console.print()
    console.print(account_table(str(epic["id"]), history, stories, names))
    console.print(ledger_table(epic))
    return history


def run_epic_part(
    client: StorylineClient, console: Console, timeout: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Create the demo's epic, watch it settle, print its account; returns its final view
    and its history."""
    console.print()
    console.rule(f"part 2: an epic ({EPIC.name!r}), planned into stories and verified as a whole")
    epic_id = create_epic(client)
    epic = watch_epic(client, console, epic_id, timeout)
    history = show_account(client, console, epic)
    return epic, history


def epic_summary(
    epic: dict[str, Any], history: list[dict[str, Any]], landing: str | None, console: Console
) -> None:
    """What the epic showed, from its final view and its history (``landing``: the landing
    commit's line in ``git log``, when it landed)."""
    table = Table(title="what the epic showed", title_justify="left")
    for column in ("", "got", "expected"):
        table.add_column(column)
    for key, want in EXPECTED_EPIC.items():
        got = str(epic.get(key))
        table.add_row(key, Text(got, style="green" if got == want else "red"), want)
    console.print(table)
    names = {str(s["id"]): str(s["name"] or "") for s in epic["stories"]}
    # The view holds the current round's blame only; earlier rounds' is in the history.
    for event in history:
        if event["type"] == "BlameConcluded":
            implicated = _listed(event["data"]["implicated"], names)
            console.print(f"implicated by blame: {implicated}", markup=False)
    console.print(f"kept through the replan: {_listed(epic['kept_stories'], names)}", markup=False)
    console.print(f"union verdicts: {len(epic['union_verdicts'])}", markup=False)
    for v in epic["union_verdicts"]:
        verdict = "passed" if v["passed"] else "failed"
        said = " / ".join(telling(v["output"], 1))
        console.print(
            f"  round {v['round']}: {verdict} on {_short(v['commit'])}: {said}", markup=False
        )
    if epic["failed_reason"] or epic["blocked_reason"]:
        console.print(f"why: {epic['failed_reason'] or epic['blocked_reason']}", markup=False)
    if landing:
        console.print(f"landed on main: {landing}", markup=False)
    ledger = epic["ledger"]
    console.print(
        f"epic cost: {ledger['tokens_in'] + ledger['tokens_out']} tokens, "
        f"${ledger['cost_usd']:.4f} (planner ${ledger['planner_cost_usd']:.4f}, "
        f"stories ${ledger['stories_cost_usd']:.4f}), run mode {epic['mode']}",
        markup=False,
    )
