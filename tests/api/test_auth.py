"""Bearer tokens: roles, actors recorded on events, per-story agent tokens."""

from __future__ import annotations

import logging

import pytest

from api.auth import (
    Authenticator,
    AuthFailure,
    StaticTokens,
    TokenError,
    is_loopback,
    load_tokens,
    parse_tokens_env,
)
from api.cli_serve import BindRefused, check_bind
from domain.config import ServerConfig, TokenConfig
from service.agent_tokens import AgentTokens
from tests.api.conftest import (
    ADMIN_TOKEN,
    READ_TOKEN,
    WRITE_TOKEN,
    LiveServer,
    assert_error,
    new_story,
)


def test_tokens_are_required_and_checked(live_auth: LiveServer) -> None:
    anonymous = live_auth.client()
    response = anonymous.get("/stories/1")
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert_error(
        anonymous.post("/stories", json={"name": "x", "acceptance_criteria": ["a"]}),
        401,
        "unauthorized",
    )
    assert_error(live_auth.client("not-a-real-token-at-all").get("/events"), 401, "invalid_token")
    assert_error(live_auth.client("sl_agent_forged").get("/events"), 401, "invalid_token")
    malformed = anonymous.get("/events", headers={"Authorization": f"Basic {ADMIN_TOKEN}"})
    assert_error(malformed, 401, "invalid_token")
    # Liveness needs no token.
    assert anonymous.get("/healthz").status_code == 200


def test_roles(live_auth: LiveServer) -> None:
    admin = live_auth.client(ADMIN_TOKEN)
    writer = live_auth.client(WRITE_TOKEN)
    reader = live_auth.client(READ_TOKEN)

    details = assert_error(
        reader.post("/stories", json={"name": "x", "acceptance_criteria": ["a"]}),
        403,
        "forbidden",
    )
    assert details == {"actor": "user:carol", "role": "read"}
    story = new_story(writer)
    sid = story["id"]
    for path in (
        f"/stories/{sid}",
        f"/stories/{sid}/history",
        "/events",
        "/stories",
        "/board",
        "/merge-queue",
        "/agents/runs",
        "/metrics",
    ):
        assert reader.get(path).status_code == 200, path
    url = f"/stories/{sid}/transitions"
    assert_error(reader.post(url, json={"event": "start_coding"}), 403, "forbidden")
    assert writer.post(url, json={"event": "start_coding"}).status_code == 200
    # Operator transitions need admin.
    assert_error(writer.post(url, json={"event": "block", "reason": "x"}), 403, "forbidden")
    assert admin.post(url, json={"event": "block", "reason": "ops hold"}).status_code == 200

    history = reader.get(f"/stories/{sid}/history").json()["events"]
    assert [(e["type"], e["actor"]) for e in history] == [
        ("StoryCreated", "user:bob"),
        ("CodingStarted", "user:bob"),
        ("StoryBlocked", "user:alice"),
    ]


def test_agent_tokens_act_only_on_their_story(live_auth: LiveServer) -> None:
    admin = live_auth.client(ADMIN_TOKEN)
    mine = new_story(admin)["id"]
    other = new_story(admin)["id"]
    url = f"/stories/{mine}/transitions"
    for event, data in [
        ("start_coding", {}),
        ("spawn_agent", {"agent": "c", "runtime": "cli"}),
        ("agent_started", {"attempt": 1, "pid": 10}),
        ("agent_exited", {"attempt": 1, "outcome": "completed"}),
        ("start_gates", {}),
        ("gates_passed", {"feature_branch": "f", "commits_ahead": 1}),
        ("start_merge", {}),
        ("merge_failed", {"kind": "conflict_detected"}),
    ]:
        assert admin.post(url, json={"event": event, "data": data}).status_code == 200

    # A runner (another process sharing the database) issues the token.
    tokens = AgentTokens(live_auth.service.app)
    token = tokens.issue(mine, 1, "mergemaster")
    assert token not in str(live_auth.client(ADMIN_TOKEN).get("/events?limit=1000").json())
    agent = live_auth.client(token)

    assert agent.get(f"/stories/{mine}").status_code == 200
    assert agent.get(f"/stories/{mine}/history").status_code == 200
    assert_error(agent.get(f"/stories/{other}"), 403, "forbidden")
    assert_error(agent.get("/events"), 403, "forbidden")
    assert_error(agent.get("/board"), 403, "forbidden")
    assert_error(
        agent.post("/stories", json={"name": "x", "acceptance_criteria": ["a"]}), 403, "forbidden"
    )
    assert_error(agent.post(url, json={"event": "requeue_merge"}), 403, "forbidden")
    assert_error(
        agent.post(f"/stories/{other}/transitions", json={"event": "merge_gave_up", "reason": "x"}),
        403,
        "forbidden",
    )
    gave_up = agent.post(url, json={"event": "merge_gave_up", "reason": "conflict too deep"})
    assert gave_up.status_code == 200, gave_up.text
    last = admin.get(f"/stories/{mine}/history").json()["events"][-1]
    assert (last["type"], last["actor"]) == ("MergemasterAttempted", f"agent:mergemaster-{mine}-1")

    assert tokens.revoke(token) is True
    assert tokens.revoke(token) is False
    assert_error(agent.get(f"/stories/{mine}"), 401, "invalid_token")


def test_agent_tokens_are_stored_as_hashes_and_expire(live_auth: LiveServer) -> None:
    from service.sqlstore import SqlStore

    admin = live_auth.client(ADMIN_TOKEN)
    sid = new_story(admin)["id"]
    tokens = AgentTokens(live_auth.service.app)
    token = tokens.issue(sid, 2, "coder")
    rows = SqlStore(live_auth.service.app).query("SELECT * FROM storyline_agent_tokens")
    assert token not in repr(rows)
    assert rows[0]["actor"] == f"agent:coder-{sid}-2"
    expired = tokens.issue(sid, 3, "coder", ttl_secs=0)
    assert_error(live_auth.client(expired).get(f"/stories/{sid}"), 401, "invalid_token")
    assert tokens.revoke_story(sid) == 2
    with pytest.raises(ValueError):
        tokens.issue(sid, 0, "coder")
    with pytest.raises(ValueError):
        tokens.issue(sid, 1, "janitor")


def test_tokens_never_reach_logs(live_auth: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    live_auth.client(ADMIN_TOKEN).get("/events")
    live_auth.client("wrong-token-0123456789").get("/events")
    assert ADMIN_TOKEN not in caplog.text
    assert "wrong-token-0123456789" not in caplog.text


def test_token_configuration() -> None:
    config = ServerConfig(
        tokens=[
            TokenConfig(actor="user:alice", role="admin", token=ADMIN_TOKEN),
            TokenConfig(actor="ci:jenkins", role="write", token_env="CI_TOKEN"),
        ]
    )
    env = {"CI_TOKEN": "ci-token-0123456789", "STORYLINE_TOKENS": f"{READ_TOKEN}=bot:chat:read"}
    tokens = load_tokens(config, env)
    assert len(tokens) == 3
    auth = Authenticator(tokens)
    assert auth.authenticate("ci-token-0123456789").actor == "ci:jenkins"
    reader = auth.authenticate(READ_TOKEN)
    assert (reader.actor, reader.role) == ("bot:chat", "read")
    with pytest.raises(AuthFailure):
        auth.authenticate(None)
    with pytest.raises(TokenError, match="CI_TOKEN"):
        load_tokens(config, {})
    with pytest.raises(TokenError):
        parse_tokens_env("just-a-token")
    with pytest.raises(TokenError):
        StaticTokens([("short", "user:x", "read")])
    with pytest.raises(TokenError):
        StaticTokens([("long-enough-token-123", "user:x", "root")])
    open_auth = Authenticator(StaticTokens())
    assert open_auth.authenticate(None).actor == "user:local"


def test_bind_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
    assert "loopback" in (check_bind("127.0.0.1", StaticTokens()) or "")
    with pytest.raises(BindRefused):
        check_bind("0.0.0.0", StaticTokens())
    assert check_bind("0.0.0.0", StaticTokens([(ADMIN_TOKEN, "user:a", "admin")])) is None
