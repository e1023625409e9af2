"""uvicorn's HTTP protocol with a cap on the size of a request's head (line and headers).

uvicorn's httptools protocol keeps every header a client sends, however large (a 200 KB
header was accepted), and its h11 limit applies to h11 only, which is slower. This subclass
counts the bytes that arrive while a head is still incomplete and answers ``431 Request
Header Fields Too Large`` and closes the connection once they pass the cap, without reading
the rest; a head that arrives whole in one read is measured when it is complete. (A read
holding the end of one request and the start of the next counts whole towards the next head:
only a client that pipelines over 32 KB could be refused early.) Without httptools, h11 with
its own limit does the same (as a 400).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from api.error_shapes import error_body

MAX_HEAD_BYTES = 32 * 1024
"""Request line plus headers. Our own requests need a few hundred bytes (a bearer token,
an idempotency key of at most 200 characters, a cursor of at most 512)."""
DRAIN_BYTES = 1 << 20
DRAIN_SECONDS = 5.0
"""After the 431 the connection is half-closed and what the client is still sending is read
and dropped (up to these bounds): closing with unread data would reset the connection,
and the client would lose the answer."""


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request whose head is too large."""


def _refusal(max_bytes: int) -> bytes:
    body = orjson.dumps(
        error_body(
            "headers_too_large",
            f"the request line and headers are larger than {max_bytes} bytes",
            {"max_bytes": max_bytes},
        )
    )
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: application/json\r\n"
        b"content-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (len(body), body)
    )


def capped_protocol(max_head_bytes: int = MAX_HEAD_BYTES) -> dict[str, Any]:
    """The uvicorn ``Config`` options that cap a request's head at ``max_head_bytes``."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional in uvicorn
        return {"http": "h11", "h11_max_incomplete_event_size": max_head_bytes}

    class CappedHttpToolsProtocol(HttpToolsProtocol):
        max_head = max_head_bytes

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_open = True
            self._head_bytes = 0
            self._refused = False
            self._answered = False
            self._answer_after_response = False
            self._drain_left = DRAIN_BYTES
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                self._drain_left -= len(data)
                if self._drain_left <= 0:
                    self.transport.close()
                return
            super().data_received(data)
            if self._refused or not self._head_open:
                return
            # Still inside a head: what the parser holds is at most what came since the last
            # message ended (a whole read is counted even when the head began inside it).
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head:
                self._refused = True
                if self._busy():
                    self._answer_after_response = True
                else:
                    self._refuse()

        def _busy(self) -> bool:
            """An earlier request on this connection is still being answered."""
            return bool(self.pipeline) or (
                self.cycle is not None and not self.cycle.response_complete
            )

        def on_headers_complete(self) -> None:
            self._head_open = False
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > self.max_head:
                # Stops the parser; uvicorn then answers through send_400_response.
                self._refused = True
                raise HeadTooLarge
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._head_open = True
            self._head_bytes = 0

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._answer_after_response and not self._busy():
                self._answer_after_response = False
                self._refuse()

        def send_400_response(self, msg: str) -> None:
            if self._refused:
                self._refuse()
                return
            super().send_400_response(msg)

        def _refuse(self) -> None:
            self._refused = True
            if self._busy():
                self._answer_after_response = True
                return
            if self._answered or self.transport.is_closing():
                return
            self._answered = True
            self.transport.write(_refusal(self.max_head))
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(DRAIN_SECONDS, self.transport.close)
            else:
                self.transport.close()

    return {"http": CappedHttpToolsProtocol}


__all__ = ["DRAIN_BYTES", "DRAIN_SECONDS", "MAX_HEAD_BYTES", "HeadTooLarge", "capped_protocol"]
