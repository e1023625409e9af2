"""A database password never shows in ``ps`` for long, nor in an error message.

Real ``storyline`` processes (the installed console script). The test server trusts local
connections, so any password is accepted: what matters is where it shows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service.cmdline import redacted_argv
from service.settings import Database, redact_url
from tests.api.test_serve import free_port, wait_until_up

STORYLINE = str(Path(sys.executable).parent / "storyline")
SECRET = "sup3r-secret-pw"


def with_password(db: Database, password: str = SECRET) -> str:
    return f"postgresql://{db.user}:{password}@{db.host}:{db.port}/{db.dbname}"


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    environment.update(env or {})
    return subprocess.run(
        [STORYLINE, *args], capture_output=True, text=True, env=environment, cwd=cwd, timeout=120
    )


def test_a_password_on_argv_is_masked_in_the_servers_command_line(
    pg_database: Database, tmp_path: Path
) -> None:
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    process = subprocess.Popen(
        [
            *(STORYLINE, "serve", "--project", str(tmp_path), "--port", str(port)),
            *("--database-url", with_password(pg_database), "--no-runners"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        assert wait_until_up(process, f"http://127.0.0.1:{port}").status_code == 200
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert SECRET.encode() not in cmdline
        assert b"--database-url" in cmdline and b"***" in cmdline  # still says what it runs
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert SECRET not in err
    warnings = [line for line in err.splitlines() if "password on the command line" in line]
    assert len(warnings) == 1 and "STORYLINE_DATABASE_URL" in warnings[0]


def test_the_url_can_come_from_a_file(pg_database: Database, tmp_path: Path) -> None:
    url_file = tmp_path / "db-url"
    url_file.write_text(with_password(pg_database) + "\n")
    upgraded = run(
        "db", "upgrade", env={"STORYLINE_DATABASE_URL_FILE": str(url_file)}, cwd=tmp_path
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert pg_database.dbname in upgraded.stdout
    assert SECRET not in upgraded.stdout + upgraded.stderr
    assert "warning" not in upgraded.stderr

    missing = run(
        "db", "status", env={"STORYLINE_DATABASE_URL_FILE": str(tmp_path / "nope")}, cwd=tmp_path
    )
    assert missing.returncode == 2
    assert f"cannot read the database URL file {tmp_path / 'nope'}" in missing.stderr
    url_file.write_text("  \n")
    empty = run("db", "status", env={"STORYLINE_DATABASE_URL_FILE": str(url_file)}, cwd=tmp_path)
    assert empty.returncode == 2 and "is empty" in empty.stderr


@pytest.mark.parametrize(
    "url",
    [
        # Unreachable: the connection error names host and port.
        f"postgresql://postgres:{SECRET}@127.0.0.1:1/storyline",
        # An unescaped "/" in the password: the "port" would hold part of it.
        "postgresql://postgres:sup3r/secret-pw@127.0.0.1:5432/storyline",
        f"postgresql://postgres:{SECRET}@127.0.0.1:5432/no_such_database_for_d",
    ],
)
@pytest.mark.parametrize("command", [["db", "upgrade"], ["db", "status"], ["story", "list"]])
def test_error_messages_never_show_the_password(
    url: str, command: list[str], tmp_path: Path
) -> None:
    failed = run(*command, "--database-url", url, cwd=tmp_path)
    assert failed.returncode in (1, 2)
    assert "error:" in failed.stderr
    for part in ("secret", "sup3r"):
        assert part not in failed.stdout + failed.stderr


def test_redaction_keeps_everything_but_the_password() -> None:
    assert redact_url("postgresql://u:p@ss/w@h:5/db?x=1") == "postgresql://u:***@h:5/db?x=1"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("sqlite:///a/b.db") == "sqlite:///a/b.db"
    argv = ["python", "storyline", "serve", "--database-url", "postgresql://u:pw@h/db", "-C", "x"]
    assert redacted_argv(argv) == [*argv[:4], "postgresql://u:***@h/db", "-C", "x"]
    assert redacted_argv(["storyline", "--database-url=postgresql://u:pw@h/db"]) == [
        "storyline",
        "--database-url=postgresql://u:***@h/db",
    ]
    assert redacted_argv(["storyline", "--database-url", "postgresql://u@h/db"]) is None
