"""The E2B control plane's JSON and its mapping onto cellbox's models."""

from __future__ import annotations

import urllib.parse

import pytest

from cellbox.api.faces.e2b import models as m
from cellbox.api.faces.e2b.versions import ENVD_VERSION
from cellbox.interpreter.errors import InvalidRequest
from cellbox.interpreter.metrics import Sample
from cellbox.interpreter.models import Limits, SandboxInfo, SandboxState

DEFAULTS = m.SandboxDefaults(cpu=1.0, memory_mb=1024, disk_mb=2048)


def info(sid: str = "sbx1", created: float = 1_700_000_000.0, **kw: object) -> SandboxInfo:
    values: dict[str, object] = {
        "id": sid,
        "template": "default",
        "state": SandboxState.RUNNING,
        "created_at": created,
        "end_at": created + 300,
    }
    values.update(kw)
    return SandboxInfo.model_validate(values)


def test_create_body_as_the_sdk_sends_it() -> None:
    body = m.NewSandbox.model_validate(
        {
            "templateID": "code-interpreter-v1",
            "timeout": 120,
            "metadata": {"a": "b"},
            "envVars": {"X": "1"},
            "secure": True,
            "allow_internet_access": True,
            "someFutureField": 1,
        }
    )
    create = m.to_create(body, max_timeout=60)
    assert create.template == "default"
    assert create.timeout == 60
    assert create.metadata == {"a": "b"} and create.envs == {"X": "1"}
    assert create.network.internet is True
    assert m.to_create(m.NewSandbox.model_validate({"templateID": "base"})).network.internet is False
    assert m.to_create(m.NewSandbox.model_validate({"templateID": "mine"})).template == "mine"


def test_public_traffic_maps_onto_cellbox_and_drops_the_traffic_token() -> None:
    body = {"templateID": "base", "network": {"allowPublicTraffic": True}}
    assert m.to_create(m.NewSandbox.model_validate(body)).allow_public_traffic is True
    assert m.to_create(m.NewSandbox.model_validate({"templateID": "base"})).allow_public_traffic is False
    private = {"templateID": "base", "network": {"allowPublicTraffic": False}}
    assert m.to_create(m.NewSandbox.model_validate(private)).allow_public_traffic is False
    with pytest.raises(InvalidRequest):
        m.to_create(m.NewSandbox.model_validate({"templateID": "base", "network": {"allowPublicTraffic": "yes"}}))
    public = info(allow_public_traffic=True, traffic_token="traffic")
    assert m.sandbox_response(public, "tok", DEFAULTS)["trafficAccessToken"] is None


def test_allow_and_deny_lists_map_onto_cellbox_egress() -> None:
    body = {"templateID": "base", "network": {"allowOut": ["pypi.org"], "denyOut": ["0.0.0.0/0"]}}
    network = m.to_create(m.NewSandbox.model_validate(body)).network
    assert network.allow_out == ["pypi.org"] and network.deny_out == ["0.0.0.0/0"]


@pytest.mark.parametrize(
    "extra",
    [
        {"autoPause": True},
        {"autoResume": {"enabled": True}},
        {"mcp": {"x": {}}},
        {"volumeMounts": [{"name": "v", "path": "/v"}]},
        {"network": {"maskRequestHost": "x"}},
        {"network": {"allowOut": "1.1.1.1"}},
    ],
)
def test_what_cannot_be_honoured_is_refused(extra: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        m.to_create(m.NewSandbox.model_validate({"templateID": "base", **extra}))


def test_responses_hold_every_field_the_generated_parsers_require() -> None:
    sbx = info(limits=Limits(cpu=2.5, memory_mb=512), traffic_token="traffic")
    created = m.sandbox_response(sbx, "tok", DEFAULTS)
    assert {"templateID", "sandboxID", "clientID", "envdVersion"} <= created.keys()
    assert created["envdVersion"] == ENVD_VERSION
    assert (created["envdAccessToken"], created["trafficAccessToken"]) == ("tok", "traffic")
    listed = m.listed_sandbox(sbx, DEFAULTS)
    required = {"templateID", "sandboxID", "clientID", "startedAt", "endAt", "cpuCount", "memoryMB"}
    assert required | {"diskSizeMB", "state", "envdVersion"} <= listed.keys()
    assert (listed["cpuCount"], listed["memoryMB"], listed["diskSizeMB"]) == (3, 512, 2048)
    assert listed["startedAt"] == "2023-11-14T22:13:20Z"
    assert listed["endAt"] == "2023-11-14T22:18:20Z"
    detail = m.sandbox_detail(info(state=SandboxState.PAUSED), "tok", DEFAULTS)
    assert detail["state"] == "paused" and detail["envdAccessToken"] == "tok"


def test_domain_is_handed_out_only_when_configured() -> None:
    assert "domain" not in m.sandbox_response(info(), "t", DEFAULTS)
    with_domain = m.SandboxDefaults(cpu=1, memory_mb=1, disk_mb=1, domain="cellbox.test")
    assert m.sandbox_response(info(), "t", with_domain)["domain"] == "cellbox.test"


def test_metric_from_a_sample() -> None:
    sample = Sample(1_700_000_000.5, 1, 37.5, memory_bytes=10, disk_used_bytes=20, disk_total_bytes=30)
    got = m.metric(sample, info(), DEFAULTS)
    assert got["memUsed"] == 10 and got["diskUsed"] == 20 and got["diskTotal"] == 30
    assert got["memTotal"] == 1024 * 1024 * 1024 and got["timestampUnix"] == 1_700_000_000
    assert got["cpuUsedPct"] == 37.5 and got["timestamp"].startswith("2023-11-14T22:13:20.5")
    bare = m.metric(Sample(0.0, 1, 0.0, None, None, None), info(), DEFAULTS)
    assert bare["memUsed"] == 0 and bare["diskTotal"] > 0


def test_metadata_query_decodes_what_the_sdk_encodes() -> None:
    meta = {"a b": "c&d", "k": "v=1"}
    sent = urllib.parse.urlencode({urllib.parse.quote(k): urllib.parse.quote(v) for k, v in meta.items()})
    assert m.parse_metadata_query(sent) == meta
    assert m.parse_metadata_query(None) is None


def test_states() -> None:
    assert set(m.parse_states(None)) == {SandboxState.RUNNING, SandboxState.PAUSED}
    assert SandboxState.PAUSED not in m.parse_states(["running"])
    assert m.parse_states(["paused"]) == [SandboxState.PAUSED]
    with pytest.raises(InvalidRequest):
        m.parse_states(["gone"])


@pytest.mark.parametrize("order", [None, "asc", "desc"])
def test_paging_visits_every_sandbox_once(order: str | None) -> None:
    sandboxes = [info(f"sbx{i}", created=1000.0 + i // 2) for i in range(7)]  # ties on created_at
    seen: list[str] = []
    token: str | None = None
    while True:
        items, token = m.page(sandboxes, 3, order, token)
        seen += [s.id for s in items]
        if token is None:
            break
    assert sorted(seen) == sorted(s.id for s in sandboxes) and len(seen) == 7
    if order == "desc":
        assert seen[0] == "sbx6"
    else:
        assert seen[0] == "sbx0"


def test_paging_errors() -> None:
    with pytest.raises(InvalidRequest):
        m.page([], 10, "sideways", None)
    with pytest.raises(InvalidRequest):
        m.page([], 10, None, "!!not-a-token")
    assert m.page([], 10, None, None) == ([], None)


def test_rfc3339_round_trip() -> None:
    assert m.parse_rfc3339(m.rfc3339(1_700_000_000.5), "t") == 1_700_000_000.5
    assert m.parse_rfc3339("2023-11-14T23:13:20+01:00", "t") == 1_700_000_000.0
    with pytest.raises(InvalidRequest):
        m.parse_rfc3339("yesterday", "startedAfter")
