"""A sandbox's ports: TCP connections to servers listening inside it, for the ports face.

``stream = await sbx.ports.open(8001)`` connects to ``127.0.0.1:8001`` inside the sandbox's own
network namespace (through its agent: nothing listens on the host for it) and gives the caller
the byte stream; the face speaks HTTP or WebSocket over it. Who may open a sandbox's ports is
:meth:`~cellbox.interpreter.manager.SandboxManager.traffic`'s decision.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cellbox.interpreter.errors import InvalidRequest

if TYPE_CHECKING:
    from cellbox.interpreter.sandbox import Sandbox

__all__ = ["PortStream", "Ports"]


@dataclass
class PortStream:
    """One TCP connection into the sandbox. The caller closes it (:meth:`close`)."""

    port: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def close(self) -> None:
        """Close both directions. Idempotent; never raises."""
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


class Ports:
    """The ports of one live sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    async def open(self, port: int) -> PortStream:
        """Connect to ``port`` inside the sandbox. InvalidRequest outside 1..65535,
        SandboxNotRunning unless running, PortNotListening when nothing accepts there."""
        if not 0 < port < 65536:
            raise InvalidRequest(f"port must be 1..65535, got {port}", field="port")
        self.sandbox.require_running()
        backend = self.sandbox.backend
        assert backend is not None
        reader, writer = await backend.open_port(port)
        return PortStream(port, reader, writer)
