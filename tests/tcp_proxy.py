"""A TCP proxy on 127.0.0.1 that a test can use to hold, cut and restore a connection."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream address.

    `hold_responses()`: bytes from upstream stop reaching clients (the request got
    through; the answer never comes back). `cut()`: every connection is dropped and new
    ones are refused until `restore()`.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._holding = False
        self._refusing = False
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.bytes_held = 0
        # Added before each chunk from upstream reaches the client (a slow provider).
        self.response_delay_seconds = 0.0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def connections(self) -> int:
        """Client connections forwarded right now."""
        return len(self._connections)

    def hold_responses(self) -> None:
        self._holding = True

    async def cut(self) -> None:
        self._refusing = True
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def restore(self) -> None:
        self._refusing = False
        self._holding = False

    async def close(self) -> None:
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            self._connections.discard(task)
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, upstream_bound=True),
                self._pump(up_reader, writer, upstream_bound=False),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()
            self._connections.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream_bound: bool
    ) -> None:
        while data := await reader.read(65536):
            if self._holding and not upstream_bound:
                self.bytes_held += len(data)
                continue
            if self.response_delay_seconds and not upstream_bound:
                await asyncio.sleep(self.response_delay_seconds)
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()
