"""jupyter_server's own websocket (de)serialisation, as a reference for cellbox.interpreter.messages.

Used in-process when jupyter_server is importable; otherwise run as a script by the Python of
``.venv-jupyter`` (scripts/jupyter-e2e-setup.sh), which keeps jupyter_server out of the service's
venv: it reads one JSON object of cases on stdin and prints one JSON object of answers. Bytes
travel base64-encoded.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def answer(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each case (``msg`` with base64 ``buffers``, ``mine_v1``, ``mine_legacy``): jupyter_server's
    frames of ``msg`` and its parse of cellbox's frames."""
    from jupyter_client.jsonutil import json_default
    from jupyter_client.session import Session
    from jupyter_server.services.kernels.connection.base import (
        deserialize_binary_message,
        deserialize_msg_from_ws_v1,
        serialize_binary_message,
        serialize_msg_to_ws_v1,
    )

    pack = Session().pack
    out = []
    for case in cases:
        msg = case["msg"]
        buffers = [_unb64(b) for b in msg["buffers"]]
        parts = [pack(msg[k]) for k in ("header", "parent_header", "metadata", "content")]
        their_v1 = serialize_msg_to_ws_v1([*parts, *buffers], msg["channel"])
        legacy_msg = {**msg, "buffers": buffers}
        their_legacy = serialize_binary_message(legacy_msg)
        channel, mine_parts = deserialize_msg_from_ws_v1(_unb64(case["mine_v1"]))
        parsed_legacy = deserialize_binary_message(_unb64(case["mine_legacy"]))
        parsed_buffers = [_b64(b) for b in parsed_legacy.pop("buffers")]
        out.append(
            {
                "packed": [_b64(p) for p in parts],
                "their_v1": _b64(their_v1),
                "their_legacy": _b64(their_legacy),
                "mine_v1_channel": channel,
                "mine_v1_parts": [_b64(p) for p in mine_parts],
                "mine_legacy": json.loads(json.dumps(parsed_legacy, default=json_default)),
                "mine_legacy_buffers": parsed_buffers,
            }
        )
    return out


if __name__ == "__main__":
    json.dump(answer(json.load(sys.stdin)), sys.stdout)
