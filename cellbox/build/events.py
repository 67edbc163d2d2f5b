"""A build's progress, as events: the CLI draws a bar from them, ``POST /v1/templates`` sends
each as one NDJSON line.

* ``step``: a build step started (``step``/``total`` over the whole build, ``phase`` one of
  ``base``, ``dockerfile``, ``cellbox``, ``export``; ``instruction``; ``line`` in the Dockerfile
  for its own steps);
* ``cached``: the step just started was taken from buildah's layer cache;
* ``log``: one line of output (``text``);
* ``error``: the build failed (``code``, ``message``, ``line`` when a Dockerfile step failed,
  ``output``: the failing step's last lines). The last event of a failed build;
* ``done``: the template is in place (``template``, ``path``, ``image``, ``duration_ms``,
  ``cached_steps``, ``exported``: False when the image was unchanged and the tree kept). The last
  event of a successful build.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["BuildEvent", "OnEvent"]

EventType = Literal["step", "cached", "log", "error", "done"]


@dataclass(frozen=True)
class BuildEvent:
    type: EventType
    step: int | None = None
    total: int | None = None
    phase: str | None = None
    instruction: str | None = None
    line: int | None = None
    text: str | None = None
    code: str | None = None
    message: str | None = None
    output: str | None = None
    template: str | None = None
    path: str | None = None
    image: str | None = None
    duration_ms: int | None = None
    cached_steps: int | None = None
    exported: bool | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object: ``type`` and the fields that are set."""
        return {k: v for k, v in asdict(self).items() if v is not None}


OnEvent = Callable[[BuildEvent], None]
