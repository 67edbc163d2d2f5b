"""The Jupyter kernel-gateway face: JupyterLab and jupyter_server attach to cellbox kernels.

``jupyter lab --gateway-url=http://HOST:PORT --GatewayClient.auth_token=KEY`` (or ``jupyter
server`` with the same flags) lists kernelspecs and starts, lists, attaches to, interrupts,
restarts and shuts down kernels here, as with Jupyter Kernel Gateway
(shared/reference/jupyter-gateway.md §1, §6). Routes, under two base URLs:

* ``/`` (the service root): ``POST /api/kernels`` creates a **new sandbox** whose default
  context is the kernel (another language: a context of that language in it);
* ``/v1/sandboxes/{id}/jupyter``: one existing sandbox. ``POST /api/kernels`` is idempotent:
  it returns the sandbox's context of that language (creating it if the sandbox has none), so
  ``--gateway-url=http://HOST:PORT/v1/sandboxes/ID/jupyter`` attaches JupyterLab to a sandbox
  an agent made; its kernels are its contexts.

``GET /api``, ``GET /api/kernelspecs[/{name}]``, ``GET /kernelspecs/{name}/{file}`` (404: no
logos), ``GET|POST /api/kernels``, ``GET|DELETE /api/kernels/{kid}``,
``POST /api/kernels/{kid}/interrupt|restart``, ``WS /api/kernels/{kid}/channels`` and
``WS /api/events/subscribe``.

Kernel ids are context ids (UUIDs). A kernel's model has ``last_activity`` as
``%Y-%m-%dT%H:%M:%S.%fZ``, ``execution_state`` (the context's state) and ``connections`` (open
channel sockets here), as jupyter_server requires. Listing is on (scoped to the caller's key).
Auth: ``Authorization: token KEY`` (or Bearer, ``X-API-Key``, ``?token=``).

**Shutdown rule** (jupyter_server DELETEs every kernel it knows when it exits, adopted ones
included): ``DELETE /api/kernels/{kid}`` on the root URL destroys the kernel's sandbox only
when this face created that sandbox (root ``POST /api/kernels``; its metadata says
``jupyter.gateway = kernel``). Any other kernel — a context of a sandbox made through another
door, or any kernel reached through a per-sandbox URL — is **detached**: this face's channel
sockets to it close and it answers 204, but the sandbox and its kernel run on.

Lifetime: a sandbox created here lives ``KERNEL_CELLBOX_TIMEOUT`` seconds (from the POST's
``env``; jupyter_server forwards its own ``KERNEL_*`` variables) or the service's largest
sandbox timeout, counted again from each client message (refreshed at most once a minute).
``KERNEL_CELLBOX_TEMPLATE`` picks the template. Other ``env`` entries (``KERNEL_WORKING_DIR``
is a path on the jupyter_server host) are ignored.

Channels: legacy JSON text frames with ``channel`` (binary frames for messages with buffers),
or ``v1.kernel.websocket.jupyter.org`` when the client offers it (jupyter_server in gateway
mode never does; JupyterLab talking to cellbox directly may). iopub goes to every socket;
shell, control and stdin replies only to the socket whose request they answer. Frontend
messages reach the kernel through the sandbox's backend (its FIFO for ``execute_request``),
comm messages and buffers untouched. TCP_NODELAY is set on the socket. A client session that
drops (``?session_id=``, which JupyterLab keeps across reconnects and jupyter_server forwards)
keeps its subscription for ``PARK_SECONDS``, buffering up to ``PARK_MAX_MESSAGES``; reconnecting
with the same ``session_id`` delivers what it missed (Kernel Gateway does this without bounds).

Binary buffers (ipywidgets' Image, FileUpload, bqplot...) pass intact here, both ways, under
both protocols. **jupyter_server 2.21's gateway relay breaks them** (gateway/connections.py;
verified by tests/e2e/test_jupyter_server.py's strict xfails): a frame from the gateway is
decoded as UTF-8, so a buffer raises UnicodeDecodeError and that socket's read loop ends for
good (the browser hears nothing more from the kernel); a binary frame from the browser is sent
on as a *text* frame, which uvicorn refuses (invalid UTF-8), so jupyter_server reconnects and
the message is lost. The way around it: let the browser open its kernel websockets here
(``--ServerApp.websocket_url=ws://HOST:PORT``, Lab's token = the cellbox key, and
``{"appendToken": "true"}`` in ``labconfig/page_config.json``); REST still goes through
jupyter_server. ``WS /api/events/subscribe`` (jupyter_server's event bus, which Lab then opens
here too) is accepted and stays quiet.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from cellbox import __version__
from cellbox.aio import TaskSet, cancel_and_wait
from cellbox.api.errors import status_for
from cellbox.api.faces.jupyter.common import close_quietly, owner_of, set_nodelay
from cellbox.interpreter import errors as e
from cellbox.interpreter import messages as m
from cellbox.interpreter.config import Settings
from cellbox.interpreter.manager import SandboxManager
from cellbox.interpreter.models import ContextInfo, SandboxCreate, SandboxInfo, SandboxState
from cellbox.interpreter.sandbox import Sandbox
from cellbox.runtimes.base import SandboxBackend

log = logging.getLogger("cellbox.api.gateway")

__all__ = ["GATEWAY_META", "Gateway", "kernel_model"]

# sandbox metadata of the sandboxes this face creates: DELETE of their kernels destroys them
GATEWAY_META = "jupyter.gateway"
TIMEOUT_META = "jupyter.timeout"  # the lifetime asked for, renewed on activity
_ACTIVITY_REFRESH = 60.0  # at most one timeout refresh per kernel per this many seconds
_SENT_IDS_KEPT = 10_000  # per socket: request ids whose replies go to it
# A client session that drops keeps its subscription this long, buffering up to this many
# messages, for a reconnect with the same session_id (Kernel Gateway buffers without bound).
PARK_SECONDS = 120.0
PARK_MAX_MESSAGES = 10_000


def spec_name(language: str) -> str:
    """The kernelspec name of a context language (``python`` is Jupyter's ``python3``)."""
    return "python3" if language == "python" else language


def language_of(spec: str) -> str:
    return "python" if spec in ("python3", "python") else spec


def _display_name(language: str) -> str:
    return {"python": "Python 3 (cellbox)", "bash": "Bash (cellbox)"}.get(language, f"{language} (cellbox)")


def _timestamp(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def kernel_model(ctx: ContextInfo, last_activity: float, connections: int, sandbox_id: str) -> dict[str, Any]:
    """The kernel model jupyter_server reads (``gateway/managers.py: refresh_model``)."""
    model: dict[str, Any] = {
        "id": ctx.id,
        "name": spec_name(ctx.language),
        "last_activity": _timestamp(last_activity),
        "execution_state": ctx.state.value,
        "connections": connections,
        "cellbox": {"sandbox_id": sandbox_id},
    }
    if ctx.state.value == "dead" and ctx.last_exit is not None:
        model["reason"] = ctx.last_exit.reason
    return model


def _error(exc: e.InterpreterError) -> JSONResponse:
    """Errors as Jupyter servers render them (``{"message", "reason"}``), plus cellbox's code."""
    http_status, _ = status_for(exc)
    reason = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict"}.get(http_status, "Error")
    return JSONResponse({"message": exc.message, "reason": reason, "code": exc.code}, status_code=http_status)


def _backend(sbx: Sandbox) -> SandboxBackend:
    sbx.require_running()
    if sbx.backend is None:
        raise e.SandboxNotRunning(f"sandbox {sbx.id} has no live kernels")
    return sbx.backend


def _recorded(msg: m.KernelMessage) -> bool:
    """A frontend's cell (a non-silent shell execute_request) is recorded as an execution;
    silent ones (completers, variable inspectors) only pass through the FIFO."""
    content = msg.get("content") or {}
    return (
        msg.get("channel") == "shell"
        and m.msg_type(msg) == "execute_request"
        and not content.get("silent")
        and content.get("store_history", True) is not False
    )


class _Tap:
    """A kernel subscription whose reader may be cancelled without ending it (a parked
    session's drain and the next socket take turns reading it)."""

    def __init__(self, source: AsyncIterator[m.KernelMessage]) -> None:
        self._it = source.__aiter__()
        self._pending: asyncio.Future[m.KernelMessage] | None = None
        self._ended = False

    async def next(self) -> m.KernelMessage | None:
        """The next message; None once the subscription ended."""
        if self._ended:
            return None
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._it.__anext__())
        pending = self._pending
        try:
            # shielded: a cancelled reader leaves the pending read (and its result) to the next
            msg = await asyncio.shield(pending)
        except StopAsyncIteration:
            self._ended = True
            self._pending = None
            return None
        self._pending = None
        return msg

    async def aclose(self) -> None:
        self._ended = True
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await self._pending
            self._pending = None
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass
class _Link:
    """One client session's view of a kernel: its subscription, the ids of the requests it
    sent (their replies are its own), and what it has not been sent yet."""

    tap: _Tap
    mine: collections.OrderedDict[str, None] = field(default_factory=collections.OrderedDict)
    backlog: collections.deque[m.KernelMessage] = field(
        default_factory=lambda: collections.deque(maxlen=PARK_MAX_MESSAGES)
    )
    drain: asyncio.Task[None] | None = None
    dropped: int = 0


@dataclass
class _Kernel:
    """What this face keeps about one kernel it has seen (in memory; rebuilt on demand)."""

    owner: str
    sandbox_id: str
    last_activity: float
    sockets: set[WebSocket] = field(default_factory=set)
    refreshed_at: float = 0.0


class Gateway:
    """The face's handlers and its in-memory state (connections, activity)."""

    def __init__(self, manager_getter: Callable[[], SandboxManager], settings: Settings) -> None:
        self._manager_getter = manager_getter
        self.settings = settings
        self.kernels: dict[str, _Kernel] = {}
        self.parked: dict[tuple[str, str], _Link] = {}
        self._shut_down: set[WebSocket] = set()  # sockets closed by a kernel shutdown
        self.tasks = TaskSet("jupyter gateway")

    @property
    def manager(self) -> SandboxManager:
        return self._manager_getter()

    # -- finding kernels ------------------------------------------------------------------

    async def _sandboxes(self, owner: str, scope_id: str | None) -> list[SandboxInfo]:
        if scope_id is not None:
            return [await self.manager.info(owner, scope_id)]
        return list(await self.manager.list_sandboxes(owner, states=[SandboxState.RUNNING.value]))

    def _seen(self, kid: str, owner: str, sandbox_id: str, created_at: float) -> _Kernel:
        k = self.kernels.get(kid)
        if k is None or k.sandbox_id != sandbox_id:
            k = self.kernels[kid] = _Kernel(owner, sandbox_id, created_at)
        return k

    def _forget_others(self, owner: str, listed: set[str]) -> None:
        """After a full listing of ``owner``'s kernels: drop what is known of their kernels that
        are gone (and have no socket here), so this map does not grow with every sandbox ever seen."""
        for kid, k in list(self.kernels.items()):
            if k.owner == owner and kid not in listed and not k.sockets:
                del self.kernels[kid]

    async def find(self, owner: str, kid: str, scope_id: str | None) -> tuple[Sandbox, ContextInfo]:
        """The live sandbox and context of kernel ``kid``; NotFound otherwise."""
        known = self.kernels.get(kid)
        candidates: list[str] = []
        if scope_id is not None:
            candidates = [scope_id]
        elif known is not None:
            candidates = [known.sandbox_id]
        for sid in candidates:
            try:
                sbx = await self.manager.get(owner, sid)
                ctx = await sbx.contexts.get(kid)
            except e.NotFound:
                continue
            except e.SandboxNotRunning as exc:
                if scope_id is not None or exc.details.get("state") == SandboxState.PAUSED.value:
                    raise  # a paused sandbox's kernel exists: say so (409)
                # an ended sandbox's kernel is gone: 404, which jupyter_server reads as culled
                self.kernels.pop(kid, None)
                continue
            return sbx, ctx
        if scope_id is None:
            for info in await self._sandboxes(owner, None):
                if any(c.id == kid for c in info.contexts):
                    sbx = await self.manager.get(owner, info.id)
                    return sbx, await sbx.contexts.get(kid)
        raise e.ContextNotFound(f"Kernel does not exist: {kid}")

    def model(self, ctx: ContextInfo, sandbox: Sandbox) -> dict[str, Any]:
        k = self._seen(ctx.id, sandbox.owner, sandbox.id, sandbox.info_base.created_at)
        return kernel_model(ctx, k.last_activity, len(k.sockets), sandbox.id)

    # -- REST -------------------------------------------------------------------------------

    async def api(self, request: Request) -> Response:
        return JSONResponse({"version": __version__, "gateway": "cellbox"})

    def _kernelspecs(self, template_name: str) -> dict[str, Any]:
        template = self.manager.templates.get(template_name)
        specs = {}
        for language, kspec in template.kernels.items():
            name = spec_name(language)
            specs[name] = {
                "name": name,
                "spec": {
                    "argv": list(kspec.argv),
                    "display_name": _display_name(language),
                    "language": language,
                    "interrupt_mode": kspec.interrupt_mode,
                    "env": {},
                    "metadata": {"cellbox": {"template": template.name}},
                },
                "resources": {},
            }
        return {"default": "python3" if "python" in template.kernels else next(iter(specs), ""), "kernelspecs": specs}

    async def _template_for(self, owner: str, scope_id: str | None) -> str:
        if scope_id is not None:
            return str((await self.manager.info(owner, scope_id)).template)
        return "default"

    async def kernelspecs(self, request: Request) -> Response:
        try:
            owner = owner_of(request)
            scope_id = request.path_params.get("sandbox_id")
            specs = self._kernelspecs(await self._template_for(owner, scope_id))
            # jupyter_server with KERNEL_USERNAME set asks for one spec as
            # /api/kernelspecs?user=NAME/SPEC (the query joined before the path; reference §1.2)
            user = request.query_params.get("user", "")
            if "/" in user:
                name = user.rsplit("/", 1)[1]
                if name not in specs["kernelspecs"]:
                    raise e.NotFound(f"Kernel spec {name} not found")
                return JSONResponse(specs["kernelspecs"][name])
            return JSONResponse(specs)
        except e.InterpreterError as exc:
            return _error(exc)

    async def kernelspec(self, request: Request) -> Response:
        try:
            owner = owner_of(request)
            scope_id = request.path_params.get("sandbox_id")
            specs = self._kernelspecs(await self._template_for(owner, scope_id))["kernelspecs"]
            name = request.path_params["name"]
            if name not in specs:
                raise e.NotFound(f"Kernel spec {name} not found")
            return JSONResponse(specs[name])
        except e.InterpreterError as exc:
            return _error(exc)

    async def kernelspec_resource(self, request: Request) -> Response:
        return _error(e.NotFound("no kernelspec resources here"))

    async def list_kernels(self, request: Request) -> Response:
        try:
            owner = owner_of(request)
            scope_id = request.path_params.get("sandbox_id")
            out = []
            for info in await self._sandboxes(owner, scope_id):
                if info.state != SandboxState.RUNNING:
                    continue
                for ctx in info.contexts:
                    k = self._seen(ctx.id, owner, info.id, info.created_at)
                    out.append(kernel_model(ctx, k.last_activity, len(k.sockets), info.id))
            if scope_id is None:
                self._forget_others(owner, {model["id"] for model in out})
            return JSONResponse(out)
        except e.InterpreterError as exc:
            return _error(exc)

    async def start_kernel(self, request: Request) -> Response:
        try:
            owner = owner_of(request)
            scope_id = request.path_params.get("sandbox_id")
            try:
                body = await request.json() if await request.body() else {}
            except ValueError:
                raise e.InvalidRequest("the body must be JSON") from None
            if not isinstance(body, dict):
                raise e.InvalidRequest("the body must be a JSON object")
            adopt = body.get("kernel_id")
            if isinstance(adopt, str) and adopt:
                sbx, ctx = await self.find(owner, adopt, scope_id)
                return JSONResponse(self.model(ctx, sbx), status_code=201)
            language = language_of(str(body.get("name") or "python3"))
            raw_env = body.get("env")
            env: dict[str, Any] = raw_env if isinstance(raw_env, dict) else {}
            if scope_id is not None:
                sbx = await self.manager.get(owner, scope_id)
                ctx = await self._context_of(sbx, language)
            else:
                sbx, ctx = await self._new_sandbox(owner, language, env)
            return JSONResponse(self.model(ctx, sbx), status_code=201)
        except e.InterpreterError as exc:
            return _error(exc)

    async def _context_of(self, sbx: Sandbox, language: str) -> ContextInfo:
        for ctx in await sbx.contexts.list():
            if ctx.language == language:
                return ctx
        return await sbx.contexts.create(language)

    def _timeout_from(self, env: dict[str, Any]) -> float:
        maximum = float(self.settings.max_sandbox_timeout)
        raw = env.get("KERNEL_CELLBOX_TIMEOUT")
        if raw is None:
            return maximum
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise e.InvalidRequest(f"KERNEL_CELLBOX_TIMEOUT must be seconds, got {raw!r}") from None
        if not 0 < value <= maximum:
            raise e.InvalidRequest(f"KERNEL_CELLBOX_TIMEOUT must be in (0, {maximum:g}]")
        return value

    async def _new_sandbox(self, owner: str, language: str, env: dict[str, Any]) -> tuple[Sandbox, ContextInfo]:
        timeout = self._timeout_from(env)
        template = str(env.get("KERNEL_CELLBOX_TEMPLATE") or "default")
        template_info = self.manager.templates.get(template)
        if language not in template_info.kernels:
            raise e.NotFound(f"No such kernel: {spec_name(language)}")
        metadata = {GATEWAY_META: "kernel", TIMEOUT_META: f"{timeout:g}"}
        info = await self.manager.create(owner, SandboxCreate(template=template, timeout=timeout, metadata=metadata))
        try:
            sbx = await self.manager.get(owner, info.id)
            ctx = await self._context_of(sbx, language)
        except BaseException:
            await self.manager.delete(owner, info.id)
            raise
        self._seen(ctx.id, owner, sbx.id, time.time()).refreshed_at = time.monotonic()
        return sbx, ctx

    @staticmethod
    def _made_here(sbx: Sandbox) -> bool:
        return bool(sbx.info_base.metadata.get(GATEWAY_META) == "kernel")

    async def get_kernel(self, request: Request) -> Response:
        try:
            owner = owner_of(request)
            sbx, ctx = await self.find(owner, request.path_params["kernel_id"], request.path_params.get("sandbox_id"))
            return JSONResponse(self.model(ctx, sbx))
        except e.InterpreterError as exc:
            return _error(exc)

    async def delete_kernel(self, request: Request) -> Response:
        try:
            owner = owner_of(request)
            kid = request.path_params["kernel_id"]
            scope_id = request.path_params.get("sandbox_id")
            sbx, _ = await self.find(owner, kid, scope_id)
            await self._close_sockets(kid)
            if scope_id is None and self._made_here(sbx):
                await self.manager.delete(owner, sbx.id)
                self.kernels.pop(kid, None)
            else:
                log.info("detached from kernel %s of sandbox %s (not created by the gateway)", kid, sbx.id)
            return Response(status_code=204)
        except e.InterpreterError as exc:
            return _error(exc)

    async def interrupt_kernel(self, request: Request) -> Response:
        try:
            owner = owner_of(request)
            kid = request.path_params["kernel_id"]
            sbx, _ = await self.find(owner, kid, request.path_params.get("sandbox_id"))
            await sbx.contexts.interrupt(kid)
            self._touch(kid)
            return Response(status_code=204)
        except e.InterpreterError as exc:
            return _error(exc)

    async def restart_kernel(self, request: Request) -> Response:
        try:
            owner = owner_of(request)
            kid = request.path_params["kernel_id"]
            sbx, _ = await self.find(owner, kid, request.path_params.get("sandbox_id"))
            ctx = await sbx.contexts.restart(kid)
            self._touch(kid)
            return JSONResponse(self.model(ctx, sbx))
        except e.InterpreterError as exc:
            return _error(exc)

    # -- activity -----------------------------------------------------------------------------

    def _touch(self, kid: str) -> None:
        k = self.kernels.get(kid)
        if k is not None:
            k.last_activity = time.time()

    def _refresh_timeout(self, owner: str, sbx: Sandbox, kid: str) -> None:
        """Push the expiry of a gateway-made sandbox forward on activity (throttled)."""
        k = self.kernels.get(kid)
        if k is None or not self._made_here(sbx):
            return
        now = time.monotonic()
        if now - k.refreshed_at < _ACTIVITY_REFRESH:
            return
        k.refreshed_at = now
        try:
            seconds = float(sbx.info_base.metadata.get(TIMEOUT_META) or self.settings.max_sandbox_timeout)
        except ValueError:
            seconds = float(self.settings.max_sandbox_timeout)
        self.tasks.spawn(self.manager.set_timeout(owner, sbx.id, seconds), name=f"gateway-refresh-{sbx.id}")

    async def _close_sockets(self, kid: str) -> None:
        k = self.kernels.get(kid)
        for ws in list(k.sockets if k else ()):
            self._shut_down.add(ws)
            await close_quietly(ws, 1000, "kernel shut down by a client")
        for key in [key for key in self.parked if key[0] == kid]:
            link = self.parked.pop(key)
            await cancel_and_wait(link.drain)
            await link.tap.aclose()

    # -- channels -------------------------------------------------------------------------------

    async def events(self, websocket: WebSocket) -> None:
        """``WS /api/events/subscribe``: jupyter_server's event bus, which JupyterLab opens on its
        ``wsUrl`` too. A frontend whose websockets come straight here (``--ServerApp.websocket_url``)
        gets a socket that stays open and quiet instead of a refused handshake retried forever:
        cellbox publishes no jupyter_server events."""
        try:
            owner_of(websocket)
        except e.InterpreterError as exc:
            _, code = status_for(exc)
            await websocket.accept()
            await close_quietly(websocket, code, exc.message)
            return
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass

    async def channels(self, websocket: WebSocket) -> None:
        kid = websocket.path_params["kernel_id"]
        try:
            owner = owner_of(websocket)
            sbx, ctx = await self.find(owner, kid, websocket.path_params.get("sandbox_id"))
            backend = _backend(sbx)
        except e.InterpreterError as exc:
            # accepted, then closed with the table's code and the reason (a refused handshake
            # would only say 403)
            _, code = status_for(exc)
            await websocket.accept()
            await close_quietly(websocket, code, exc.message)
            return
        protocol = m.select_subprotocol(websocket.scope.get("subprotocols") or [])
        session_id = websocket.query_params.get("session_id") or ""
        key = (kid, session_id)
        link = self.parked.pop(key, None) if session_id else None
        if link is not None:
            # the same client session again: take over its subscription and what it missed
            await cancel_and_wait(link.drain)
            link.drain = None
        else:
            # subscribe before accepting: nothing the kernel answers can be missed
            link = _Link(_Tap(backend.subscribe(kid)))
        await websocket.accept(subprotocol=protocol or None)
        set_nodelay(websocket)
        k = self._seen(kid, owner, sbx.id, time.time())
        k.sockets.add(websocket)
        relay = asyncio.create_task(self._to_client(websocket, link, protocol, kid), name=f"gateway-out-{kid}")
        client_left = False
        try:
            client_left = await self._from_client(websocket, owner, sbx, kid, protocol, link, relay)
        finally:
            await cancel_and_wait(relay)
            shut_down = websocket in self._shut_down
            self._shut_down.discard(websocket)
            if session_id and client_left and not shut_down:
                self._park(key, link)
            else:
                await link.tap.aclose()
            # counted as connected until parked: a client that saw connections drop to 0 may
            # reconnect and find its session's backlog
            k.sockets.discard(websocket)
            await close_quietly(websocket)

    def _park(self, key: tuple[str, str], link: _Link) -> None:
        """Keep a departed client session's subscription for a while, buffering what the kernel
        says, so a reconnect with the same ``session_id`` (JupyterLab's) gets what it missed."""

        async def drain() -> None:
            try:
                async with asyncio.timeout(PARK_SECONDS):
                    while (msg := await link.tap.next()) is not None:
                        if len(link.backlog) == link.backlog.maxlen:
                            link.dropped += 1
                        link.backlog.append(msg)
            except TimeoutError:
                pass
            finally:
                if self.parked.get(key) is link:  # nobody came back for it
                    del self.parked[key]
                    if link.dropped:
                        log.info("kernel %s: dropped %d messages for session %s", key[0], link.dropped, key[1])
                    await link.tap.aclose()

        previous = self.parked.pop(key, None)
        if previous is not None and previous is not link:
            self.tasks.spawn(previous.tap.aclose(), name="gateway-unpark")
        self.parked[key] = link
        link.drain = self.tasks.spawn(drain(), name=f"gateway-park-{key[0]}")

    async def _from_client(
        self,
        websocket: WebSocket,
        owner: str,
        sbx: Sandbox,
        kid: str,
        protocol: m.WsProtocol,
        link: _Link,
        relay: asyncio.Task[bool],
    ) -> bool:
        """Relay client frames to the kernel; True when the client left, False when the
        kernel's stream ended (context removed, sandbox closed)."""
        receive = asyncio.ensure_future(websocket.receive())
        try:
            while True:
                done, _ = await asyncio.wait({receive, relay}, return_when=asyncio.FIRST_COMPLETED)
                if relay in done:
                    return not relay.result()  # the kernel's stream ended, or sending failed
                message = receive.result()
                if message["type"] == "websocket.disconnect":
                    return True
                receive = asyncio.ensure_future(websocket.receive())
                data = message.get("text")
                if data is None:
                    data = message.get("bytes") or b""
                try:
                    msg = m.decode_ws_frame(data, protocol)
                except ValueError as exc:
                    log.warning("kernel %s: dropped a malformed frame from a client: %s", kid, exc)
                    continue
                msg_id = msg["header"].get("msg_id")
                if msg_id:
                    link.mine[msg_id] = None
                    while len(link.mine) > _SENT_IDS_KEPT:
                        link.mine.popitem(last=False)
                self._touch(kid)
                self._refresh_timeout(owner, sbx, kid)
                try:
                    if _recorded(msg):
                        # A cell: into the sandbox's execution log and artifacts like any other.
                        await sbx.executions.start_message(kid, msg)
                    else:
                        await _backend(sbx).send_message(kid, msg)
                except e.InterpreterError as exc:
                    log.warning("kernel %s: could not deliver %s: %s", kid, m.msg_type(msg), exc.message)
        except WebSocketDisconnect:
            return True
        finally:
            receive.cancel()

    @staticmethod
    def _for_this_socket(msg: m.KernelMessage, mine: collections.OrderedDict[str, None]) -> bool:
        """iopub is for everyone; shell, control and stdin messages only for the socket whose
        request they answer."""
        channel = msg.get("channel")
        if channel == "iopub":
            return True
        parent = m.parent_msg_id(msg)
        if parent is None or parent not in mine:
            return False
        if channel in ("shell", "control") and m.msg_type(msg).endswith("_reply"):
            mine.pop(parent, None)
        return True

    async def _to_client(self, websocket: WebSocket, link: _Link, protocol: m.WsProtocol, kid: str) -> bool:
        """Relay the kernel's messages for this socket; True when the kernel's stream ended,
        False when the client could not be sent to (it left)."""
        while True:
            if link.backlog:
                msg = link.backlog.popleft()
            else:
                got = await link.tap.next()
                if got is None:
                    return True
                msg = got
            if not self._for_this_socket(msg, link.mine):
                continue
            self._touch(kid)
            frame = m.encode_ws_frame(msg, protocol)
            try:
                if isinstance(frame, str):
                    await websocket.send_text(frame)
                else:
                    await websocket.send_bytes(frame)
            except (WebSocketDisconnect, RuntimeError):
                link.backlog.appendleft(msg)  # not delivered: a reconnect gets it
                return False
            except asyncio.CancelledError:
                link.backlog.appendleft(msg)
                raise
