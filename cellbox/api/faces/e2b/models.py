"""The E2B control plane's JSON (``spec/openapi.yml`` as the 2.x SDKs' generated client reads
it), and the pure mapping between it and cellbox's own models.

Request bodies ignore fields this version does not know (newer SDKs add some), but a field
cellbox cannot honour is refused with a 400 naming it (:func:`to_create`), never dropped.
Responses carry every field the generated parsers require (``from_dict`` raises KeyError on
a missing one).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cellbox.api.faces.e2b.versions import ENVD_VERSION
from cellbox.interpreter.errors import InvalidRequest
from cellbox.interpreter.metrics import Sample
from cellbox.interpreter.models import (
    Limits,
    NetworkSpec,
    SandboxCreate,
    SandboxInfo,
    SandboxState,
)

__all__ = [
    "CLIENT_ID",
    "DEFAULT_TEMPLATE_ALIASES",
    "ConnectBody",
    "NewSandbox",
    "PageCursor",
    "SandboxDefaults",
    "TimeoutBody",
    "listed_sandbox",
    "metric",
    "page",
    "parse_metadata_query",
    "parse_rfc3339",
    "parse_states",
    "rfc3339",
    "sandbox_detail",
    "sandbox_response",
    "to_create",
]

CLIENT_ID = "cellbox"  # E2B puts the node id here; the SDKs keep it and never use it
# The E2B SDKs' default templates ("base" for e2b, "code-interpreter-v1" for
# e2b-code-interpreter) run on cellbox's default template.
DEFAULT_TEMPLATE_ALIASES = frozenset({"base", "code-interpreter-v1", "code-interpreter", "default"})


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class NewSandbox(_Body):
    """``POST /v2/sandboxes`` (and the older ``POST /sandboxes``)."""

    template_id: str = Field(alias="templateID")
    timeout: int | None = Field(default=None, ge=0)
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars")
    allow_internet_access: bool | None = None
    network: dict[str, Any] | None = None
    auto_pause: bool | None = Field(default=None, alias="autoPause")
    auto_resume: dict[str, Any] | None = Field(default=None, alias="autoResume")
    secure: bool | None = None  # deprecated, always "secure" here: every sandbox has a token
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None
    volume_mounts: list[dict[str, Any]] | None = Field(default=None, alias="volumeMounts")


class TimeoutBody(_Body):
    """``POST /sandboxes/{id}/timeout``: seconds from now."""

    timeout: int = Field(ge=0)


class ConnectBody(_Body):
    """``POST /v2/sandboxes/{id}/connect``: an optional new timeout; ``memory: false`` asks to
    reboot instead of restoring (not offered: refused)."""

    timeout: int | None = Field(default=None, ge=0)
    memory: bool | None = None


@dataclass(frozen=True)
class SandboxDefaults:
    """What ``cpuCount``/``memoryMB``/``diskSizeMB`` report when a sandbox has no own limit."""

    cpu: float
    memory_mb: int
    disk_mb: int
    domain: str | None = None  # the ``domain`` to hand out for host routing, when configured


def cellbox_template(template_id: str) -> str:
    """The cellbox template an E2B template id names (the SDK defaults map to ``default``)."""
    return "default" if template_id in DEFAULT_TEMPLATE_ALIASES else template_id


def _network(body: NewSandbox) -> NetworkSpec:
    internet = bool(body.allow_internet_access)
    net = body.network or {}
    mapped = {"allowOut", "denyOut", "allowPublicTraffic"}
    unsupported = sorted(k for k, v in net.items() if v not in (None, [], {}) and k not in mapped)
    if unsupported:
        raise InvalidRequest(
            f"network options {', '.join(unsupported)} are not supported by cellbox's E2B face; "
            "use allow_internet_access, allowOut and denyOut",
            field="network",
        )
    lists = {}
    for key, field in (("allowOut", "allow_out"), ("denyOut", "deny_out")):
        value = net.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidRequest(f"network.{key} is a list of domains, addresses or CIDRs", field="network")
        lists[field] = value
    return NetworkSpec(internet=internet, **lists)


def to_create(body: NewSandbox, max_timeout: float | None = None) -> SandboxCreate:
    """The cellbox create request for an E2B one. InvalidRequest names what cannot be had."""
    refused = [
        name
        for name, value in (
            ("autoPause", body.auto_pause),
            ("autoResume", (body.auto_resume or {}).get("enabled")),
            ("mcp", body.mcp),
            ("iam", body.iam),
            ("volumeMounts", body.volume_mounts),
        )
        if value
    ]
    if refused:
        raise InvalidRequest(f"not supported by cellbox's E2B face: {', '.join(refused)}", field=refused[0])
    timeout: float | None = float(body.timeout) if body.timeout else None
    if timeout is not None and max_timeout is not None:
        timeout = min(timeout, max_timeout)
    public = (body.network or {}).get("allowPublicTraffic")
    if public is not None and not isinstance(public, bool):
        raise InvalidRequest("network.allowPublicTraffic is a boolean", field="network")
    return SandboxCreate(
        template=cellbox_template(body.template_id),
        timeout=timeout,
        envs=dict(body.env_vars or {}),
        metadata=dict(body.metadata or {}),
        network=_network(body),
        # E2B's default is public; cellbox's ports stay private unless asked (the README says so).
        allow_public_traffic=bool(public),
    )


def rfc3339(ts: float) -> str:
    """A unix time as the RFC 3339 UTC string the SDKs parse (``isoparse``)."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse_rfc3339(value: str, field: str) -> float:
    """An RFC 3339 time (``2026-12-01T10:00:00Z``, any offset) as a unix time."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"invalid {field}: expected an RFC 3339 time", field=field) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _e2b_state(state: SandboxState) -> Literal["running", "paused"]:
    return "paused" if state is SandboxState.PAUSED else "running"


def _end_at(info: SandboxInfo) -> float:
    return info.end_at or info.ended_at or info.created_at


def _sizes(info: SandboxInfo, defaults: SandboxDefaults) -> dict[str, Any]:
    limits: Limits = info.limits
    return {
        "cpuCount": max(1, math.ceil(limits.cpu or defaults.cpu)),
        "memoryMB": limits.memory_mb or defaults.memory_mb,
        "diskSizeMB": limits.disk_mb or defaults.disk_mb,
    }


def sandbox_response(info: SandboxInfo, access_token: str, defaults: SandboxDefaults) -> dict[str, Any]:
    """The ``Sandbox`` object of create and connect: ``envdAccessToken`` (envd's
    ``X-Access-Token``), and ``trafficAccessToken``, the sandbox's cellbox traffic token (the
    ``e2b-traffic-access-token`` header opens its ports; the SDKs send it to port 49999 too),
    null when the sandbox was made with ``allowPublicTraffic`` (as E2B's)."""
    out: dict[str, Any] = {
        "templateID": info.template,
        "sandboxID": info.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "alias": info.template,
        "envdAccessToken": access_token,
        "trafficAccessToken": None if info.allow_public_traffic else info.traffic_token,
    }
    if defaults.domain:
        out["domain"] = defaults.domain
    return out


def listed_sandbox(info: SandboxInfo, defaults: SandboxDefaults) -> dict[str, Any]:
    """One item of ``GET /v2/sandboxes``."""
    return {
        "templateID": info.template,
        "alias": info.template,
        "sandboxID": info.id,
        "clientID": CLIENT_ID,
        "startedAt": rfc3339(info.created_at),
        "endAt": rfc3339(_end_at(info)),
        **_sizes(info, defaults),
        "state": _e2b_state(info.state),
        "envdVersion": ENVD_VERSION,
        "metadata": dict(info.metadata),
    }


def sandbox_detail(info: SandboxInfo, access_token: str, defaults: SandboxDefaults) -> dict[str, Any]:
    """``GET /sandboxes/{id}``."""
    out = listed_sandbox(info, defaults)
    out["envdAccessToken"] = access_token
    if defaults.domain:
        out["domain"] = defaults.domain
    return out


def metric(sample: Sample, info: SandboxInfo, defaults: SandboxDefaults) -> dict[str, Any]:
    """One ``SandboxMetric`` from one of the core's samples (:mod:`cellbox.interpreter.metrics`).
    Without isolation a sandbox has no cgroup: its memory and disk use read 0."""
    sizes = _sizes(info, defaults)
    return {
        "timestamp": rfc3339(sample.at),
        "timestampUnix": int(sample.at),
        "cpuCount": sizes["cpuCount"],
        "cpuUsedPct": sample.cpu_pct,
        "memUsed": sample.memory_bytes or 0,
        "memTotal": sizes["memoryMB"] * 1024 * 1024,
        "memCache": 0,
        "diskUsed": sample.disk_used_bytes or 0,
        "diskTotal": sample.disk_total_bytes or sizes["diskSizeMB"] * 1024 * 1024,
    }


# ---------------------------------------------------------------------------------------------
# Listing: filters and paging


def parse_metadata_query(value: str | None) -> dict[str, str] | None:
    """The ``metadata`` query parameter: ``k=v&k2=v2`` with keys and values quoted once more
    by the SDK (``urlencode({quote(k): quote(v)})``)."""
    if not value:
        return None
    pairs = urllib.parse.parse_qsl(value, keep_blank_values=True)
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def parse_states(value: list[str] | None) -> list[SandboxState]:
    """``state=running,paused`` (or repeated); default both, as E2B's."""
    names = [part.strip() for item in value or [] for part in item.split(",") if part.strip()]
    if not names:
        return [SandboxState.RUNNING, SandboxState.PAUSED]
    out: list[SandboxState] = []
    for name in names:
        if name == "running":
            out += [SandboxState.RUNNING, SandboxState.STARTING]
        elif name == "paused":
            out.append(SandboxState.PAUSED)
        else:
            raise InvalidRequest(f"unknown state {name!r}: expected running or paused", field="state")
    return out


@dataclass(frozen=True)
class PageCursor:
    """Where the next page starts: after the sandbox ``(created_at, id)`` in list order. An
    opaque token to clients (``X-Next-Token``)."""

    created_at: float
    id: str

    def encode(self) -> str:
        raw = json.dumps([self.created_at, self.id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> PageCursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            created_at, sid = json.loads(raw)
            return cls(float(created_at), str(sid))
        except (ValueError, TypeError, binascii.Error):
            raise InvalidRequest("invalid nextToken", field="nextToken") from None


def page(
    sandboxes: list[SandboxInfo], limit: int, order: str | None, next_token: str | None
) -> tuple[list[SandboxInfo], str | None]:
    """One page of ``sandboxes`` sorted by start time (``order`` asc, the default, or desc)
    and the token of the next page (None on the last)."""
    if order not in (None, "asc", "desc"):
        raise InvalidRequest(f"invalid order {order!r}: expected asc or desc", field="order")
    if limit < 1:
        raise InvalidRequest("limit must be at least 1", field="limit")
    desc = order == "desc"
    items = sorted(sandboxes, key=lambda s: (s.created_at, s.id), reverse=desc)
    if next_token:
        cur = PageCursor.decode(next_token)
        key = (cur.created_at, cur.id)
        items = [s for s in items if ((s.created_at, s.id) < key if desc else (s.created_at, s.id) > key)]
    chosen = items[:limit]
    more = len(items) > limit
    token = PageCursor(chosen[-1].created_at, chosen[-1].id).encode() if more and chosen else None
    return chosen, token
