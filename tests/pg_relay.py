"""A loopback relay to PostgreSQL that can fail the way a database host does."""

from __future__ import annotations

import contextlib
import socket
import threading


class Relay:
    """Relays 127.0.0.1:<port> to PostgreSQL until ``play_dead`` or ``refuse``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.alive = threading.Event()
        self.alive.set()
        self.interrupted = False
        self.refused = False
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.interrupted:
                client.close()
                continue
            with self.lock:
                if self.refused:
                    client.close()
                    return
                self.sockets.append(client)
            if not self.alive.is_set():
                continue  # a dead host: the connection is open and nothing ever answers
            server = socket.create_connection(self.upstream)
            with self.lock:
                # refuse() may have run while this connection was being made: it must not
                # survive it (a pooled connection that did kept a pass working for good).
                if self.refused:
                    for sock in (client, server):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                        sock.close()
                    return
                self.sockets.append(server)
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.alive.wait()  # while dead, hold the bytes: no answer, no error
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def play_dead(self) -> None:
        self.alive.clear()

    def revive(self) -> None:
        self.alive.set()

    def interrupt(self) -> None:
        """Drop every connection and close new ones at once, until :meth:`resume` (what a
        restart or a network blip looks like)."""
        self.interrupted = True
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self.sockets.clear()

    def resume(self) -> None:
        self.interrupted = False

    def refuse(self) -> None:
        """Close the port and drop every connection: connection refused from now on."""
        # shutdown() first: close() alone does not wake the thread blocked in accept().
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            self.refused = True
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self.alive.set()

    def close(self) -> None:
        self.refuse()
        with self.lock:
            for sock in self.sockets:
                sock.close()
