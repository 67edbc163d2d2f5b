"""The egress policy: parsing, E2B precedence, the floor, operator bounds (pure, table-driven)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from cellbox.egress.policy import (
    OperatorPolicy,
    SandboxPolicy,
    forbidden_reason,
    parse_network,
    parse_rule,
)
from cellbox.interpreter.errors import InvalidRequest


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


PUBLIC = "93.184.216.34"
PUBLIC6 = "2606:2800:220:1:248:1893:25c8:1946"


@pytest.mark.parametrize(
    ("entry", "kind", "name"),
    [
        ("pypi.org", "domain", "pypi.org"),
        ("PyPI.org.", "domain", "pypi.org"),
        ("*.pythonhosted.org", "wildcard", "pythonhosted.org"),
        ("bücher.de", "domain", "xn--bcher-kva.de"),
        ("1.1.1.1", "network", ""),
        ("8.8.8.0/24", "network", ""),
        ("2606:4700::/32", "network", ""),
        ("::1", "network", ""),
        ("0.0.0.0/0", "all", ""),
        ("::/0", "all", ""),
    ],
)
def test_parse_rule_kinds(entry: str, kind: str, name: str) -> None:
    rule = parse_rule(entry)
    assert rule.kind == kind
    assert rule.name == name
    assert rule.entry == entry


@pytest.mark.parametrize(
    "entry",
    ["", "  ", "exa mple.com", "*", "*.", "a.*.com", "foo*.com", "-bad.com", "1.2.3", "10.0.0.1/8", "300.1.1.1",
     "1.2.3.4/33", "::g", "x" * 64 + ".com", "http://pypi.org", "pypi.org:443", 42, None],
)  # fmt: skip
def test_malformed_entries_name_the_entry(entry: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_network({"internet": False, "allow_out": [entry]})
    assert info.value.details["field"] == "network"
    assert info.value.details["entry"] == entry
    assert repr(entry) in info.value.message


@pytest.mark.parametrize(
    "spec",
    [{"internet": "yes"}, {"allow_out": "pypi.org"}, {"egress": []}, ["pypi.org"], {"deny_out": ["bad..com"]}],
)
def test_malformed_specs(spec: Any) -> None:
    with pytest.raises(InvalidRequest):
        parse_network(spec)


def test_default_is_no_egress() -> None:
    for spec in (None, {}, {"internet": False}, {"internet": False, "deny_out": ["1.1.1.1"]}):
        policy = parse_network(spec)
        assert not policy.wants_egress
        assert not policy.decide("pypi.org", ip(PUBLIC), 443).allowed
        assert not policy.decide(None, ip(PUBLIC6), 443).allowed


def test_pydantic_model_spec() -> None:
    from pydantic import BaseModel

    class Spec(BaseModel):
        internet: bool = True
        allow_out: list[str] = []
        deny_out: list[str] = []

    assert parse_network(Spec()).internet


# (spec, host, address, expected allowed) with a permissive operator
CASES: list[tuple[dict[str, Any], str | None, str, bool]] = [
    ({"internet": True}, "pypi.org", PUBLIC, True),
    ({"internet": True}, None, PUBLIC6, True),
    ({"internet": True, "deny_out": ["93.184.216.0/24"]}, "pypi.org", PUBLIC, False),
    ({"internet": True, "deny_out": ["pypi.org"]}, "pypi.org", PUBLIC, False),
    ({"internet": True, "deny_out": ["pypi.org"]}, "files.pypi.org", PUBLIC, True),
    ({"internet": True, "deny_out": ["*.pypi.org"]}, "files.pypi.org", PUBLIC, False),
    ({"internet": True, "deny_out": ["*.pypi.org"]}, "pypi.org", PUBLIC, True),
    # an explicit allow wins over a deny
    ({"internet": True, "deny_out": ["93.184.216.0/24"], "allow_out": ["pypi.org"]}, "pypi.org", PUBLIC, True),
    ({"internet": True, "deny_out": ["93.184.216.0/24"], "allow_out": [PUBLIC]}, None, PUBLIC, True),
    # deny everything plus an allow list is an allow list
    ({"deny_out": ["0.0.0.0/0"], "allow_out": ["pypi.org"]}, "pypi.org", PUBLIC, True),
    ({"deny_out": ["0.0.0.0/0"], "allow_out": ["pypi.org"]}, "evil.org", PUBLIC, False),
    ({"internet": True, "deny_out": ["0.0.0.0/0"], "allow_out": ["pypi.org"]}, "evil.org", PUBLIC, False),
    ({"internet": True, "deny_out": ["0.0.0.0/0"], "allow_out": ["pypi.org"]}, None, PUBLIC6, False),
    ({"internet": False, "allow_out": ["*.pythonhosted.org"]}, "files.pythonhosted.org", PUBLIC, True),
    ({"internet": False, "allow_out": ["*.pythonhosted.org"]}, "pythonhosted.org", PUBLIC, False),
    ({"internet": False, "allow_out": ["8.8.8.0/24"]}, None, "8.8.8.8", True),
    ({"internet": False, "allow_out": ["8.8.8.0/24"]}, "dns.google", "8.8.8.8", True),
    ({"internet": False, "allow_out": ["8.8.8.0/24"]}, None, "8.8.9.8", False),
    ({"internet": False, "allow_out": ["2606:2800::/32"]}, None, PUBLIC6, True),
    # an IPv4-mapped IPv6 address is its IPv4 address
    ({"internet": False, "allow_out": ["8.8.8.8"]}, None, "::ffff:8.8.8.8", True),
    # a domain rule never matches a connection made by address
    ({"internet": False, "allow_out": ["pypi.org"]}, None, PUBLIC, False),
    # internet: true never reaches the floor
    ({"internet": True}, None, "127.0.0.1", False),
    ({"internet": True}, "localhost", "127.0.0.1", False),
    ({"internet": True}, None, "169.254.169.254", False),
    ({"internet": True}, None, "10.1.2.3", False),
    ({"internet": True}, None, "192.168.1.1", False),
    ({"internet": True}, None, "::1", False),
    ({"internet": True}, None, "fe80::1", False),
    ({"internet": True}, None, "fd00:ec2::254", False),
    ({"internet": True}, None, "::ffff:127.0.0.1", False),
    ({"internet": True}, None, "64:ff9b::a9fe:a9fe", False),  # NAT64 of the metadata address
    ({"internet": True}, None, "2002:7f00:1::", False),  # 6to4 of 127.0.0.1
    ({"internet": True}, None, "0.0.0.0", False),
    ({"internet": True}, None, "224.0.0.1", False),
    # DNS rebinding: an allowed name that resolves to a forbidden address
    ({"allow_out": ["pypi.org"]}, "pypi.org", "127.0.0.1", False),
    ({"allow_out": ["pypi.org"]}, "pypi.org", "169.254.169.254", False),
]


@pytest.mark.parametrize(("spec", "host", "address", "allowed"), CASES)
def test_decisions(spec: dict[str, Any], host: str | None, address: str, allowed: bool) -> None:
    decision = parse_network(spec).decide(host, ip(address), 443)
    assert decision.allowed is allowed, decision.reason
    assert decision.reason


def test_reasons_name_the_rule_and_the_range() -> None:
    policy = parse_network({"internet": True, "deny_out": ["*.evil.org"]})
    denied = policy.decide("x.evil.org", ip(PUBLIC), 443)
    assert denied.rule == "*.evil.org" and "deny_out" in denied.reason
    metadata = policy.decide("good.org", ip("169.254.169.254"), 80)
    assert "cloud metadata" in metadata.reason and "good.org resolves to" in metadata.reason
    assert "loopback" in policy.decide(None, ip("127.0.0.1"), 80).reason


@pytest.mark.parametrize(
    ("address", "reason"),
    [("127.0.0.53", "loopback"), ("169.254.169.254", "cloud metadata"), ("169.254.1.1", "link-local"),
     ("10.0.0.1", "private"), ("172.31.255.255", "private"), ("100.64.0.1", "shared (CGNAT)"),
     ("::1", "loopback"), ("fc00::1", "private (ULA)"), ("fe80::1", "link-local"), ("ff02::1", "multicast"),
     ("::ffff:10.0.0.1", "private"), (PUBLIC, None), (PUBLIC6, None), ("1.1.1.1", None)],
)  # fmt: skip
def test_forbidden_reason(address: str, reason: str | None) -> None:
    assert forbidden_reason(ip(address)) == reason


def test_operator_permit_lifts_the_floor_for_its_ranges_only() -> None:
    op = OperatorPolicy.build(permit=["127.0.0.2/32"])
    explicit = parse_network({"allow_out": ["127.0.0.2"]}, op)
    assert explicit.decide(None, ip("127.0.0.2"), 8000).allowed
    assert not explicit.decide(None, ip("127.0.0.3"), 8000).allowed
    by_name = parse_network({"allow_out": ["upstream.test"]}, op)
    assert by_name.decide("upstream.test", ip("127.0.0.2"), 8000).allowed
    assert not by_name.decide("upstream.test", ip("127.0.0.3"), 8000).allowed  # rebinding
    assert not by_name.decide("upstream.test", ip("169.254.169.254"), 80).allowed
    assert parse_network({"internet": True}, op).decide(None, ip("127.0.0.2"), 80).allowed
    with pytest.raises(InvalidRequest, match="127.0.0.0/8"):
        parse_network({"allow_out": ["127.0.0.0/8"]}, op)  # wider than the permit


def test_permit_does_not_widen_an_operator_allow_list() -> None:
    # e.g. an inspecting proxy every name resolves to: permitting it must not open every name
    op = OperatorPolicy.build(allow=["pypi.org"], permit=["203.0.113.80/32"])
    policy = parse_network({"internet": True}, op)
    assert policy.decide("pypi.org", ip("203.0.113.80"), 443).allowed
    assert not policy.decide("evil.example", ip("203.0.113.80"), 443).allowed
    assert policy.decide_name("evil.example", 443) is not None
    with pytest.raises(InvalidRequest, match="203.0.113.80"):
        parse_network({"allow_out": ["203.0.113.80"]}, op)


def test_service_own_addresses_are_refused_inside_a_permitted_range() -> None:
    op = OperatorPolicy.build(permit=["loopback"], own_addresses=["127.0.0.1"])
    policy = parse_network({"allow_out": ["127.0.0.0/8"]}, op)
    assert policy.decide(None, ip("127.0.0.2"), 80).allowed
    refused = policy.decide(None, ip("127.0.0.1"), 80)
    assert not refused.allowed and "own address" in refused.reason
    assert not policy.decide(None, ip("::ffff:127.0.0.1"), 80).allowed
    public = OperatorPolicy.build(own_addresses=["198.51.99.7"])
    with pytest.raises(InvalidRequest, match="own address"):
        parse_network({"allow_out": ["198.51.99.7"]}, public)
    assert not parse_network({"internet": True}, public).decide(None, ip("198.51.99.7"), 8080).allowed


def test_operator_bounds_sandbox_requests() -> None:
    op = OperatorPolicy.build(allow=["pypi.org", "*.pythonhosted.org", "151.101.0.0/16"])
    parse_network({"allow_out": ["pypi.org", "files.pythonhosted.org", "*.a.pythonhosted.org"]}, op)
    parse_network({"allow_out": ["151.101.1.0/24"]}, op)
    for entry in ["8.8.8.8", "0.0.0.0/0"]:
        with pytest.raises(InvalidRequest) as info:
            parse_network({"allow_out": [entry]}, op)
        assert info.value.details == {"field": "network", "entry": entry}
    # a name outside the operator's names may still resolve into its CIDRs: decided at connect
    parse_network({"allow_out": ["mirror.example"]}, op)
    names_only = OperatorPolicy.build(allow=["pypi.org"])
    with pytest.raises(InvalidRequest, match="mirror.example"):
        parse_network({"allow_out": ["mirror.example"]}, names_only)
    # an operator allow list bounds internet: true too, at connect time
    policy = parse_network({"internet": True}, op)
    assert policy.decide("pypi.org", ip(PUBLIC), 443).allowed
    assert not policy.decide("evil.org", ip(PUBLIC), 443).allowed
    assert policy.decide(None, ip("151.101.64.223"), 443).allowed


def test_operator_deny_list_and_private_entries() -> None:
    op = OperatorPolicy.build(deny=["*.internal.example", "203.0.0.0/8"])
    with pytest.raises(InvalidRequest, match="x.internal.example"):
        parse_network({"allow_out": ["x.internal.example"]}, op)
    with pytest.raises(InvalidRequest, match="10.0.0.0/8"):
        parse_network({"allow_out": ["10.0.0.0/8"]}, op)
    with pytest.raises(InvalidRequest, match="loopback"):
        parse_network({"allow_out": ["127.0.0.1"]}, op)
    with pytest.raises(InvalidRequest, match="cloud metadata"):
        parse_network({"allow_out": ["169.254.169.254"]}, op)
    policy = parse_network({"internet": True}, op)
    assert not policy.decide("a.internal.example", ip(PUBLIC), 443).allowed
    assert policy.decide("b.example", ip(PUBLIC), 443).allowed


def test_operator_disabled_and_ports() -> None:
    off = OperatorPolicy.build(enabled=False)
    assert not parse_network({"internet": False}, off).wants_egress
    with pytest.raises(InvalidRequest, match="disabled"):
        parse_network({"internet": True}, off)
    with pytest.raises(InvalidRequest, match="pypi.org"):
        parse_network({"allow_out": ["pypi.org"]}, off)
    web = parse_network({"internet": True}, OperatorPolicy.build(ports=[80, 443]))
    assert web.decide(None, ip(PUBLIC), 443).allowed
    assert not web.decide(None, ip(PUBLIC), 25).allowed
    assert web.decide_name("smtp.example", 25) is not None


@pytest.mark.parametrize(
    "kwargs",
    [{"allow": ["bad..x"]}, {"deny": ["1.2.3.4/40"]}, {"permit": ["nowhere"]}, {"own_addresses": ["x"]},
     {"ports": [0]}],
)  # fmt: skip
def test_operator_misconfiguration_is_a_value_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        OperatorPolicy.build(**kwargs)


def test_decide_name_refuses_without_dns_only_when_no_address_could_help() -> None:
    names_only = parse_network({"allow_out": ["pypi.org"]})
    assert names_only.decide_name("pypi.org", 443) is None
    refused = names_only.decide_name("evil.org", 443)
    assert refused is not None and not refused.allowed
    with_cidr = parse_network({"allow_out": ["pypi.org", "8.8.8.0/24"]})
    assert with_cidr.decide_name("evil.org", 443) is None  # may resolve into 8.8.8.0/24
    internet = parse_network({"internet": True, "deny_out": ["*.evil.org"]})
    assert internet.decide_name("good.org", 443) is None
    assert internet.decide_name("a.evil.org", 443) is not None
    assert internet.decide_name("bad name", 443) is not None
    assert SandboxPolicy().decide_name("pypi.org", 443) is not None


def test_to_spec_round_trips() -> None:
    spec = {"internet": True, "allow_out": ["pypi.org", "1.1.1.1"], "deny_out": ["0.0.0.0/0"]}
    assert parse_network(spec).to_spec() == spec


@pytest.mark.parametrize(
    ("spec", "may"),
    [({}, False), ({"internet": True}, True), ({"allow_out": ["pypi.org"]}, True),
     ({"allow_out": ["*.org"]}, True), ({"allow_out": ["1.1.1.1"]}, False),
     ({"internet": True, "deny_out": ["pypi.org"]}, False), ({"internet": True, "deny_out": ["0.0.0.0/0"]}, False),
     ({"internet": True, "deny_out": ["0.0.0.0/0"], "allow_out": ["pypi.org"]}, True)],
)  # fmt: skip
def test_the_package_cache_is_only_for_sandboxes_that_reach_its_index(spec: dict[str, Any], may: bool) -> None:
    from cellbox.egress.cache import sandbox_may_use

    assert sandbox_may_use(parse_network(spec), "https://pypi.org/simple/") is may
