"""``storyline epic`` as a user runs it: a real subprocess on the local store of each
database, and the same commands with ``--url`` against a real ``storyline serve``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.settings import Database
from tests.api.test_serve import database_url, free_port, run_serve, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
WRITE = "epic-cli-writer-0123456789"
READ = "epic-cli-reader-0123456789"


def storyline(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    environment.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"storyline {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def local(project: Path, db: Database) -> list[str]:
    return ["--project", str(project), "--database-url", database_url(db)]


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def test_add_list_show_block_history_on_the_local_store(tmp_path: Path, database: Database) -> None:
    where = local(tmp_path, database)
    added = as_json(
        storyline(
            "epic",
            "add",
            "--name",
            "Pretty printer",
            "--goal",
            "Read a file and print it prettily.",
            "--criterion",
            "prints the sample",
            "-c",
            "handles empty files",
            "--max-budget-usd",
            "2.5",
            "--actor",
            "user:dana",
            "--json",
            *where,
        )
    )
    assert added["id"] == "epic-1" and added["stage"] == "planning"
    assert added["acceptance_criteria"] == ["prints the sample", "handles empty files"]
    assert added["ledger"]["max_budget_usd"] == 2.5

    human = storyline("epic", "add", "--name", "Second", "--goal", "g", "-c", "c", *where).stdout
    assert "created epic epic-2 (Second), planning" in human
    listed = as_json(storyline("epic", "list", "--json", *where))
    assert [(e["id"], e["stage"], e["stories_total"]) for e in listed] == [
        ("epic-1", "planning", 0),
        ("epic-2", "planning", 0),
    ]
    table = storyline("epic", "list", *where).stdout
    assert "epic-1" in table and "Pretty printer" in table and "0/0" in table

    blocked = storyline(
        "epic",
        "block",
        "epic-1",
        "--reason",
        "waiting on the design",
        "--actor",
        "user:ops",
        *where,
    ).stdout
    assert "epic epic-1: block -> blocked (version 2)" in blocked
    shown = storyline("epic", "show", "epic-1", *where).stdout
    for text in ("Pretty printer", "blocked", "waiting on the design", "epic/epic-1", "of $2.50"):
        assert text in shown, shown
    unblocked = as_json(
        storyline(
            "epic", "unblock", "epic-1", "-r", "agreed", "--max-budget-usd", "4", "--json", *where
        )
    )
    assert unblocked["stage"] == "planning" and unblocked["max_budget_usd"] == 4.0

    history = as_json(storyline("epic", "history", "epic-1", "--json", *where))
    assert [(e["type"], e["actor"], e["reason"]) for e in history[:2]] == [
        ("EpicCreated", "user:dana", None),
        ("EpicBlocked", "user:ops", "waiting on the design"),
    ]
    # Without --actor: the login's user.
    assert history[2]["type"] == "EpicUnblocked" and history[2]["reason"] == "agreed"
    assert history[2]["actor"].startswith("user:") and history[2]["actor"] != "user:ops"
    table = storyline("epic", "history", "epic-1", *where).stdout
    assert "EpicBlocked" in table and "user:ops" in table

    back_then = as_json(
        storyline(
            "epic", "show", "epic-1", "--as-of", str(history[1]["position"]), "--json", *where
        )
    )
    assert back_then["stage"] == "blocked" and back_then["as_of"] == str(history[1]["position"])

    failed = storyline("epic", "fail", "epic-2", "-r", "dropped", "--json", *where)
    assert as_json(failed)["failed_reason"] == "dropped"


def test_refusals_are_one_line_and_change_nothing(tmp_path: Path, database: Database) -> None:
    where = local(tmp_path, database)
    storyline("epic", "add", "--name", "E", "--goal", "g", "-c", "c", *where)

    def refused(code: int, needle: str, *args: str) -> None:
        proc = storyline(*args, *where, check=False)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr

    refused(2, "at least one --criterion", "epic", "add", "--name", "E", "--goal", "g")
    refused(1, "goal must not be empty", "epic", "add", "--name", "E", "--goal", " ", "-c", "c")
    refused(
        1,
        "max_budget_usd",
        "epic",
        "add",
        "--name",
        "E",
        "--goal",
        "g",
        "-c",
        "c",
        "--max-budget-usd",
        "-1",
    )
    refused(1, "invalid epic id", "epic", "show", "../../etc/passwd")
    refused(1, "invalid epic id", "epic", "history", "1")
    refused(1, "invalid epic id", "epic", "block", "epic-1\n", "-r", "x")
    refused(1, "epic 'epic-9' does not exist", "epic", "show", "epic-9")
    refused(2, "--as-of takes a log position", "epic", "show", "epic-1", "--as-of", "soon")
    refused(2, "--reason must not be empty", "epic", "block", "epic-1", "-r", " ")
    refused(1, "legal events from 'planning'", "epic", "unblock", "epic-1", "-r", "x")
    refused(1, "version 1", "epic", "block", "epic-1", "-r", "x", "--expected-version", "7")
    missing = storyline("epic", "block", "epic-1", *where, check=False)
    assert missing.returncode == 2 and "--reason" in missing.stderr

    history = as_json(storyline("epic", "history", "epic-1", "--json", *where))
    assert [e["type"] for e in history] == ["EpicCreated"]
    assert [e["id"] for e in as_json(storyline("epic", "list", "--json", *where))] == ["epic-1"]


@pytest.fixture
def served(database: Database, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    process = run_serve(
        "--project",
        str(tmp_path),
        "--database-url",
        database_url(database),
        "--port",
        str(port),
        "--no-runners",
        "--log-level",
        "warning",
        env={"STORYLINE_TOKENS": f"{WRITE}=user:writer:write,{READ}=user:reader:read"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, url)
        yield url
    finally:
        process.terminate()
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def test_the_same_commands_against_a_running_server(served: str, tmp_path: Path) -> None:
    remote = ["--url", served]
    writer = {"STORYLINE_TOKEN": WRITE}
    added = as_json(
        storyline(
            "epic",
            "add",
            "--name",
            "Remote",
            "--goal",
            "g",
            "-c",
            "c",
            "--json",
            *remote,
            "--actor",
            "user:ignored",
            env=writer,
        )
    )
    assert added["id"] == "epic-1" and added["position"] is not None
    storyline("epic", "block", "epic-1", "-r", "over the wire", *remote, env=writer)

    reader = {"STORYLINE_TOKEN": READ}
    shown = as_json(storyline("epic", "show", "epic-1", "--json", *remote, env=reader))
    assert shown["stage"] == "blocked" and shown["blocked_reason"] == "over the wire"
    listed = as_json(storyline("epic", "list", "--json", *remote, env=reader))
    assert [e["id"] for e in listed] == ["epic-1"]
    history = as_json(storyline("epic", "history", "epic-1", "--json", *remote, env=reader))
    # Remotely the token decides who acted, not --actor.
    assert [(e["type"], e["actor"]) for e in history] == [
        ("EpicCreated", "user:writer"),
        ("EpicBlocked", "user:writer"),
    ]
    past = as_json(
        storyline(
            "epic",
            "show",
            "epic-1",
            "--as-of",
            str(history[0]["position"]),
            "--json",
            *remote,
            env=reader,
        )
    )
    assert past["stage"] == "planning"

    forbidden = storyline("epic", "unblock", "epic-1", "-r", "x", *remote, env=reader, check=False)
    assert forbidden.returncode == 1 and "may not send 'unblock'" in forbidden.stderr
    hostile = storyline("epic", "show", "epic-1%2F..", *remote, env=reader, check=False)
    assert hostile.returncode == 1 and "invalid epic id" in hostile.stderr
    unknown = storyline("epic", "show", "epic-5", *remote, env=reader, check=False)
    assert unknown.returncode == 1 and "epic 'epic-5' does not exist" in unknown.stderr
    assert len(as_json(storyline("epic", "history", "epic-1", "--json", *remote, env=reader))) == 2
