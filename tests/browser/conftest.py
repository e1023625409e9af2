"""A real headless Chromium (Debian's ``chromium``, driven by Playwright) against a real
``storyline serve``.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium`` (or
``$STORYLINE_CHROMIUM``), which ``scripts/install-chromium.sh`` installs. Without it or
without the ``playwright`` package the tests skip with the reason; under CI (``CI`` or
``STORYLINE_REQUIRE_BROWSER`` set) that is a failure instead, so the board is never
silently untested.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import migrations
from service.settings import Database
from tests.api.test_serve import free_port
from tests.pipeline_support import dump_toml, make_config, make_repo

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("STORYLINE_CHROMIUM", "/usr/bin/chromium"))
REQUIRE_BROWSER = bool(os.environ.get("CI") or os.environ.get("STORYLINE_REQUIRE_BROWSER"))
SCREENSHOTS = ROOT / "build" / "screenshots"
"""Where the run leaves its screenshots (gitignored); the terminal summary lists them."""

WRITE_TOKEN = "browser-write-token-0123456789"
READ_TOKEN = "browser-read-token-0123456789"
WRITER = "user:writer"
READER = "user:reader"

FIX = [
    # Talkative for a few seconds, so the card shows its running agent while the board
    # watches.
    {"sleep": 6, "interval": 0.5},
    {"write": "app.py", "content": "def add(a, b):\n    return a + b\n"},
    {"commit": "fix add"},
]
CODER_SCRIPT: dict[str, Any] = {"*": FIX}

_session_started = time.time()


def _browser_problem() -> str | None:
    if not CHROMIUM.exists():
        return (
            f"{CHROMIUM} is missing (scripts/install-chromium.sh installs Debian's chromium; "
            "or set STORYLINE_CHROMIUM)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"the playwright package is missing ({exc}); run scripts/bootstrap.sh"
    return None


def require_browser() -> None:
    problem = _browser_problem()
    if problem is None:
        return
    if REQUIRE_BROWSER:
        pytest.fail(f"the browser tests are required here (CI) but cannot run: {problem}")
    pytest.skip(f"no browser: {problem}")


# Module scope, not session: Playwright's sync API keeps an event loop running in the
# worker's main thread while it is started, and every later test of that worker that runs
# asyncio itself (the MCP client tests) would fail with "Already running asyncio".
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One headless Chromium per test process; each test gets its own context."""
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    # Waits, not thresholds: generous for a loaded two-core CI machine.
    expect.set_options(timeout=20_000)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            # Root in a container: Chromium's sandbox needs user namespaces it may not get.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
            timeout=60_000,
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Server:
    """A running ``storyline serve``: its URL, project, database and log."""

    url: str
    port: int
    project: Path
    db: Database
    log: Path
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    tokens: dict[str, str] = field(default_factory=dict)

    def headers(self, role: str = "write") -> dict[str, str]:
        token = self.tokens.get(role)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "serve", *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"storyline serve did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, size: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""

    # ------------------------------------------------------------------ API helpers

    def create(
        self, name: str, story_id: str, criteria: list[str] | None = None, priority: int = 0
    ) -> None:
        body = {
            "id": story_id,
            "name": name,
            "acceptance_criteria": criteria or ["it works"],
            "priority": priority,
        }
        created = httpx.post(
            f"{self.url}/stories",
            params={"wait": "true"},
            json=body,
            headers=self.headers(),
            timeout=30,
        )
        assert created.status_code == 201, created.text

    def transition(self, story_id: str, event: str, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"event": event}
        if reason is not None:
            body["reason"] = reason
        moved = httpx.post(
            f"{self.url}/stories/{story_id}/transitions",
            params={"wait": "true"},
            json=body,
            headers=self.headers(),
            timeout=30,
        )
        assert moved.status_code == 200, moved.text
        answer: dict[str, Any] = moved.json()
        return answer

    def story(self, story_id: str) -> dict[str, Any]:
        got = httpx.get(f"{self.url}/stories/{story_id}", headers=self.headers(), timeout=30)
        assert got.status_code == 200, got.text
        answer: dict[str, Any] = got.json()
        return answer

    def history(self, story_id: str) -> list[dict[str, Any]]:
        got = httpx.get(
            f"{self.url}/stories/{story_id}/history", headers=self.headers(), timeout=30
        )
        assert got.status_code == 200, got.text
        events: list[dict[str, Any]] = got.json()["events"]
        return events


def make_server(
    base: Path, *, runners: bool, tokens: bool = False, coder_script: dict[str, Any] | None = None
) -> Server:
    """A project (a git repo with the scripted agent configured) and a migrated SQLite file."""
    project = make_repo(base / "repo")
    config = make_config(base, coder_script if coder_script is not None else CODER_SCRIPT)
    (project / "storyline.toml").write_text(dump_toml(config))
    db = Database(kind="sqlite", sqlite_path=base / "storyline.db")
    migrations.upgrade(db)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    server_tokens: dict[str, str] = {}
    if tokens:
        env["STORYLINE_TOKENS"] = f"{WRITE_TOKEN}={WRITER}:write,{READ_TOKEN}={READER}:read"
        server_tokens = {"write": WRITE_TOKEN, "read": READ_TOKEN}
    args = [
        "--project",
        str(project),
        "--database-url",
        f"sqlite:///{db.sqlite_path}",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    if not runners:
        args.append("--no-runners")
    return Server(
        url=f"http://127.0.0.1:{port}",
        port=port,
        project=project,
        db=db,
        log=base / "serve.log",
        args=args,
        env=env,
        tokens=server_tokens,
    )


def _started(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(chromium: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``serve`` with its runners (the scripted coder) and no tokens: loopback, no login."""
    yield from _started(make_server(tmp_path_factory.mktemp("served"), runners=True))


@pytest.fixture(scope="module")
def served_with_tokens(chromium: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``serve --no-runners`` with a write token and a read-only token configured."""
    base = tmp_path_factory.mktemp("served-tokens")
    yield from _started(make_server(base, runners=False, tokens=True))


@dataclass
class Browsing:
    """One browser context (its own sessionStorage) and what its pages did."""

    context: Any
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    navigations: list[str] = field(default_factory=list)

    def page(self) -> Any:
        page = self.context.new_page()

        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: (
                self.errors.append(f"console.{msg.type}: {msg.text}")
                if msg.type == "error"
                else None
            ),
        )
        page.on(
            "framenavigated",
            lambda frame: (
                self.navigations.append(frame.url) if frame.parent_frame is None else None
            ),
        )
        return page


@pytest.fixture
def browsing(chromium: Any, request: pytest.FixtureRequest) -> Iterator[Browsing]:
    """A fresh context at 1280 x 800 (the size the issue asks the board to work at)."""
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(30_000)
    browsing = Browsing(context)
    try:
        yield browsing
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed and browsing.errors:
            print("browser errors:\n" + "\n".join(browsing.errors[-20:]))
        context.close()


def screenshot(page: Any, name: str) -> Path:
    """A full-page PNG in build/screenshots/ (gitignored), listed at the end of the run."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SCREENSHOTS.is_dir():
        return
    fresh = sorted(p for p in SCREENSHOTS.glob("*.png") if p.stat().st_mtime >= _session_started)
    if fresh:
        terminalreporter.write_line("browser screenshots: " + ", ".join(str(p) for p in fresh))
