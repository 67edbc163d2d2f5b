"""What the E2B face's handlers need: the core's manager, the settings, and who the caller is
(:mod:`.auth`). One :class:`Services` per face app, in ``app.state.e2b``."""

from __future__ import annotations

import contextlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from cellbox.api.deps import ANONYMOUS, key_from_headers, owner_of_key
from cellbox.api.faces import Services as CoreServices
from cellbox.api.faces.e2b import auth
from cellbox.api.faces.e2b.models import SandboxDefaults
from cellbox.api.faces.e2b.watchers import Watchers
from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import InvalidRequest, Unauthorized
from cellbox.interpreter.manager import SandboxManager
from cellbox.interpreter.sandbox import Sandbox

__all__ = [
    "ENVD_PORT",
    "JUPYTER_PORT",
    "SANDBOX_ID_HEADER",
    "SANDBOX_PORT_HEADER",
    "TRAFFIC_TOKEN_HEADER",
    "Services",
    "sandbox_target",
    "services",
]

#: envd (commands, files, PTY) and the code-interpreter server, as E2B numbers them.
ENVD_PORT = 49983
JUPYTER_PORT = 49999
SANDBOX_ID_HEADER = "e2b-sandbox-id"
SANDBOX_PORT_HEADER = "e2b-sandbox-port"
#: Where the SDKs (and a client of a private sandbox's port) send ``trafficAccessToken``.
TRAFFIC_TOKEN_HEADER = "e2b-traffic-access-token"
# E2B's host routing, ``{port}-{sandbox id}.{domain}``; only cellbox's own id shape is claimed,
# so no other request's host is ever taken for one.
_HOST_TARGET = re.compile(r"(?P<port>\d{1,5})-(?P<id>sb_[0-9a-f]{8,64})\.(?P<domain>.+)")


def sandbox_target(headers: Any, domain: str | None) -> tuple[str, int] | None:
    """``(sandbox id, port)`` a request is addressed to: the ``E2b-Sandbox-Id`` /
    ``E2b-Sandbox-Port`` headers, else the host ``{port}-{id}.{domain}`` (E2B's domain mode,
    behind a TLS proxy; with ``domain`` given, only that domain); None for the control plane."""
    sid = headers.get(SANDBOX_ID_HEADER)
    port = headers.get(SANDBOX_PORT_HEADER)
    if sid and port and port.isdigit():
        return sid, int(port)
    host = (headers.get("host") or "").split(":", 1)[0].lower()
    match = _HOST_TARGET.fullmatch(host)
    if match and (domain is None or match["domain"] == domain.lower()):
        return match["id"], int(match["port"])
    return None


@dataclass
class Services:
    core: CoreServices  # the registry's: settings now, the manager once the lifespan ran
    defaults: SandboxDefaults
    watchers: Watchers = field(default_factory=Watchers)  # envd's polling watchers

    @property
    def settings(self) -> Settings:
        return self.core.settings

    @property
    def manager(self) -> SandboxManager:
        return self.core.manager

    # -- the control plane -----------------------------------------------------------------

    def caller_key(self, conn: HTTPConnection) -> str | None:
        """The caller's API key (None when the service has no keys). Unauthorized otherwise."""
        keys = self.settings.api_keys
        if not keys:
            return None
        key = key_from_headers(conn.headers.get("authorization"), conn.headers.get("x-api-key"))
        if key is None:
            raise Unauthorized("missing API key: set E2B_API_KEY (sent as X-API-KEY)")
        for known in keys:
            if hmac.compare_digest(key.encode(), known.encode()):
                return known
        raise Unauthorized("invalid API key")

    def owner(self, conn: HTTPConnection) -> str:
        return self.owner_of(self.caller_key(conn))

    @staticmethod
    def owner_of(key: str | None) -> str:
        """The owner id of a configured key (None: the anonymous owner of a keyless service)."""
        return ANONYMOUS if key is None else owner_of_key(key)

    def token(self, conn: HTTPConnection, sandbox_id: str) -> str:
        """The access token the caller gets for a sandbox of theirs."""
        return auth.access_token(self.caller_key(conn), sandbox_id)

    # -- the sandbox surfaces --------------------------------------------------------------

    def target(self, conn: HTTPConnection) -> tuple[str, int]:
        found = sandbox_target(conn.headers, self.defaults.domain)
        if found is None:
            raise InvalidRequest("no sandbox named: send E2b-Sandbox-Id and E2b-Sandbox-Port")
        return found

    async def sandbox_owner(self, conn: HTTPConnection, sandbox_id: str, port: int) -> str:
        """The owner of ``sandbox_id`` according to the request's access token (``X-Access-Token``),
        else, on the code-interpreter port only (:data:`JUPYTER_PORT`, where the SDKs send no
        envd token), its traffic token (``E2B-Traffic-Access-Token``: in E2B as here it opens the
        sandbox's ports, that one included; never envd, i.e. commands and files). Public traffic
        opens no surface of this face: a token it is."""
        keys = list(self.settings.api_keys)
        token = conn.headers.get("x-access-token")
        traffic = conn.headers.get(TRAFFIC_TOKEN_HEADER)
        if token or not traffic or port != JUPYTER_PORT:
            return auth.owner_for_token(keys, sandbox_id, token)
        with contextlib.suppress(Unauthorized):
            return auth.owner_for_token(keys, sandbox_id, traffic)  # an access token sent as traffic's
        try:
            sbx = await self.manager.traffic(sandbox_id, None, traffic)
        except Unauthorized:
            raise Unauthorized("invalid access token") from None
        expected = sbx.info_base.traffic_token
        if not expected or not hmac.compare_digest(traffic.encode(), expected.encode()):
            raise Unauthorized("invalid access token")
        return sbx.owner

    async def sandbox(self, conn: HTTPConnection) -> tuple[str, Sandbox]:
        """The sandbox a sandbox-surface request is addressed to (live, paused or ended: work
        on one that is not running raises SandboxNotRunning)."""
        sid, port = self.target(conn)
        owner = await self.sandbox_owner(conn, sid, port)  # authenticate before touching the core
        return sid, await self.manager.get(owner, sid)


def services(conn: HTTPConnection) -> Services:
    svc: Services = conn.app.state.e2b
    return svc
