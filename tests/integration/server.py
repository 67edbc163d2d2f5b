"""A real uvicorn server running the cellbox app in the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn

from cellbox.aio import cancel_and_wait
from cellbox.api.app import create_app
from cellbox.interpreter.config import Settings
from cellbox.interpreter.manager import SandboxManager


@dataclass
class RunningServer:
    url: str
    settings: Settings
    manager: SandboxManager


@contextlib.asynccontextmanager
async def run_server(settings: Settings, faces: list[str] | None = None) -> AsyncIterator[RunningServer]:
    """Open a SandboxManager, serve it with uvicorn on a free loopback port (every face, or
    those named in ``faces``), and close both on exit. The listening socket is bound before
    uvicorn starts, so no readiness wait is needed: connections queue in the backlog until
    uvicorn accepts them."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = int(sock.getsockname()[1])
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
    manager = await SandboxManager.open(settings)
    app = create_app(settings, manager=manager, faces=faces)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", settings, manager)
    finally:
        server.should_exit = True
        try:
            # A graceful exit first (open streams get uvicorn's timeout_graceful_shutdown), then
            # the hard way. A cancellation of the test itself goes through, never swallowed.
            done, _ = await asyncio.wait({task}, timeout=30)
            if not done:
                await cancel_and_wait(task)
        finally:
            await manager.close()
            sock.close()
    # Only after a clean exit of the test body: a server that crashed under it fails the test.
    if not task.cancelled() and (exc := task.exception()) is not None:
        raise exc
