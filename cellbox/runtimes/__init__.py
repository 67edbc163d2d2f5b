"""Runtimes: where sandboxes live. Picked by name, imported only when selected."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cellbox.interpreter.errors import RuntimeUnavailable
from cellbox.runtimes.specs import LocalConfig

if TYPE_CHECKING:
    from cellbox.egress.service import Egress
    from cellbox.runtimes.base import Runtime

__all__ = ["RUNTIMES", "RuntimeSettings", "load_runtime", "local_config"]

RUNTIMES: dict[str, str] = {
    "local": "cellbox.runtimes.backend:local_runtime",
}


class RuntimeSettings(Protocol):
    """What :func:`load_runtime` reads of the service's settings (``interpreter.config.Settings``
    has all of it; ``runtimes`` never imports it)."""

    @property
    def runtime(self) -> str: ...
    @property
    def data_dir(self) -> Path: ...
    @property
    def isolation(self) -> str: ...
    @property
    def kernel_start_timeout(self) -> float: ...
    @property
    def default_memory_mb(self) -> int: ...
    @property
    def default_cpu(self) -> float: ...
    @property
    def default_pids(self) -> int: ...
    @property
    def default_disk_mb(self) -> int: ...
    @property
    def default_nofile(self) -> int: ...
    @property
    def default_fsize_mb(self) -> int: ...
    @property
    def sandbox_uid_first(self) -> int: ...
    @property
    def sandbox_uid_count(self) -> int: ...
    @property
    def sandbox_range_first(self) -> int: ...
    @property
    def sandbox_range_count(self) -> int: ...
    @property
    def cgroup_prefix(self) -> str: ...
    @property
    def sandbox_tmp_mb(self) -> int: ...
    @property
    def interrupt_grace(self) -> float: ...
    @property
    def max_output_bytes(self) -> int: ...
    @property
    def max_contexts_per_sandbox(self) -> int: ...

    def resolved_run_dir(self) -> Path: ...


def local_config(settings: RuntimeSettings) -> LocalConfig:
    """The local runtime's configuration, read from ``settings`` by attribute."""
    return LocalConfig(
        data_dir=settings.data_dir,
        run_dir=settings.resolved_run_dir(),
        isolation=settings.isolation,
        kernel_start_timeout=settings.kernel_start_timeout,
        default_memory_mb=settings.default_memory_mb,
        default_cpu=settings.default_cpu,
        default_pids=settings.default_pids,
        default_disk_mb=settings.default_disk_mb,
        default_nofile=settings.default_nofile,
        default_fsize_mb=settings.default_fsize_mb,
        sandbox_uid_first=settings.sandbox_uid_first,
        sandbox_uid_count=settings.sandbox_uid_count,
        sandbox_range_first=settings.sandbox_range_first,
        sandbox_range_count=settings.sandbox_range_count,
        cgroup_prefix=settings.cgroup_prefix,
        sandbox_tmp_mb=settings.sandbox_tmp_mb,
    )


def load_runtime(settings: RuntimeSettings, *, egress: Egress | None = None) -> Runtime:
    """Instantiate the runtime ``settings.runtime`` names; RuntimeUnavailable if unknown or
    its optional dependencies are missing. ``egress`` (the service's, made by the manager) gives
    sandboxes that ask for it outbound network; without it, any is refused."""
    target = RUNTIMES.get(settings.runtime)
    if target is None:
        raise RuntimeUnavailable(f"unknown runtime {settings.runtime!r}; known: {', '.join(sorted(RUNTIMES))}")
    module_name, _, factory = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"runtime {settings.runtime!r} needs {exc.name}: pip install 'cellbox[{settings.runtime}]'"
        ) from exc
    runtime: Runtime = getattr(module, factory)(settings, egress=egress)
    return runtime
