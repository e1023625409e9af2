"""The HTTP client and the CLI backends: same calls, same shapes, locally or remotely."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import httpx
import pytest

from api.cli_remote import LocalBackend, RemoteBackend, story_backend
from api.client import ClientError, StorylineClient
from tests.api.conftest import ADMIN_TOKEN, LiveServer, ServerFactory


def test_client_mirrors_the_application(serve_api: ServerFactory) -> None:
    live: LiveServer = serve_api(projections=True)
    with StorylineClient(live.url) as client:
        created = client.create_story(
            name="Client story", acceptance_criteria=["ok"], priority=3, wait=True
        )
        sid = created["id"]
        assert created["stage"] == "backlog"
        moved = client.transition(sid, "start_coding", expected_version=1, wait=True)
        assert (moved["stage"], moved["version"]) == ("coding", 2)
        assert client.get_story(sid)["version"] == 2
        assert client.get_story(sid, as_of=created["position"])["stage"] == "backlog"
        assert [e["type"] for e in client.history(sid)] == ["StoryCreated", "CodingStarted"]
        assert [r["id"] for r in client.list_stories(stage="coding")["stories"]] == [sid]
        assert client.events(after=0)["next_after"] == moved["position"]
        assert [r["id"] for r in client.board()["stages"]["coding"]] == [sid]
        assert client.merge_queue() == []
        assert client.agent_runs(story_id=sid) == []
        assert "# TYPE" in client.metrics()
        assert client.healthz()["status"] == "ok"
        streamed = list(itertools.islice(client.stream(after=0), 2))
        assert [e["position"] for e in streamed] == [created["position"], moved["position"]]
        resumed = next(client.stream(last_event_id=created["position"]))
        assert resumed["type"] == "CodingStarted"

        with pytest.raises(ClientError) as refused:
            client.transition(sid, "start_coding", expected_version=1)
        assert (refused.value.status, refused.value.code) == (409, "version_conflict")
        assert refused.value.details["current_version"] == 2
        with pytest.raises(ClientError) as missing:
            client.get_story("nope")
        assert (missing.value.status, missing.value.code) == (404, "story_not_found")
        # The client sends one key per call; a caller-chosen key makes a retry a replay.
        first = client.transition(sid, "block", reason="r", idempotency_key="cli-1")
        again = client.transition(sid, "block", reason="r", idempotency_key="cli-1")
        assert first == again


def test_client_auth_and_unreachable(live_auth: LiveServer) -> None:
    with StorylineClient(live_auth.url) as anonymous, pytest.raises(ClientError) as denied:
        anonymous.events()
    assert (denied.value.status, denied.value.code) == (401, "unauthorized")
    with StorylineClient(live_auth.url, token=ADMIN_TOKEN) as admin:
        assert admin.create_story(name="x", acceptance_criteria=["a"])["id"] == "1"
    with (
        StorylineClient("http://127.0.0.1:9", retries=0, timeout=2) as nowhere,
        pytest.raises(ClientError) as unreachable,
    ):
        nowhere.get_story("1")
    assert (unreachable.value.status, unreachable.value.code) == (0, "unreachable")


def test_local_and_remote_backends_agree(live: LiveServer, tmp_path: Path) -> None:
    remote = RemoteBackend(StorylineClient(live.url))
    local = LocalBackend(live.service, actor="user:cli")
    try:
        for backend in (remote, local):
            story = backend.create_story(name="Same", acceptance_criteria=["a"])
            moved = backend.transition(story["id"], "start_coding", expected_version=1)
            assert (moved["stage"], moved["version"]) == ("coding", 2)
            assert moved["position"] > story["position"]
            assert backend.get_story(story["id"], as_of=str(story["position"]))["stage"] == (
                "backlog"
            )
            assert [e["type"] for e in backend.history(story["id"])] == [
                "StoryCreated",
                "CodingStarted",
            ]
            with pytest.raises(ClientError) as refused:
                backend.transition(story["id"], "archive")
            assert (refused.value.status, refused.value.code) == (409, "illegal_transition")
            with pytest.raises(ClientError) as missing:
                backend.get_story("missing")
            assert missing.value.status == 404
        assert [e["actor"] for e in local.events(after=0)] == [
            "user:local",
            "user:local",
            "user:cli",
            "user:cli",
        ]
    finally:
        remote.client.close()

    with story_backend(url=live.url) as backend:
        assert isinstance(backend, RemoteBackend)
        assert len(backend.events(after=0)) == 4


class _Watching(httpx.HTTPTransport):
    """A real transport that tells when an answer with ``status`` has arrived."""

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status
        self.seen = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if response.status_code == self.status:
            self.seen.set()
        return response


def test_the_client_resends_a_key_in_use_until_it_is_freed(live: LiveServer) -> None:
    """The key is claimed by an instance that is alive (this process holds its lock), so
    the server answers 409 idempotency_key_in_use; once that owner is gone, the client's
    next resend runs the command. Without the resend the caller would see the 409."""
    from api.auth import ANONYMOUS_ACTOR
    from api.schemas import CreateStoryRequest
    from service.idempotency import TABLE, fingerprint
    from service.instances import liveness_for
    from service.sqlstore import SqlStore

    body = {"name": "Held", "acceptance_criteria": ["a"]}
    dumped = CreateStoryRequest.model_validate(body).model_dump(mode="json")
    sql = SqlStore(live.service.app)
    owner = liveness_for(live.service.db, sql)
    try:
        sql.write(
            f"INSERT INTO {TABLE} (actor, idem_key, fingerprint, created_at, owner_instance) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                ANONYMOUS_ACTOR,
                "held",
                fingerprint("POST", "/stories", dumped),
                time.time(),
                owner.current(),
            ),
        )
        with (
            StorylineClient(live.url, in_use_retries=0) as impatient,
            pytest.raises(ClientError) as in_use,
        ):
            impatient.create_story(name="Held", acceptance_criteria=["a"], idempotency_key="held")
        assert (in_use.value.status, in_use.value.code) == (409, "idempotency_key_in_use")

        transport = _Watching(409)
        # The owner goes away only after the server has refused the key once.
        releaser = threading.Thread(target=lambda: transport.seen.wait(60) and owner.close())
        releaser.start()
        with StorylineClient(live.url, transport=transport) as client:
            created = client.create_story(
                name="Held", acceptance_criteria=["a"], idempotency_key="held"
            )
        releaser.join(timeout=60)
        assert transport.seen.is_set()
        assert created["name"] == "Held"
        with StorylineClient(live.url) as reader:
            assert [e["type"] for e in reader.events(after=0)["events"]] == ["StoryCreated"]
    finally:
        owner.close()
