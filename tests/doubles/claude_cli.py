"""Where the real Claude Code CLI is, and the environment that keeps it offline.

``scripts/install-agent-clis.sh`` installs the pinned CLI into ``.tools/npm``. A test that
needs it calls :func:`claude_cli` (or uses the ``claude_cli`` fixture): skipped when the
CLI is absent locally, a failure under CI (``CI`` or ``STORYLINE_REQUIRE_POSTGRES`` set),
where the install script has run and a missing CLI means a broken install.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PINNED_VERSION = "2.1.332"
REQUIRE_CLIS = bool(os.environ.get("CI") or os.environ.get("STORYLINE_REQUIRE_POSTGRES"))

# Offline and quiet: no telemetry, no update checks, no error reports, no side requests
# (title generation, quota probes) beyond the main loop the tests script.
OFFLINE_ENV = {
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_BUG_COMMAND": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "CLAUDE_CODE_MAX_RETRIES": "1",
}
DUMMY_API_KEY = "sk-ant-test-dummy-key-0123456789"


def installed_cli(command: str, override_env: str) -> Path | None:
    """``$override_env``, else the pinned install in ``.tools/npm``, else ``command`` on PATH."""
    override = os.environ.get(override_env)
    if override:
        return Path(override)
    local = REPO_ROOT / ".tools" / "npm" / "bin" / command
    if local.exists():
        return local
    found = shutil.which(command)
    return Path(found) if found else None


def required_cli(command: str, override_env: str, label: str) -> Path:
    """The CLI's path; skip (locally) or fail (in CI) when it is not installed."""
    path = installed_cli(command, override_env)
    if path is not None:
        return path
    message = f"the {label} is not installed (run scripts/install-agent-clis.sh)"
    if REQUIRE_CLIS:
        pytest.fail(message)
    pytest.skip(message)


def claude_cli_path() -> Path | None:
    return installed_cli("claude", "STORYLINE_CLAUDE_CLI")


def claude_cli() -> Path:
    return required_cli("claude", "STORYLINE_CLAUDE_CLI", "Claude Code CLI")


def cli_env(base_url: str, home: Path) -> dict[str, str]:
    """Variables for a CLI run against the scripted server, with its own empty HOME.

    A private HOME keeps the CLI's settings, sessions and credentials of the machine's user
    out of the test, and the test's out of the user's.
    """
    home.mkdir(parents=True, exist_ok=True)
    return {
        **OFFLINE_ENV,
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": DUMMY_API_KEY,
    }
