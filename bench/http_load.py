"""A lean HTTP/1.1 load generator for row 4: keep-alive requests over a raw socket.

The benchmark's clients share the server's two cores. httpx spends about 0.7 ms of client
CPU per request (measured with ``bench/http_transitions.py``), which on this machine is CPU
taken from the server being measured; this client spends a few tens of microseconds, as
``wrk`` or ``h2load`` would, so row 4 measures the server rather than the load generator.
It speaks just enough HTTP/1.1 for storyline's JSON answers (``Content-Length`` bodies on
one keep-alive connection) and refuses anything else loudly rather than misreading it.

Each client is a process (``bench.common.run_clients``) that creates its own stories through
the API and then drives them through ``block``/``unblock`` with ``expected_version``, moving
to a fresh story every ``STEPS_PER_STORY`` transitions (the workload of
``bench/http_transitions.py``, so row 4 and row 4i compare like with like).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import orjson

STEPS_PER_STORY = 10
STORIES_PER_CLIENT = 400


class HttpError(RuntimeError):
    pass


class KeepAliveClient:
    """One keep-alive HTTP/1.1 connection; ``request`` returns (status, body)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"need an http:// URL, got {url!r}")
        self._address = (parts.hostname, parts.port or 80)
        self._host = f"Host: {parts.netloc}\r\n".encode()
        self._auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
        self._buffer = b""
        self._sock = socket.create_connection(self._address, timeout=30)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self._sock.close()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host, self._auth]
        if body is not None:
            head.append(
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
            )
        self._sock.sendall(b"".join(head) + b"\r\n" + (body or b""))
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            self._receive()
        header = self._buffer[:end].decode("latin-1")
        self._buffer = self._buffer[end + 4 :]
        status_line, *lines = header.split("\r\n")
        if not status_line.startswith("HTTP/1.1 "):
            raise HttpError(f"not an HTTP/1.1 answer: {status_line!r}")
        fields = {}
        for line in lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "content-length" not in fields:
            raise HttpError(f"answer without Content-Length: {header!r}")
        if fields.get("connection", "").lower() == "close":
            raise HttpError("the server closed the keep-alive connection")
        length = int(fields["content-length"])
        while len(self._buffer) < length:
            self._receive()
        payload, self._buffer = self._buffer[:length], self._buffer[length:]
        return int(status_line[9:12]), payload

    def _receive(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise HttpError("the server closed the connection")
        self._buffer += chunk


def transition_client(
    *, index: int, url: str, prefix: str, token: str | None = None
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A row-4 client for ``bench.common.run_clients``: (operation, close)."""
    client = KeepAliveClient(url, token)
    ids = [f"{prefix}-c{index}-s{n}" for n in range(STORIES_PER_CLIENT)]
    for story_id in ids:
        body = orjson.dumps(
            {"id": story_id, "name": f"bench {story_id}", "acceptance_criteria": ["a"]}
        )
        status, answer = client.request("POST", "/stories", body)
        if status != 201:
            raise HttpError(f"creating {story_id}: {status} {answer[:300]!r}")
    step = 0

    def transition() -> None:
        nonlocal step
        story, move = divmod(step, STEPS_PER_STORY)
        story_id = ids[story % len(ids)]
        lap = story // len(ids)  # after every story was used, go round again
        version = 1 + lap * STEPS_PER_STORY + move
        event, reason = ("block", "bench") if move % 2 == 0 else ("unblock", None)
        body = orjson.dumps({"event": event, "expected_version": version, "reason": reason})
        status, answer = client.request("POST", f"/stories/{story_id}/transitions", body)
        if status != 200:
            raise HttpError(f"{event} {story_id} v{version}: {status} {answer[:300]!r}")
        step += 1

    return transition, client.close
