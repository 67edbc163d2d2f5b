"""The half of the SDK that does no I/O, shared by :class:`Sandbox` and :class:`AsyncSandbox`.

Every API call is described once, here, as a :class:`Call`: the request to make and the
function that turns the response into a value or raises the error its body names
(:func:`raise_for_error`). The two clients only send calls (``httpx.Client`` or
``httpx.AsyncClient``) and feed streamed lines to an :class:`~._models.ExecutionBuilder`, the
way httpx's ``Client`` and ``AsyncClient`` share ``BaseClient``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata as _metadata
from typing import IO, Any, Generic, Literal, NamedTuple, TypedDict, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from cellbox.interpreter import errors, models

from ._models import (
    Callback,
    Callbacks,
    CommandBuilder,
    Context,
    Execution,
    ExecutionBuilder,
    NotebookCallbacks,
    NotebookRunBuilder,
    WatchBuilder,
    execution_from_record,
    validated,
)

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
    * ``websocket``: ``run_code`` over the sandbox's executions websocket when it can (default
      True; it is faster: ``cellbox.client._ws``); False: always HTTP NDJSON.
    """

    base_url: str | None
    api_key: str | None
    request_timeout: float | None
    transport: TransportT | None
    websocket: bool


_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass(frozen=True)
class ConnectionConfig:
    """Where the service is and how to talk to it; resolved once per sandbox object."""

    base_url: str
    api_key: str | None = field(repr=False)
    request_timeout: float | None
    transport: Any = None
    websocket: bool = True

    @classmethod
    def resolve(cls, options: ConnectionOptions[Any]) -> ConnectionConfig:
        """Arguments first, then ``CELLBOX_URL`` / ``CELLBOX_API_KEY``, then the defaults."""
        url = options.get("base_url") or os.environ.get("CELLBOX_URL") or DEFAULT_BASE_URL
        key = options.get("api_key")
        key = key if key is not None else os.environ.get("CELLBOX_API_KEY") or None
        timeout = options.get("request_timeout", DEFAULT_REQUEST_TIMEOUT)
        return cls(url.rstrip("/"), key, timeout, options.get("transport"), options.get("websocket", True))

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
    content: Any = None  # a raw body: bytes, or an iterator of bytes chunks (streamed)
    files: Any = None  # multipart parts, as httpx takes them

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``request()`` / ``build_request()`` / ``stream()`` of either httpx client."""
        timeout = httpx.USE_CLIENT_DEFAULT if isinstance(self.timeout, UseClientDefault) else self.timeout
        return {
            "method": self.method,
            "url": self.url,
            "params": self.params,
            "json": self.json,
            "content": self.content,
            "files": self.files,
            "timeout": timeout,
        }


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


def _false_on(error: type[errors.InterpreterError], parse: Callable[[httpx.Response], bool]) -> Callable[..., bool]:
    """``parse``, but ``False`` when the response is exactly ``error`` (not a subclass, not another 404)."""

    def wrapped(response: httpx.Response) -> bool:
        try:
            return parse(response)
        except errors.InterpreterError as exc:
            if type(exc) is error:
                return False
            raise

    return wrapped


def _true(response: httpx.Response) -> bool:
    raise_for_error(response)
    return True


def _json_bool(key: str) -> Callable[[httpx.Response], bool]:
    def parse(response: httpx.Response) -> bool:
        raise_for_error(response)
        return bool(response.json()[key])

    return parse


def _text(response: httpx.Response) -> str:
    raise_for_error(response)
    return response.text


def _follow(url: str, after: int, config: ConnectionConfig) -> Call[None]:
    """``GET url?follow=true&after=N``: a replay, then the live events, with no read timeout
    (the server sends keepalives while it is quiet)."""
    params = [("follow", "true"), ("after", str(after))]
    return Call("GET", url, _nothing, params=params, timeout=httpx.Timeout(config.request_timeout, read=None))


def _stream_timeout(config: ConnectionConfig, timeout: float | None) -> httpx.Timeout:
    """The timeouts of a stream the server ends itself after ``timeout`` seconds (if any).

    No read timeout without one: a long quiet run is normal, and the server's keepalives show
    the connection is alive. With one, the read timeout only catches a server that went silent.
    """
    return httpx.Timeout(config.request_timeout, read=timeout + STREAM_READ_GRACE if timeout else None)


def _context_id(context: ContextLike) -> str:
    return context if isinstance(context, str) else context.id


#: What ``run_notebook`` takes: the notebook as nbformat JSON, parsed (a dict, or nbformat's
#: ``NotebookNode``) or as text or bytes (an ``.ipynb`` file's content).
NotebookLike = Mapping[str, Any] | str | bytes


def _notebook_body(notebook: NotebookLike) -> bytes:
    if isinstance(notebook, bytes):
        return notebook
    if isinstance(notebook, str):
        return notebook.encode()
    if isinstance(notebook, Mapping):
        return json.dumps(notebook).encode()
    raise errors.InvalidRequest(
        f"cannot run a {type(notebook).__name__}: pass the notebook as a dict, or its JSON as str or bytes",
        field="notebook",
    )


def _json_object(response: httpx.Response) -> dict[str, Any]:
    raise_for_error(response)
    value = response.json()
    if not isinstance(value, dict):
        raise errors.InterpreterError(f"expected a JSON object from {response.request.url.path}")
    return value


HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)


class SandboxBase(Generic[HttpT]):
    """State and request building shared by both clients; the subclasses only send."""

    def __init__(self, sandbox_id: str, *, http: HttpT, config: ConnectionConfig) -> None:
        """Wrap a client the object then owns; use ``create`` or ``connect`` instead."""
        self._sandbox_id = sandbox_id
        self._http: HttpT = http
        self._config = config
        self._ports_domain: str | None = None  # the service's, from the sandbox's info

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

    # -- ports --------------------------------------------------------------------------------

    def get_host(self, port: int) -> str:
        """Where a server listening on ``port`` inside the sandbox is reached, without the scheme
        (E2B's ``get_host``): ``{port}-{id}.{domain}`` when the service has a ports domain, else
        the service's host and the port's path (``127.0.0.1:8080/v1/sandboxes/{id}/ports/{port}``),
        so ``f"http://{sbx.get_host(port)}"`` works either way."""
        if self._ports_domain:
            return f"{port}-{self._sandbox_id}.{self._ports_domain}"
        url = httpx.URL(self._config.base_url)
        authority = url.netloc.decode()
        return f"{authority}{url.path.rstrip('/')}{self._path('ports', str(port))}"

    def port_url(self, port: int, path: str = "") -> str:
        """The URL of ``path`` on the server listening on ``port`` inside the sandbox. It needs the
        API key (as a header), the sandbox's ``traffic_token`` (``X-Cellbox-Traffic-Token``, or
        ``?cellbox_token=``), or a sandbox created with ``allow_public_traffic=True``."""
        scheme = httpx.URL(self._config.base_url).scheme
        return f"{scheme}://{self.get_host(port)}/{path.lstrip('/')}"

    # -- sandboxes ----------------------------------------------------------------------------

    @staticmethod
    def _create_call(
        template: str,
        timeout: float | None,
        envs: Mapping[str, str] | None,
        metadata: Mapping[str, str] | None,
        limits: models.Limits | Mapping[str, Any] | None,
        network: models.NetworkSpec | Mapping[str, Any] | None,
        allow_public_traffic: bool = False,
    ) -> Call[models.SandboxInfo]:
        body = validated(
            models.SandboxCreate,
            template=template,
            timeout=timeout,
            envs=dict(envs or {}),
            metadata=dict(metadata or {}),
            limits=limits or models.Limits(),
            network=network or models.NetworkSpec(),
            allow_public_traffic=allow_public_traffic,
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

    def _lifecycle_call(self, action: str, request_timeout: RequestTimeout) -> Call[models.SandboxInfo]:
        """``pause`` or ``resume``."""
        return Call("POST", self._path(action), _model(models.SandboxInfo), timeout=request_timeout)

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

    def _egress_call(self, after: int, limit: int, request_timeout: RequestTimeout) -> Call[models.EgressLogPage]:
        params = [("after", str(after)), ("limit", str(limit))]
        return Call("GET", self._path("egress"), _model(models.EgressLogPage), params=params, timeout=request_timeout)

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

        stream_timeout = _stream_timeout(self._config, timeout)
        return Call("POST", self._path("execute"), parse, json=body, timeout=stream_timeout), builder

    def _get_execution_call(self, execution_id: str, after: int, request_timeout: RequestTimeout) -> Call[Execution]:
        parse = _model(models.ExecutionRecord)
        path = self._path("executions", execution_id)
        params = [("after", str(after))]
        return Call("GET", path, lambda r: execution_from_record(parse(r)), params=params, timeout=request_timeout)

    def _follow_call(self, execution_id: str, after: int) -> tuple[Call[None], ExecutionBuilder]:
        call = _follow(self._path("executions", execution_id), after, self._config)
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

    # -- notebooks ----------------------------------------------------------------------------

    def _export_notebook_call(
        self, context: ContextLike | None, request_timeout: RequestTimeout
    ) -> Call[dict[str, Any]]:
        params = [] if context is None else [("context", _context_id(context))]
        return Call("GET", self._path("notebook"), _json_object, params=params, timeout=request_timeout)

    def _run_notebook_call(
        self,
        notebook: NotebookLike,
        context: ContextLike | None,
        stop_on_error: bool,
        timeout: float | None,
        callbacks: NotebookCallbacks,
    ) -> tuple[Call[None], NotebookRunBuilder]:
        # The options go in the query, so the body is the notebook's own bytes, unparsed here.
        params = [
            ("stop_on_error", "true" if stop_on_error else "false"),
            ("events", "true" if callbacks.on_event is not None else "false"),
        ]
        if context is not None:
            params.append(("context", _context_id(context)))
        if timeout is not None:
            params.append(("timeout", str(timeout)))
        # the server's timeout is per cell: a line (a cell's end) comes at least that often
        call = Call(
            "POST",
            self._path("notebook", "run"),
            _nothing,
            params=params,
            content=_notebook_body(notebook),
            timeout=_stream_timeout(self._config, timeout),
        )
        return call, NotebookRunBuilder(callbacks)


# -- files ----------------------------------------------------------------------------------------

ReadFormat = Literal["text", "bytes", "stream"]
_READ_PARSERS: dict[str, Callable[[httpx.Response], Any]] = {"text": _text, "bytes": _content, "stream": _nothing}
CHUNK_SIZE = 64 * 1024

#: What ``files.write`` takes: text (written as UTF-8), bytes, a file object (read in chunks),
#: or an iterable of bytes chunks. ``AsyncSandbox`` also takes an async iterable of bytes.
WriteData = str | bytes | IO[Any] | Iterable[bytes]


class WriteEntry(NamedTuple):
    """One file of ``files.write_files``; a plain ``(path, data)`` tuple does as well."""

    path: str
    data: WriteData


def _as_bytes(chunk: str | bytes | bytearray | memoryview[Any]) -> bytes:
    return chunk.encode() if isinstance(chunk, str) else bytes(chunk)


def _file_chunks(file: IO[Any]) -> Iterator[bytes]:
    while chunk := file.read(CHUNK_SIZE):
        yield _as_bytes(chunk)


def _raw_body(data: Any) -> Any:
    """The body of ``files.write``: bytes, or chunks the client streams (an iterator, or an async
    iterable passed through for the async client)."""
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        return _as_bytes(data)
    if hasattr(data, "read"):
        return _file_chunks(data)
    if hasattr(data, "__aiter__"):
        return data
    if isinstance(data, Iterable):
        return (_as_bytes(chunk) for chunk in data)
    raise errors.InvalidRequest(
        f"cannot write a {type(data).__name__}: pass str, bytes, a file object or an iterable of bytes", field="data"
    )


def _part(data: Any) -> bytes | IO[bytes]:
    """A multipart part: a binary file as it is (httpx streams it), anything else as bytes."""
    if hasattr(data, "read") and not isinstance(data, io.TextIOBase):
        file: IO[bytes] = data
        return file
    body = _raw_body(data)
    if hasattr(body, "__aiter__"):
        raise errors.InvalidRequest("write_files cannot take an async iterable; write() streams one", field="data")
    return body if isinstance(body, bytes) else b"".join(body)


def _at(path: str) -> list[tuple[str, str]]:
    return [("path", path)]


class FilesBase:
    """The requests of ``sbx.files``, shared by :class:`~._sync.Filesystem` and
    :class:`~._async.AsyncFilesystem`, which only send them.

    Paths are absolute (``/home/user/...``) or relative to ``/home/user``; a path that leaves
    the sandbox raises ``PermissionDenied``, a missing one ``FileNotFound``.
    """

    def __init__(self, sandbox: SandboxBase[Any]) -> None:
        self._config = sandbox._config
        self._url = sandbox._path("files")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._config.base_url}{self._url})"

    def download_url(self, path: str) -> str:
        """The URL that ``GET``\\s the file's bytes; it needs the API key (``Authorization: Bearer``)."""
        return str(httpx.URL(self._config.base_url + self._url, params={"path": path}))

    def _read_call(self, path: str, format: str, request_timeout: RequestTimeout) -> Call[Any]:
        if format not in _READ_PARSERS:
            raise errors.InvalidRequest(f"format must be 'text', 'bytes' or 'stream', not {format!r}", field="format")
        return Call("GET", self._url, _READ_PARSERS[format], params=_at(path), timeout=request_timeout)

    def _watch_call(self, path: str, recursive: bool) -> tuple[Call[None], WatchBuilder]:
        params = [("path", path), ("recursive", "true" if recursive else "false")]
        timeout = httpx.Timeout(self._config.request_timeout, read=None)  # keepalives while quiet
        return Call("GET", self._url + "/watch", _nothing, params=params, timeout=timeout), WatchBuilder(path)

    def _write_call(self, path: str, data: Any, request_timeout: RequestTimeout) -> Call[models.EntryInfo]:
        parse = _model(models.EntryInfo)
        return Call("PUT", self._url, parse, params=_at(path), content=_raw_body(data), timeout=request_timeout)

    def _write_files_call(
        self, files: Iterable[tuple[str, Any]], request_timeout: RequestTimeout
    ) -> Call[list[models.EntryInfo]]:
        parts = [("file", (path, _part(data), "application/octet-stream")) for path, data in files]
        if not parts:
            raise errors.InvalidRequest("write_files needs at least one (path, data)", field="files")
        parse = _model(models.EntryList)
        return Call("POST", self._url, lambda r: parse(r).entries, files=parts, timeout=request_timeout)

    def _list_call(self, path: str, depth: int, request_timeout: RequestTimeout) -> Call[list[models.EntryInfo]]:
        parse = _model(models.EntryList)
        params = [*_at(path), ("depth", str(depth))]
        return Call("GET", self._url + "/list", lambda r: parse(r).entries, params=params, timeout=request_timeout)

    def _get_info_call(self, path: str, request_timeout: RequestTimeout) -> Call[models.EntryInfo]:
        return Call("GET", self._url + "/stat", _model(models.EntryInfo), params=_at(path), timeout=request_timeout)

    def _exists_call(self, path: str, request_timeout: RequestTimeout) -> Call[bool]:
        # A missing parent directory may come back as file_not_found rather than {"exists": false}.
        parse = _false_on(errors.FileNotFound, _json_bool("exists"))
        return Call("GET", self._url + "/exists", parse, params=_at(path), timeout=request_timeout)

    def _make_dir_call(self, path: str, request_timeout: RequestTimeout) -> Call[bool]:
        body = validated(models.MkdirBody, path=path, parents=True)
        return Call("POST", self._url + "/mkdir", _json_bool("created"), json=body, timeout=request_timeout)

    def _rename_call(self, old: str, new: str, request_timeout: RequestTimeout) -> Call[models.EntryInfo]:
        body = validated(models.MoveBody, src=old, dst=new)
        return Call("POST", self._url + "/move", _model(models.EntryInfo), json=body, timeout=request_timeout)

    def _remove_call(self, path: str, request_timeout: RequestTimeout) -> Call[None]:
        return Call("DELETE", self._url, _nothing, params=_at(path), timeout=request_timeout)

    def _keep_call(self, path: str, request_timeout: RequestTimeout) -> Call[models.ArtifactInfo]:
        url = self._url + "/artifact"
        return Call("POST", url, _model(models.ArtifactInfo), params=_at(path), timeout=request_timeout)


# -- commands -------------------------------------------------------------------------------------

#: A terminal size: a :class:`~cellbox.interpreter.models.PtySize` or ``(rows, cols)``.
PtySizeLike = models.PtySize | tuple[int, int]


def _pty_size(size: PtySizeLike) -> dict[str, int]:
    rows, cols = (size.rows, size.cols) if isinstance(size, models.PtySize) else size
    return {"rows": int(rows), "cols": int(cols)}


class PtyOptions(TypedDict, total=False):
    """The keyword arguments of ``pty.create`` besides the size.

    * ``cmd``: what runs in the terminal (default: an interactive login shell, ``bash -i -l``).
    * ``envs``, ``cwd``, ``user``: as for ``commands.run``; ``TERM`` defaults to ``xterm-256color``.
    * ``timeout``: seconds until the service kills it (``None`` or 0: no limit).
    * ``on_data``: the handle's ``wait`` calls it with each chunk of terminal output (bytes).
    * ``request_timeout``: the limit of the starting request.
    """

    cmd: str | None
    envs: Mapping[str, str] | None
    cwd: str | None
    user: str | None
    timeout: float | None
    on_data: Callback | None
    request_timeout: RequestTimeout


# ``after`` beyond any seq: a command's record without its events (its output may be large).
_NO_EVENTS = 2**62


class RunOptions(TypedDict, total=False):
    """The keyword arguments of ``commands.run`` besides ``background``.

    * ``envs``: environment variables added to the sandbox's.
    * ``cwd``: the working directory (default ``/home/user``).
    * ``timeout``: seconds until the service kills the command's process group (``None`` or
      0: no limit); the end then raises ``CommandExitError`` with ``timed_out``.
    * ``on_stdout`` / ``on_stderr``: called with each text chunk as it arrives (the async
      client awaits what they return when that is awaitable).
    * ``user``: the user to run as: ``"user"`` (the default) or ``"root"`` (in sandboxes that
      offer it; others refuse with ``PermissionDenied``).
    * ``tag``: a label shown in ``commands.list()`` (and E2B's process selector by tag).
    * ``request_timeout``: for ``background=True``, the limit of the starting request.
    """

    envs: Mapping[str, str] | None
    cwd: str | None
    timeout: float | None
    on_stdout: Callback | None
    on_stderr: Callback | None
    user: str | None
    tag: str | None
    request_timeout: RequestTimeout


class CommandsBase:
    """The requests of ``sbx.commands``, shared by :class:`~._sync.Commands` and
    :class:`~._async.AsyncCommands`, which only send them."""

    def __init__(self, sandbox: SandboxBase[Any]) -> None:
        self._config = sandbox._config
        self._url = sandbox._path("commands")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._config.base_url}{self._url})"

    def _pid_url(self, pid: int, *more: str) -> str:
        return "/".join([self._url, str(int(pid)), *more])

    @staticmethod
    def _request(cmd: str, options: RunOptions, background: bool) -> dict[str, Any]:
        envs, cwd, timeout = dict(options.get("envs") or {}), options.get("cwd"), options.get("timeout")
        fields: dict[str, Any] = {"user": options.get("user"), "tag": options.get("tag")}
        fields = {k: v for k, v in fields.items() if v}
        return validated(
            models.CommandRequest, cmd=cmd, envs=envs, cwd=cwd, timeout=timeout, background=background, **fields
        )

    @staticmethod
    def _callbacks(options: RunOptions) -> Callbacks:
        return Callbacks(options.get("on_stdout"), options.get("on_stderr"))

    def _run_call(self, cmd: str, options: RunOptions) -> tuple[Call[None], CommandBuilder]:
        body = self._request(cmd, options, background=False)
        builder = CommandBuilder(callbacks=self._callbacks(options))

        def parse(response: httpx.Response) -> None:
            raise_for_error(response)
            pid = response.headers.get("X-Command-Pid", "")
            builder.pid = int(pid) if pid.isdigit() else None

        timeout = _stream_timeout(self._config, options.get("timeout"))
        return Call("POST", self._url, parse, json=body, timeout=timeout), builder

    def _start_call(self, cmd: str, options: RunOptions) -> Call[models.CommandInfo]:
        body = self._request(cmd, options, background=True)
        timeout = options.get("request_timeout", USE_CLIENT_DEFAULT)
        return Call("POST", self._url, _model(models.CommandInfo), json=body, timeout=timeout)

    def _follow_call(self, pid: int, callbacks: Callbacks) -> tuple[Call[None], CommandBuilder]:
        return _follow(self._pid_url(pid), -1, self._config), CommandBuilder(pid, callbacks)

    def _list_call(self, include_finished: bool, request_timeout: RequestTimeout) -> Call[list[models.CommandInfo]]:
        parse = _model(models.CommandList)
        params = [] if include_finished else [("running", "true")]
        return Call("GET", self._url, lambda r: parse(r).commands, params=params, timeout=request_timeout)

    def _info_call(self, pid: int, request_timeout: RequestTimeout) -> Call[models.CommandInfo]:
        params = [("after", str(_NO_EVENTS))]
        return Call("GET", self._pid_url(pid), _model(models.CommandRecord), params=params, timeout=request_timeout)

    def _kill_call(self, pid: int, request_timeout: RequestTimeout) -> Call[bool]:
        # An unknown pid is "not_found"; a missing sandbox (sandbox_not_found) still raises.
        return Call("DELETE", self._pid_url(pid), _false_on(errors.NotFound, _true), timeout=request_timeout)

    def _send_stdin_call(self, pid: int, data: str | bytes, request_timeout: RequestTimeout) -> Call[None]:
        body = validated(models.StdinBody, data=data.decode() if isinstance(data, bytes) else data)
        return Call("POST", self._pid_url(pid, "stdin"), _nothing, json=body, timeout=request_timeout)

    def _send_bytes_call(self, pid: int, data: str | bytes, request_timeout: RequestTimeout) -> Call[None]:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        body = validated(models.StdinBody, data=base64.b64encode(raw).decode(), encoding="base64")
        return Call("POST", self._pid_url(pid, "stdin"), _nothing, json=body, timeout=request_timeout)

    def _resize_call(self, pid: int, size: PtySizeLike, request_timeout: RequestTimeout) -> Call[models.CommandInfo]:
        body = validated(models.PtySize, **_pty_size(size))
        url = self._pid_url(pid, "resize")
        return Call("POST", url, _model(models.CommandInfo), json=body, timeout=request_timeout)

    def _pty_call(self, size: PtySizeLike, options: PtyOptions) -> Call[models.CommandInfo]:
        fields: dict[str, Any] = {"user": options["user"]} if options.get("user") else {}
        body = validated(
            models.CommandRequest,
            cmd=options.get("cmd") or "",
            envs=dict(options.get("envs") or {}),
            cwd=options.get("cwd"),
            timeout=options.get("timeout"),
            background=True,
            pty=_pty_size(size),
            **fields,
        )
        timeout = options.get("request_timeout", USE_CLIENT_DEFAULT)
        return Call("POST", self._url, _model(models.CommandInfo), json=body, timeout=timeout)

    def _close_stdin_call(self, pid: int, request_timeout: RequestTimeout) -> Call[None]:
        return Call("POST", self._pid_url(pid, "stdin", "close"), _nothing, timeout=request_timeout)

    def _signal_call(self, pid: int, signal: str | int, request_timeout: RequestTimeout) -> Call[models.CommandInfo]:
        # int(): a signal.Signals member is an int, and its JSON must be the number.
        body = validated(models.SignalBody, signal=int(signal) if isinstance(signal, int) else signal)
        url = self._pid_url(pid, "signal")
        return Call("POST", url, _model(models.CommandInfo), json=body, timeout=request_timeout)


CommandsT = TypeVar("CommandsT", bound=CommandsBase)


class CommandHandleBase(Generic[CommandsT]):
    """What both clients' command handles share: the pid, the info, ``run``'s callbacks."""

    def __init__(self, commands: CommandsT, info: models.CommandInfo, callbacks: Callbacks | None = None) -> None:
        """Made by ``commands.run(..., background=True)`` and ``commands.connect(pid)``."""
        self._commands = commands
        self.info = info  # as it was when the handle was made: see wait() for the end
        self._callbacks = callbacks or Callbacks()

    @property
    def pid(self) -> int:
        """The command's process id in the sandbox (``commands.connect`` takes it)."""
        return self.info.pid

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pid={self.pid}, cmd={self.info.cmd!r})"

    def _wait_callbacks(self, on_stdout: Callback | None, on_stderr: Callback | None) -> Callbacks:
        """``wait``'s callbacks, else the ones ``run`` was given."""
        return Callbacks(on_stdout or self._callbacks.on_stdout, on_stderr or self._callbacks.on_stderr)
