"""The Connect protocol (v1), JSON codec only, as the E2B SDKs speak it to envd.

Pure code, no sockets. What goes over the wire (https://connectrpc.com/docs/protocol):

* **Unary**: ``POST /<pkg>.<Service>/<Method>`` with ``Content-Type: application/json`` and
  the request message as the body. Success: 200 and the response message as a JSON body.
  Failure: a non-2xx status (:data:`HTTP_STATUS`) and a Connect error body
  ``{"code": "not_found", "message": "..."}``.
* **Server streaming**: ``Content-Type: application/connect+json``. The request body is one
  *envelope*; the response is 200 and a series of envelopes, the last one flagged
  end-of-stream and holding ``{}`` or ``{"error": {"code", "message"}}``. An envelope is one
  flag byte, a 4-byte big-endian length and that many bytes of JSON::

      0x00 | 00 00 00 0c | {"event":{}}      a message
      0x02 | 00 00 00 02 | {}                the end of the stream (always last)

  Flag ``0x01`` marks a compressed payload; the SDKs send none (they disable compression)
  and a compressed request is refused with ``unimplemented``.
* ``Connect-Timeout-Ms`` carries the caller's deadline (:func:`parse_timeout_ms`).

Messages are protobuf's canonical JSON: lowerCamelCase field names, int64 as JSON strings,
bytes as standard base64, enums by name; a reader ignores fields it does not know.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

__all__ = [
    "CONTENT_TYPE_STREAM",
    "CONTENT_TYPE_UNARY",
    "HTTP_STATUS",
    "Code",
    "ConnectError",
    "EnvelopeReader",
    "decode_unary",
    "end_stream",
    "envelope",
    "error_body",
    "parse_timeout_ms",
    "read_single_envelope",
]

CONTENT_TYPE_UNARY = "application/json"
CONTENT_TYPE_STREAM = "application/connect+json"

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
_HEADER = struct.Struct(">BI")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # per envelope; envd requests are small JSON messages


class Code(enum.StrEnum):
    """Connect error codes (the gRPC codes, in snake case)."""

    CANCELED = "canceled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    UNAUTHENTICATED = "unauthenticated"


# The HTTP status of a unary error, from the protocol's table.
HTTP_STATUS: dict[Code, int] = {
    Code.CANCELED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


class ConnectError(Exception):
    """An RPC failure with its Connect code; rendered by :func:`error_body`."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ConnectError({self.code.value!r}, {self.message!r})"


def error_body(err: ConnectError) -> dict[str, Any]:
    """The JSON error object: a unary error's body, and the ``error`` of an end-stream."""
    return {"code": err.code.value, "message": err.message}


def _dumps(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    """One envelope holding ``message`` as JSON."""
    payload = _dumps(message)
    return _HEADER.pack(flags, len(payload)) + payload


def end_stream(error: ConnectError | None = None) -> bytes:
    """The end-of-stream envelope that closes every streaming response, exactly once."""
    return envelope({} if error is None else {"error": error_body(error)}, FLAG_END_STREAM)


def _decode_json(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload or b"{}")
    except ValueError as exc:
        raise ConnectError(Code.INVALID_ARGUMENT, f"the request is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ConnectError(Code.INVALID_ARGUMENT, "the request message must be a JSON object")
    return message


def decode_unary(body: bytes) -> dict[str, Any]:
    """A unary request's message (an empty body is the empty message)."""
    return _decode_json(body)


class EnvelopeReader:
    """Splits a byte stream into envelopes, however the bytes arrive (chunked bodies cut
    envelopes anywhere)."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_message_bytes

    def feed(self, data: bytes) -> list[tuple[int, dict[str, Any]]]:
        """Add bytes; return the ``(flags, message)`` pairs now complete, in order."""
        self._buffer += data
        out: list[tuple[int, dict[str, Any]]] = []
        while len(self._buffer) >= _HEADER.size:
            flags, length = _HEADER.unpack_from(self._buffer)
            if length > self._max:
                raise ConnectError(Code.RESOURCE_EXHAUSTED, f"message of {length} bytes is over {self._max}")
            if flags & FLAG_COMPRESSED:
                raise ConnectError(Code.UNIMPLEMENTED, "compressed messages are not supported")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            out.append((flags, _decode_json(payload)))
        return out

    @property
    def pending(self) -> int:
        """Bytes of an envelope not yet complete."""
        return len(self._buffer)


def read_single_envelope(body: bytes) -> dict[str, Any]:
    """The one request message of a server-streaming call (its whole body)."""
    reader = EnvelopeReader()
    messages = reader.feed(body)
    if reader.pending or len(messages) != 1 or messages[0][0] & FLAG_END_STREAM:
        raise ConnectError(Code.INVALID_ARGUMENT, "a streaming request must hold exactly one message envelope")
    return messages[0][1]


def parse_timeout_ms(value: str | None) -> float | None:
    """``Connect-Timeout-Ms`` in seconds; None when absent. The protocol allows at most 10
    digits; anything else is ``invalid_argument``."""
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > 10:
        raise ConnectError(Code.INVALID_ARGUMENT, f"invalid Connect-Timeout-Ms {value!r}")
    return int(value) / 1000.0
