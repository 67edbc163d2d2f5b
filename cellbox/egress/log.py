"""The egress decision log: a bounded in-memory ring of records per sandbox.

The proxy adds a record when it decides (allowed or denied, and why) and completes it when the
connection closes (bytes each way). The API reads a sandbox's ring through
:meth:`EgressLogBook.get` (``GET /v1/sandboxes/{id}/egress`` is the lead's route). Nothing is
persisted: the ring is for "why did my pip install fail", not an audit trail; counters survive
eviction so a flood that pushes old records out still shows in the totals.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["EgressLog", "EgressLogBook", "EgressRecord"]


@dataclass
class EgressRecord:
    """One connection the sandbox asked for. ``protocol`` is ``"connect"``, ``"http"``,
    ``"socks5"`` or ``"unknown"`` (a handshake that never finished); ``host`` is what the sandbox
    asked for (a name or an address); ``address`` the resolved address it was decided on."""

    seq: int
    time: float
    protocol: str
    host: str
    port: int
    allowed: bool
    reason: str
    address: str | None = None
    rule: str | None = None
    error: str | None = None  # allowed, but the upstream could not be reached
    server_name: str | None = None  # the TLS server name (SNI) the client sent, when checked
    bytes_up: int = 0
    bytes_down: int = 0
    closed_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EgressLog:
    """One sandbox's ring of decisions (``capacity`` most recent) and its running totals.

    Called from the proxy's event loop only (not thread-safe, no locks needed)."""

    def __init__(self, sandbox_id: str, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.sandbox_id = sandbox_id
        self._ring: deque[EgressRecord] = deque(maxlen=capacity)
        self._seq = 0
        self.allowed = 0
        self.denied = 0
        self.bytes_up = 0
        self.bytes_down = 0

    def decision(
        self,
        protocol: str,
        host: str,
        port: int,
        allowed: bool,
        reason: str,
        *,
        address: str | None = None,
        rule: str | None = None,
    ) -> EgressRecord:
        """Record a decision; returns the record so :meth:`closed` can complete it."""
        record = EgressRecord(self._seq, time.time(), protocol, host, port, allowed, reason, address, rule)
        self._seq += 1
        if allowed:
            self.allowed += 1
        else:
            self.denied += 1
        self._ring.append(record)
        return record

    def closed(self, record: EgressRecord, bytes_up: int, bytes_down: int, error: str | None = None) -> None:
        """Complete ``record`` when its connection ends (even if it was evicted from the ring)."""
        record.bytes_up = bytes_up
        record.bytes_down = bytes_down
        record.closed_at = time.time()
        if error is not None:
            record.error = error
        self.bytes_up += bytes_up
        self.bytes_down += bytes_down

    def records(self, after: int = -1, limit: int | None = None) -> list[EgressRecord]:
        """The records still in the ring with ``seq > after``, oldest first."""
        out = [record for record in self._ring if record.seq > after]
        return out if limit is None else out[:limit]

    def summary(self) -> dict[str, Any]:
        return {
            "sandbox_id": self.sandbox_id,
            "allowed": self.allowed,
            "denied": self.denied,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "next": self._seq,
        }


class EgressLogBook:
    """The service's logs, one per sandbox with egress (kept by the manager, read by the API)."""

    def __init__(self, capacity_per_sandbox: int = 1000) -> None:
        self.capacity = capacity_per_sandbox
        self._logs: dict[str, EgressLog] = {}

    def for_sandbox(self, sandbox_id: str) -> EgressLog:
        """The sandbox's log, created on first use (the runtime calls this at create)."""
        log = self._logs.get(sandbox_id)
        if log is None:
            log = self._logs[sandbox_id] = EgressLog(sandbox_id, self.capacity)
        return log

    def get(self, sandbox_id: str) -> EgressLog | None:
        return self._logs.get(sandbox_id)

    def drop(self, sandbox_id: str) -> None:
        """Forget a sandbox's log (when the sandbox is deleted). Idempotent."""
        self._logs.pop(sandbox_id, None)
