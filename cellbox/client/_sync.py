"""The blocking client: :class:`Sandbox`.

All requests are built and parsed by :class:`~._base.SandboxBase`; this module only sends
them with an ``httpx.Client`` and calls the ``run_code`` callbacks.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Generator, Iterable, Iterator, Mapping
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
Options = ConnectionOptions[httpx.BaseTransport]


def _send(http: httpx.Client, call: Call[T]) -> T:
    return call.parse(http.request(**call.options()))


class Sandbox(SandboxBase[httpx.Client]):
    """A sandbox on a cellbox service, driven with blocking calls.

    Get one with :meth:`create` or :meth:`connect`; ``with Sandbox.create() as sbx:`` kills it
    on exit. Each object owns one ``httpx.Client`` (connection pool), released by
    :meth:`close` or the ``with`` block. Errors the service reports are raised as the
    :mod:`cellbox.interpreter.errors` class the body names (``SandboxNotFound``, ...).
    """

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
    ) -> Sandbox:
        """Start a sandbox and return once its default python context is ready.

        ``timeout`` is the sandbox's lifetime in seconds (server default when ``None``);
        ``limits`` and ``network`` take :class:`Limits` / :class:`NetworkSpec` or their dicts.
        ``options`` say how to reach the service: ``base_url``, ``api_key``,
        ``request_timeout``, ``transport`` (see :class:`~._base.ConnectionOptions`).
        Raises ``TemplateNotFound``, ``SandboxLimitReached``, ``ServiceAtCapacity``, ...
        """
        return cls._open(options, cls._create_call(template, timeout, envs, metadata, limits, network))

    @classmethod
    def connect(cls, sandbox_id: str, **options: Unpack[Options]) -> Sandbox:
        """Attach to an existing sandbox; raises ``SandboxNotFound`` if this key cannot see it."""
        return cls._open(options, cls._connect_call(sandbox_id))

    @classmethod
    def list(
        cls,
        state: str | models.SandboxState | Iterable[str | models.SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
        **options: Unpack[Options],
    ) -> builtins.list[models.SandboxInfo]:
        """The sandboxes of this API key, filtered by state(s) and by metadata (all pairs must match)."""
        with httpx.Client(**ConnectionConfig.resolve(options).client_options(httpx.HTTPTransport)) as http:
            return _send(http, cls._list_call(state, metadata))

    @classmethod
    def _open(cls, options: Options, call: Call[models.SandboxInfo]) -> Sandbox:
        config = ConnectionConfig.resolve(options)
        http = httpx.Client(**config.client_options(httpx.HTTPTransport))
        try:
            info = _send(http, call)
        except BaseException:
            http.close()
            raise
        return cls(info.id, http=http, config=config)

    def get_info(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.SandboxInfo:
        """The sandbox's current state, limits, contexts and expiry (``end_at``)."""
        return _send(self._http, self._info_call(request_timeout))

    def set_timeout(
        self, seconds: float, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.SandboxInfo:
        """Make the sandbox expire ``seconds`` from now; returns the updated info."""
        return _send(self._http, self._set_timeout_call(seconds, request_timeout))

    def kill(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Kill the sandbox; ``False`` if it was already gone. Idempotent. Does not :meth:`close`."""
        return _send(self._http, self._kill_call(request_timeout))

    def is_running(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Whether the sandbox exists and is in the ``running`` state."""
        return _send(self._http, self._is_running_call(request_timeout))

    def close(self) -> None:
        """Release the HTTP connections; the sandbox itself keeps running. Idempotent."""
        self._http.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.kill()
        finally:
            self.close()

    # -- code ---------------------------------------------------------------------------------

    def run_code(
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
        """Run ``code`` in a context and return everything it produced.

        ``context`` (a :class:`Context` or its id) or ``language`` picks the kernel; neither
        means the sandbox's python context. Output streams as it happens: ``on_stdout`` /
        ``on_stderr`` get each text chunk, ``on_result`` each :class:`Result`, ``on_error`` the
        :class:`ExecutionError`, ``on_event`` every event (keepalives too), in arrival order,
        ``on_event`` first. ``timeout`` (seconds) is the execution's limit on the server; the
        status is then ``timeout``. ``inline`` keeps images base64 in ``Result.data``.
        ``interrupt_on_disconnect`` interrupts the kernel if this call goes away.

        An error in the code is not raised: it is in ``Execution.error`` (status ``error``).
        Raises the error the service reports (``SandboxNotRunning``, ``ContextNotFound``, ...)
        and :class:`ExecutionIncomplete` if the stream broke before the execution's end.
        """
        callbacks = Callbacks(on_stdout, on_stderr, on_result, on_error, on_event)
        call, builder = self._execute_call(
            code, context, language, envs, timeout, inline, interrupt_on_disconnect, callbacks
        )
        with contextlib.closing(self._stream(call, builder)) as steps:
            for calls in steps:
                for callback, arg in calls:
                    callback(arg)
        return builder.finish()

    def get_execution(
        self, execution_id: str, after: int = -1, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Execution:
        """Rebuild an execution from its stored events (those with ``seq > after``), also while it runs."""
        return _send(self._http, self._get_execution_call(execution_id, after, request_timeout))

    def stream_execution(self, execution_id: str, after: int = -1) -> Iterator[models.Event]:
        """Yield an execution's events with ``seq > after``, then the live ones until ``end``.

        Keepalives are not yielded. Raises :class:`ExecutionIncomplete` if the stream breaks first.
        """
        call, builder = self._follow_call(execution_id, after)
        with contextlib.closing(self._stream(call, builder)) as steps:
            for _ in steps:
                if builder.last_event is not None and builder.last_event.type != "keepalive":
                    yield builder.last_event
        builder.finish()

    def _stream(self, call: Call[None], builder: ExecutionBuilder) -> Generator[builtins.list[PendingCall], None, None]:
        """Feed the NDJSON lines of ``call`` to ``builder``; yield the callbacks due after each, until ``end``."""
        with self._http.stream(**call.options()) as response:
            if response.is_error:
                response.read()
            call.parse(response)
            try:
                for line in response.iter_lines():
                    yield builder.feed(line)
                    if builder.done:
                        return
            except httpx.TransportError as exc:
                raise builder.incomplete(exc) from exc

    # -- contexts -----------------------------------------------------------------------------

    def create_code_context(
        self, language: str = "python", cwd: str | None = None, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Start another kernel (``python``, ``bash``, ...) in the sandbox; it shares the filesystem."""
        return _send(self._http, self._create_context_call(language, cwd, request_timeout))

    def list_code_contexts(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> builtins.list[Context]:
        """The sandbox's contexts."""
        return _send(self._http, self._list_contexts_call(request_timeout))

    def restart_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Restart the context's kernel: same id, variables gone."""
        return _send(self._http, self._context_action_call(context, "restart", request_timeout))

    def interrupt_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Interrupt what the context is running (a ``KeyboardInterrupt`` in the code)."""
        return _send(self._http, self._context_action_call(context, "interrupt", request_timeout))

    def remove_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Stop the context's kernel and forget it."""
        _send(self._http, self._remove_context_call(context, request_timeout))

    # -- artifacts ----------------------------------------------------------------------------

    def download_artifact(
        self, artifact: ArtifactLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> bytes:
        """The bytes of an artifact, given its ref (``Result.artifacts[i]``), info, id or URL."""
        return _send(self._http, self._download_call(artifact, request_timeout))

    def list_artifacts(
        self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[models.ArtifactInfo]:
        """Every artifact the sandbox's executions produced."""
        return _send(self._http, self._list_artifacts_call(request_timeout))
