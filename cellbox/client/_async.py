"""The asyncio client: :class:`AsyncSandbox`, the twin of :class:`~._sync.Sandbox`.

Same requests, same parsing (:class:`~._base.SandboxBase`), same results; only the I/O is
``httpx.AsyncClient``, and ``run_code`` callbacks may be coroutine functions (awaited in
order) as well as plain functions. Each method's contract is documented on the sync twin.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Generator, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx

from cellbox.interpreter import models

from ._base import (
    USE_CLIENT_DEFAULT,
    ArtifactLike,
    Call,
    ConnectionConfig,
    ConnectionOptions,
    ContextLike,
    RequestTimeout,
    SandboxBase,
)
from ._models import Callback, Callbacks, Context, Execution, ExecutionBuilder, PendingCall

T = TypeVar("T")
Options = ConnectionOptions[httpx.AsyncBaseTransport]


async def _send(http: httpx.AsyncClient, call: Call[T]) -> T:
    return call.parse(await http.request(**call.options()))


class _Opening:
    """What :meth:`AsyncSandbox.create` / ``connect`` return: ``await`` it, or ``async with`` it.

    ``async with AsyncSandbox.create() as sbx:`` kills the sandbox on exit, like the sync
    ``with Sandbox.create() as sbx:``.
    """

    def __init__(self, opening: Coroutine[Any, Any, AsyncSandbox]) -> None:
        self._opening = opening
        self._sandbox: AsyncSandbox | None = None

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._opening.__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sandbox = await self._opening
        return self._sandbox

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._sandbox is not None
        await self._sandbox.__aexit__(exc_type, exc, tb)


class AsyncSandbox(SandboxBase[httpx.AsyncClient]):
    """A sandbox on a cellbox service, driven with ``await``; see :class:`Sandbox` for the contracts."""

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        template: str = "default",
        timeout: float | None = None,
        envs: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        limits: models.Limits | Mapping[str, Any] | None = None,
        network: models.NetworkSpec | Mapping[str, Any] | None = None,
        **options: Unpack[Options],
    ) -> _Opening:
        """Start a sandbox: ``sbx = await AsyncSandbox.create()`` or ``async with AsyncSandbox.create() as sbx``."""
        call = cls._create_call(template, timeout, envs, metadata, limits, network)
        return _Opening(cls._open(options, call))

    @classmethod
    def connect(cls, sandbox_id: str, **options: Unpack[Options]) -> _Opening:
        """Attach to an existing sandbox (``await`` or ``async with``, as :meth:`create`)."""
        return _Opening(cls._open(options, cls._connect_call(sandbox_id)))

    @classmethod
    async def list(
        cls,
        state: str | models.SandboxState | Iterable[str | models.SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
        **options: Unpack[Options],
    ) -> builtins.list[models.SandboxInfo]:
        """Async :meth:`Sandbox.list`."""
        async with httpx.AsyncClient(**ConnectionConfig.resolve(options).client_options(httpx.AsyncHTTPTransport)) as http:
            return await _send(http, cls._list_call(state, metadata))

    @classmethod
    async def _open(cls, options: Options, call: Call[models.SandboxInfo]) -> AsyncSandbox:
        config = ConnectionConfig.resolve(options)
        http = httpx.AsyncClient(**config.client_options(httpx.AsyncHTTPTransport))
        try:
            info = await _send(http, call)
        except BaseException:
            await http.aclose()
            raise
        return cls(info.id, http=http, config=config)

    async def get_info(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.SandboxInfo:
        """Async :meth:`Sandbox.get_info`."""
        return await _send(self._http, self._info_call(request_timeout))

    async def set_timeout(
        self, seconds: float, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.SandboxInfo:
        """Async :meth:`Sandbox.set_timeout`."""
        return await _send(self._http, self._set_timeout_call(seconds, request_timeout))

    async def kill(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Async :meth:`Sandbox.kill`."""
        return await _send(self._http, self._kill_call(request_timeout))

    async def is_running(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Async :meth:`Sandbox.is_running`."""
        return await _send(self._http, self._is_running_call(request_timeout))

    async def close(self) -> None:
        """Async :meth:`Sandbox.close`."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.kill()
        finally:
            await self.close()

    # -- code ---------------------------------------------------------------------------------

    async def run_code(
        self,
        code: str,
        *,
        context: ContextLike | None = None,
        language: str | None = None,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        on_result: Callback | None = None,
        on_error: Callback | None = None,
        on_event: Callback | None = None,
        envs: Mapping[str, str] | None = None,
        timeout: float | None = None,
        inline: bool = False,
        interrupt_on_disconnect: bool = False,
    ) -> Execution:
        """Async :meth:`Sandbox.run_code`; a callback's awaitable result is awaited before the next one runs."""
        callbacks = Callbacks(on_stdout, on_stderr, on_result, on_error, on_event)
        call, builder = self._execute_call(
            code, context, language, envs, timeout, inline, interrupt_on_disconnect, callbacks
        )
        async with contextlib.aclosing(self._stream(call, builder)) as steps:
            async for calls in steps:
                for callback, arg in calls:
                    if inspect.isawaitable(returned := callback(arg)):
                        await returned
        return builder.finish()

    async def get_execution(
        self, execution_id: str, after: int = -1, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Execution:
        """Async :meth:`Sandbox.get_execution`."""
        return await _send(self._http, self._get_execution_call(execution_id, after, request_timeout))

    async def stream_execution(self, execution_id: str, after: int = -1) -> AsyncIterator[models.Event]:
        """Async :meth:`Sandbox.stream_execution` (``async for event in sbx.stream_execution(eid)``)."""
        call, builder = self._follow_call(execution_id, after)
        async with contextlib.aclosing(self._stream(call, builder)) as steps:
            async for _ in steps:
                if builder.last_event is not None and builder.last_event.type != "keepalive":
                    yield builder.last_event
        builder.finish()

    async def _stream(
        self, call: Call[None], builder: ExecutionBuilder
    ) -> AsyncGenerator[builtins.list[PendingCall], None]:
        """Feed the NDJSON lines of ``call`` to ``builder``; yield the callbacks due after each, until ``end``."""
        async with self._http.stream(**call.options()) as response:
            if response.is_error:
                await response.aread()
            call.parse(response)
            try:
                async for line in response.aiter_lines():
                    yield builder.feed(line)
                    if builder.done:
                        return
            except httpx.TransportError as exc:
                raise builder.incomplete(exc) from exc

    # -- contexts -----------------------------------------------------------------------------

    async def create_code_context(
        self, language: str = "python", cwd: str | None = None, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Async :meth:`Sandbox.create_code_context`."""
        return await _send(self._http, self._create_context_call(language, cwd, request_timeout))

    async def list_code_contexts(
        self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[Context]:
        """Async :meth:`Sandbox.list_code_contexts`."""
        return await _send(self._http, self._list_contexts_call(request_timeout))

    async def restart_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Async :meth:`Sandbox.restart_code_context`."""
        return await _send(self._http, self._context_action_call(context, "restart", request_timeout))

    async def interrupt_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Async :meth:`Sandbox.interrupt_code_context`."""
        return await _send(self._http, self._context_action_call(context, "interrupt", request_timeout))

    async def remove_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Async :meth:`Sandbox.remove_code_context`."""
        await _send(self._http, self._remove_context_call(context, request_timeout))

    # -- artifacts ----------------------------------------------------------------------------

    async def download_artifact(
        self, artifact: ArtifactLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> bytes:
        """Async :meth:`Sandbox.download_artifact`."""
        return await _send(self._http, self._download_call(artifact, request_timeout))

    async def list_artifacts(
        self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[models.ArtifactInfo]:
        """Async :meth:`Sandbox.list_artifacts`."""
        return await _send(self._http, self._list_artifacts_call(request_timeout))
