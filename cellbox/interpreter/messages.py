"""Jupyter messages as plain typed data: build, parse and (de)serialise them, with no I/O.

Bottom layer: the runtimes and every face may import it. Only ``runtimes/kernel.py`` talks to
kernels (through jupyter_client); everything else handles messages through these types.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

__all__ = ["Channel", "Header", "KernelMessage"]

Channel = Literal["shell", "iopub", "stdin", "control"]


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
