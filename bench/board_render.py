"""Row 8: the web board with 10,000 stories, measured in a real headless Chromium.

A SQLite database is filled with 10,000 stories (about 100,000 events; the same generated
workload as row 7: ``bench.scale.dataset``), its projections rebuilt, and ``storyline serve
--no-runners`` serves it. Debian's chromium (``scripts/install-chromium.sh``), driven by
Playwright, then measures:

* 8: time to DOMContentLoaded of ``/`` (the page shell), from the navigation's start;
* 8f: time until the board is filled: every column that has stories shows its first card
  (the card fragments fetched and inserted), from the navigation's start;
* 8e: the delay from an event's commit to its card moving: a story is created, then
  ``start_coding`` is sent through the API; a MutationObserver stamps (epoch ms) the moment
  the card lands in the coding column, against the event's own timestamp (taken just
  before the commit, so the delay is an upper bound by the commit's own duration).

Each page load uses a fresh browser context (nothing cached); one warm-up load is not
counted. Targets (issue 16): first render under 1 s, event to card under 250 ms.

    python -m bench --only board_render
    python -m bench.board_render            # the row alone, printed
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Measurement,
    Settings,
    pending,
    percentile,
    scratch_database,
    tempdir,
)
from service.settings import Database

STORIES = 10_000
CHROMIUM = Path(os.environ.get("STORYLINE_CHROMIUM", "/usr/bin/chromium"))
STAGES = ("backlog", "coding", "gates", "merge", "merge_failure", "blocked", "done", "archived")

# Stamps, in the page, when the first card appears and when each card lands in a column.
OBSERVER = """
window.__bench = {firstCard: null, columns: {}, cardAt: {}};
(() => {
  const seen = (card) => {
    const column = card.closest("section.column");
    if (!column) return;
    const now = performance.now();
    const stage = column.dataset.stage;
    const bench = window.__bench;
    if (bench.firstCard === null) bench.firstCard = now;
    if (!(stage in bench.columns)) bench.columns[stage] = now;
    const key = card.dataset.storyId + "/" + stage;
    if (!(key in bench.cardAt)) bench.cardAt[key] = performance.timeOrigin + now;
  };
  new MutationObserver((records) => {
    for (const record of records) {
      if (record.type === "attributes") {
        if (record.target.matches && record.target.matches("article.card")) seen(record.target);
        continue;
      }
      for (const node of record.addedNodes) {
        if (node.nodeType !== 1) continue;
        if (node.matches("article.card")) seen(node);
        node.querySelectorAll("article.card").forEach(seen);
      }
    }
  }).observe(document, {subtree: true, childList: true, attributes: true,
                        attributeFilter: ["data-stage"]});
})();
"""


def browser_problem() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (scripts/install-chromium.sh)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"playwright is missing ({exc})"
    return None


def _load(db: Database, stories: int) -> int:
    from bench.projection_rebuild import load_events, rebuild
    from bench.scale import dataset

    events = load_events(db, dataset(stories))
    # serve starts at the projections' head instead of folding 100,000 events first.
    rebuild(db, 20000)
    return events


class Served:
    def __init__(self, settings: Settings, db: Database) -> None:
        from bench.scale import _free_port, _serve_command

        project = settings.workdir / "board-project"
        project.mkdir(exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = settings.workdir / "board-serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    *_serve_command(),
                    "--project",
                    str(project),
                    "--database-url",
                    f"sqlite:///{db.sqlite_path}",
                    "--port",
                    str(self.port),
                    "--no-runners",
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_up(self) -> None:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
                return
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"storyline serve did not start: {self.log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _nonempty_stages(url: str) -> set[str]:
    import httpx

    board = httpx.get(f"{url}/board", params={"limit": 1}, timeout=60).json()["stages"]
    return {stage for stage, rows in board.items() if rows}


def _wait(page: Any, expression: str, arg: Any = None, timeout: float = 60.0) -> None:
    """Poll ``expression`` (a JS function of ``arg``) until truthy. Not wait_for_function:
    the board's CSP forbids eval, which that one needs; evaluate goes through the
    DevTools protocol. The stamps come from the page's own observer, so polling adds
    nothing to what is measured."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression, arg):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the board never satisfied {expression}")
        time.sleep(0.02)


def _page_load(browser: Any, url: str, stages: set[str]) -> tuple[float, float]:
    """(DOMContentLoaded, board filled) in ms from the navigation's start, fresh context."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.add_init_script(OBSERVER)
        page.goto(f"{url}/", wait_until="domcontentloaded", timeout=60_000)
        _wait(page, "(stages) => stages.every(s => s in window.__bench.columns)", sorted(stages))
        dcl = page.evaluate(
            "performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd"
        )
        columns = page.evaluate("window.__bench.columns")
        return float(dcl), max(float(columns[s]) for s in stages)
    finally:
        context.close()


def _event_delays(browser: Any, url: str, samples: int) -> list[float]:
    """ms from each CodingStarted's timestamp to its card in the coding column."""
    import httpx

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    delays: list[float] = []
    try:
        page = context.new_page()
        page.add_init_script(OBSERVER)
        page.goto(f"{url}/", wait_until="domcontentloaded", timeout=60_000)
        _wait(page, "() => window.__bench.firstCard !== null")
        with httpx.Client(base_url=url, timeout=60) as client:
            for index in range(samples):
                story_id = f"bench-board-{index}"
                # Above every generated story (priorities -2..2): the card sorts onto the
                # first page of its column, where the board shows it (a card that sorts
                # past the page only moves the column's count).
                created = client.post(
                    "/stories",
                    json={
                        "id": story_id,
                        "name": f"moving card {index}",
                        "acceptance_criteria": ["a"],
                        "priority": 100,
                    },
                )
                created.raise_for_status()
                # Let the board take the creation in first: only the move is timed.
                time.sleep(0.2)
                moved = client.post(
                    f"/stories/{story_id}/transitions", json={"event": "start_coding"}
                )
                moved.raise_for_status()
                key = f"{story_id}/coding"
                _wait(page, "(key) => key in window.__bench.cardAt", key, timeout=30)
                landed = float(page.evaluate("(key) => window.__bench.cardAt[key]", key))
                events = client.get(f"/stories/{story_id}/history").json()["events"]
                [started] = [e for e in events if e["type"] == "CodingStarted"]
                committed = datetime.fromisoformat(started["timestamp"]).timestamp() * 1000
                delays.append(landed - committed)
                time.sleep(0.1)  # one move at a time, as a person would watch them
    finally:
        context.close()
    return delays


def run(settings: Settings) -> list[Measurement]:
    problem = browser_problem()
    if problem is not None:
        return [pending("8", "web board in Chromium", problem, backend="sqlite")]
    from playwright.sync_api import sync_playwright

    loads = 3 if settings.quick else 10
    samples = 10 if settings.quick else 30
    out: list[Measurement] = []
    with scratch_database(settings, "sqlite") as db:
        started = time.monotonic()
        events = _load(db, STORIES)
        print(
            f"[bench] board: {STORIES:,} stories, {events:,} events loaded and projected "
            f"in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        served = Served(settings, db)
        try:
            served.wait_up()
            stages = _nonempty_stages(served.url)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=str(CHROMIUM),
                    args=["--no-sandbox", "--disable-dev-shm-usage"],
                )
                try:
                    _page_load(browser, served.url, stages)  # warm-up, not counted
                    timings = [_page_load(browser, served.url, stages) for _ in range(loads)]
                    delays = _event_delays(browser, served.url, samples)
                finally:
                    browser.close()
        finally:
            served.stop()
    scale = f"{STORIES:,} stories / {events:,} events"
    for row, label, values, note in (
        (
            "8",
            f"board first render, {scale}: time to DOMContentLoaded",
            [t[0] for t in timings],
            f"{loads} loads of /, fresh context each, after one warm-up load",
        ),
        (
            "8f",
            f"board filled, {scale}: first card in every non-empty column",
            [t[1] for t in timings],
            f"{len(stages)} non-empty columns; ms from the navigation's start",
        ),
        (
            "8e",
            f"event commit to card moved on an open board, {scale}",
            delays,
            f"{samples} start_coding transitions via the API; event timestamp to "
            "MutationObserver stamp (an upper bound)",
        ),
    ):
        out.append(
            Measurement(
                row,
                label,
                "sqlite",
                None,
                percentile(values, 50),
                "ms",
                p50_ms=percentile(values, 50),
                p99_ms=percentile(values, 99),
                note=note,
            )
        )
    return out


def main() -> int:
    from bench.common import DEFAULT_PG_ADMIN_URL

    quick = "--quick" in sys.argv[1:]
    with tempdir() as work:
        settings = Settings.make(
            quick=quick, pg_admin_url=DEFAULT_PG_ADMIN_URL, sqlite=True, workdir=Path(work)
        )
        for m in run(settings):
            print(
                f"{m.row:>3} {m.label}: {m.status} p50={m.p50_ms} ms p99={m.p99_ms} ms ({m.note})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
