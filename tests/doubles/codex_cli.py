"""Where the real Codex CLI is, and the environment that keeps it offline.

``scripts/install-agent-clis.sh`` installs the pinned CLI into ``.tools/npm``. A test that
needs it calls :func:`codex_cli`: skipped when the CLI is absent locally, a failure under CI
(``CI`` or ``STORYLINE_REQUIRE_POSTGRES`` set), where the install script has run and a
missing CLI means a broken install.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.doubles.claude_cli import REPO_ROOT, REQUIRE_CLIS

PINNED_VERSION = "0.171.0"
DUMMY_API_KEY = "sk-openai-test-dummy-key-0123456789"


def codex_cli_path() -> Path | None:
    override = os.environ.get("STORYLINE_CODEX_CLI")
    if override:
        return Path(override)
    local = REPO_ROOT / ".tools" / "npm" / "bin" / "codex"
    if local.exists():
        return local
    found = shutil.which("codex")
    return Path(found) if found else None


def codex_cli() -> Path:
    """The CLI's path; skip (locally) or fail (in CI) when it is not installed."""
    path = codex_cli_path()
    if path is not None:
        return path
    message = "the Codex CLI is not installed (run scripts/install-agent-clis.sh)"
    if REQUIRE_CLIS:
        pytest.fail(message)
    pytest.skip(message)


def codex_env(home: Path) -> dict[str, str]:
    """A private HOME and CODEX_HOME: the CLI keeps its sessions, config and logs there, and
    the machine user's config, credentials and sessions stay out of the test (and the test's
    out of the user's). ``resume`` needs the same home as the run it resumes."""
    home.mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "CODEX_HOME": str(home)}
