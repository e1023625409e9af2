"""Where the real Codex CLI is, and the environment that keeps it offline.

``scripts/install-agent-clis.sh`` installs the pinned CLI into ``.tools/npm``. A test that
needs it calls :func:`codex_cli`: skipped when the CLI is absent locally, a failure under CI
(``CI`` or ``STORYLINE_REQUIRE_POSTGRES`` set), where the install script has run and a
missing CLI means a broken install.
"""

from __future__ import annotations

from pathlib import Path

from tests.doubles.claude_cli import installed_cli, required_cli

PINNED_VERSION = "0.171.0"
DUMMY_API_KEY = "sk-openai-test-dummy-key-0123456789"


def codex_cli_path() -> Path | None:
    return installed_cli("codex", "STORYLINE_CODEX_CLI")


def codex_cli() -> Path:
    return required_cli("codex", "STORYLINE_CODEX_CLI", "Codex CLI")


def codex_env(home: Path) -> dict[str, str]:
    """A private HOME and CODEX_HOME: the CLI keeps its sessions, config and logs there, and
    the machine user's config, credentials and sessions stay out of the test (and the test's
    out of the user's). ``resume`` needs the same home as the run it resumes."""
    home.mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "CODEX_HOME": str(home)}
