"""Runtimes: where sandboxes live. Picked by name, imported only when selected."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cellbox.interpreter.errors import RuntimeUnavailable

if TYPE_CHECKING:
    from cellbox.interpreter.config import Settings
    from cellbox.runtimes.base import Runtime

RUNTIMES: dict[str, str] = {
    "local": "cellbox.runtimes.backend:local_runtime",
}


def load_runtime(settings: Settings) -> Runtime:
    """Instantiate the runtime ``settings.runtime`` names; RuntimeUnavailable if unknown or
    its optional dependencies are missing."""
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
    runtime: Runtime = getattr(module, factory)(settings)
    return runtime
