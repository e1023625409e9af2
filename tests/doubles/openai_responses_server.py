"""A scripted OpenAI Responses API server: the test double behind the real Codex CLI.

Codex (0.171) talks to its model provider with ``POST {base_url}/responses`` and
``stream: true``; its instructions travel as ``developer`` messages inside ``input`` (the
request has no ``instructions`` field), the task as the last ``user`` message. This server
answers each request with the next turn of a script as server-sent events
(``response.created``, ``response.output_item.added``/``done``,
``response.output_text.delta``, ``response.function_call_arguments.delta``,
``response.completed`` with usage) and records every request so a test can assert what the
model received.

A script is a JSON list of turns (or ``{"turns": [...]}``). A turn is one of::

    {"text": "Done."}
    {"text": "...", "function_call": [{"name": "exec_command", "arguments": {"cmd": "git status"}}]}
    {"function_call": [{"namespace": "mcp__storyline", "name": "add_note", "arguments": {...}}]}
    {"error": {"status": 429, "message": "Rate limit reached"}}     # the real error JSON
    {"delay_secs": 2.0, "text": "slow"}
    {"repeat": true, "error": {"status": 500}}                      # answer forever

When the script runs out every request gets ``{"text": "Done."}``.

Run it as ``python -m tests.doubles.openai_responses_server --port 0 --script FILE``: it
prints ``listening on http://127.0.0.1:PORT`` and serves until killed. In-process, use
:class:`ResponsesServer` as a context manager.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "gpt-5.1-codex"
_SECRET_HEADERS = {"authorization", "openai-api-key", "api-key"}
# Type and code of OpenAI's error bodies for the statuses a test scripts.
_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", None),
}


@dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: Mapping[str, Any]
    namespace: str | None = None
    """For a tool inside a ``namespace`` tool (Codex offers MCP servers that way)."""


@dataclass(frozen=True)
class Turn:
    """One scripted answer to one request."""

    text: str = ""
    function_calls: tuple[FunctionCall, ...] = ()
    error_status: int | None = None
    error_message: str = ""
    delay_secs: float = 0.0
    repeat: bool = False
    input_tokens: int = 150
    output_tokens: int = 40

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Turn:
        unknown = set(raw) - {
            "text",
            "function_call",
            "error",
            "delay_secs",
            "repeat",
            "input_tokens",
            "output_tokens",
        }
        if unknown:
            raise ValueError(f"unknown keys in a script turn: {sorted(unknown)}")
        calls = tuple(
            FunctionCall(
                name=str(c["name"]),
                arguments=dict(c.get("arguments", {})),
                namespace=str(c["namespace"]) if c.get("namespace") else None,
            )
            for c in raw.get("function_call", [])
        )
        error = raw.get("error")
        return cls(
            text=str(raw.get("text", "")),
            function_calls=calls,
            error_status=int(error["status"]) if error else None,
            error_message=str(error.get("message", "scripted error")) if error else "",
            delay_secs=float(raw.get("delay_secs", 0.0)),
            repeat=bool(raw.get("repeat", False)),
            input_tokens=int(raw.get("input_tokens", 150)),
            output_tokens=int(raw.get("output_tokens", 40)),
        )


def load_script(raw: object) -> list[Turn]:
    if isinstance(raw, Mapping):
        raw = raw.get("turns", [])
    if not isinstance(raw, list):
        raise ValueError("a script is a list of turns or {'turns': [...]}")
    return [Turn.from_json(t) for t in raw]


def _texts(item: Mapping[str, Any]) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
    return ""


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    answered_with: str = ""

    @property
    def input_items(self) -> list[dict[str, Any]]:
        items = self.body.get("input")
        return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []

    def messages(self, role: str) -> list[str]:
        return [
            _texts(i)
            for i in self.input_items
            if i.get("type") == "message" and i.get("role") == role
        ]

    @property
    def instructions(self) -> str:
        """Everything the model is told as instructions: the field and developer messages."""
        parts = [str(self.body.get("instructions") or "")]
        parts.extend(self.messages("developer"))
        parts.extend(self.messages("system"))
        return "\n".join(p for p in parts if p)

    @property
    def tool_names(self) -> list[str]:
        return [str(t.get("name")) for t in self.body.get("tools", []) if isinstance(t, dict)]

    def function_outputs(self) -> list[str]:
        """The outputs of the tool calls the CLI sent back (what the tools answered)."""
        return [
            str(i.get("output"))
            for i in self.input_items
            if i.get("type") in ("function_call_output", "custom_tool_call_output")
        ]


@dataclass
class _State:
    turns: list[Turn]
    model: str
    requests: list[RecordedRequest] = field(default_factory=list)
    position: int = 0
    record_path: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_turn(self) -> Turn:
        with self.lock:
            if self.position >= len(self.turns):
                return Turn(text="Done.")
            turn = self.turns[self.position]
            if not turn.repeat:
                self.position += 1
            return turn


def _error_body(status: int, message: str) -> dict[str, Any]:
    kind, code = _ERRORS.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the recorded requests are the log."""

    def _send_json(self, status: int, payload: object, headers: Mapping[str, str] = {}) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:24]}")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: dict[str, Any]) -> RecordedRequest:
        headers = {
            k.lower(): ("[redacted]" if k.lower() in _SECRET_HEADERS else v)
            for k, v in self.headers.items()
        }
        record = RecordedRequest(self.path, headers, body)
        state = self.server.state
        with state.lock:
            state.requests.append(record)
            if state.record_path is not None:
                line = {"path": self.path, "headers": headers, "body": body}
                with state.record_path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(line) + "\n")
        return record

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.endswith("/models"):
            model = self.server.state.model
            self._send_json(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            return
        self._send_json(404, _error_body(404, f"no route {path}"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("content-length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        record = self._record(body)
        if not path.endswith("/responses"):
            self._send_json(404, _error_body(404, f"no route {path}"))
            return
        turn = self.server.state.next_turn()
        if turn.delay_secs:
            time.sleep(turn.delay_secs)
        if turn.error_status is not None:
            record.answered_with = f"error {turn.error_status}"
            headers = {"retry-after": "0"} if turn.error_status == 429 else {}
            self._send_json(
                turn.error_status, _error_body(turn.error_status, turn.error_message), headers
            )
            return
        record.answered_with = "function_call" if turn.function_calls else "text"
        self._stream(turn, str(body.get("model") or self.server.state.model))

    def _stream(self, turn: Turn, model: str) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True
        response: dict[str, Any] = {
            "id": f"resp_{uuid.uuid4().hex[:24]}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "model": model,
            "output": [],
        }
        self._event({"type": "response.created", "response": response})
        output: list[dict[str, Any]] = []
        if turn.text or not turn.function_calls:
            output.append(self._message(len(output), turn.text or "Done."))
        for call in turn.function_calls:
            output.append(self._function_call(len(output), call))
        usage = {
            "input_tokens": turn.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": turn.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": turn.input_tokens + turn.output_tokens,
        }
        done = {**response, "status": "completed", "output": output, "usage": usage}
        self._event({"type": "response.completed", "response": done})

    def _message(self, index: int, text: str) -> dict[str, Any]:
        item_id = f"msg_{uuid.uuid4().hex[:24]}"
        item: dict[str, Any] = {
            "type": "message",
            "id": item_id,
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        self._event({"type": "response.output_item.added", "output_index": index, "item": item})
        for piece in _pieces(text):
            self._event(
                {
                    "type": "response.output_text.delta",
                    "item_id": item_id,
                    "output_index": index,
                    "content_index": 0,
                    "delta": piece,
                }
            )
        content = [{"type": "output_text", "text": text, "annotations": []}]
        done = {**item, "status": "completed", "content": content}
        self._event({"type": "response.output_item.done", "output_index": index, "item": done})
        return done

    def _function_call(self, index: int, call: FunctionCall) -> dict[str, Any]:
        arguments = json.dumps(dict(call.arguments))
        item: dict[str, Any] = {
            "type": "function_call",
            "id": f"fc_{uuid.uuid4().hex[:24]}",
            "call_id": f"call_{uuid.uuid4().hex[:24]}",
            "name": call.name,
            "arguments": "",
            "status": "in_progress",
        }
        if call.namespace:
            item["namespace"] = call.namespace
        self._event({"type": "response.output_item.added", "output_index": index, "item": item})
        for piece in _pieces(arguments):
            self._event(
                {
                    "type": "response.function_call_arguments.delta",
                    "item_id": item["id"],
                    "output_index": index,
                    "delta": piece,
                }
            )
        done = {**item, "arguments": arguments, "status": "completed"}
        self._event({"type": "response.output_item.done", "output_index": index, "item": done})
        return done

    def _event(self, payload: Mapping[str, Any]) -> None:
        self.wfile.write(f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()


def _pieces(text: str, size: int = 24) -> Iterator[str]:
    for start in range(0, max(len(text), 1), size):
        yield text[start : start + size]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed mid-stream (the watchdog's job in some tests) is not an error.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def _turns(script: Sequence[Turn] | object) -> list[Turn]:
    if isinstance(script, (list, tuple)) and all(isinstance(t, Turn) for t in script):
        return list(script)
    return load_script(script)


class ResponsesServer:
    """The scripted Responses API server on a loopback port, in a background thread."""

    def __init__(self, script: Sequence[Turn] | object = (), *, model: str = DEFAULT_MODEL) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = _State(turns=_turns(script), model=model)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The base URL a client appends ``/responses`` to."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._server.state.lock:
            return list(self._server.state.requests)

    def set_script(self, script: Sequence[Turn] | object) -> None:
        """Replace the remaining script (for a test with several agent runs)."""
        with self._server.state.lock:
            self._server.state.turns = _turns(script)
            self._server.state.position = 0

    def start(self) -> ResponsesServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ResponsesServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
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
    print(f"listening on http://{host!s}:{port}/v1", flush=True)
    with suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
