"""The things measured: each peer can run code and report one :class:`Outcome` per call.

* :mod:`.raw`: jupyter_client straight to a local ipykernel;
* :mod:`.kernel_gateway`: Jupyter Kernel Gateway over its websocket;
* :mod:`.cellbox`: a ``cellbox serve`` subprocess over HTTP NDJSON, and through the SDK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Skip(Exception):
    """A measurement cannot run here (a peer will not install or start); its reason is shown."""


@dataclass
class Outcome:
    """One execution as a client saw it. Times are seconds from the moment the request was sent."""

    seconds: float
    status: str = "ok"  # "ok", or the kernel's/server's word for what went wrong
    first_stdout: float | None = None
    stdout_bytes: int = 0
    artifacts: list[dict[str, Any]] = field(default_factory=list)


STDOUT_CODE = """\
import sys
_chunk = "x" * ({chunk} - 1) + "\\n"
for _ in range({count}):
    sys.stdout.write(_chunk)
sys.stdout.flush()
"""


def stdout_code(total_bytes: int, chunk: int = 64 * 1024) -> tuple[str, int]:
    """Code that prints about ``total_bytes`` in ``chunk``-byte writes, and the exact byte count."""
    count = max(1, total_bytes // chunk)
    return STDOUT_CODE.format(chunk=chunk, count=count), count * chunk
