"""OpenAIRuntime against a real local chat-completions server with scripted replies."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from domain.config import AgentConfig, FixupCaps
from runners.agents import AgentStartError, OpenAIRuntime
from runners.agents.openai_runtime import Workspace, parse_retry_after
from tests.agents.conftest import SpecFactory, git

WAIT = 60.0
API_KEY = "sk-test-very-secret-key-000111"

Reply = tuple[int, dict[str, str], Any]


class ChatServer:
    """A chat-completions endpoint answering from a list of replies (the last one repeats)."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    index = len(server.requests)
                    server.requests.append({"path": self.path, "body": body})
                    server.headers.append(dict(self.headers))
                    status, headers, payload = server.replies[min(index, len(server.replies) - 1)]
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[list[Reply]], ChatServer]]:
    servers: list[ChatServer] = []

    def start(replies: list[Reply]) -> ChatServer:
        server = ChatServer(replies)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def call(call_id: str, name: str, **arguments: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def ok(*tool_calls: dict[str, Any], content: str | None = None) -> Reply:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = list(tool_calls)
    return (
        200,
        {},
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if tool_calls else "stop",
                }
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
        },
    )


def tool_results(request: dict[str, Any]) -> dict[str, str]:
    return {
        m["tool_call_id"]: m["content"] for m in request["body"]["messages"] if m["role"] == "tool"
    }


def openai_agent(server: ChatServer, **fields: Any) -> AgentConfig:
    return AgentConfig(
        name="oa",
        runtime="openai",
        model="local-model",
        base_url=server.base_url,
        api_key_env="TEST_OPENAI_KEY",
        **fields,
    )


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEST_OPENAI_KEY", API_KEY)
    return API_KEY


def test_a_tool_using_conversation_edits_the_worktree_and_records_usage(
    serve: Callable[[list[Reply]], ChatServer],
    make_spec: SpecFactory,
    repo: Path,
    tmp_path: Path,
    api_key: str,
) -> None:
    git(repo, "config", "user.name", "OpenAI Agent")
    git(repo, "config", "user.email", "oa@example.invalid")
    outside = tmp_path / "outside"
    outside.mkdir()
    (repo / "link").symlink_to(outside)
    server = serve(
        [
            (429, {"Retry-After": "2"}, {"error": {"message": "slow down"}}),
            ok(
                call("c1", "write_file", path="src/hello.py", content="print('hi')\n"),
                call("c2", "list_files", path="."),
                call("c3", "read_file", path="README.md"),
            ),
            ok(
                call("e1", "write_file", path="../escape.txt", content="x"),
                call("e2", "read_file", path="/etc/passwd"),
                call("e3", "write_file", path="link/evil.txt", content="x"),
                call("e4", "read_file", path=".git/config"),
                call("e5", "run_command", argv="git status"),
                call("e6", "no_such_tool"),
            ),
            ok(
                call("g1", "run_command", argv=["git", "add", "src/hello.py"]),
                call("g2", "run_command", argv=["git", "commit", "-q", "-m", "Add hello"]),
            ),
            ok(content="All done."),
        ]
    )
    delays: list[float] = []
    runtime = OpenAIRuntime(
        price_per_input_token=1e-6,
        price_per_output_token=2e-6,
        sleep=delays.append,
        backoff_base_secs=0.01,
    )
    spec = make_spec(openai_agent(server), repo, gate_failure="E   assert 1 == 2")
    result = runtime.start(spec).wait(WAIT)

    assert result.outcome == "completed", result.error
    assert result.result_subtype == "success"
    assert result.turns == 4
    assert result.tokens_in == 400 and result.tokens_out == 40
    assert result.cost_usd == pytest.approx(400e-6 + 80e-6)
    assert result.session_id is not None
    assert result.exit_code is None

    # 429 honoured: one retry, waiting at least what the server asked for.
    assert len(server.requests) == 5
    assert len(delays) == 1 and delays[0] >= 2.0

    assert (repo / "src" / "hello.py").read_text() == "print('hi')\n"
    assert git(repo, "log", "-1", "--format=%s").strip() == "Add hello"
    assert not (tmp_path / "escape.txt").exists()
    assert list(outside.iterdir()) == []

    first = tool_results(server.requests[2])
    assert {"README.md", "src/"} <= set(first["c2"].splitlines())
    assert first["c3"] == "hello\n"
    refused = tool_results(server.requests[3])
    for call_id in ("e1", "e2", "e3", "e4", "e5", "e6"):
        assert refused[call_id].startswith("error:"), (call_id, refused[call_id])
    assert "outside the worktree" in refused["e1"]
    assert "absolute" in refused["e2"]
    assert "outside the worktree" in refused["e3"]
    assert "root:" not in refused["e2"]

    body = server.requests[1]["body"]
    assert body["model"] == "local-model"
    assert {t["function"]["name"] for t in body["tools"]} == {
        "read_file",
        "write_file",
        "list_files",
        "run_command",
    }
    system, user = body["messages"][0], body["messages"][1]
    assert "Your previous run's quality gates failed:\nE   assert 1 == 2" in system["content"]
    assert "Add a greeting" in user["content"]
    assert server.headers[0]["Authorization"] == f"Bearer {api_key}"

    log_text = spec.log_path.read_text(encoding="utf-8")
    assert api_key not in log_text
    assert spec.env["STORYLINE_TOKEN"] not in log_text
    events = [json.loads(line)["event"] for line in log_text.splitlines()]
    assert events[0] == "start" and events[-1] == "end"
    assert "retry" in events and "tool" in events


def test_the_turn_cap_stops_a_model_that_never_finishes(
    serve: Callable[[list[Reply]], ChatServer], make_spec: SpecFactory, repo: Path, api_key: str
) -> None:
    server = serve([ok(call("c", "list_files"))])
    spec = make_spec(openai_agent(server, max_turns=3), repo)
    result = OpenAIRuntime().start(spec).wait(WAIT)
    assert result.outcome == "failed"
    assert result.result_subtype == "error_max_turns"
    assert result.turns == 3 and len(server.requests) == 3
    assert result.cost_usd is None  # no prices configured: cost unknown, not zero


def test_a_fixup_run_is_held_to_the_fixup_turn_cap(
    serve: Callable[[list[Reply]], ChatServer], make_spec: SpecFactory, repo: Path, api_key: str
) -> None:
    server = serve([ok(call("c", "list_files"))])
    spec = make_spec(
        openai_agent(server, max_turns=50),
        repo,
        fixup_pending=True,
        fixup_caps=FixupCaps(max_turns=2),
    )
    result = OpenAIRuntime().start(spec).wait(WAIT)
    assert result.result_subtype == "error_max_turns"
    assert len(server.requests) == 2


def test_the_budget_stops_the_run_once_spent(
    serve: Callable[[list[Reply]], ChatServer], make_spec: SpecFactory, repo: Path, api_key: str
) -> None:
    server = serve([ok(call("c", "list_files"))])
    spec = make_spec(openai_agent(server, max_budget_usd=0.0015), repo)
    result = OpenAIRuntime(price_per_input_token=1e-5).start(spec).wait(WAIT)
    assert result.outcome == "failed"
    assert result.result_subtype == "error_max_budget_usd"
    assert len(server.requests) == 2  # $0.001 per turn: the second turn crosses $0.0015
    assert result.cost_usd == pytest.approx(0.002)


def test_a_client_error_is_not_retried(
    serve: Callable[[list[Reply]], ChatServer], make_spec: SpecFactory, repo: Path, api_key: str
) -> None:
    server = serve([(401, {}, {"error": {"message": f"bad key {API_KEY}"}})])
    spec = make_spec(openai_agent(server), repo)
    result = OpenAIRuntime(sleep=lambda _: None).start(spec).wait(WAIT)
    assert result.outcome == "failed"
    assert len(server.requests) == 1
    assert result.error is not None and "401" in result.error
    assert API_KEY not in result.error  # even when the server echoes it back
    assert API_KEY not in spec.log_path.read_text()


def test_server_errors_are_retried_with_growing_backoff_then_given_up(
    serve: Callable[[list[Reply]], ChatServer], make_spec: SpecFactory, repo: Path, api_key: str
) -> None:
    server = serve([(503, {}, {"error": "overloaded"})])
    delays: list[float] = []
    runtime = OpenAIRuntime(
        max_retries=3, backoff_base_secs=1.0, backoff_jitter=0.0, sleep=delays.append
    )
    result = runtime.start(make_spec(openai_agent(server), repo)).wait(WAIT)
    assert result.outcome == "failed"
    assert len(server.requests) == 4
    assert delays == [1.0, 2.0, 4.0]
    assert result.session_id is None and result.turns == 0


def test_connection_errors_are_retried(make_spec: SpecFactory, repo: Path, api_key: str) -> None:
    agent = AgentConfig(
        name="oa", runtime="openai", base_url="http://127.0.0.1:9/v1", api_key_env="TEST_OPENAI_KEY"
    )
    delays: list[float] = []
    runtime = OpenAIRuntime(max_retries=2, sleep=delays.append)
    result = runtime.start(make_spec(agent, repo)).wait(WAIT)
    assert result.outcome == "failed"
    assert len(delays) == 2
    assert result.error is not None and "ConnectError" in result.error


def test_a_hung_command_is_killed_and_reported_to_the_model(
    serve: Callable[[list[Reply]], ChatServer], make_spec: SpecFactory, repo: Path, api_key: str
) -> None:
    server = serve([ok(call("c", "run_command", argv=["sleep", "300"])), ok(content="ok")])
    spec = make_spec(openai_agent(server, command_timeout_secs=0.5), repo)
    result = OpenAIRuntime().start(spec).wait(WAIT)
    assert result.outcome == "completed"
    assert tool_results(server.requests[1])["c"].startswith("timed out after 0.5s")


def test_commands_get_the_story_env_but_not_the_model_key(
    serve: Callable[[list[Reply]], ChatServer], make_spec: SpecFactory, repo: Path, api_key: str
) -> None:
    server = serve([ok(call("c", "run_command", argv=["env"])), ok(content="ok")])
    result = OpenAIRuntime().start(make_spec(openai_agent(server), repo)).wait(WAIT)
    assert result.outcome == "completed"
    output = tool_results(server.requests[1])["c"]
    assert "STORYLINE_STORY_ID=42" in output
    assert "TEST_OPENAI_KEY" not in output and API_KEY not in output


def test_a_missing_api_key_is_a_start_error_naming_the_variable(
    serve: Callable[[list[Reply]], ChatServer],
    make_spec: SpecFactory,
    repo: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TEST_OPENAI_KEY", raising=False)
    server = serve([ok(content="hi")])
    with pytest.raises(AgentStartError, match="TEST_OPENAI_KEY"):
        OpenAIRuntime().start(make_spec(openai_agent(server), repo))
    assert server.requests == []


def test_kill_during_a_backoff_ends_the_run_promptly(
    serve: Callable[[list[Reply]], ChatServer], make_spec: SpecFactory, repo: Path, api_key: str
) -> None:
    server = serve([(429, {"Retry-After": "3600"}, {})])
    running = OpenAIRuntime(backoff_max_secs=3600).start(make_spec(openai_agent(server), repo))
    deadline = threading.Event()
    while not server.requests and not deadline.wait(0.02):
        pass
    running.kill()
    result = running.wait(WAIT)
    assert result.outcome == "failed"
    assert result.killed_on_request


def test_a_silent_model_is_inactive(
    make_spec: SpecFactory, repo: Path, api_key: str, tmp_path: Path
) -> None:
    release = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            release.wait(30)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        agent = AgentConfig(
            name="oa",
            runtime="openai",
            base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1",
        )
        spec = make_spec(agent, repo, inactivity_timeout_secs=0.5)
        result = OpenAIRuntime().start(spec).wait(WAIT)
        assert result.outcome == "inactive"
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()


# --- confinement of the file tools --------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    root = tmp_path / "wt"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "secret.txt").write_text("TOPSECRET")
    (root / "out").symlink_to(tmp_path)
    (root / "inner").symlink_to(root / "pkg")
    return Workspace(root, env={}, command_timeout_secs=5)


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../secret.txt", "pkg/../../secret.txt", "out/secret.txt", ".git/HEAD", "", 3],
)
def test_paths_leaving_the_worktree_are_refused(workspace: Workspace, path: object) -> None:
    ok_, text = workspace.dispatch("read_file", json.dumps({"path": path}))
    assert not ok_
    assert text.startswith("error:")
    assert "TOPSECRET" not in text


def test_paths_inside_the_worktree_work_through_inner_links(workspace: Workspace) -> None:
    assert workspace.dispatch("read_file", {"path": "pkg/../pkg/mod.py"}) == (True, "x = 1\n")
    assert workspace.dispatch("read_file", {"path": "inner/mod.py"}) == (True, "x = 1\n")
    ok_, listing = workspace.dispatch("list_files", {"path": ".", "recursive": True})
    assert ok_ and "pkg/mod.py" in listing.splitlines()


def test_malformed_tool_arguments_are_an_error_for_the_model(workspace: Workspace) -> None:
    ok_, text = workspace.dispatch("write_file", "{not json")
    assert not ok_ and "not valid JSON" in text
    ok_, text = workspace.dispatch("run_command", {"argv": []})
    assert not ok_ and "argv" in text


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("5", 5.0), ("0", 0.0), ("1.5", 1.5), ("soon", None), (None, None), ("-3", 0.0)],
)
def test_retry_after_parsing(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


def test_retry_after_as_an_http_date() -> None:
    value = parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT")
    assert value == 0.0  # in the past: retry now
