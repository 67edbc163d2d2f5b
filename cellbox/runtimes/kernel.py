"""KernelSession: our async wrapper around one kernel process and its jupyter_client.

The only module that imports jupyter_client. A session owns:

* the kernel process, started by the local runtime (``LocalRuntime.start_kernel``);
* one ``AsyncKernelClient`` (heartbeat off: liveness comes from the process, because a missed
  1 s heartbeat during a slow start reads as a false death);
* four pump tasks (iopub, shell, stdin, control) that route every message by its parent
  ``msg_id`` to the queue of the request that caused it, and hand *every* message to the
  raw subscribers (:meth:`KernelSession.subscribe`: the Jupyter gateway face relays a
  frontend's traffic, comms and broadcast ``status`` included);
* a watcher task that notices the process exiting at once and pushes a ``Died`` marker into
  every open route, so nobody waits on a dead kernel.

Executions are not serialised here; the context runner in ``backend.py`` does that.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from jupyter_client.asynchronous.client import AsyncKernelClient

from cellbox.aio import cancel_and_wait
from cellbox.interpreter.errors import InvalidRequest, KernelDied, KernelStartFailed
from cellbox.interpreter.messages import Channel, KernelMessage
from cellbox.interpreter.models import KernelExit
from cellbox.runtimes.specs import KernelProcess, KernelSpec

log = logging.getLogger("cellbox.kernel")

Message = dict[str, Any]

_POLL_MS = 1000
# A raw subscriber that falls this many messages behind is cut off (its iterator ends): a
# stuck frontend must not grow the service's memory without bound.
SUBSCRIBER_BACKLOG = 10_000
_CHANNELS: tuple[Channel, ...] = ("shell", "iopub", "stdin", "control")


class Subscription:
    """Every message of one kernel, from the moment of subscribing (see
    :meth:`KernelSession.subscribe`). Iterate it; :meth:`close` ends the iteration."""

    def __init__(self, session: KernelSession) -> None:
        self._session = session
        self.queue: asyncio.Queue[KernelMessage | None] = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self.overflowed = False

    def put(self, msg: KernelMessage) -> None:
        try:
            self.queue.put_nowait(msg)
        except asyncio.QueueFull:
            log.warning("a raw kernel subscriber fell %d messages behind; cutting it off", SUBSCRIBER_BACKLOG)
            self.overflowed = True
            self.close()

    def close(self) -> None:
        self._session._subscribers.discard(self)
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)
        if self.queue.full():  # make room for the end marker
            self.queue.get_nowait()
            self.queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[KernelMessage]:
        try:
            while (msg := await self.queue.get()) is not None:
                yield msg
        finally:
            self._session._subscribers.discard(self)


@dataclass(frozen=True)
class Died:
    """Put into routes when the kernel process exits."""

    exit: KernelExit


RouteItem = tuple[str, Message] | Died


class Route:
    """The messages (``(channel, msg)``) caused by one request, in arrival order."""

    def __init__(self, msg_id: str) -> None:
        self.msg_id = msg_id
        self.queue: asyncio.Queue[RouteItem] = asyncio.Queue()

    async def get(self, deadline: float | None = None) -> RouteItem:
        """The next item; raises TimeoutError at the loop-time ``deadline``."""
        if deadline is None:
            return await self.queue.get()
        async with asyncio.timeout_at(deadline):
            return await self.queue.get()


class KernelSession:
    """One kernel: start, route messages, interrupt, stop.

    Launch = ``await runtime.start_kernel(...)`` through ``launch`` (a callable that returns a
    fresh :class:`KernelProcess`), so restart is just stop + start with the same callable.
    """

    def __init__(self, launch: Callable[[], Awaitable[KernelProcess]], spec: KernelSpec, start_timeout: float) -> None:
        self._launch = launch
        self.spec = spec
        self.start_timeout = start_timeout
        self.process: KernelProcess | None = None
        self.client: AsyncKernelClient | None = None
        self.exit: KernelExit | None = None
        self.died = asyncio.Event()
        self._routes: dict[str, Route] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._on_death: list[Callable[[KernelExit], None]] = []
        self._subscribers: set[Subscription] = set()
        self.started_at = 0.0
        self.last_activity = time.time()
        self.execution_state = "starting"  # the kernel's last iopub status

    @property
    def alive(self) -> bool:
        return self.process is not None and not self.died.is_set()

    def on_death(self, callback: Callable[[KernelExit], None]) -> None:
        """Register ``callback(exit)``, called once each time a started kernel dies."""
        self._on_death.append(callback)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch the kernel and return when it answers ``kernel_info`` on shell *and* iopub
        delivered a message to us (else the first output can be lost to ZMQ's slow joiner).

        Raises KernelStartFailed (process exit or no answer within ``start_timeout``).
        """
        self.exit = None
        self.died = asyncio.Event()
        self.execution_state = "starting"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self.process = process = await self._launch()
        client = AsyncKernelClient()
        client.load_connection_info(cast(Any, process.connection_info))
        client.start_channels(shell=True, iopub=True, stdin=True, control=True, hb=False)
        self.client = client
        self._tasks = [asyncio.create_task(self._watch(process), name="kernel-watch")]
        for name in _CHANNELS:
            channel = getattr(client, f"{name}_channel")
            self._tasks.append(asyncio.create_task(self._pump(name, channel), name=f"kernel-{name}"))
        try:
            await self._wait_ready(t0 + self.start_timeout)
        except BaseException:
            await self.stop()
            raise
        self.started_at = time.monotonic()
        log.debug("kernel ready in %.0f ms", (loop.time() - t0) * 1000)

    async def _wait_ready(self, ldeadline: float) -> None:
        """Probe with ``kernel_info`` every second until one is answered on shell and iopub
        (``ldeadline`` is loop time).

        Every probe's replies land in one route: a kernel slow to start (a loaded host) may
        answer an early probe late, and that answer counts as much as a fresh one."""
        loop = asyncio.get_running_loop()
        client = self._require_client()
        route = Route("kernel_info")
        probes: list[str] = []
        got_reply = got_iopub = False
        try:
            while not (got_reply and got_iopub):
                msg = client.session.msg("kernel_info_request")
                probes.append(msg["header"]["msg_id"])
                self._routes[probes[-1]] = route
                client.shell_channel.send(msg)
                probe_deadline = min(ldeadline, loop.time() + 1.0)
                try:
                    while not (got_reply and got_iopub):
                        item = await route.get(probe_deadline)
                        if isinstance(item, Died):
                            raise KernelStartFailed(
                                f"kernel exited during start: {item.exit.detail or item.exit.reason}",
                                exit=item.exit.model_dump(),
                            )
                        channel, _ = item
                        got_reply |= channel == "shell"
                        got_iopub |= channel == "iopub"
                except TimeoutError:
                    if loop.time() >= ldeadline:
                        raise KernelStartFailed(f"kernel not ready after {self.start_timeout:.0f} s") from None
        finally:
            for msg_id in probes:
                self.close_route(msg_id)

    async def stop(self) -> None:
        """Kill the kernel process and stop the pumps. Idempotent; never raises (but lets a
        cancellation of the caller through, after closing the sockets)."""
        for t in self._tasks:
            t.cancel()
        process, client = self.process, self.client
        try:
            if process is not None:
                try:
                    await process.kill()
                except Exception:
                    log.warning("could not kill a kernel process", exc_info=True)
            for t in self._tasks:
                await cancel_and_wait(t)
        finally:
            self._tasks = []
            if client is not None:
                with contextlib.suppress(Exception):
                    client.stop_channels()
        self.client = None
        if self.exit is None:
            self.exit = KernelExit(reason="stopped", at=time.time())
        self.died.set()
        self._fail_routes(Died(self.exit))

    # -- messaging -------------------------------------------------------------------------

    def open_route(self, msg_id: str) -> Route:
        route = Route(msg_id)
        self._routes[msg_id] = route
        if self.died.is_set() and self.exit is not None:
            route.queue.put_nowait(Died(self.exit))
        return route

    def close_route(self, msg_id: str) -> None:
        self._routes.pop(msg_id, None)

    def execute(self, code: str, *, silent: bool = False, allow_stdin: bool = True) -> Route:
        """Send an execute_request; returns the route its replies and outputs arrive on."""
        client = self._require_client()
        msg = client.session.msg(
            "execute_request",
            {
                "code": code,
                "silent": silent,
                "store_history": not silent,
                "user_expressions": {},
                "allow_stdin": allow_stdin,
                "stop_on_error": True,
            },
        )
        # Open the route before sending, so no reply can arrive unrouted.
        route = self.open_route(msg["header"]["msg_id"])
        client.shell_channel.send(msg)
        return route

    def execute_message(self, message: KernelMessage) -> Route:
        """Send a frontend's own execute_request (its header kept); returns its route."""
        route = self.open_route(str(message["header"]["msg_id"]))
        self.send(message)
        return route

    def send_input(self, value: str) -> None:
        """Answer the kernel's pending ``input_request``."""
        self._require_client().input(value)

    def subscribe(self) -> Subscription:
        """Every message the kernel sends from now on, on every channel (with ``channel`` set),
        across restarts, until the subscription is closed."""
        sub = Subscription(self)
        self._subscribers.add(sub)
        return sub

    def announce(self, execution_state: str) -> None:
        """Tell the raw subscribers the kernel's state changed without a message of its own
        (``restarting``, ``dead``), as jupyter_server does for its frontends."""
        if not self._subscribers:
            return
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": "status",
            "session": "cellbox",
            "username": "cellbox",
            "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "version": "5.3",
        }
        status = cast(
            KernelMessage,
            {
                "channel": "iopub",
                "header": header,
                "parent_header": {},
                "metadata": {},
                "content": {"execution_state": execution_state},
                "buffers": [],
                "msg_id": msg_id,
                "msg_type": "status",
            },
        )
        for sub in list(self._subscribers):
            sub.put(status)

    def close_subscriptions(self) -> None:
        for sub in list(self._subscribers):
            sub.close()

    def send(self, message: KernelMessage) -> None:
        """Send a message built elsewhere (a frontend's), keeping its header: the kernel's
        replies carry its ``msg_id`` as their parent and reach the raw subscribers."""
        channel = message.get("channel")
        if channel not in _CHANNELS:
            raise InvalidRequest(f"unknown channel {channel!r}; one of {', '.join(_CHANNELS)}", field="channel")
        client = self._require_client()
        zmq_channel = getattr(client, f"{channel}_channel")
        msg = {k: message.get(k, {}) for k in ("header", "parent_header", "metadata", "content")}
        client.session.send(zmq_channel.socket, msg, buffers=message.get("buffers") or None)
        self.last_activity = time.time()

    async def interrupt(self) -> None:
        """Interrupt the running cell: ``interrupt_request`` on control, or SIGINT for kernels
        whose spec says ``signal``. Does not wait for the cell to stop."""
        if not self.alive:
            return
        if self.spec.interrupt_mode == "signal":
            assert self.process is not None
            self.process.signal(signal.SIGINT)
            return
        client = self._require_client()
        msg = client.session.msg("interrupt_request", {})
        client.control_channel.send(msg)

    def _require_client(self) -> AsyncKernelClient:
        if self.client is None or self.died.is_set():
            raise KernelDied("the kernel is not running", exit=self.exit.model_dump() if self.exit else None)
        return self.client

    async def _pump(self, channel: str, zmq_channel: Any) -> None:
        # Under load (20+ kernels starting at once) a zmq.asyncio wait sometimes never woke for
        # messages already queued (the socket's edge-triggered FD; a fresh client on the same
        # kernel got answers at once), leaving a kernel "not ready" for good. Polling with a
        # timeout re-checks the socket: a missed wake-up costs at most _POLL_MS.
        sock, session = zmq_channel.socket, zmq_channel.session
        while True:
            if not await sock.poll(_POLL_MS):
                continue
            frames = await sock.recv_multipart()
            try:
                _, smsg = session.feed_identities(frames)
                msg = session.deserialize(smsg)
            except Exception:  # a malformed or unsigned message: skip it, keep pumping
                log.warning("dropped an unreadable %s message", channel, exc_info=True)
                continue
            self.last_activity = time.time()
            if channel == "iopub" and msg["msg_type"] == "status":
                self.execution_state = msg["content"].get("execution_state", self.execution_state)
            parent = msg.get("parent_header") or {}
            route = self._routes.get(parent.get("msg_id", ""))
            if route is not None:
                route.queue.put_nowait((channel, msg))
            if self._subscribers:
                raw = cast(KernelMessage, {**msg, "channel": channel})
                for sub in list(self._subscribers):
                    sub.put(raw)

    async def _watch(self, process: KernelProcess) -> None:
        exit_info = await process.wait()
        if self.process is not process:
            return
        self.exit = exit_info
        self.died.set()
        self.execution_state = "dead"
        self._fail_routes(Died(exit_info))
        self.announce("dead")
        for cb in self._on_death:
            try:
                cb(exit_info)
            except Exception:
                log.exception("kernel death callback failed")

    def _fail_routes(self, died: Died) -> None:
        for route in self._routes.values():
            route.queue.put_nowait(died)
