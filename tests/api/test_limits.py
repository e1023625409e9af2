"""Transport limits of ``storyline serve``: an oversize request head is refused with 431 and
the connection closed (issue 12 item 10)."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.http_protocol import MAX_HEAD_BYTES
from service import migrations
from service.settings import Database
from tests.api.test_serve import serve_without_runners, wait_until_up


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    db = Database(kind="sqlite", sqlite_path=tmp_path / "storyline.db")
    migrations.upgrade(db)
    process, url = serve_without_runners(db, tmp_path)
    try:
        wait_until_up(process, url)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def request(header_bytes: int, path: str = "/healthz") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\nX-Padding: {'p' * header_bytes}\r\n\r\n".encode()


def exchange(url: str, *requests: bytes) -> tuple[bytes, bool]:
    """Send ``requests`` on one connection; return what came back and whether the server
    closed the connection (read to end of stream)."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        for data in requests:
            try:
                sock.sendall(data)
            except OSError:
                break  # the server stopped reading: its answer is already on the way
        received = b""
        closed = False
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                received += chunk
        except TimeoutError:
            pass
    return received, closed


def test_a_200_kb_header_is_431_and_the_connection_closed(served: str) -> None:
    received, closed = exchange(served, request(200 * 1024))
    assert received.startswith(b"HTTP/1.1 431 "), received[:200]
    assert b'"code":"headers_too_large"' in received
    assert closed


def test_a_head_just_over_the_cap_is_refused_and_one_under_it_is_served(served: str) -> None:
    over, closed = exchange(served, request(MAX_HEAD_BYTES + 1))
    assert over.startswith(b"HTTP/1.1 431 ") and closed
    under, _ = exchange(served, request(MAX_HEAD_BYTES - 200) + b"")
    assert under.startswith(b"HTTP/1.1 200 "), under[:200]


def test_an_oversize_head_after_a_good_request_on_a_kept_alive_connection(served: str) -> None:
    received, closed = exchange(served, request(10), request(100 * 1024))
    first, _, rest = received.partition(b"HTTP/1.1 431 ")
    assert first.startswith(b"HTTP/1.1 200 ") and rest, received[:300]
    assert closed
