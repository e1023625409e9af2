"""A loopback TCP proxy for PostgreSQL that loses commits: their replies, or the commits.

``python -m tests.faults.pgproxy --listen 127.0.0.1:0 --upstream 127.0.0.1:5432
--mode lose --every 25`` prints one JSON line, ``{"port": P, "control_port": C}``, then
relays connections to the upstream server. It reads the client's side of the wire protocol
(the startup packet, then typed messages) far enough to recognise the commit of an event
insert (a SELECT calling an ``*insert_events*`` function, or an INSERT INTO the events
table, see ``--insert-pattern``) executed outside a transaction block (committed by the
``Sync`` that ends its batch, whether parsed each time or prepared once and bound by name),
or the ``COMMIT`` of a transaction block that executed one.

Every ``every``-th such commit (counted over all connections) is faulted by ``mode``:

* ``lose``: the commit is forwarded, the proxy waits until the server's ``ReadyForQuery``
  for it has arrived (so the commit happened), discards the reply and closes both sockets.
  The client cannot tell this from a commit that never reached the server.
* ``drop``: the batch with the commit is not forwarded; both sockets are closed, so the
  server rolls the transaction back. The commit did not happen.
* ``alternate``: ``lose`` and ``drop`` in turn; ``off``: relay only.

The control port takes one command per line: ``stats`` answers a JSON line of counters;
``set mode=lose every=25 [limit=K]`` starts a new schedule (answer ``ok``): every 25th
commit from now on, at most K of them.

Extended-protocol messages are held back until the ``Sync`` (or ``Flush``) that ends their
batch, so a fault always covers a whole batch. A ``Flush`` is never a commit point: a
transaction committed before a ``Flush`` (libpq pipeline mode) is relayed unfaulted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import struct
from dataclasses import asdict, dataclass, field

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
INSERT_PATTERN = r"^\s*SELECT\b.*insert_events|^\s*INSERT\s+INTO\s+\S*storyline_events\b"
"""Event inserts: the DB function storyline calls, or the library's plain INSERT."""
MODES = ("off", "lose", "drop", "alternate")


@dataclass
class Stats:
    connections: int = 0
    commits: int = 0  # commit points seen (event inserts committed or attempted)
    lost_replies: int = 0  # committed, reply discarded
    dropped_commits: int = 0  # not forwarded: rolled back


@dataclass
class Schedule:
    """Which commits to fault: every ``every``-th since the schedule was set, at most
    ``limit`` of them (no limit when None)."""

    mode: str = "off"
    every: int = 0
    limit: int | None = None
    inserts: re.Pattern[str] = re.compile(INSERT_PATTERN, re.IGNORECASE | re.DOTALL)
    stats: Stats = field(default_factory=Stats)
    _counted: int = 0
    _faulted: int = 0
    _alternate_next: str = "lose"

    def reset(self, mode: str, every: int, limit: int | None) -> None:
        self.mode, self.every, self.limit = mode, every, limit
        self._counted = self._faulted = 0

    def fault_for_next_commit(self) -> str | None:
        """Count a commit point and say which fault, if any, it gets."""
        self.stats.commits += 1
        self._counted += 1
        if self.mode == "off" or self.every <= 0 or self._counted % self.every:
            return None
        if self.limit is not None and self._faulted >= self.limit:
            return None
        self._faulted += 1
        if self.mode != "alternate":
            return self.mode
        fault, self._alternate_next = (
            self._alternate_next,
            "drop" if self._alternate_next == "lose" else "lose",
        )
        return fault


def _cstring(body: bytes, start: int) -> tuple[str, int]:
    end = body.index(b"\0", start)
    return body[start:end].decode("utf-8", "replace"), end + 1


def _keyword(query: str) -> str:
    words = query.strip().split(None, 1)
    return words[0].rstrip(";").upper() if words else ""


class Connection:
    """One client connection and its upstream; the client's messages are read in order."""

    def __init__(
        self,
        schedule: Schedule,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.schedule = schedule
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = upstream
        self.statements: dict[str, str] = {}
        self.portals: dict[str, str] = {}
        self.in_block = False
        self.block_inserted = False
        self.batch: list[bytes] = []
        self.batch_commits = False  # this batch commits an event insert
        self.batch_inserted = False  # this batch executes an insert outside a block
        # ReadyForQuery messages: one for the startup, then one per Sync or Query sent.
        self.ready_expected = 1
        self.ready_seen = 0
        self.lose_at: int | None = None  # the ReadyForQuery whose batch is lost
        self.closed = asyncio.Event()

    # -------------------------------------------------------------- client -> server

    async def client_to_server(self) -> None:
        if not await self._startup():
            return
        while not self.closed.is_set():
            header = await self.client_reader.readexactly(5)
            kind = header[:1]
            (length,) = struct.unpack("!I", header[1:])
            body = await self.client_reader.readexactly(length - 4)
            message = header + body
            if kind in (b"P", b"B", b"D", b"E", b"C"):
                self._note_extended(kind, body)
                self.batch.append(message)
            elif kind == b"S":
                self.batch.append(message)
                await self._end_batch(commit_point=self._autocommit_point())
            elif kind == b"H":
                self.batch.append(message)
                await self._end_batch(commit_point=False, counts_ready=False)
            elif kind == b"Q":
                query, _ = _cstring(body, 0)
                commit_point = self._note_statement(query)
                self.batch.append(message)
                await self._end_batch(commit_point=commit_point)
            else:  # Terminate, password, copy data...: relay as they come
                self.batch.append(message)
                await self._end_batch(commit_point=False, counts_ready=False)
                if kind == b"X":
                    await self.close()

    async def _startup(self) -> bool:
        while True:
            header = await self.client_reader.readexactly(8)
            length, code = struct.unpack("!II", header)
            rest = await self.client_reader.readexactly(length - 8)
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                # Plain loopback only: refuse encryption so every byte can be read.
                self.client_writer.write(b"N")
                await self.client_writer.drain()
                continue
            self.server_writer.write(header + rest)
            await self.server_writer.drain()
            return code != CANCEL_REQUEST

    def _note_extended(self, kind: bytes, body: bytes) -> None:
        if kind == b"P":
            name, offset = _cstring(body, 0)
            query, _ = _cstring(body, offset)
            self.statements[name] = query
        elif kind == b"B":
            portal, offset = _cstring(body, 0)
            statement, _ = _cstring(body, offset)
            self.portals[portal] = self.statements.get(statement, "")
        elif kind == b"E":
            portal, _ = _cstring(body, 0)
            if self._note_statement(self.portals.get(portal, ""), extended=True):
                self.batch_commits = True

    def _note_statement(self, query: str, *, extended: bool = False) -> bool:
        """Track transaction blocks; True if ``query`` commits an event insert now."""
        keyword = _keyword(query)
        if keyword in ("BEGIN", "START"):
            self.in_block, self.block_inserted = True, False
        elif keyword in ("COMMIT", "END"):
            committed = self.in_block and self.block_inserted
            self.in_block = self.block_inserted = False
            return committed
        elif keyword in ("ROLLBACK", "ABORT"):
            self.in_block = self.block_inserted = False
        elif self.schedule.inserts.search(query):
            if self.in_block:
                self.block_inserted = True
            elif extended:
                self.batch_inserted = True
            else:
                return True  # a simple query outside a block commits at once
        return False

    def _autocommit_point(self) -> bool:
        inserted, self.batch_inserted = self.batch_inserted, False
        return self.batch_commits or (inserted and not self.in_block)

    async def _end_batch(self, *, commit_point: bool, counts_ready: bool = True) -> None:
        batch, self.batch, self.batch_commits = self.batch, [], False
        fault = self.schedule.fault_for_next_commit() if commit_point else None
        if fault == "drop":
            self.schedule.stats.dropped_commits += 1
            await self.close()
            return
        if counts_ready:
            self.ready_expected += 1
        if fault == "lose":
            self.schedule.stats.lost_replies += 1
            self.lose_at = self.ready_expected
        self.server_writer.write(b"".join(batch))
        await self.server_writer.drain()
        if fault == "lose":
            # Read nothing more from the client: the server's answer decides the close.
            await self.closed.wait()

    # -------------------------------------------------------------- server -> client

    async def server_to_client(self) -> None:
        while not self.closed.is_set():
            header = await self.server_reader.readexactly(5)
            (length,) = struct.unpack("!I", header[1:])
            body = await self.server_reader.readexactly(length - 4)
            # The batch this message answers: its ReadyForQuery is the last message.
            answering = self.ready_seen + 1
            if header[:1] == b"Z":
                self.ready_seen += 1
            if self.lose_at is not None and answering >= self.lose_at:
                if header[:1] == b"Z" and answering == self.lose_at:
                    await self.close()  # the commit happened; its answer is lost
                continue
            self.client_writer.write(header + body)
            await self.client_writer.drain()

    async def close(self) -> None:
        self.closed.set()
        for writer in (self.client_writer, self.server_writer):
            writer.close()
        for writer in (self.client_writer, self.server_writer):
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class Proxy:
    def __init__(self, upstream: tuple[str, int], schedule: Schedule) -> None:
        self.upstream = upstream
        self.schedule = schedule

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.schedule.stats.connections += 1
        try:
            upstream = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        connection = Connection(self.schedule, (reader, writer), upstream)
        tasks = [
            asyncio.ensure_future(connection.client_to_server()),
            asyncio.ensure_future(connection.server_to_client()),
        ]
        # Either side ending (EOF, reset, a fault) ends the connection for both.
        await asyncio.wait([*tasks, asyncio.ensure_future(connection.closed.wait())],
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        await connection.close()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := (await reader.readline()).decode().strip():
                writer.write((self._command(line) + "\n").encode())
                await writer.drain()
        finally:
            writer.close()

    def _command(self, line: str) -> str:
        verb, _, args = line.partition(" ")
        if verb == "stats":
            return json.dumps({**asdict(self.schedule.stats), "mode": self.schedule.mode,
                               "every": self.schedule.every})  # fmt: skip
        if verb == "set":
            settings = dict(arg.split("=", 1) for arg in args.split() if "=" in arg)
            mode = settings.get("mode", self.schedule.mode)
            if mode not in MODES:
                return f"error: mode must be one of {', '.join(MODES)}"
            try:
                every = int(settings.get("every", self.schedule.every))
                limit = int(settings["limit"]) if "limit" in settings else None
            except ValueError:
                return "error: every and limit must be integers"
            self.schedule.reset(mode, every, limit)
            return "ok"
        return "error: commands are 'stats' and 'set mode=M every=N [limit=K]'"


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def serve(args: argparse.Namespace) -> None:
    schedule = Schedule(inserts=re.compile(args.insert_pattern, re.IGNORECASE | re.DOTALL))
    schedule.reset(args.mode, args.every, None)
    proxy = Proxy(_address(args.upstream), schedule)
    host, port = _address(args.listen)
    server = await asyncio.start_server(proxy.handle, host, port)
    control = await asyncio.start_server(proxy.control, host, args.control_port)
    ports = {
        "port": server.sockets[0].getsockname()[1],
        "control_port": control.sockets[0].getsockname()[1],
    }
    print(json.dumps(ports), flush=True)
    async with server, control:
        await asyncio.gather(server.serve_forever(), control.serve_forever())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on")
    parser.add_argument("--upstream", default="127.0.0.1:5432", help="the PostgreSQL server")
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument("--mode", choices=MODES, default="off")
    parser.add_argument("--every", type=int, default=0, help="fault every N-th commit")
    parser.add_argument(
        "--insert-pattern", default=INSERT_PATTERN, help="regex of an event insert's SQL"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
