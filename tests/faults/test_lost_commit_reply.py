"""A commit whose reply is lost must not run a command twice (issue 12, item 1).

Between storyline and PostgreSQL sits ``tests.faults.pgproxy``, a real proxy process that
recognises the commit of an event insert and either forwards it and throws its reply away
(the commit happened, the client sees a dropped connection) or drops it unsent (the commit
did not happen, the client sees the same). The recorder retries both; only the log can say
which one it was, and every answer must agree with the log.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import OperationalError

from domain.commands import apply_named
from domain.errors import VersionConflict
from service.application import StorylineApplication
from service.events_log import LoggedEvent
from service.idempotency import MARK_KWARG, IdempotencyMark, IdempotencyStore
from service.settings import Database
from service.sqlstore import SqlStore
from tests.faults.support import Load, Server, read_log, reconcile

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
ACTOR = "user:proxy-test"


@dataclass
class PgProxy:
    """``python -m tests.faults.pgproxy`` in front of ``upstream``, controlled over its port."""

    process: subprocess.Popen[str]
    port: int
    control_port: int

    @classmethod
    def start(cls, upstream: Database, mode: str = "off", every: int = 0) -> PgProxy:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.faults.pgproxy",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                f"{upstream.host}:{upstream.port}",
                "--mode",
                mode,
                "--every",
                str(every),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if not k.startswith("STORYLINE_")},
        )
        lines: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        stdout = process.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            ports = json.loads(lines.get(timeout=30))
        except (queue.Empty, ValueError):
            process.kill()
            raise AssertionError("the proxy did not print its ports") from None
        return cls(process, int(ports["port"]), int(ports["control_port"]))

    def command(self, line: str) -> str:
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=10) as sock:
            sock.sendall(line.encode() + b"\n")
            return sock.makefile().readline().strip()

    def set(self, mode: str, every: int = 1, limit: int | None = None) -> None:
        line = f"set mode={mode} every={every}" + ("" if limit is None else f" limit={limit}")
        assert self.command(line) == "ok"

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = json.loads(self.command("stats"))
        return stats

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def proxy(pg_database: Database) -> Iterator[PgProxy]:
    started = PgProxy.start(pg_database)
    try:
        yield started
    finally:
        started.stop()


def through(proxy: PgProxy, db: Database) -> Database:
    return replace(db, host="127.0.0.1", port=proxy.port)


def events_by_reason(db: Database) -> dict[str, list[LoggedEvent]]:
    by_reason: dict[str, list[LoggedEvent]] = {}
    for event in read_log(db):
        by_reason.setdefault(event.reason or "", []).append(event)
    return by_reason


def test_the_proxy_loses_replies_and_drops_commits(pg_database: Database, proxy: PgProxy) -> None:
    """The fault itself: a lost reply leaves the event committed, a dropped commit does not
    (the recorder's retry is what makes both look alike to the caller)."""
    app = StorylineApplication(through(proxy, pg_database), pool_size=1)
    try:
        created = app.create_story(
            name="n", description="", acceptance_criteria=["a"], actor=ACTOR, reason="create"
        )
        proxy.set("lose", every=1)
        # Every attempt's reply is lost, so no attempt is known to have committed: the caller
        # gets a retryable error, and the log has the event exactly once.
        with pytest.raises(OperationalError):
            app.transition(created.story.id, "start_coding", actor=ACTOR, reason="lost")
        proxy.set("drop", every=1)
        with pytest.raises(OperationalError):
            app.transition(created.story.id, "block", actor=ACTOR, reason="dropped")
        stats = proxy.stats()
    finally:
        app.close()
    assert stats["lost_replies"] >= 10 and stats["dropped_commits"] >= 10, stats
    by_reason = events_by_reason(pg_database)
    assert [len(by_reason.get(r, [])) for r in ("create", "lost", "dropped")] == [1, 1, 0]


def test_a_lost_reply_is_answered_with_the_committed_result(
    pg_database: Database, proxy: PgProxy
) -> None:
    """The issue's two symptoms, one lost reply each: a create with an automatic id made a
    second story, and a transition answered a conflict with its own event."""
    app = StorylineApplication(through(proxy, pg_database), pool_size=1)
    try:
        proxy.set("lose", every=1, limit=1)
        created = app.create_story(
            name="n", description="", acceptance_criteria=["a"], actor=ACTOR, reason="create"
        )
        created_stories = [e.story_id for e in read_log(pg_database) if e.version == 1]
        assert (created.story.id, created_stories) == ("1", ["1"])
        proxy.set("lose", every=1, limit=1)
        moved = app.transition("1", "start_coding", actor=ACTOR, reason="move", expected_version=1)
        assert proxy.stats()["lost_replies"] == 2
    finally:
        app.close()
    log = read_log(pg_database)
    assert [(e.story_id, e.version, e.reason) for e in log] == [
        ("1", 1, "create"),
        ("1", 2, "move"),
    ]
    assert (created.story.id, created.position) == ("1", log[0].position)
    assert (moved.story.version, moved.position) == (2, log[1].position)


@pytest.mark.parametrize("db_functions", [True, False], ids=["db-functions", "library-insert"])
def test_commands_through_lost_and_dropped_commits_are_applied_once(
    pg_database: Database, proxy: PgProxy, db_functions: bool
) -> None:
    """Creates with automatic ids, transitions, two-event saves, with and without a key;
    also through the library's own insert (plain INSERTs in a pipelined transaction), which
    storyline's settings never select but the recorder still resolves."""
    db = through(proxy, pg_database)
    app = StorylineApplication(db, pool_size=2)
    recorder: Any = app.recorder
    recorder.datastore.enable_db_functions = db_functions
    store = IdempotencyStore(app)
    outcomes: Counter[str] = Counter()
    told: dict[str, tuple[str, int, int]] = {}  # reason -> (story, version, position)
    keys: dict[str, int] = {}  # idempotency key -> position its command was told
    proxy.set("alternate", every=3)
    try:
        for number in range(10):
            reason = f"create-{number}"
            mark = None
            if number % 2:
                assert store.claim(ACTOR, reason, "fp").state == "claimed"
                mark = IdempotencyMark(ACTOR, reason)
            created = app.create_story(
                name=reason,
                description="",
                acceptance_criteria=["a"],
                actor=ACTOR,
                reason=reason,
                idempotency=mark,
            )
            story = created.story
            told[reason] = (story.id, story.version, created.position)
            if mark:
                keys[reason] = created.position
            outcomes["create"] += 1
            for step, event in enumerate(["start_coding", "block", "unblock", "block"]):
                reason = f"{story.id}-{step}-{event}"
                mark = None
                if step % 2:
                    assert store.claim(ACTOR, reason, "fp").state == "claimed"
                    mark = IdempotencyMark(ACTOR, reason)
                moved = app.transition(
                    story.id,
                    event,
                    actor=ACTOR,
                    reason=reason,
                    expected_version=story.version,
                    idempotency=mark,
                )
                story = moved.story
                told[reason] = (story.id, story.version, moved.position)
                if mark:
                    keys[reason] = moved.position
                outcomes[event] += 1
            # Two events in one save: the recorder's multi-event inserts, with and without
            # a key.
            for marked in (False, True):
                current = app.get_story(story.id)
                reasons = [f"{story.id}-pair-{marked}-unblock", f"{story.id}-pair-{marked}-block"]
                for event, reason in zip(["unblock", "block"], reasons, strict=True):
                    apply_named(
                        current,
                        event,
                        actor=ACTOR,
                        reason=reason,
                        data=None,
                        policy=app.policy,
                        dependency_stages={},
                    )
                kwargs: dict[str, Any] = {}
                if marked:
                    assert store.claim(ACTOR, reasons[-1], "fp").state == "claimed"
                    kwargs[MARK_KWARG] = IdempotencyMark(ACTOR, reasons[-1])
                recordings = app.save(current, **kwargs)
                positions = [r.notification.id for r in recordings]
                for version, (reason, position) in enumerate(
                    zip(reasons, positions, strict=True), start=current.version - 1
                ):
                    told[reason] = (story.id, version, position)
                if marked:
                    keys[reasons[-1]] = positions[-1]
                outcomes["pair"] += 1
        stats = proxy.stats()
        marks = {
            row["idem_key"]: row["committed_position"]
            for row in SqlStore(app).query(
                "SELECT idem_key, committed_position FROM storyline_idempotency"
            )
        }
    finally:
        app.close()
    print(f"\nproxy: {stats}; commands: {dict(outcomes)}")
    assert stats["lost_replies"] >= 5 and stats["dropped_commits"] >= 5, stats
    by_reason = events_by_reason(pg_database)
    duplicated = {r: len(e) for r, e in by_reason.items() if len(e) > 1}
    assert duplicated == {}
    assert set(by_reason) == set(told)  # nothing lost, nothing unasked for
    assert {r: (e[0].story_id, e[0].version, e[0].position) for r, e in by_reason.items()} == told
    assert len([e for e in read_log(pg_database) if e.version == 1]) == 10  # one story each
    assert marks == keys  # each key marked with its own command's event


def test_a_genuine_race_after_a_failed_attempt_is_still_a_conflict(
    pg_database: Database, proxy: PgProxy
) -> None:
    """A key violation after a failed attempt is only our own commit if the stored event
    is the one we sent: another writer's event at that version stays a lost race."""
    app = StorylineApplication(through(proxy, pg_database), pool_size=1)
    direct = StorylineApplication(pg_database, pool_size=1)
    try:
        created = app.create_story(
            name="n", description="", acceptance_criteria=["a"], actor=ACTOR, reason="create"
        )
        proxy.set("drop", every=1)
        errors: list[BaseException] = []

        def slow_transition() -> None:
            try:
                app.transition(
                    created.story.id, "start_coding", actor=ACTOR, reason="ours", expected_version=1
                )
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=slow_transition)
        worker.start()
        deadline = time.monotonic() + 30
        while proxy.stats()["dropped_commits"] < 1:
            assert time.monotonic() < deadline, "no commit was dropped"
            time.sleep(0.01)
        direct.transition(
            created.story.id, "start_coding", actor=ACTOR, reason="theirs", expected_version=1
        )
        proxy.set("off")
        worker.join(timeout=30)
    finally:
        app.close()
        direct.close()
    assert len(errors) == 1 and isinstance(errors[0], VersionConflict), errors
    by_reason = events_by_reason(pg_database)
    assert "ours" not in by_reason and len(by_reason["theirs"]) == 1


@pytest.mark.slow
def test_serve_answers_every_keyed_command_as_the_log_says(
    pg_database: Database, proxy: PgProxy, tmp_path: Path
) -> None:
    """``storyline serve`` on PostgreSQL through the proxy, 1 in 25 event commits faulted
    (lost reply and dropped commit in turn), 300 keyed commands from four clients."""
    server = Server(through(proxy, pg_database), tmp_path)
    server.start()
    load = Load(server.url, workers=4, transitions_per_story=6, resend_for=30)
    try:
        proxy.set("alternate", every=25)
        load.start()
        load.wait_for_acknowledged(300, timeout=120)
        load.stop(timeout=60)
        stats = proxy.stats()
        proxy.set("off")
    finally:
        load.stop(timeout=60)
        code = server.stop()
    ledger = reconcile(load.commands, read_log(pg_database))
    print(f"\nproxy: {stats}\nanswers: {dict(load.answers)}\nledger: {ledger.line()}")
    assert code == 0, server.tail()
    assert stats["lost_replies"] >= 3 and stats["dropped_commits"] >= 3, stats
    assert ledger.acknowledged >= 300
    assert ledger.acknowledged == ledger.logged == ledger.commands, ledger.line()
    assert (ledger.lost, ledger.duplicated, ledger.disagreeing) == (0, 0, 0), ledger.line()
    assert (ledger.unresolved, ledger.unacknowledged_logged, ledger.foreign) == (0, 0, 0)
