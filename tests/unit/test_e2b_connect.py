"""The Connect-RPC codec of the E2B face: envelopes, end of stream, errors, timeouts."""

from __future__ import annotations

import json
import struct

import pytest

from cellbox.api.faces.e2b import connect
from cellbox.api.faces.e2b.connect import Code, ConnectError, EnvelopeReader


def test_envelope_layout_matches_the_protocol() -> None:
    raw = connect.envelope({"event": {"start": {"pid": 42}}})
    flags, length = struct.unpack(">BI", raw[:5])
    assert flags == 0
    assert length == len(raw) - 5
    assert json.loads(raw[5:]) == {"event": {"start": {"pid": 42}}}


def test_end_stream_is_flagged_and_carries_the_error() -> None:
    ok = connect.end_stream()
    assert ok[0] == connect.FLAG_END_STREAM and json.loads(ok[5:]) == {}
    bad = connect.end_stream(ConnectError(Code.DEADLINE_EXCEEDED, "too slow"))
    assert json.loads(bad[5:]) == {"error": {"code": "deadline_exceeded", "message": "too slow"}}


def test_reader_reassembles_envelopes_cut_anywhere() -> None:
    data = connect.envelope({"a": 1}) + connect.envelope({"b": "é"}) + connect.end_stream()
    for cut in range(1, len(data)):
        reader = EnvelopeReader()
        got = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert [m for _, m in got] == [{"a": 1}, {"b": "é"}, {}]
        assert got[-1][0] == connect.FLAG_END_STREAM
        assert reader.pending == 0


def test_single_envelope_request_as_the_sdk_sends_it() -> None:
    body = b'\x00\x00\x00\x00J{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"]},"stdin":false}'
    assert connect.read_single_envelope(body) == {
        "process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"]},
        "stdin": False,
    }


@pytest.mark.parametrize(
    "body",
    [b"", b"\x00\x00\x00\x00\x05{}", connect.envelope({}) + connect.envelope({}), connect.end_stream()],
)
def test_single_envelope_refuses_anything_else(body: bytes) -> None:
    with pytest.raises(ConnectError) as info:
        connect.read_single_envelope(body)
    assert info.value.code is Code.INVALID_ARGUMENT


def test_compressed_and_oversized_messages_are_refused() -> None:
    with pytest.raises(ConnectError) as info:
        EnvelopeReader().feed(b"\x01\x00\x00\x00\x02{}")
    assert info.value.code is Code.UNIMPLEMENTED
    with pytest.raises(ConnectError) as info:
        EnvelopeReader(max_message_bytes=10).feed(b"\x00\x00\x00\x00\x0b")
    assert info.value.code is Code.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("body", [b"{", b"[1]", b'"x"'])
def test_unary_body_must_be_a_json_object(body: bytes) -> None:
    with pytest.raises(ConnectError) as info:
        connect.decode_unary(body)
    assert info.value.code is Code.INVALID_ARGUMENT


def test_unary_empty_body_is_the_empty_message() -> None:
    assert connect.decode_unary(b"") == {}


def test_timeout_header() -> None:
    assert connect.parse_timeout_ms(None) is None
    assert connect.parse_timeout_ms("60000") == 60.0
    for bad in ("-1", "1.5", "12345678901", "abc"):
        with pytest.raises(ConnectError):
            connect.parse_timeout_ms(bad)


def test_every_code_has_an_http_status() -> None:
    assert set(connect.HTTP_STATUS) == set(Code)
    assert connect.HTTP_STATUS[Code.NOT_FOUND] == 404
    assert connect.HTTP_STATUS[Code.ALREADY_EXISTS] == 409
    assert connect.error_body(ConnectError(Code.NOT_FOUND, "nope")) == {"code": "not_found", "message": "nope"}
