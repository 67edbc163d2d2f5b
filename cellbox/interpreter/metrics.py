"""Resource samples of live sandboxes over time: what E2B's ``get_metrics(start, end)`` serves.

A :class:`Sampler` reads every running sandbox's usage (the runtime's ``usage``: a few cgroup
files and a ``statvfs``, cheap) every ``interval`` seconds into a bounded :class:`MetricsRing`
per sandbox, so a sandbox's history costs at most ``capacity`` small samples. CPU use is a
percentage of the sandbox's CPUs between two samples. A read whose newest sample is older than
one interval takes a fresh one first (:meth:`Sampler.samples`), so an answer is never stale.
Samples live in memory: a sandbox's history ends with it, or with the service.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cellbox.interpreter.models import SandboxState, SandboxUsage

if TYPE_CHECKING:
    from cellbox.interpreter.sandbox import Sandbox

log = logging.getLogger("cellbox.metrics")

__all__ = ["DEFAULT_CAPACITY", "DEFAULT_INTERVAL", "MetricsRing", "Sample", "Sampler"]

DEFAULT_INTERVAL = 5.0  # E2B's sandboxes report every 5 s as well
DEFAULT_CAPACITY = 720  # an hour of them


@dataclass(frozen=True)
class Sample:
    at: float  # unix time
    cpu_count: int
    cpu_pct: float  # of all the sandbox's CPUs since the previous sample (0 for the first)
    memory_bytes: int | None
    disk_used_bytes: int | None
    disk_total_bytes: int | None


class MetricsRing:
    """One sandbox's last ``capacity`` samples, oldest first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.samples: deque[Sample] = deque(maxlen=max(1, capacity))
        self._cpu: tuple[float, float] | None = None  # (time, cpu seconds) of the last sample

    def add(self, at: float, usage: SandboxUsage | None, cpu_count: int) -> Sample:
        u = usage or SandboxUsage()
        pct = 0.0
        if u.cpu_seconds is not None:
            if self._cpu is not None and at > self._cpu[0]:
                used = max(0.0, u.cpu_seconds - self._cpu[1]) / (at - self._cpu[0])
                pct = min(100.0, 100.0 * used / max(1, cpu_count))
            self._cpu = (at, u.cpu_seconds)
        sample = Sample(at, cpu_count, round(pct, 2), u.memory_bytes, u.disk_used_bytes, u.disk_total_bytes)
        self.samples.append(sample)
        return sample

    def between(self, start: float | None, end: float | None) -> list[Sample]:
        """The samples with ``start <= at <= end`` (either bound may be None)."""
        return [s for s in self.samples if (start is None or s.at >= start) and (end is None or s.at <= end)]


class Sampler:
    """Samples the sandboxes ``sandboxes()`` yields every ``interval`` seconds (:meth:`run`)."""

    def __init__(
        self,
        sandboxes: Callable[[], Iterable[Sandbox]],
        interval: float = DEFAULT_INTERVAL,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sandboxes = sandboxes
        self.interval = interval
        self.capacity = capacity
        self.clock = clock
        self.rings: dict[str, MetricsRing] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.sample_all()
            except Exception:  # never stops the sampling of the next round
                log.warning("metrics sampling failed", exc_info=True)
            await asyncio.sleep(self.interval)

    async def sample_all(self) -> None:
        live = {sb.id: sb for sb in self._sandboxes() if sb.state == SandboxState.RUNNING}
        for sid in [sid for sid in self.rings if sid not in live]:
            del self.rings[sid]  # ended (or paused: its CPU clock stops, a new series starts)
        for sb in live.values():
            await self.sample(sb)

    async def sample(self, sb: Sandbox) -> Sample | None:
        """A sample of ``sb`` now (None when it is not running or its usage cannot be read)."""
        backend = sb.backend
        if backend is None or sb.state != SandboxState.RUNNING:
            return None
        try:
            usage = await sb.runtime.usage(backend)
        except Exception:
            log.debug("usage of %s could not be read", sb.id, exc_info=True)
            return None
        ring = self.rings.setdefault(sb.id, MetricsRing(self.capacity))
        return ring.add(self.clock(), usage, cpu_count(sb))

    async def samples(self, sb: Sandbox, start: float | None = None, end: float | None = None) -> list[Sample]:
        """``sb``'s samples between ``start`` and ``end``; a fresh one first when the newest
        is older than one interval."""
        ring = self.rings.get(sb.id)
        if ring is None or not ring.samples or self.clock() - ring.samples[-1].at >= self.interval:
            await self.sample(sb)
            ring = self.rings.get(sb.id)
        return ring.between(start, end) if ring is not None else []


def cpu_count(sb: Sandbox) -> int:
    """The CPUs a sandbox may use (its limit rounded up; the service default when unset)."""
    return max(1, math.ceil(sb.info_base.limits.cpu or sb.settings.default_cpu))
