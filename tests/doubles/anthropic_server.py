"""A scripted Anthropic-compatible model server: the test double behind the real Claude Code CLI.

It speaks the Messages API the CLI speaks (``POST /v1/messages``, streaming server-sent events
or one JSON body, ``POST /v1/messages/count_tokens``), answers each *main-loop* request with
the next turn of a script, and records every request (headers without credentials, the system
prompt, the messages, the tools) so a test can assert what the model received.

A script is a JSON list of turns (or ``{"turns": [...]}``). A turn is one of::

    {"text": "Done."}                                       # end_turn
    {"text": "...", "tool_use": [{"name": "Bash", "input": {"command": "git status"}}]}
    {"error": {"status": 529, "type": "overloaded_error", "message": "Overloaded"}}
    {"delay_secs": 2.0, "text": "slow"}                     # wait before answering
    {"stream_delay_secs": 0.5, "text": "..."}              # a slow generation, streamed
    {"repeat": true, "tool_use": [...]}                     # answer forever (max-turns tests)

Requests the CLI makes besides its main loop (a title or topic check on a small model, a
quota probe) carry no tools; they get a short text reply and do not consume the script.
When the script runs out every main-loop request gets ``{"text": "Done."}``.

Run it as ``python -m tests.doubles.anthropic_server --port 0 --script FILE``: it prints
``listening on http://127.0.0.1:PORT`` and serves until killed. In-process, use
:class:`AnthropicServer` as a context manager.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "claude-sonnet-4-5-20250929"
_SECRET_HEADERS = {"x-api-key", "authorization"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class ToolUse:
    name: str
    input: Mapping[str, Any]
    id: str = ""


@dataclass(frozen=True)
class Turn:
    """One scripted answer to one main-loop request."""

    text: str = ""
    tool_use: tuple[ToolUse, ...] = ()
    error_status: int | None = None
    error_type: str | None = None
    error_message: str = ""
    delay_secs: float = 0.0
    stream_delay_secs: float = 0.0
    """Pause between streamed events: a long generation that keeps sending."""
    repeat: bool = False
    input_tokens: int = 120
    output_tokens: int = 30

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Turn:
        unknown = set(raw) - {
            "text",
            "tool_use",
            "error",
            "delay_secs",
            "stream_delay_secs",
            "repeat",
            "input_tokens",
            "output_tokens",
        }
        if unknown:
            raise ValueError(f"unknown keys in a script turn: {sorted(unknown)}")
        tools = tuple(
            ToolUse(name=str(t["name"]), input=dict(t.get("input", {})), id=str(t.get("id", "")))
            for t in raw.get("tool_use", [])
        )
        error = raw.get("error")
        status = int(error["status"]) if error else None
        return cls(
            text=str(raw.get("text", "")),
            tool_use=tools,
            error_status=status,
            error_type=(error.get("type") or _ERROR_TYPES.get(status or 0, "api_error"))
            if error
            else None,
            error_message=str(error.get("message", "scripted error")) if error else "",
            delay_secs=float(raw.get("delay_secs", 0.0)),
            stream_delay_secs=float(raw.get("stream_delay_secs", 0.0)),
            repeat=bool(raw.get("repeat", False)),
            input_tokens=int(raw.get("input_tokens", 120)),
            output_tokens=int(raw.get("output_tokens", 30)),
        )


def load_script(raw: object) -> list[Turn]:
    if isinstance(raw, Mapping):
        raw = raw.get("turns", [])
    if not isinstance(raw, list):
        raise ValueError("a script is a list of turns or {'turns': [...]}")
    return [Turn.from_json(t) for t in raw]


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    main_loop: bool
    answered_with: str = ""

    @property
    def system_text(self) -> str:
        """The system prompt as one string (the API allows a string or text blocks)."""
        system = self.body.get("system")
        if isinstance(system, str):
            return system
        if isinstance(system, list):
            return "\n".join(str(b.get("text", "")) for b in system if isinstance(b, dict))
        return ""

    @property
    def tool_names(self) -> list[str]:
        return [str(t.get("name")) for t in self.body.get("tools", []) if isinstance(t, dict)]

    def tool_results(self) -> list[dict[str, Any]]:
        """The ``tool_result`` blocks of the last user message (what the tools answered)."""
        messages = self.body.get("messages", [])
        if not messages:
            return []
        content = messages[-1].get("content")
        if not isinstance(content, list):
            return []
        return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]


@dataclass
class _State:
    turns: list[Turn]
    model: str
    requests: list[RecordedRequest] = field(default_factory=list)
    position: int = 0
    record_path: Path | None = None
    """Where a server in another process mirrors its requests (JSON lines)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_turn(self) -> Turn:
        with self.lock:
            if self.position >= len(self.turns):
                return Turn(text="Done.")
            turn = self.turns[self.position]
            if not turn.repeat:
                self.position += 1
            return turn


def _is_main_loop(body: Mapping[str, Any]) -> bool:
    # The CLI's agent loop always offers its tools; side requests (titles, topic checks,
    # quota probes) offer none.
    return bool(body.get("tools"))


def _text_of_last_user_message(body: Mapping[str, Any]) -> str:
    messages = body.get("messages") or []
    if not messages:
        return ""
    content = messages[-1].get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


def _blocks(turn: Turn) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if turn.text:
        blocks.append({"type": "text", "text": turn.text})
    for tool in turn.tool_use:
        blocks.append(
            {
                "type": "tool_use",
                "id": tool.id or f"toolu_{uuid.uuid4().hex[:24]}",
                "name": tool.name,
                "input": dict(tool.input),
            }
        )
    if not blocks:
        blocks.append({"type": "text", "text": "Done."})
    return blocks


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the recorded requests are the log."""

    # --- plumbing -------------------------------------------------------------------------

    def _send_json(self, status: int, payload: object, headers: Mapping[str, str] = {}) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> dict[str, Any]:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _record(self, body: dict[str, Any], main_loop: bool) -> RecordedRequest:
        headers = {
            k.lower(): ("[redacted]" if k.lower() in _SECRET_HEADERS else v)
            for k, v in self.headers.items()
        }
        record = RecordedRequest("POST", self.path, headers, body, main_loop)
        state = self.server.state
        with state.lock:
            state.requests.append(record)
            if state.record_path is not None:
                line = {"path": self.path, "main_loop": main_loop, "headers": headers, "body": body}
                with state.record_path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(line) + "\n")
        return record

    # --- routes ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/v1/models"):
            model = self.server.state.model
            self._send_json(
                200,
                {
                    "data": [{"type": "model", "id": model, "display_name": model}],
                    "has_more": False,
                    "first_id": model,
                    "last_id": model,
                },
            )
            return
        self._send_json(404, _error_body(404, "not_found_error", f"no route {path}"))

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        if path == "/v1/messages/count_tokens":
            self._record(body, main_loop=False)
            approx = len(json.dumps(body)) // 4
            self._send_json(200, {"input_tokens": max(approx, 1)})
            return
        if path != "/v1/messages":
            self._record(body, main_loop=False)
            self._send_json(404, _error_body(404, "not_found_error", f"no route {path}"))
            return
        main_loop = _is_main_loop(body)
        record = self._record(body, main_loop)
        turn = self.server.state.next_turn() if main_loop else Turn(text="Storyline task")
        if turn.delay_secs:
            time.sleep(turn.delay_secs)
        if turn.error_status is not None:
            record.answered_with = f"error {turn.error_status}"
            headers = {"retry-after": "0"} if turn.error_status in (429, 529) else {}
            self._send_json(
                turn.error_status,
                _error_body(turn.error_status, turn.error_type or "api_error", turn.error_message),
                headers,
            )
            return
        record.answered_with = "tool_use" if turn.tool_use else "text"
        model = str(body.get("model") or self.server.state.model)
        if body.get("stream"):
            self._stream(turn, model, turn.stream_delay_secs)
        else:
            self._send_json(200, _message(turn, model))

    def _stream(self, turn: Turn, model: str, pause: float = 0.0) -> None:
        self._pause = pause
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
        self.end_headers()
        self.close_connection = True
        message = _message(turn, model)
        blocks = message.pop("content")
        stop_reason = message["stop_reason"]
        usage = message["usage"]
        message.update(
            content=[],
            stop_reason=None,
            usage={**usage, "output_tokens": 1},
        )
        self._event("message_start", {"type": "message_start", "message": message})
        for index, block in enumerate(blocks):
            start: dict[str, Any]
            if block["type"] == "text":
                start = {"type": "text", "text": ""}
                self._event(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": start},
                )
                for piece in _pieces(block["text"]):
                    self._event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "text_delta", "text": piece},
                        },
                    )
            else:
                start = {**block, "input": {}}
                self._event(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": start},
                )
                for piece in _pieces(json.dumps(block["input"])):
                    self._event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        },
                    )
            self._event("content_block_stop", {"type": "content_block_stop", "index": index})
        self._event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
        self._event("message_stop", {"type": "message_stop"})

    def _event(self, name: str, payload: object) -> None:
        if getattr(self, "_pause", 0.0):
            time.sleep(self._pause)
        self.wfile.write(f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()


def _pieces(text: str, size: int = 24) -> Iterator[str]:
    if not text:
        yield ""
        return
    for start in range(0, len(text), size):
        yield text[start : start + size]


def _message(turn: Turn, model: str) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _blocks(turn),
        "stop_reason": "tool_use" if turn.tool_use else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": turn.input_tokens,
            "output_tokens": turn.output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def _error_body(status: int, kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed mid-stream (the watchdog's job in some tests) is not an error.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class AnthropicServer:
    """The scripted model server on a loopback port, in a background thread."""

    def __init__(self, script: Sequence[Turn] | object = (), *, model: str = DEFAULT_MODEL) -> None:
        turns = (
            list(script)
            if isinstance(script, (list, tuple)) and all(isinstance(t, Turn) for t in script)
            else load_script(script)
        )
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = _State(turns=turns, model=model)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._server.state.lock:
            return list(self._server.state.requests)

    @property
    def main_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.main_loop]

    def set_script(self, script: Sequence[Turn] | object) -> None:
        """Replace the remaining script (for a test with several agent runs)."""
        turns = (
            list(script)
            if isinstance(script, (list, tuple)) and all(isinstance(t, Turn) for t in script)
            else load_script(script)
        )
        with self._server.state.lock:
            self._server.state.turns = turns
            self._server.state.position = 0

    def start(self) -> AnthropicServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> AnthropicServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def serving(script: object = (), *, model: str = DEFAULT_MODEL) -> Iterator[AnthropicServer]:
    with AnthropicServer(script, model=model) as server:
        yield server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--script", type=Path, help="JSON file with the turns")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--record", type=Path, help="append every request here as JSON lines")
    args = parser.parse_args(argv)
    script = json.loads(args.script.read_text(encoding="utf-8")) if args.script else []
    server = _Server(("127.0.0.1", args.port), _Handler)
    server.state = _State(turns=load_script(script), model=args.model)
    server.state.record_path = args.record
    host, port = server.server_address[:2]
    print(f"listening on http://{host!s}:{port}", flush=True)
    with suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
