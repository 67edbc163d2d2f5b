"""The half of the SDK that does no I/O, shared by :class:`Sandbox` and :class:`AsyncSandbox`.

Every API call is described once, here, as a :class:`Call`: the request to make and the
function that turns the response into a value or raises the error its body names
(:func:`raise_for_error`). The two clients only send calls (``httpx.Client`` or
``httpx.AsyncClient``) and feed streamed lines to an :class:`~._models.ExecutionBuilder`, the
way httpx's ``Client`` and ``AsyncClient`` share ``BaseClient``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata as _metadata
from typing import Any, Generic, TypedDict, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from cellbox.interpreter import errors, models

from ._models import Callbacks, Context, Execution, ExecutionBuilder, execution_from_record, validated

T = TypeVar("T")

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_REQUEST_TIMEOUT = 60.0
# A streamed execution with a ``timeout`` gets a read timeout this much longer: the server
# needs the timeout itself, then up to its interrupt grace (5 s) to stop the kernel and send
# `end`, and it sends keepalives only every few seconds meanwhile.
STREAM_READ_GRACE = 15.0


class UseClientDefault:
    """The type of :data:`USE_CLIENT_DEFAULT`.

    A per-call ``request_timeout`` left at this value means "the timeout the sandbox was
    created or connected with"; ``None`` means "no timeout" (as in httpx).
    """

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT = UseClientDefault()

RequestTimeout = float | None | UseClientDefault
ArtifactLike = models.ArtifactRef | models.ArtifactInfo | str
ContextLike = Context | str

try:
    _VERSION = _metadata.version("cellbox")
except _metadata.PackageNotFoundError:  # running from a source checkout
    _VERSION = "0+unknown"


TransportT = TypeVar("TransportT")


class ConnectionOptions(TypedDict, Generic[TransportT], total=False):
    """The keyword arguments of ``create``, ``connect`` and ``list``: how to reach the service.

    * ``base_url``: default ``$CELLBOX_URL``, then ``http://127.0.0.1:8080``.
    * ``api_key``: default ``$CELLBOX_API_KEY``; sent as ``Authorization: Bearer <key>``.
    * ``request_timeout``: seconds a non-streaming call may take, and the connect timeout of
      streams (default 60; ``None``: no limit). Methods take a per-call ``request_timeout``.
    * ``transport``: an httpx transport to use instead of the network (tests, custom proxies).
    """

    base_url: str | None
    api_key: str | None
    request_timeout: float | None
    transport: TransportT | None


_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass(frozen=True)
class ConnectionConfig:
    """Where the service is and how to talk to it; resolved once per sandbox object."""

    base_url: str
    api_key: str | None = field(repr=False)
    request_timeout: float | None
    transport: Any = None

    @classmethod
    def resolve(cls, options: ConnectionOptions[Any]) -> ConnectionConfig:
        """Arguments first, then ``CELLBOX_URL`` / ``CELLBOX_API_KEY``, then the defaults."""
        url = options.get("base_url") or os.environ.get("CELLBOX_URL") or DEFAULT_BASE_URL
        key = options.get("api_key")
        key = key if key is not None else os.environ.get("CELLBOX_API_KEY") or None
        timeout = options.get("request_timeout", DEFAULT_REQUEST_TIMEOUT)
        return cls(url.rstrip("/"), key, timeout, options.get("transport"))

    def client_options(self, transport_cls: Callable[..., Any]) -> dict[str, Any]:
        """Keyword arguments for ``httpx.Client`` / ``httpx.AsyncClient``; ``transport_cls`` is
        ``httpx.HTTPTransport`` or ``httpx.AsyncHTTPTransport``."""
        headers = {"User-Agent": f"cellbox-python/{_VERSION}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {
            "base_url": self.base_url,
            "headers": headers,
            "timeout": self.request_timeout,
            # TCP_NODELAY: h11 writes headers and body separately, and with Nagle on, the body
            # waits for the server's delayed ACK: +40 ms on every small request (measured).
            "transport": self.transport or transport_cls(socket_options=_NODELAY),
        }

    def same_origin(self, url: str) -> bool:
        """Whether ``url`` is on the service's own scheme, host and port (so it may get the API key)."""
        ours, theirs = httpx.URL(self.base_url), httpx.URL(url)
        return (theirs.scheme, theirs.host, theirs.port) == (ours.scheme, ours.host, ours.port)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request and how to read its response.

    ``parse`` raises the error an error response names; for a stream it is called once the
    head (and, for an error, the body) arrived, and returns ``None``.
    """

    method: str
    url: str
    parse: Callable[[httpx.Response], T]
    params: list[tuple[str, str]] | None = None
    json: Any = None
    timeout: httpx.Timeout | RequestTimeout = USE_CLIENT_DEFAULT

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``request()`` / ``stream()`` of either httpx client."""
        timeout = httpx.USE_CLIENT_DEFAULT if isinstance(self.timeout, UseClientDefault) else self.timeout
        return {"method": self.method, "url": self.url, "params": self.params, "json": self.json, "timeout": timeout}


# Used when an error body carries no code this SDK knows (a proxy's HTML page, an older server).
_STATUS_ERRORS: dict[int, type[errors.InterpreterError]] = {
    400: errors.InvalidRequest,
    401: errors.Unauthorized,
    403: errors.Unauthorized,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.RequestTooLarge,
    422: errors.InvalidRequest,
    429: errors.SandboxLimitReached,
    503: errors.ServiceAtCapacity,
}


def raise_for_error(response: httpx.Response) -> None:
    """Raise the :mod:`~cellbox.interpreter.errors` exception an error response describes.

    The body must have been read. A body without a known ``error.code`` gives the class of
    its HTTP status, else :class:`~cellbox.interpreter.errors.InterpreterError`.
    """
    if not response.is_error:
        return
    try:
        payload = response.json()
    except ValueError:
        payload = None
    fallback = f"HTTP {response.status_code} {response.reason_phrase}: {response.text[:500]}".rstrip(": ")
    error = errors.from_payload(payload, fallback_message=fallback)
    if type(error) is errors.InterpreterError and response.status_code in _STATUS_ERRORS:
        error = _STATUS_ERRORS[response.status_code](error.message, **error.details)
    raise error


def _model(model: type[pydantic.BaseModel]) -> Callable[[httpx.Response], Any]:
    def parse(response: httpx.Response) -> Any:
        raise_for_error(response)
        return model.model_validate_json(response.content)

    return parse


def _nothing(response: httpx.Response) -> None:
    raise_for_error(response)


def _content(response: httpx.Response) -> bytes:
    raise_for_error(response)
    return response.content


def _false_if_missing(parse: Callable[[httpx.Response], bool]) -> Callable[[httpx.Response], bool]:
    def wrapped(response: httpx.Response) -> bool:
        return False if response.status_code == 404 else parse(response)

    return wrapped


def _context_id(context: ContextLike) -> str:
    return context if isinstance(context, str) else context.id


HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)


class SandboxBase(Generic[HttpT]):
    """State and request building shared by both clients; the subclasses only send."""

    def __init__(self, sandbox_id: str, *, http: HttpT, config: ConnectionConfig) -> None:
        """Wrap a client the object then owns; use ``create`` or ``connect`` instead."""
        self._sandbox_id = sandbox_id
        self._http: HttpT = http
        self._config = config

    @property
    def sandbox_id(self) -> str:
        """The sandbox's id (``connect`` takes it)."""
        return self._sandbox_id

    @property
    def base_url(self) -> str:
        """The service this sandbox lives on."""
        return self._config.base_url

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sandbox_id={self._sandbox_id!r}, base_url={self._config.base_url!r})"

    def _path(self, *parts: str) -> str:
        return "/v1/sandboxes/" + "/".join(quote(p, safe="") for p in (self._sandbox_id, *parts))

    # -- sandboxes ----------------------------------------------------------------------------

    @staticmethod
    def _create_call(
        template: str,
        timeout: float | None,
        envs: Mapping[str, str] | None,
        metadata: Mapping[str, str] | None,
        limits: models.Limits | Mapping[str, Any] | None,
        network: models.NetworkSpec | Mapping[str, Any] | None,
    ) -> Call[models.SandboxInfo]:
        body = validated(
            models.SandboxCreate,
            template=template,
            timeout=timeout,
            envs=dict(envs or {}),
            metadata=dict(metadata or {}),
            limits=limits or models.Limits(),
            network=network or models.NetworkSpec(),
        )
        return Call("POST", "/v1/sandboxes", _model(models.SandboxInfo), json=body)

    @staticmethod
    def _connect_call(sandbox_id: str) -> Call[models.SandboxInfo]:
        return Call("GET", f"/v1/sandboxes/{quote(sandbox_id, safe='')}", _model(models.SandboxInfo))

    @staticmethod
    def _list_call(
        state: str | models.SandboxState | Iterable[str | models.SandboxState] | None,
        metadata: Mapping[str, str] | None,
    ) -> Call[list[models.SandboxInfo]]:
        states = [state] if isinstance(state, str) else list(state or [])
        params = [("state", models.SandboxState(s).value) for s in states]
        params += [("metadata", f"{k}={v}") for k, v in (metadata or {}).items()]
        parse = _model(models.SandboxList)
        return Call("GET", "/v1/sandboxes", lambda r: parse(r).sandboxes, params=params)

    def _info_call(self, request_timeout: RequestTimeout) -> Call[models.SandboxInfo]:
        return Call("GET", self._path(), _model(models.SandboxInfo), timeout=request_timeout)

    def _set_timeout_call(self, seconds: float, request_timeout: RequestTimeout) -> Call[models.SandboxInfo]:
        body = {"timeout": seconds}
        return Call("POST", self._path("timeout"), _model(models.SandboxInfo), json=body, timeout=request_timeout)

    def _kill_call(self, request_timeout: RequestTimeout) -> Call[bool]:
        def parse(response: httpx.Response) -> bool:
            raise_for_error(response)
            return True

        return Call("DELETE", self._path(), _false_if_missing(parse), timeout=request_timeout)

    def _is_running_call(self, request_timeout: RequestTimeout) -> Call[bool]:
        parse_info = _model(models.SandboxInfo)

        def parse(response: httpx.Response) -> bool:
            return bool(parse_info(response).state is models.SandboxState.RUNNING)

        return Call("GET", self._path(), _false_if_missing(parse), timeout=request_timeout)

    # -- contexts -----------------------------------------------------------------------------

    def _create_context_call(
        self, language: str, cwd: str | None, request_timeout: RequestTimeout
    ) -> Call[models.ContextInfo]:
        body = validated(models.ContextCreate, language=language, cwd=cwd)
        return Call("POST", self._path("contexts"), _model(models.ContextInfo), json=body, timeout=request_timeout)

    def _list_contexts_call(self, request_timeout: RequestTimeout) -> Call[list[models.ContextInfo]]:
        parse = _model(models.ContextList)
        return Call("GET", self._path("contexts"), lambda r: parse(r).contexts, timeout=request_timeout)

    def _context_action_call(
        self, context: ContextLike, action: str, request_timeout: RequestTimeout
    ) -> Call[models.ContextInfo]:
        path = self._path("contexts", _context_id(context), action)
        return Call("POST", path, _model(models.ContextInfo), timeout=request_timeout)

    def _remove_context_call(self, context: ContextLike, request_timeout: RequestTimeout) -> Call[None]:
        return Call("DELETE", self._path("contexts", _context_id(context)), _nothing, timeout=request_timeout)

    # -- executions ---------------------------------------------------------------------------

    def _execute_call(
        self,
        code: str,
        context: ContextLike | None,
        language: str | None,
        envs: Mapping[str, str] | None,
        timeout: float | None,
        inline: bool,
        interrupt_on_disconnect: bool,
        callbacks: Callbacks,
    ) -> tuple[Call[None], ExecutionBuilder]:
        if context is not None and language is not None:
            raise errors.InvalidRequest("pass context or language, not both")
        body = validated(
            models.ExecuteRequest,
            code=code,
            context=None if context is None else _context_id(context),
            language=language,
            envs=dict(envs or {}),
            timeout=timeout,
            inline=inline,
            interrupt_on_disconnect=interrupt_on_disconnect,
        )
        builder = ExecutionBuilder(callbacks=callbacks)

        def parse(response: httpx.Response) -> None:
            raise_for_error(response)
            builder.execution.id = response.headers.get("X-Execution-Id", "")

        # No read timeout by default: a long quiet computation is normal, and the server's
        # keepalives show the connection is alive. With a timeout, the server ends the
        # execution itself; the read timeout only catches a server that went silent.
        read = None if timeout is None else timeout + STREAM_READ_GRACE
        stream_timeout = httpx.Timeout(self._config.request_timeout, read=read)
        return Call("POST", self._path("execute"), parse, json=body, timeout=stream_timeout), builder

    def _get_execution_call(self, execution_id: str, after: int, request_timeout: RequestTimeout) -> Call[Execution]:
        parse = _model(models.ExecutionRecord)
        path = self._path("executions", execution_id)
        params = [("after", str(after))]
        return Call("GET", path, lambda r: execution_from_record(parse(r)), params=params, timeout=request_timeout)

    def _follow_call(self, execution_id: str, after: int) -> tuple[Call[None], ExecutionBuilder]:
        params = [("follow", "true"), ("after", str(after))]
        timeout = httpx.Timeout(self._config.request_timeout, read=None)
        call = Call("GET", self._path("executions", execution_id), _nothing, params=params, timeout=timeout)
        return call, ExecutionBuilder(execution_id)

    # -- artifacts ----------------------------------------------------------------------------

    def _download_call(self, artifact: ArtifactLike, request_timeout: RequestTimeout) -> Call[bytes]:
        if isinstance(artifact, str):
            is_url = artifact.startswith(("http://", "https://"))
            url, artifact_id = (artifact, artifact.rstrip("/").rsplit("/", 1)[-1]) if is_url else ("", artifact)
        else:
            url, artifact_id = artifact.url, artifact.id
        if not (url and self._config.same_origin(url)):
            # The API key goes to the service's own origin only; any other URL is read by id.
            url = f"/v1/artifacts/{quote(artifact_id, safe='')}"
        return Call("GET", url, _content, timeout=request_timeout)

    def _list_artifacts_call(self, request_timeout: RequestTimeout) -> Call[list[models.ArtifactInfo]]:
        parse = _model(models.ArtifactList)
        return Call("GET", self._path("artifacts"), lambda r: parse(r).artifacts, timeout=request_timeout)
