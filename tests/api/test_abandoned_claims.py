"""A claim left by a killed server is taken over at once; a live server's claim is not.

Real ``serve`` processes on both backends. The claim's owner is a server instance holding a
lock for its life (``service.instances``): once that process is gone, a retry with the same
key runs the command straight away instead of answering ``409 idempotency_key_in_use``
until the 60 s lease runs out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import ANONYMOUS_ACTOR
from api.schemas import CreateStoryRequest
from service.application import StorylineApplication
from service.idempotency import TABLE, fingerprint
from service.instances import instance_lock_dir, liveness_for, new_instance_id
from service.settings import Database
from service.sqlstore import SqlStore
from tests.api.test_serve import database_url, free_port, serve_without_runners, wait_until_up

BODY = {"name": "Once", "acceptance_criteria": ["runs once"]}

# `serve`, with the application's create_story stopped for good once the key is claimed:
# the kill then lands between the claim and the commit, every time.
PAUSED_SERVE = """
import os, pathlib, time, typer
from api.cli_serve import serve
from service.application import StorylineApplication

def paused(self, *args, **kwargs):
    pathlib.Path(os.environ["PAUSE_MARKER"]).write_text("claimed")
    time.sleep(3600)

StorylineApplication.create_story = paused
typer.run(serve)
"""


def create_fingerprint() -> str:
    body = CreateStoryRequest.model_validate(BODY).model_dump(mode="json")
    return fingerprint("POST", "/stories", body)


@contextmanager
def served(database: Database, tmp_path: Path) -> Iterator[str]:
    process, url = serve_without_runners(database, tmp_path, "--projections", "thread")
    try:
        wait_until_up(process, url)
        yield url
    finally:
        process.kill()
        process.communicate(timeout=60)


@contextmanager
def sql(database: Database) -> Iterator[SqlStore]:
    app = StorylineApplication(database)
    try:
        yield SqlStore(app)
    finally:
        app.close()


def insert_claim(store: SqlStore, key: str, owner: str) -> None:
    store.write(
        f"INSERT INTO {TABLE} (actor, idem_key, fingerprint, created_at, owner_instance) "
        "VALUES (?, ?, ?, ?, ?)",
        (ANONYMOUS_ACTOR, key, create_fingerprint(), time.time(), owner),
    )


def created_stories(url: str) -> list[str]:
    events = httpx.get(f"{url}/events", timeout=30).json()["events"]
    return [e["story_id"] for e in events if e["type"] == "StoryCreated"]


def post(url: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}/stories", json=BODY, headers={"Idempotency-Key": key}, timeout=60)


def test_a_dead_owners_claim_is_taken_over_and_a_live_owners_is_not(
    database: Database, tmp_path: Path
) -> None:
    with sql(database) as store:
        # A claim by an instance that no process holds: its server was killed.
        insert_claim(store, "orphan", new_instance_id())
        # A claim by an instance that is alive (this test process holds its lock).
        live_owner = liveness_for(database, store)
        insert_claim(store, "busy", live_owner.current())
        try:
            with served(database, tmp_path) as url:
                taken = post(url, "orphan")
                assert taken.status_code == 201, taken.text
                assert "idempotent-replayed" not in taken.headers

                busy = post(url, "busy")
                assert busy.status_code == 409
                assert busy.json()["error"]["code"] == "idempotency_key_in_use"

                live_owner.close()  # its process is gone now: the next retry runs
                freed = post(url, "busy")
                assert freed.status_code == 201, freed.text
                assert post(url, "orphan").json() == taken.json()  # and replays as before
                assert created_stories(url) == [taken.json()["id"], freed.json()["id"]]
        finally:
            live_owner.close()


def test_a_server_killed_between_claim_and_commit_frees_the_key_at_once(
    database: Database, tmp_path: Path
) -> None:
    marker = tmp_path / "paused"
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")}
    environment["PAUSE_MARKER"] = str(marker)
    # The URL goes by the environment, as the README recommends.
    environment["STORYLINE_DATABASE_URL"] = database_url(database)
    paused = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PAUSED_SERVE,
            "--project",
            str(tmp_path),
            "--port",
            str(port),
            "--no-runners",
            "--projections",
            "thread",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    first: dict[str, Any] = {}
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(paused, url)

        def send() -> None:
            try:
                first["response"] = post(url, "killed")
            except httpx.TransportError as exc:
                first["error"] = exc

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.02)
        with sql(database) as store:
            [claim] = store.query(
                f"SELECT status_code, committed_position, owner_instance FROM {TABLE}"
            )
        assert claim["status_code"] is None and claim["committed_position"] is None
        assert claim["owner_instance"]
        paused.kill()
        paused.communicate(timeout=60)
        sender.join(timeout=60)
        assert "error" in first  # the client never got an answer
    finally:
        if paused.poll() is None:
            paused.kill()
            paused.communicate(timeout=60)

    with served(database, tmp_path) as url:
        retried = post(url, "killed")
        assert retried.status_code == 201, retried.text
        assert "idempotent-replayed" not in retried.headers
        assert post(url, "killed").json() == retried.json()
        assert created_stories(url) == [retried.json()["id"]]


HOLD_A_LOCK = """
import sys, time
from pathlib import Path
from service.instances import FileLockInstance
print(FileLockInstance(Path(sys.argv[1])).current(), flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_lock_files_of_killed_instances_are_swept(database: Database, tmp_path: Path) -> None:
    with sql(database) as store:
        directory = instance_lock_dir(database)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_A_LOCK, str(directory)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None
            held = holder.stdout.readline().strip()
            checker = liveness_for(database, store)
            assert checker.is_alive(held) is True
            holder.kill()
            holder.wait(timeout=60)
            assert (directory / f"{held}.lock").exists()  # a kill leaves the file

            mine = checker.current()  # starting an instance sweeps the dead ones' files
            assert sorted(p.stem for p in directory.glob("*.lock")) == [mine]
            assert checker.is_alive(held) is False
            checker.close()  # a clean stop removes its own
            assert list(directory.glob("*.lock")) == []
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(timeout=60)
