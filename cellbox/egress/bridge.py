"""Loopback TCP → unix socket relay: how a sandbox with only its own loopback reaches the
service's egress proxy.

Runs *inside* the sandbox, in its agent: it listens on 127.0.0.1:PORT of the sandbox's network
namespace and, for every connection, opens the unix socket the runtime bound into the sandbox
(the proxy's, :mod:`cellbox.egress.proxy`) and copies bytes both ways, half-closes included.
The bridge decides nothing: the proxy on the other side checks every connection.

Standard library only, and no cellbox imports: the agent is one stdlib-only file that loads
this module's source (or runs it as a script: ``python3 bridge.py UNIX_PATH [--port 3128]``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence

__all__ = ["DEFAULT_PORT", "Bridge", "main"]

DEFAULT_PORT = 3128  # the conventional proxy port; the sandbox's HTTP_PROXY points at it


class Bridge:
    """Listen on ``host:port`` (loopback; ``port=0`` picks one) and relay each connection to the
    unix socket ``unix_path``. At most ``max_connections`` at once: more are closed at accept
    (the proxy caps them lower anyway). Start with :meth:`start`, stop with :meth:`close`."""

    def __init__(
        self,
        unix_path: str,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        max_connections: int = 256,
        buffer_size: int = 64 * 1024,
        close_timeout: float = 30.0,
    ) -> None:
        self.unix_path = unix_path
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.buffer_size = buffer_size
        self.close_timeout = close_timeout
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        """Bind and serve; returns the port (useful with ``port=0``)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and end every relayed connection. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= self.max_connections:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            try:
                up_reader, up_writer = await asyncio.open_unix_connection(self.unix_path, limit=self.buffer_size)
            except OSError:
                return  # the proxy is gone: the client sees the connection close
            # The proxy answers for the upstream: once its side ends, the connection is over.
            upload = asyncio.create_task(self._pipe(reader, up_writer))
            try:
                await self._pipe(up_reader, writer)
            finally:
                upload.cancel()
                await asyncio.gather(upload, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # close() cancels; this task is the root of its connection (see the proxy)
        finally:
            if up_writer is not None:
                up_writer.transport.abort()
            try:
                await _finish(reader, writer, self.close_timeout)
            except asyncio.CancelledError:
                pass
            self._tasks.discard(task)
            self._writers.discard(writer)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(self.buffer_size):
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof() and not dst.is_closing():
                dst.write_eof()
                await dst.drain()
        except (ConnectionError, OSError):
            dst.transport.abort()


async def _finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
    """Half-close once the buffer is flushed, read away what the client still sends (a close with
    unread bytes is a reset that can destroy our last bytes at the client), close; abort after
    ``timeout`` seconds. (The proxy's ``finish`` does the same: this file stays stdlib-only.)"""
    transport = writer.transport
    if transport.is_closing():
        return
    try:
        await asyncio.wait_for(_linger(reader, writer), timeout)
    except (OSError, RuntimeError):  # TimeoutError is an OSError (3.11, the templates' Python)
        pass
    finally:
        transport.abort()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if writer.can_write_eof():
        writer.write_eof()
    discarded = 0
    while discarded < (1 << 20) and (data := await reader.read(64 * 1024)):
        discarded += len(data)
    writer.close()
    await writer.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Relay a loopback TCP port to a unix socket.")
    parser.add_argument("unix_path")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)

    async def run() -> None:
        bridge = Bridge(args.unix_path, args.host, args.port)
        port = await bridge.start()
        print(f"bridge listening on {args.host}:{port}", flush=True)
        try:
            await bridge.serve_forever()
        finally:
            await bridge.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
