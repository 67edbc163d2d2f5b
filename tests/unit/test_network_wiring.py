"""The network wiring without sandboxes: egress settings and flags, the manager's network
checks and port authorisation over the fake runtime, the ports-by-host-name rewrite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from click.testing import CliRunner
from pydantic import ValidationError

from cellbox import cli
from cellbox.api.faces.native import PortHosts
from cellbox.egress.hosttrust import HostConfig
from cellbox.egress.policy import OperatorPolicy
from cellbox.egress.service import Egress
from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import InvalidRequest, SandboxNotFound, Unauthorized
from cellbox.interpreter.manager import SandboxManager
from cellbox.interpreter.models import NetworkSpec, SandboxCreate
from tests.unit.test_manager import open_manager


def test_egress_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CELLBOX_EGRESS_ALLOW", "pypi.org, *.pythonhosted.org")
    monkeypatch.setenv("CELLBOX_EGRESS_PERMIT", '["203.0.113.80/32", "loopback"]')
    settings = Settings(data_dir=tmp_path)
    assert settings.egress_allow == ["pypi.org", "*.pythonhosted.org"]
    assert settings.egress_permit == ["203.0.113.80/32", "loopback"]
    assert settings.resolved_package_cache_dir() == tmp_path / "pip-cache"


@pytest.mark.parametrize(
    ("field", "entry"),
    [("egress_permit", "everything"), ("egress_allow", "not a host!"), ("egress_deny", "1.2.3.4/99")],
)
def test_a_bad_egress_setting_is_a_startup_error_naming_it(field: str, entry: str) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: [entry]})


def test_serve_refuses_a_bad_egress_flag() -> None:
    result = CliRunner().invoke(cli.main, ["serve", "--egress-permit", "everything"])
    assert result.exit_code == 2
    assert "egress_permit" in result.stderr and "everything" in result.stderr


def test_network_spec_keeps_rejecting_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        NetworkSpec.model_validate({"internet": True, "allowOut": ["x"]})
    spec = NetworkSpec.model_validate({"allow_out": ["pypi.org"], "deny_out": ["0.0.0.0/0"]})
    assert spec.allow_out == ["pypi.org"] and spec.deny_out == ["0.0.0.0/0"] and not spec.internet


@pytest_asyncio.fixture
async def manager(tmp_path: Path) -> Any:
    mgr = await open_manager(tmp_path)
    mgr.egress = Egress(OperatorPolicy.build(allow=["pypi.org"]), host=HostConfig(root=Path("/nonexistent")))
    yield mgr
    await mgr.close()


@pytest.mark.asyncio
async def test_create_checks_the_network_before_provisioning(manager: SandboxManager) -> None:
    with pytest.raises(InvalidRequest, match="example.com") as caught:
        await manager.create("alice", SandboxCreate(network=NetworkSpec(allow_out=["example.com"])))
    assert caught.value.details.get("entry") == "example.com"
    with pytest.raises(InvalidRequest, match="not a host"):
        await manager.create("alice", SandboxCreate(network=NetworkSpec(allow_out=["not a host!"])))
    assert manager.live_count() == 0  # nothing was provisioned


@pytest.mark.asyncio
async def test_who_may_open_a_sandboxs_ports(manager: SandboxManager) -> None:
    manager.egress = None  # the fake runtime gives only the default network
    info = await manager.create("alice", SandboxCreate())
    public = await manager.create("alice", SandboxCreate(allow_public_traffic=True))
    token = info.traffic_token
    assert token and token != public.traffic_token
    assert (await manager.traffic(info.id, "alice", None)).id == info.id
    assert (await manager.traffic(info.id, None, token)).id == info.id
    assert (await manager.traffic(info.id, "bob", token)).id == info.id  # the token is enough
    assert (await manager.traffic(public.id, None, None)).id == public.id
    with pytest.raises(Unauthorized):
        await manager.traffic(info.id, None, None)
    with pytest.raises(Unauthorized):
        await manager.traffic(info.id, None, "wrong")
    with pytest.raises(SandboxNotFound):
        await manager.traffic(info.id, "bob", None)
    with pytest.raises(SandboxNotFound):
        await manager.traffic("sb_0000000000000000", None, token)


@pytest.mark.asyncio
async def test_port_hosts_rewrite_only_their_domain() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)

    wrapped = PortHosts(app, "Ports.Example")

    def scope(host: str, path: str = "/a/b") -> dict[str, Any]:
        return {"type": "http", "path": path, "raw_path": path.encode(), "headers": [(b"host", host.encode())]}

    await wrapped(scope("8001-sb_0123456789abcdef.ports.example:8080"), None, None)
    await wrapped(scope("8001-sb_0123456789abcdef.other.example"), None, None)
    await wrapped(scope("ports.example"), None, None)
    assert seen[0]["path"] == "/v1/sandboxes/sb_0123456789abcdef/ports/8001/a/b"
    assert seen[0]["raw_path"] == b"/v1/sandboxes/sb_0123456789abcdef/ports/8001/a/b"
    assert [s["path"] for s in seen[1:]] == ["/a/b", "/a/b"]


def test_sdk_egress_log_ports_and_public_traffic() -> None:
    import json

    import httpx

    from cellbox.client import Sandbox
    from tests.unit.test_client import INFO, FakeService

    service = FakeService()
    page = {
        "summary": {"sandbox_id": "sbx1", "allowed": 1, "denied": 0, "next": 1},
        "records": [{"seq": 0, "time": 1.0, "protocol": "connect", "host": "pypi.org", "port": 443,
                     "allowed": True, "reason": "allowed by internet"}],
    }  # fmt: skip
    service.route("GET", "/v1/sandboxes/sbx1/egress", body=page)
    service.route("POST", "/v1/sandboxes", status=201, body={**INFO, "ports_domain": "ports.example"})
    sbx = Sandbox.create(
        network={"internet": True},
        allow_public_traffic=True,
        base_url="http://cb:8080",
        transport=httpx.MockTransport(service),
    )
    body = json.loads(service.requests[0].content)
    assert body["allow_public_traffic"] is True and body["network"]["internet"] is True
    log = sbx.get_egress_log(after=-1, limit=5)
    assert log.records[0].host == "pypi.org" and log.summary.allowed == 1
    assert service.requests[-1].url.params["limit"] == "5"
    assert sbx.get_host(3000) == "3000-sbx1.ports.example"
    assert sbx.port_url(3000, "/x") == "http://3000-sbx1.ports.example/x"
    sbx._ports_domain = None
    assert sbx.get_host(3000) == "cb:8080/v1/sandboxes/sbx1/ports/3000"
    assert sbx.port_url(3000) == "http://cb:8080/v1/sandboxes/sbx1/ports/3000/"
    sbx.close()
