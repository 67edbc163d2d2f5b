"""Jupyter messages as plain typed data: build, parse and (de)serialise them, with no I/O.

Bottom layer: the runtimes and every face may import it. Only ``runtimes/kernel.py`` talks to
kernels (through jupyter_client); everything else handles messages through these types.

Three parts:

* **Building requests** (:func:`new_message` and one helper per request the service sends:
  :func:`execute_request`, :func:`kernel_info_request`, :func:`interrupt_request`,
  :func:`complete_request`, :func:`inspect_request`, :func:`is_complete_request`,
  :func:`shutdown_request`, :func:`input_reply`, :func:`comm_info_request`). A message built
  here carries no signature: the kernel session signs it when it sends it.
* **Reading messages** (:func:`msg_type`, :func:`parent_msg_id`, :func:`is_reply_to`,
  :func:`reply_status`, :func:`execution_state`), plus TypedDicts for the contents read most.
* **Websocket frames** of the Jupyter kernel channels (jupyter_server
  ``services/kernels/connection/base.py``, JupyterLab ``services/src/kernel/serialize.ts``):

  - legacy protocol (no subprotocol): a text frame is one JSON message with ``channel``; a
    message with buffers goes as a binary frame, all integers uint32 big-endian::

        [nbufs][offset_0 ... offset_{nbufs-1}][JSON message incl. "channel"][buffer_0]...

    ``nbufs`` = number of buffers + 1; ``offset_0`` = ``4 * (nbufs + 1)`` is where the JSON
    starts and ``offset_i`` where buffer ``i - 1`` starts (the last one runs to the end).
  - ``v1.kernel.websocket.jupyter.org`` (:data:`WS_V1_PROTOCOL`): always binary, all integers
    uint64 little-endian::

        [n][offset_0 ... offset_{n-1}][channel][header][parent_header][metadata][content][buffer_0]...

    ``n`` = 6 + number of buffers (the offsets of channel, the four JSON parts and each buffer,
    plus the total length last); ``offset_0`` = ``8 * (n + 1)``.

  Buffers travel intact both ways (ipywidgets and comms rely on it).
"""

from __future__ import annotations

import datetime as _dt
import json
import struct
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NotRequired, TypedDict, cast

__all__ = [
    "CHANNELS",
    "PROTOCOL_VERSION",
    "WS_V1_PROTOCOL",
    "Channel",
    "CompleteReplyContent",
    "DisplayDataContent",
    "ErrorContent",
    "ExecuteInputContent",
    "ExecuteReplyContent",
    "ExecuteRequestContent",
    "ExecuteResultContent",
    "Header",
    "InputRequestContent",
    "KernelInfoReplyContent",
    "KernelMessage",
    "StatusContent",
    "StreamContent",
    "WsProtocol",
    "comm_info_request",
    "complete_request",
    "decode_ws_frame",
    "deserialize_binary_message",
    "deserialize_msg_from_ws_v1",
    "encode_ws_frame",
    "execute_request",
    "execution_state",
    "from_json_frame",
    "input_reply",
    "inspect_request",
    "interrupt_request",
    "is_complete_request",
    "is_reply_to",
    "kernel_info_request",
    "msg_type",
    "new_header",
    "new_message",
    "pack_ws_v1",
    "parent_msg_id",
    "reply_status",
    "select_subprotocol",
    "serialize_binary_message",
    "serialize_msg_to_ws_v1",
    "shutdown_request",
    "to_json_frame",
    "unpack_ws_v1",
]

Channel = Literal["shell", "iopub", "stdin", "control"]
CHANNELS: frozenset[str] = frozenset(["shell", "iopub", "stdin", "control"])

PROTOCOL_VERSION = "5.3"
WS_V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"

# "" is the legacy protocol (no subprotocol negotiated).
WsProtocol = Literal["", "v1.kernel.websocket.jupyter.org"]


class Header(TypedDict, total=False):
    msg_id: str
    msg_type: str
    session: str
    username: str
    date: str
    version: str


class KernelMessage(TypedDict, total=False):
    """One Jupyter message, with the channel it travelled on (as the gateway's JSON frames)."""

    channel: Channel
    header: Header
    parent_header: Header | dict[str, Any]
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[bytes]
    msg_id: str
    msg_type: str


# -- contents ---------------------------------------------------------------------------------


class ExecuteRequestContent(TypedDict):
    code: str
    silent: bool
    store_history: bool
    user_expressions: dict[str, Any]
    allow_stdin: bool
    stop_on_error: bool


class ExecuteReplyContent(TypedDict):
    status: Literal["ok", "error", "aborted"]
    execution_count: int | None
    ename: NotRequired[str]
    evalue: NotRequired[str]
    traceback: NotRequired[list[str]]
    user_expressions: NotRequired[dict[str, Any]]
    payload: NotRequired[list[dict[str, Any]]]


class KernelInfoReplyContent(TypedDict, total=False):
    status: str
    protocol_version: str
    implementation: str
    implementation_version: str
    language_info: dict[str, Any]
    banner: str
    help_links: list[dict[str, str]]


class CompleteReplyContent(TypedDict):
    status: str
    matches: list[str]
    cursor_start: int
    cursor_end: int
    metadata: dict[str, Any]


class StatusContent(TypedDict):
    execution_state: Literal["busy", "idle", "starting", "restarting", "dead"]


class StreamContent(TypedDict):
    name: Literal["stdout", "stderr"]
    text: str


class DisplayDataContent(TypedDict):
    data: dict[str, Any]
    metadata: dict[str, Any]
    transient: NotRequired[dict[str, Any]]


class ExecuteResultContent(DisplayDataContent):
    execution_count: int | None


class ExecuteInputContent(TypedDict):
    code: str
    execution_count: int


class ErrorContent(TypedDict):
    ename: str
    evalue: str
    traceback: list[str]


class InputRequestContent(TypedDict):
    prompt: str
    password: bool


# -- building ---------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_header(msg_type: str, *, session: str, username: str = "cellbox") -> Header:
    """A fresh header: a new ``msg_id``, the current UTC ``date``, protocol :data:`PROTOCOL_VERSION`."""
    return Header(
        msg_id=uuid.uuid4().hex,
        msg_type=msg_type,
        session=session,
        username=username,
        date=_now(),
        version=PROTOCOL_VERSION,
    )


def new_message(
    msg_type: str,
    content: dict[str, Any] | None = None,
    *,
    channel: Channel,
    session: str,
    parent: KernelMessage | None = None,
    metadata: dict[str, Any] | None = None,
    buffers: Sequence[bytes] = (),
    username: str = "cellbox",
) -> KernelMessage:
    """A complete message for ``channel``; ``parent`` (a request) fills ``parent_header``."""
    header = new_header(msg_type, session=session, username=username)
    return KernelMessage(
        channel=channel,
        header=header,
        msg_id=header["msg_id"],
        msg_type=msg_type,
        parent_header=dict(parent["header"]) if parent is not None and "header" in parent else {},
        metadata=dict(metadata or {}),
        content=dict(content or {}),
        buffers=[bytes(b) for b in buffers],
    )


def execute_request(
    code: str,
    *,
    session: str,
    silent: bool = False,
    store_history: bool | None = None,
    user_expressions: dict[str, Any] | None = None,
    allow_stdin: bool = False,
    stop_on_error: bool = True,
) -> KernelMessage:
    """``execute_request`` on shell; ``store_history`` defaults to ``not silent`` (as jupyter_client)."""
    content = ExecuteRequestContent(
        code=code,
        silent=silent,
        store_history=(not silent) if store_history is None else store_history,
        user_expressions=dict(user_expressions or {}),
        allow_stdin=allow_stdin,
        stop_on_error=stop_on_error,
    )
    return new_message("execute_request", dict(content), channel="shell", session=session)


def kernel_info_request(*, session: str, channel: Channel = "shell") -> KernelMessage:
    """``kernel_info_request`` (shell by default; control works too and skips the queue)."""
    return new_message("kernel_info_request", {}, channel=channel, session=session)


def interrupt_request(*, session: str) -> KernelMessage:
    """``interrupt_request`` on control (for kernels whose spec says ``interrupt_mode: message``)."""
    return new_message("interrupt_request", {}, channel="control", session=session)


def shutdown_request(*, session: str, restart: bool = False) -> KernelMessage:
    return new_message("shutdown_request", {"restart": restart}, channel="control", session=session)


def complete_request(code: str, cursor_pos: int | None = None, *, session: str) -> KernelMessage:
    """``complete_request``; ``cursor_pos`` defaults to the end of ``code``."""
    pos = len(code) if cursor_pos is None else cursor_pos
    return new_message("complete_request", {"code": code, "cursor_pos": pos}, channel="shell", session=session)


def inspect_request(
    code: str, cursor_pos: int | None = None, *, session: str, detail_level: Literal[0, 1] = 0
) -> KernelMessage:
    pos = len(code) if cursor_pos is None else cursor_pos
    content = {"code": code, "cursor_pos": pos, "detail_level": detail_level}
    return new_message("inspect_request", content, channel="shell", session=session)


def is_complete_request(code: str, *, session: str) -> KernelMessage:
    return new_message("is_complete_request", {"code": code}, channel="shell", session=session)


def comm_info_request(*, session: str, target_name: str | None = None) -> KernelMessage:
    content = {} if target_name is None else {"target_name": target_name}
    return new_message("comm_info_request", content, channel="shell", session=session)


def input_reply(value: str, *, session: str, parent: KernelMessage | None = None) -> KernelMessage:
    """The answer to an ``input_request`` (stdin); ``parent`` is that request when known."""
    return new_message("input_reply", {"value": value}, channel="stdin", session=session, parent=parent)


# -- reading ----------------------------------------------------------------------------------


def msg_type(msg: KernelMessage) -> str:
    """The message's type, from its header (or the top-level duplicate frames carry)."""
    header = msg.get("header") or {}
    return str(header.get("msg_type") or msg.get("msg_type") or "")


def parent_msg_id(msg: KernelMessage) -> str | None:
    """The ``msg_id`` of the request this message answers or was caused by; None for broadcasts."""
    parent = msg.get("parent_header") or {}
    value = parent.get("msg_id")
    return str(value) if value else None


def is_reply_to(msg: KernelMessage, request: KernelMessage) -> bool:
    return parent_msg_id(msg) == request["header"]["msg_id"]


def reply_status(msg: KernelMessage) -> str | None:
    """``content.status`` of a ``*_reply`` ("ok", "error", "aborted"); None for other messages."""
    if not msg_type(msg).endswith("_reply"):
        return None
    status = (msg.get("content") or {}).get("status")
    return str(status) if status is not None else None


def execution_state(msg: KernelMessage) -> str | None:
    """The kernel state an iopub ``status`` message announces; None for other messages."""
    if msg_type(msg) != "status":
        return None
    state = (msg.get("content") or {}).get("execution_state")
    return str(state) if state is not None else None


# -- websocket frames -------------------------------------------------------------------------


def _json_default(obj: object) -> object:
    # jupyter_client's Session.deserialize turns header dates into datetimes; put them back the
    # way jupyter_client.jsonutil.json_default does.
    if isinstance(obj, _dt.datetime):
        if obj.tzinfo is None:
            obj = obj.replace(tzinfo=_dt.UTC)
        return obj.isoformat().replace("+00:00", "Z")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        # No JSON form; a buffer belongs in ``buffers``, never in a JSON part.
        raise TypeError("binary data in a JSON part of a message; put it in buffers")
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _pack(obj: object) -> bytes:
    return json.dumps(obj, default=_json_default, ensure_ascii=False).encode("utf-8")


def _unpack(data: bytes | memoryview) -> Any:
    return json.loads(bytes(data).decode("utf-8"))


def _bytes(buffers: Iterable[bytes | bytearray | memoryview] | None) -> list[bytes]:
    return [bytes(b) for b in buffers or ()]


def _check_channel(channel: object) -> Channel:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}: expected one of {sorted(CHANNELS)}")
    return cast(Channel, channel)


def _wire_dict(msg: KernelMessage, channel: str) -> dict[str, Any]:
    """The legacy JSON object of ``msg`` (without buffers): what jupyter_server writes."""
    header = dict(msg.get("header") or {})
    out: dict[str, Any] = {
        "header": header,
        "msg_id": header.get("msg_id", msg.get("msg_id", "")),
        "msg_type": header.get("msg_type", msg.get("msg_type", "")),
        "parent_header": dict(msg.get("parent_header") or {}),
        "metadata": dict(msg.get("metadata") or {}),
        "content": dict(msg.get("content") or {}),
        "buffers": [],
        "channel": channel,
    }
    return out


def _from_wire_dict(obj: object, buffers: list[bytes]) -> KernelMessage:
    if not isinstance(obj, dict):
        raise ValueError(f"a kernel message must be a JSON object, got {type(obj).__name__}")
    header = obj.get("header")
    if not isinstance(header, dict) or not isinstance(header.get("msg_type"), str):
        raise ValueError("a kernel message needs a header with a msg_type")
    for part in ("parent_header", "metadata", "content"):
        if obj.get(part) is not None and not isinstance(obj.get(part), dict):
            raise ValueError(f"{part} must be a JSON object")
    msg = KernelMessage(
        channel=_check_channel(obj.get("channel") or "shell"),  # missing channel: shell, as jupyter_server
        header=cast(Header, header),
        msg_id=str(header.get("msg_id", "")),
        msg_type=header["msg_type"],
        parent_header=obj.get("parent_header") or {},
        metadata=obj.get("metadata") or {},
        content=obj.get("content") or {},
        buffers=buffers,
    )
    return msg


def to_json_frame(msg: KernelMessage, channel: str | None = None) -> str:
    """The legacy text frame of a message without buffers (top-level ``msg_id``/``msg_type``
    duplicates and ``channel`` added, as jupyter_server sends them). ValueError if it has buffers."""
    if msg.get("buffers"):
        raise ValueError("a message with buffers needs a binary frame (serialize_binary_message)")
    return json.dumps(_wire_dict(msg, _check_channel(channel or msg.get("channel"))), default=_json_default)


def from_json_frame(text: str | bytes) -> KernelMessage:
    """Parse a legacy text frame; ValueError (json.JSONDecodeError included) when malformed."""
    return _from_wire_dict(json.loads(text), [])


def serialize_binary_message(msg: KernelMessage, channel: str | None = None) -> bytes:
    """The legacy binary frame (see the module docstring), as jupyter_server's function of the
    same name: for messages with buffers under the legacy protocol."""
    obj = _wire_dict(msg, _check_channel(channel or msg.get("channel")))
    del obj["buffers"]
    parts = [json.dumps(obj, default=_json_default).encode("utf-8"), *_bytes(msg.get("buffers"))]
    nbufs = len(parts)
    offsets = [4 * (nbufs + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"!{nbufs + 1}I", nbufs, *offsets) + b"".join(parts)


def deserialize_binary_message(data: bytes | memoryview) -> KernelMessage:
    """Parse a legacy binary frame; ValueError when its layout is broken."""
    data = bytes(data)
    if len(data) < 8:
        raise ValueError("binary frame too short")
    (nbufs,) = struct.unpack("!I", data[:4])
    if nbufs < 1 or 4 * (nbufs + 1) > len(data):
        raise ValueError(f"binary frame announces {nbufs} parts in {len(data)} bytes")
    offsets = list(struct.unpack(f"!{nbufs}I", data[4 : 4 * (nbufs + 1)]))
    ends = [*offsets[1:], len(data)]
    if offsets[0] != 4 * (nbufs + 1) or any(a > b for a, b in zip(offsets, ends, strict=True)):
        raise ValueError("binary frame offsets out of order")
    parts = [data[a:b] for a, b in zip(offsets, ends, strict=True)]
    return _from_wire_dict(_unpack(parts[0]), parts[1:])


def pack_ws_v1(channel: str, parts: Sequence[bytes | memoryview]) -> bytes:
    """A v1 frame from the channel and raw parts (header, parent_header, metadata, content as
    packed JSON, then the buffers): jupyter_server's ``serialize_msg_to_ws_v1`` on a list, for
    relaying frames without parsing them."""
    chan = channel.encode("utf-8")
    blobs = [bytes(p) for p in parts]
    offsets = [8 * (1 + 1 + len(blobs) + 1)]
    offsets.append(offsets[-1] + len(chan))
    for blob in blobs:
        offsets.append(offsets[-1] + len(blob))
    head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return head + chan + b"".join(blobs)


def unpack_ws_v1(data: bytes | memoryview) -> tuple[str, list[bytes]]:
    """(channel, raw parts) of a v1 frame: jupyter_server's ``deserialize_msg_from_ws_v1``.
    ValueError when its layout is broken."""
    data = bytes(data)
    if len(data) < 8:
        raise ValueError("v1 frame too short")
    n = int.from_bytes(data[:8], "little")
    if n < 6 or 8 * (n + 1) > len(data):
        raise ValueError(f"v1 frame announces {n} offsets in {len(data)} bytes")
    offsets = [int.from_bytes(data[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(n)]
    if offsets[0] != 8 * (n + 1) or offsets != sorted(offsets) or offsets[-1] > len(data):
        raise ValueError("v1 frame offsets out of order")
    channel = data[offsets[0] : offsets[1]].decode("utf-8")
    return channel, [data[offsets[i] : offsets[i + 1]] for i in range(1, n - 1)]


def serialize_msg_to_ws_v1(msg: KernelMessage, channel: str | None = None) -> bytes:
    """The ``v1.kernel.websocket.jupyter.org`` frame of a message (buffers appended intact)."""
    chan = _check_channel(channel or msg.get("channel"))
    parts = [
        _pack(dict(msg.get("header") or {})),
        _pack(dict(msg.get("parent_header") or {})),
        _pack(dict(msg.get("metadata") or {})),
        _pack(dict(msg.get("content") or {})),
        *_bytes(msg.get("buffers")),
    ]
    return pack_ws_v1(chan, parts)


def deserialize_msg_from_ws_v1(data: bytes | memoryview) -> KernelMessage:
    """Parse a v1 frame into a message; ValueError when malformed."""
    channel, parts = unpack_ws_v1(data)
    if len(parts) < 4:
        raise ValueError("v1 frame lacks the four JSON parts")
    header, parent, metadata, content = (_unpack(p) for p in parts[:4])
    obj = {"channel": channel, "header": header, "parent_header": parent, "metadata": metadata, "content": content}
    return _from_wire_dict(obj, parts[4:])


def select_subprotocol(offered: Iterable[str]) -> WsProtocol:
    """The subprotocol to answer a client's offer with: v1 when offered, else legacy ("")."""
    if WS_V1_PROTOCOL in offered:
        return "v1.kernel.websocket.jupyter.org"
    return ""


def encode_ws_frame(msg: KernelMessage, protocol: WsProtocol, channel: str | None = None) -> str | bytes:
    """A server→client frame under ``protocol``: v1 always binary; legacy text unless the
    message has buffers."""
    if protocol == WS_V1_PROTOCOL:
        return serialize_msg_to_ws_v1(msg, channel)
    if msg.get("buffers"):
        return serialize_binary_message(msg, channel)
    return to_json_frame(msg, channel)


def decode_ws_frame(data: str | bytes, protocol: WsProtocol) -> KernelMessage:
    """A client→server frame under ``protocol``; ValueError (a JSON error included) when
    malformed. Under legacy a binary frame is the legacy binary layout."""
    if isinstance(data, str):
        if protocol == WS_V1_PROTOCOL:
            raise ValueError("text frame under the v1 protocol (it is binary only)")
        return from_json_frame(data)
    if protocol == WS_V1_PROTOCOL:
        return deserialize_msg_from_ws_v1(data)
    return deserialize_binary_message(data)
