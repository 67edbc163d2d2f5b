"""Faces: the doors clients come in by, each its own sub-application over the one core.

A :class:`Face` says which requests are its own (``matches``) and builds its ASGI app from the
shared :class:`Services`. Each face renders errors its own way over the one exception tree and
serialises the core's models itself; none of them holds core internals. The root app
(``cellbox.api.app``) hands every request to the first face in :data:`FACES` that claims it;
the native face (``/v1``, ``/healthz``, ``/docs``) takes whatever no other face claimed.

Faces are imported lazily, by name, like the runtimes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Scope

from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import RuntimeUnavailable
from cellbox.interpreter.manager import SandboxManager

__all__ = ["FACES", "Face", "Services", "load_faces"]


@dataclass
class Services:
    """What every face gets: the settings now, the manager once the lifespan opened it."""

    settings: Settings
    _manager: SandboxManager | None = field(default=None, repr=False)

    @property
    def manager(self) -> SandboxManager:
        if self._manager is None:
            raise RuntimeError("Expected the service to be started, but its lifespan has not run")
        return self._manager


@dataclass(frozen=True)
class Face:
    name: str
    matches: Callable[[Scope], bool]
    build: Callable[[Services], ASGIApp]


# Order matters: the first face that claims a request gets it; "native" claims the rest.
FACES: dict[str, str] = {
    "e2b": "cellbox.api.faces.e2b.app:FACE",
    "jupyter": "cellbox.api.faces.jupyter:FACE",
    "native": "cellbox.api.faces.native:FACE",
}


def load_faces(names: list[str] | None = None) -> list[Face]:
    """The faces to serve, in :data:`FACES` order, the native one last."""
    wanted = names if names is not None else list(FACES)
    faces = []
    for name in FACES:
        if name not in wanted:
            continue
        module_name, _, attr = FACES[name].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RuntimeUnavailable(f"face {name!r} needs {exc.name}") from exc
        faces.append(getattr(module, attr))
    return sorted(faces, key=lambda f: f.name == "native")
