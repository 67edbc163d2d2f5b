"""The physical limit: jupyter_client's AsyncKernelClient on a local ipykernel.

The kernel is the benchmark interpreter's own ipykernel (the same one the service's default
template uses when it runs from this venv), over ZMQ ``ipc`` sockets like cellbox's kernels.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from benchmarks.peers import Outcome


class RawKernel:
    """One ipykernel started and driven with jupyter_client; ``execute`` is one request."""

    def __init__(self, workdir: Path, name: str = "k") -> None:
        self._workdir = workdir
        self._name = name
        self.km: AsyncKernelManager | None = None
        self.kc: AsyncKernelClient | None = None

    @property
    def pid(self) -> int | None:
        prov = getattr(self.km, "provisioner", None)
        proc = getattr(prov, "process", None)
        return getattr(proc, "pid", None)

    async def start(self, timeout: float = 60.0) -> None:
        km = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=str(self._workdir / self._name))
        # Quiet the kernel's own loggers; its stderr goes to our terminal otherwise.
        await km.start_kernel(cwd=str(self._workdir), stderr=asyncio.subprocess.DEVNULL)
        self.km = km
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=timeout)
        self.kc = kc

    async def execute(self, code: str, timeout: float = 60.0) -> Outcome:
        """Send ``execute_request``; done when both ``execute_reply`` and iopub ``idle`` arrived."""
        kc = self.kc
        assert kc is not None
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        msg_id = kc.execute(code)
        first = None
        nbytes = 0
        while True:
            msg = await kc.get_iopub_msg(timeout=max(0.0, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            mtype = msg["msg_type"]
            if mtype == "stream":
                if first is None:
                    first = time.perf_counter() - t0
                nbytes += len(msg["content"]["text"])
            elif mtype == "status" and msg["content"]["execution_state"] == "idle":
                break
        while True:
            reply = await kc.get_shell_msg(timeout=max(0.0, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        return Outcome(time.perf_counter() - t0, reply["content"]["status"], first, nbytes)

    async def stop(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            await self.km.shutdown_kernel(now=True)
