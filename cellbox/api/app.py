"""The application factory: ``create_app(settings)``, the root of every face.

The root app runs the lifespan (it opens the :class:`SandboxManager` and closes it) and hands
each request to the first face that claims it (``cellbox.api.faces``).
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from cellbox.api.faces import Face, Services, load_faces
from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import RuntimeUnavailable
from cellbox.interpreter.manager import SandboxManager

log = logging.getLogger("cellbox.api")


class CellboxApp:
    """The root ASGI app: lifespan, then dispatch to the faces."""

    def __init__(self, settings: Settings, faces: list[Face], manager: SandboxManager | None = None) -> None:
        self.settings = settings
        self.services = Services(settings, manager)
        self._owns_manager = manager is None
        self.faces = [(face, face.build(self.services)) for face in faces]

    def app_for(self, scope: Scope) -> ASGIApp:
        for face, app in self.faces:
            if face.matches(scope):
                return app
        return self.faces[-1][1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.app_for(scope)(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            if self._owns_manager:
                self.services._manager = await SandboxManager.open(self.settings)
        except Exception as exc:
            if not isinstance(exc, RuntimeUnavailable):  # a refusal that says why is one line (uvicorn's)
                log.exception("cellbox could not start")
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        assert message["type"] == "lifespan.shutdown"
        try:
            if self._owns_manager and self.services._manager is not None:
                await self.services._manager.close()
        except Exception as exc:
            log.exception("cellbox did not shut down cleanly")
            await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


def create_app(settings: Settings, manager: SandboxManager | None = None, faces: list[str] | None = None) -> CellboxApp:
    """Build the ASGI app. Without ``manager`` the lifespan opens one from ``settings`` (and
    closes it at shutdown); tests may pass their own. ``faces`` names the faces to serve
    (default: every registered one)."""
    return CellboxApp(settings, load_faces(faces), manager)
