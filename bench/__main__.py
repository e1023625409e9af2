"""``python -m bench``: every benchmark row in one run, side by side, with the ratios.

    python -m bench                      # the full run (~15 min), rewrites "## Full run"
    python -m bench --quick              # the ~2-minute version (--write yes: "## Quick run")
    python -m bench --only raw_insert,app_transitions --no-sqlite

Rows: 1 raw INSERT limit, 2 bare eventsourcing app, 3 storyline application layer,
4 HTTP, 5 projection rebuild vs bare read, 6 runner reaction, 7 scale (100k stories),
8 the web board in Chromium (10k stories), 9 merge throughput (the speculative queue),
10 scale-out (stories per minute with 1, 2 and 3 worker runner processes).
A row whose code is not there yet is shown as "pending"; a row that fails is shown as
"error" with the reason, and the run goes on.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from bench.common import (
    DEFAULT_PG_ADMIN_URL,
    ROOT,
    Measurement,
    Settings,
    environment,
    failed,
    replace_section,
    tempdir,
)

# name -> (module, row label for errors); run in this order.
BENCHES: dict[str, tuple[str, str]] = {
    "raw_insert": ("bench.raw_insert", "1"),
    "bare_library": ("bench.bare_library", "2"),
    "app_transitions": ("bench.app_transitions", "3"),
    "http": ("bench.external", "4"),
    "projection_rebuild": ("bench.scale", "5"),
    "runner_reaction": ("bench.runner_reaction", "6"),
    "scale": ("bench.scale", "7"),
    "board_render": ("bench.board_render", "8"),
    "merge_throughput": ("bench.merge_throughput", "9"),
    "scale_out": ("bench.scale_out", "10"),
}
# Throughput rows sharing the machine with whatever else runs on it: run in interleaved
# rounds and keep each row's best round (interference only ever slows a round down).
ROUNDS = ("raw_insert", "bare_library", "app_transitions", "http")
ENTRY = {"http": "run_http", "projection_rebuild": "run_rebuild_only"}


METHODS = """\
How: every client is its own process (multiprocessing, spawn), so the 4-client rows are
4 processes and the client side is not serialised on one GIL; rows 1-4 are the best of 3
interleaved rounds (5 s after a 1.5 s warm-up each; every round is listed in the note)
because other jobs share this VM. Row 3 drives 20 stories per client through random
*legal* commands of every stage (`projections.workload.next_command`), with
`expected_version`. Row 4 runs `storyline serve --no-runners` as on PostgreSQL in
production (projections in their child process) against 4 client processes of the lean
keep-alive client `bench/http_load.py` (httpx would spend ~0.7 ms of client CPU per request
on the server's two cores), in the same rounds as rows 1-3. Row 6
latency = AgentStarted.timestamp - CodingStarted.timestamp (taken before its commit, so an
upper bound by the commit time; AgentStarted is taken right after `Popen` returned, i.e.
the agent executable was exec'd). Row 7 requests are sequential from one keep-alive
client; `serve` runs without runners (they would act on the generated stories). Row 8
loads the web board of 10,000 stories (SQLite, `serve --no-runners`) in Debian's headless
chromium through Playwright: DOMContentLoaded and the first card of every non-empty column
from the navigation's start (fresh context per load), and an event's timestamp (just before
its commit) to the MutationObserver stamp of its card landing in the new column."""


@dataclass
class Ratio:
    name: str
    value: float | None
    target: str
    met: bool | None
    detail: str = ""

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "info" if not self.target else "pending"
        return "met" if self.met else "**MISSED**"


def _find(results: list[Measurement], key: str) -> Measurement | None:
    for m in results:
        if m.key == key and m.status == "ok" and m.value is not None:
            return m
    return None


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ratios(results: list[Measurement]) -> list[Ratio]:
    out: list[Ratio] = []

    def ratio(name: str, top: str, bottom: str, minimum: float | None) -> None:
        a, b = _find(results, top), _find(results, bottom)
        target = f">= {minimum:.2f}" if minimum is not None else ""
        if a is None or b is None or not b.value:
            out.append(Ratio(name, None, target, None, "row missing"))
            return
        assert a.value is not None
        value = a.value / b.value
        met = None if minimum is None else value >= minimum
        out.append(Ratio(name, value, target, met, f"{_fmt(a.value)} / {_fmt(b.value)}"))

    def bound(name: str, key: str, attr: str, maximum: float, unit: str) -> None:
        m = _find(results, key)
        value = getattr(m, attr) if m is not None else None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append(Ratio(name, None, f"< {maximum:g} {unit}", None, "row missing"))
            return
        out.append(Ratio(name, value, f"< {maximum:g} {unit}", value < maximum, f"{unit}"))

    ratio(
        "row 2 / row 1, PostgreSQL, 1 client (library defaults)",
        "2/postgres/1",
        "1/postgres/1",
        None,
    )
    ratio(
        "row 2b / row 1, PostgreSQL, 1 client (DB functions)", "2b/postgres/1", "1/postgres/1", None
    )
    ratio("row 3 / row 1, PostgreSQL, 1 client", "3/postgres/1", "1/postgres/1", 0.30)
    ratio("row 3 / row 1, PostgreSQL, 4 clients", "3/postgres/4", "1/postgres/4", 0.35)
    ratio(
        "row 1n / row 1, PostgreSQL, 4 clients (cost of NOTIFY on every commit)",
        "1n/postgres/4",
        "1/postgres/4",
        None,
    )
    ratio(
        "row 3 / row 1n, PostgreSQL, 4 clients (vs the INSERT + NOTIFY ceiling)",
        "3/postgres/4",
        "1n/postgres/4",
        None,
    )
    ratio(
        "row 3 / row 2b, PostgreSQL, 1 client (storyline vs bare library)",
        "3/postgres/1",
        "2b/postgres/1",
        None,
    )
    ratio("row 3 / row 2b, PostgreSQL, 4 clients", "3/postgres/4", "2b/postgres/4", None)
    ratio(
        "row 3 / row 2c, PostgreSQL, 1 client (vs the library's own get + save)",
        "3/postgres/1",
        "2c/postgres/1",
        None,
    )
    ratio("row 3 / row 1, SQLite, 1 client", "3/sqlite/1", "1/sqlite/1", None)
    ratio("row 3 / row 1, SQLite, 4 clients", "3/sqlite/4", "1/sqlite/4", None)
    ratio("row 4 / row 3, PostgreSQL, 4 clients", "4/postgres/4", "3/postgres/4", 0.5)
    bound("row 4 p99 latency, 4 clients", "4/postgres/4", "p99_ms", 50, "ms")
    ratio(
        "row 4 / row 4i (HTTP vs the same workload in-process)",
        "4/postgres/4",
        "4i/postgres/4",
        None,
    )
    ratio("row 5: rebuild / bare read", "5/postgres/-", "5r/postgres/-", 0.5)
    bound(
        "row 6 median, PostgreSQL, runner in the API process", "6/postgres/1", "p50_ms", 100, "ms"
    )
    bound("row 6 median, SQLite, runner in the API process", "6/sqlite/1", "p50_ms", 100, "ms")
    bound("row 6 median, PostgreSQL, separate runner process", "6x/postgres/1", "p50_ms", 100, "ms")
    bound("row 6 median, SQLite, separate runner process", "6x/sqlite/1", "p50_ms", 100, "ms")
    for key, what in (
        ("7a/postgres/1", "GET /board?stage=coding&limit=50"),
        ("7b/postgres/1", "GET /stories/{id}"),
        ("7c/postgres/1", "GET /stories/{id}/history"),
    ):
        bound(f"row 7 p99 {what}", key, "p99_ms", 50, "ms")
    bound("row 7 resident memory of storyline serve", "7m/postgres/-", "value", 300, "MB")
    bound("row 8 median, board DOMContentLoaded, 10k stories", "8/sqlite/-", "p50_ms", 1000, "ms")
    bound("row 8f median, board filled, 10k stories", "8f/sqlite/-", "p50_ms", 1000, "ms")
    bound("row 8e median, event commit to card moved", "8e/sqlite/-", "p50_ms", 250, "ms")
    ratio("row 9: k=1 / k=4, all pass", "9/postgres/1", "9/postgres/4", 3.0)
    ratio("row 9: k=1 / k=4 with batch 3, all pass", "9/postgres/1", "9b/postgres/4", None)
    ratio("row 9f: k=1 / k=4, one failing story", "9f/postgres/1", "9f/postgres/4", 2.0)
    bound("row 9o per landed story, gate time excluded", "9o/postgres/-", "value", 0.5, "s")
    ratio("row 10: 3 workers / 1 worker, coding part", "10/postgres/3", "10/postgres/1", 2.5)
    ratio("row 10: 2 workers / 1 worker, coding part", "10/postgres/2", "10/postgres/1", None)
    ratio("row 10t: 3 workers / 1 worker, end to end", "10t/postgres/3", "10t/postgres/1", None)
    return out


def render(results: list[Measurement], env: dict[str, str], command: str, seconds: float) -> str:
    lines = [
        f"Command: `{command}` (run from the repository root; took {seconds / 60:.1f} min)",
        "",
        f"- Date: {env['date']}",
        f"- Machine: {env['machine']}",
        f"- Versions: {env['versions']}",
        f"- Load average (1 min) at the start and the end: {env['load']} / "
        f"{os.getloadavg()[0]:.2f} (other jobs on this shared VM show up here)",
        "",
        METHODS,
        "",
        "| Row | Measurement | DB | Clients | Result | p50 ms | p99 ms | Note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        result = f"{_fmt(m.value)} {m.unit}".strip() if m.status == "ok" else m.status.upper()
        lines.append(
            f"| {m.row} | {m.label} | {m.backend} | {m.clients or '-'} | {result} | "
            f"{_fmt(m.p50_ms)} | {_fmt(m.p99_ms)} | {m.note.replace('|', '/')} |"
        )
    lines += [
        "",
        "Ratios and targets:",
        "",
        "| Ratio | Value | Target | Status | From |",
        "|---|---|---|---|---|",
    ]
    for r in ratios(results):
        lines.append(
            f"| {r.name} | {_fmt(r.value)} | {r.target or '-'} | {r.verdict} | {r.detail} |"
        )
    return "\n".join(lines) + "\n"


def best_of(rounds: list[list[Measurement]]) -> list[Measurement]:
    """Each row's best round (highest value), its note listing every round."""
    if len(rounds) == 1:
        return rounds[0]
    out: list[Measurement] = []
    for first in rounds[0]:
        same = [m for r in rounds for m in r if m.key == first.key and m.status == "ok"]
        if not same:
            out.append(first)
            continue
        best = max(same, key=lambda m: m.value or 0.0)
        values = " / ".join(_fmt(m.value) for m in same)
        best.note = f"best of {len(same)} rounds: {values}" + (
            f"; {best.note}" if best.note else ""
        )
        out.append(best)
    return out


def run_one(name: str, settings: Settings) -> list[Measurement]:
    module_name, row = BENCHES[name]
    started = time.monotonic()
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    try:
        module = import_module(module_name)
        entry: Callable[[Settings], list[Measurement]] = getattr(module, ENTRY.get(name, "run"))
        results = entry(settings)
    except Exception as exc:
        traceback.print_exc()
        results = [failed(row, name, exc)]
    print(f"[bench] {name} done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    for m in results:
        print(
            f"[bench]   {m.row:>3} {m.backend:8} {m.clients or '-'!s:>2} "
            f"{m.status:7} {_fmt(m.value)} {m.unit} p50={_fmt(m.p50_ms)} p99={_fmt(m.p99_ms)} "
            f"{m.note}",
            file=sys.stderr,
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the one-minute version")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: {', '.join(BENCHES)}"
    )
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL)
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL rows only")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of the throughput rows 1-3, best kept (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--output", type=Path, default=ROOT / "BENCHMARKS.md", help="the file to update"
    )
    parser.add_argument(
        "--write",
        choices=("auto", "yes", "no"),
        default="auto",
        help="update the output file (auto: only for a full run of every row: no --only/--quick)",
    )
    args = parser.parse_args(args_list)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    if "scale" in names and "projection_rebuild" in names:
        # Row 7's database is built by rebuilding its projections: row 5 comes with it.
        names.remove("projection_rebuild")
    started = time.monotonic()
    with tempdir() as work:
        settings = Settings.make(
            quick=args.quick,
            pg_admin_url=args.pg_admin_url,
            sqlite=not args.no_sqlite,
            workdir=Path(work),
        )
        env = environment(settings)
        env["load"] = f"{os.getloadavg()[0]:.2f}"
        results: list[Measurement] = []
        rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
        repeated = [n for n in names if n in ROUNDS]
        by_round = [
            [m for name in repeated for m in run_one(name, settings)] for _ in range(rounds)
        ]
        results = best_of(by_round)
        for name in names:
            if name not in ROUNDS:
                results += run_one(name, settings)
    elapsed = time.monotonic() - started
    command = "python -m bench " + shlex.join(args_list) if args_list else "python -m bench"
    table = render(results, env, command.strip(), elapsed)
    print(table)
    # Only a complete full run replaces the recorded figures by default.
    write = args.write == "yes" or (args.write == "auto" and not args.only and not args.quick)
    if write:
        heading = "Quick run" if args.quick else "Full run"
        replace_section(args.output, heading, table)
        print(f"[bench] wrote the table to {args.output} (## {heading})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
