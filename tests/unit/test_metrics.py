"""The core's resource samples (E2B's get_metrics): the ring, CPU percentages, the sampler."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from cellbox.interpreter.metrics import MetricsRing, Sampler
from cellbox.interpreter.models import Limits, SandboxState, SandboxUsage


def test_the_ring_keeps_the_newest_and_filters_by_time() -> None:
    ring = MetricsRing(capacity=3)
    for at in (10.0, 20.0, 30.0, 40.0):
        ring.add(at, SandboxUsage(memory_bytes=int(at)), cpu_count=1)
    assert [s.at for s in ring.samples] == [20.0, 30.0, 40.0]
    assert [s.at for s in ring.between(25.0, None)] == [30.0, 40.0]
    assert [s.at for s in ring.between(None, 30.0)] == [20.0, 30.0]
    assert [s.memory_bytes for s in ring.between(30.0, 30.0)] == [30]


def test_cpu_percent_is_of_all_the_sandboxes_cpus_between_two_samples() -> None:
    ring = MetricsRing()
    assert ring.add(100.0, SandboxUsage(cpu_seconds=5.0), cpu_count=2).cpu_pct == 0.0  # no earlier sample
    assert ring.add(110.0, SandboxUsage(cpu_seconds=10.0), cpu_count=2).cpu_pct == 25.0  # 5 s of 20 CPU-s
    assert ring.add(111.0, SandboxUsage(cpu_seconds=13.0), cpu_count=2).cpu_pct == 100.0  # capped
    assert ring.add(112.0, None, cpu_count=2).cpu_pct == 0.0  # no cgroup: unknown reads 0


class FakeRuntime:
    def __init__(self) -> None:
        self.cpu = 0.0
        self.calls = 0

    async def usage(self, backend: Any) -> SandboxUsage:
        self.calls += 1
        self.cpu += 0.5
        return SandboxUsage(memory_bytes=1000, cpu_seconds=self.cpu)


def fake_sandbox(sid: str, runtime: FakeRuntime, state: SandboxState = SandboxState.RUNNING) -> Any:
    return SimpleNamespace(
        id=sid,
        state=state,
        backend=object(),
        runtime=runtime,
        info_base=SimpleNamespace(limits=Limits(cpu=1)),
        settings=SimpleNamespace(default_cpu=1.0),
    )


@pytest.mark.asyncio
async def test_the_sampler_samples_running_sandboxes_and_forgets_ended_ones() -> None:
    now = [1000.0]
    runtime = FakeRuntime()
    running, paused = fake_sandbox("a", runtime), fake_sandbox("b", runtime, SandboxState.PAUSED)
    live = [running, paused]
    sampler = Sampler(lambda: live, interval=5.0, clock=lambda: now[0])
    await sampler.sample_all()
    now[0] = 1001.0
    await sampler.sample_all()
    assert set(sampler.rings) == {"a"}
    got = await sampler.samples(running)  # the newest is 0 s old: no fresh sample
    assert [s.at for s in got] == [1000.0, 1001.0] and got[1].cpu_pct == 50.0
    now[0] = 1010.0
    assert [s.at for s in await sampler.samples(running, start=1001.0)] == [1001.0, 1010.0]  # a fresh one
    assert runtime.calls == 3
    live.remove(running)
    await sampler.sample_all()
    assert sampler.rings == {}
