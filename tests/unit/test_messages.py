"""Jupyter messages: builders, readers, and the websocket frames, checked against jupyter_server."""

from __future__ import annotations

import base64
import datetime as dt
import importlib.util
import json
import pathlib
import struct
import subprocess
import sys
from typing import Any

import pytest

from cellbox.interpreter import messages as m
from cellbox.interpreter.messages import KernelMessage

ROOT = pathlib.Path(__file__).parents[2]
JUPYTER_VENV_PY = ROOT / ".venv-jupyter" / "bin" / "python"


def _msg(
    msg_type: str = "comm_msg", *, buffers: list[bytes] | None = None, channel: m.Channel = "shell"
) -> KernelMessage:
    msg = m.new_message(
        msg_type,
        {"comm_id": "c1", "data": {"value": "é ✓ 日本", "n": [1, 2.5, None, True]}},
        channel=channel,
        session="sess-1",
        metadata={"k": "v"},
        buffers=buffers or [],
    )
    msg["parent_header"] = m.new_header("execute_request", session="other")
    return msg


CASES: dict[str, KernelMessage] = {
    "no_buffers": _msg("execute_request"),
    "binary_buffers": _msg(buffers=[b"\xff\x00\x01binary", bytes(range(256))]),
    "empty_buffer": _msg(buffers=[b""], channel="iopub"),
    "control": _msg("interrupt_request", channel="control"),
}


def _plain(msg: KernelMessage) -> dict[str, Any]:
    return {k: msg.get(k) for k in ("channel", "header", "parent_header", "metadata", "content")}


# -- against jupyter_server's implementation ---------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> list[dict[str, Any]]:
    """jupyter_server's answers for CASES (in-process, or through .venv-jupyter's Python)."""
    cases = [
        {
            "msg": {**_plain(msg), "buffers": [base64.b64encode(b).decode() for b in msg["buffers"]]},
            "mine_v1": base64.b64encode(m.serialize_msg_to_ws_v1(msg)).decode(),
            "mine_legacy": base64.b64encode(m.serialize_binary_message(msg)).decode(),
        }
        for msg in CASES.values()
    ]
    ref_path = pathlib.Path(__file__).with_name("jupyter_server_ref.py")
    if importlib.util.find_spec("jupyter_server") is not None:
        sys.path.insert(0, str(ref_path.parent))
        try:
            import jupyter_server_ref

            answers: list[dict[str, Any]] = jupyter_server_ref.answer(json.loads(json.dumps(cases)))
        finally:
            sys.path.remove(str(ref_path.parent))
        return answers
    if not JUPYTER_VENV_PY.exists():
        pytest.skip("jupyter_server not installed here nor in .venv-jupyter (scripts/jupyter-e2e-setup.sh)")
    out = subprocess.run(
        [str(JUPYTER_VENV_PY), str(ref_path)], input=json.dumps(cases), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    return answers


@pytest.mark.parametrize("index,name", list(enumerate(CASES)))
def test_v1_frames_round_trip_with_jupyter_server(reference: list[dict[str, Any]], index: int, name: str) -> None:
    msg = CASES[name]
    ref = reference[index]
    # jupyter_server reads ours: the channel, the four JSON parts, the buffers byte for byte
    assert ref["mine_v1_channel"] == msg["channel"]
    parts = [base64.b64decode(p) for p in ref["mine_v1_parts"]]
    assert [json.loads(p) for p in parts[:4]] == [
        msg["header"],
        msg["parent_header"],
        msg["metadata"],
        msg["content"],
    ]
    assert parts[4:] == msg["buffers"]
    # we read theirs
    theirs = base64.b64decode(ref["their_v1"])
    back = m.deserialize_msg_from_ws_v1(theirs)
    assert _plain(back) == _plain(msg) and back["buffers"] == msg["buffers"]
    # and relaying the same raw parts gives their bytes exactly
    packed = [base64.b64decode(p) for p in ref["packed"]]
    assert m.pack_ws_v1(msg["channel"], [*packed, *msg["buffers"]]) == theirs
    assert m.unpack_ws_v1(theirs) == (msg["channel"], [*packed, *msg["buffers"]])


@pytest.mark.parametrize("index,name", list(enumerate(CASES)))
def test_legacy_binary_frames_round_trip_with_jupyter_server(
    reference: list[dict[str, Any]], index: int, name: str
) -> None:
    msg = CASES[name]
    ref = reference[index]
    parsed = ref["mine_legacy"]
    assert parsed["channel"] == msg["channel"] and parsed["content"] == msg["content"]
    assert parsed["header"] == msg["header"] and parsed["parent_header"] == msg["parent_header"]
    assert [base64.b64decode(b) for b in ref["mine_legacy_buffers"]] == msg["buffers"]
    back = m.deserialize_binary_message(base64.b64decode(ref["their_legacy"]))
    assert _plain(back) == _plain(msg) and back["buffers"] == msg["buffers"]


# -- layouts, by hand ---------------------------------------------------------------------------


def test_v1_layout_is_uint64_little_endian_offsets() -> None:
    frame = m.pack_ws_v1("iopub", [b"{}", b"{}", b"{}", b"{}", b"\x01\x02"])
    n = int.from_bytes(frame[:8], "little")
    assert n == 7  # channel, 4 JSON parts, 1 buffer, total length
    offsets = [int.from_bytes(frame[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(n)]
    assert offsets[0] == 8 * (n + 1)
    assert frame[offsets[0] : offsets[1]] == b"iopub"
    assert offsets[-1] == len(frame)
    assert frame[offsets[5] : offsets[6]] == b"\x01\x02"


def test_legacy_binary_layout_is_uint32_big_endian_offsets() -> None:
    msg = _msg(buffers=[b"abc"])
    frame = m.serialize_binary_message(msg)
    nbufs, off0, off1 = struct.unpack("!3I", frame[:12])
    assert (nbufs, off0) == (2, 12)
    body = json.loads(frame[off0:off1])
    assert body["channel"] == "shell" and body["msg_type"] == "comm_msg" and "buffers" not in body
    assert frame[off1:] == b"abc"


def test_json_frames_carry_channel_and_top_level_duplicates() -> None:
    msg = m.execute_request("1+1", session="s")
    text = m.to_json_frame(msg)
    obj = json.loads(text)
    assert obj["channel"] == "shell" and obj["msg_id"] == msg["header"]["msg_id"]
    assert obj["msg_type"] == "execute_request" and obj["buffers"] == []
    back = m.from_json_frame(text)
    assert _plain(back) == _plain(msg)


def test_a_json_frame_without_channel_is_shell() -> None:
    frame = {"header": {"msg_id": "1", "msg_type": "kernel_info_request"}, "parent_header": {}, "content": {}}
    assert m.from_json_frame(json.dumps(frame))["channel"] == "shell"


def test_jupyter_client_datetimes_serialise_with_z() -> None:
    msg = _msg("status", channel="iopub")
    when = dt.datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)
    msg["header"] = {**msg["header"], "date": when}  # type: ignore[typeddict-item]  # as Session.deserialize gives
    obj = json.loads(m.to_json_frame(msg))
    assert obj["header"]["date"] == "2026-12-01T10:00:00.123456Z"
    v1 = m.deserialize_msg_from_ws_v1(m.serialize_msg_to_ws_v1(msg))
    assert v1["header"]["date"] == "2026-12-01T10:00:00.123456Z"


def test_encode_picks_the_frame_kind() -> None:
    plain, binary = _msg(), _msg(buffers=[b"x"])
    assert isinstance(m.encode_ws_frame(plain, ""), str)
    assert isinstance(m.encode_ws_frame(binary, ""), bytes)
    assert isinstance(m.encode_ws_frame(plain, m.WS_V1_PROTOCOL), bytes)
    for msg in (plain, binary):
        for proto in ("", m.WS_V1_PROTOCOL):
            frame = m.encode_ws_frame(msg, proto)  # type: ignore[arg-type]
            back = m.decode_ws_frame(frame, proto)  # type: ignore[arg-type]
            assert _plain(back) == _plain(msg) and back["buffers"] == msg["buffers"]


def test_select_subprotocol() -> None:
    assert m.select_subprotocol([m.WS_V1_PROTOCOL]) == m.WS_V1_PROTOCOL
    assert m.select_subprotocol(["other"]) == ""
    assert m.select_subprotocol([]) == ""


@pytest.mark.parametrize(
    "frame,proto",
    [
        ("not json", ""),
        ("[1, 2]", ""),
        ('{"header": {}}', ""),
        ('{"header": {"msg_type": "x"}, "channel": "hb"}', ""),
        ('{"header": {"msg_type": "x"}, "content": []}', ""),
        ("{}", m.WS_V1_PROTOCOL),
        (b"\x00\x01", ""),
        (b"\x00\x00\x00\x09" + b"\x00" * 8, ""),
        (b"\xff" * 64, ""),
        (b"\x00" * 4, m.WS_V1_PROTOCOL),
        ((7).to_bytes(8, "little") + b"\x00" * 16, m.WS_V1_PROTOCOL),
        (m.pack_ws_v1("shell", [b"{", b"{}", b"{}", b"{}"]), m.WS_V1_PROTOCOL),
        (m.pack_ws_v1("shell", [b"{}", b"{}"]), m.WS_V1_PROTOCOL),
        (m.pack_ws_v1("nochan", [b'{"msg_type": "x"}', b"{}", b"{}", b"{}"]), m.WS_V1_PROTOCOL),
        (m.pack_ws_v1("shell", [b"\xff\xfe", b"{}", b"{}", b"{}"]), m.WS_V1_PROTOCOL),
    ],
)
def test_malformed_frames_raise_value_error(frame: str | bytes, proto: m.WsProtocol) -> None:
    with pytest.raises(ValueError):
        m.decode_ws_frame(frame, proto)


def test_text_frame_with_buffers_is_refused() -> None:
    with pytest.raises(ValueError, match="binary"):
        m.to_json_frame(_msg(buffers=[b"x"]))


# -- builders and readers -------------------------------------------------------------------------


def test_execute_request_defaults_follow_jupyter_client() -> None:
    msg = m.execute_request("x = 1", session="s")
    assert msg["channel"] == "shell" and m.msg_type(msg) == "execute_request"
    assert msg["content"] == {
        "code": "x = 1",
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }
    assert m.execute_request("x", session="s", silent=True)["content"]["store_history"] is False
    header = msg["header"]
    assert header["version"] == m.PROTOCOL_VERSION and header["session"] == "s"
    dt.datetime.strptime(header["date"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert m.execute_request("x", session="s")["header"]["msg_id"] != header["msg_id"]


def test_requests_go_on_their_channels() -> None:
    assert m.interrupt_request(session="s")["channel"] == "control"
    assert m.shutdown_request(session="s", restart=True)["content"] == {"restart": True}
    assert m.kernel_info_request(session="s")["channel"] == "shell"
    assert m.complete_request("imp", session="s")["content"] == {"code": "imp", "cursor_pos": 3}
    assert m.inspect_request("len", 1, session="s")["content"]["cursor_pos"] == 1
    assert m.is_complete_request("for x in y:", session="s")["content"] == {"code": "for x in y:"}
    assert m.comm_info_request(session="s", target_name="jupyter.widget")["content"] == {
        "target_name": "jupyter.widget"
    }


def test_replies_are_matched_to_their_requests() -> None:
    request = m.execute_request("1+1", session="s")
    reply = m.new_message(
        "execute_reply", {"status": "ok", "execution_count": 1}, channel="shell", session="k", parent=request
    )
    status = m.new_message("status", {"execution_state": "idle"}, channel="iopub", session="k", parent=request)
    assert m.is_reply_to(reply, request) and m.parent_msg_id(reply) == request["header"]["msg_id"]
    assert m.reply_status(reply) == "ok" and m.reply_status(status) is None
    assert m.execution_state(status) == "idle" and m.execution_state(reply) is None
    answer = m.input_reply("42", session="s", parent=request)
    assert answer["channel"] == "stdin" and answer["content"] == {"value": "42"}
    assert m.parent_msg_id(m.kernel_info_request(session="s")) is None
