"""What a sandbox may reach: parse and validate its ``network`` spec, bound it by the operator's
policy, and decide each connection on (hostname, resolved address, port).

Pure code: no sockets, no DNS. The proxy resolves names and asks :meth:`SandboxPolicy.decide`
about each address before it connects to exactly that address.

Entries (in ``allow_out`` / ``deny_out`` and in the operator's lists) are

* a domain, ``pypi.org``: that exact name (case-insensitive, trailing dot ignored, IDNA);
* a wildcard, ``*.pythonhosted.org``: any name *below* that domain (not the domain itself);
* an IP address, ``1.1.1.1`` / ``2606:4700::1111``, or a CIDR, ``8.8.8.0/24``;
* ``0.0.0.0/0`` (or ``::/0``): every destination, IPv4 and IPv6 (E2B's ``ALL_TRAFFIC``).

A sandbox's rules follow E2B: an allow that matches wins over a deny that matches; otherwise a
deny that matches refuses; otherwise ``internet`` decides. So ``internet: false`` (the default)
and no ``allow_out`` is no egress at all, and ``deny_out: ["0.0.0.0/0"]`` plus an allow list is an
allow list. Domains match only when the sandbox connects *by name* (SOCKS5 with a domain address,
``CONNECT host:443``, ``http://host/``); IP rules match the resolved address.

Below every sandbox's rules there is a floor: loopback, link-local (169.254.0.0/16, the cloud
metadata address), private and other non-global ranges (IPv4 and IPv6, IPv4-mapped, 6to4 and
NAT64 forms included) and the service's own addresses are refused, unless the operator permits the
range explicitly (:attr:`OperatorPolicy.permit`); a permitted range is then like any public
address, under the operator's and the sandbox's rules. An allowed name that resolves to a
forbidden address (DNS rebinding) is refused the same way.

The operator's allow/deny lists bound what any sandbox may get. For the operator an allow list
alone is an allow list (anything else refused); a deny list alone is a deny list; both: an allow
that matches wins. A sandbox asking for more than the operator gives is refused at create with
:class:`~cellbox.interpreter.errors.InvalidRequest` naming the entry (``field="network"``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cellbox.interpreter.errors import InvalidRequest

__all__ = [
    "ALL_TRAFFIC",
    "Decision",
    "IPAddress",
    "IPNetwork",
    "OperatorPolicy",
    "Rule",
    "SandboxPolicy",
    "canonical_ip",
    "forbidden_reason",
    "parse_network",
    "parse_rule",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALL_TRAFFIC = "0.0.0.0/0"

RuleKind = Literal["all", "domain", "wildcard", "network"]


def _net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


# The floor: ranges no sandbox reaches unless the operator permits them. Order matters only for
# the label (the first match names the reason); the metadata address comes before link-local.
_SPECIAL: tuple[tuple[IPNetwork, str], ...] = (
    (_net("169.254.169.254/32"), "cloud metadata"),
    (_net("0.0.0.0/8"), "unspecified"),
    (_net("10.0.0.0/8"), "private"),
    (_net("100.64.0.0/10"), "shared (CGNAT)"),
    (_net("127.0.0.0/8"), "loopback"),
    (_net("169.254.0.0/16"), "link-local"),
    (_net("172.16.0.0/12"), "private"),
    (_net("192.0.0.0/24"), "reserved"),
    (_net("192.0.2.0/24"), "documentation"),
    (_net("192.168.0.0/16"), "private"),
    (_net("198.18.0.0/15"), "benchmarking"),
    (_net("198.51.100.0/24"), "documentation"),
    (_net("203.0.113.0/24"), "documentation"),
    (_net("224.0.0.0/4"), "multicast"),
    (_net("240.0.0.0/4"), "reserved"),
    (_net("::1/128"), "loopback"),
    (_net("::/128"), "unspecified"),
    (_net("::/96"), "IPv4-compatible (deprecated)"),
    (_net("64:ff9b:1::/48"), "NAT64 (local use)"),
    (_net("100::/64"), "discard"),
    (_net("2001::/32"), "Teredo"),
    (_net("2001:db8::/32"), "documentation"),
    (_net("fd00:ec2::254/128"), "cloud metadata"),
    (_net("fc00::/7"), "private (ULA)"),
    (_net("fe80::/10"), "link-local"),
    (_net("fec0::/10"), "site-local"),
    (_net("ff00::/8"), "multicast"),
)
_NAT64 = _net("64:ff9b::/96")

# Operator shorthands for `permit`.
PERMIT_ALIASES: dict[str, tuple[str, ...]] = {
    "loopback": ("127.0.0.0/8", "::1/128"),
    "private": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"),
    "link-local": ("169.254.0.0/16", "fe80::/10"),
}

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def canonical_ip(ip: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` is ``a.b.c.d``: rules and the floor see the IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _subnet(inner: IPNetwork, outer: IPNetwork) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is below the floor (``"loopback"``, ``"private"``, ...), or None if it is a
    global address. IPv4 embedded in IPv6 (mapped, 6to4, NAT64) is judged as that IPv4."""
    ip = canonical_ip(ip)
    for network, label in _SPECIAL:
        if ip.version == network.version and ip in network:
            return label
    if isinstance(ip, ipaddress.IPv6Address) and (v4 := _embedded_v4(ip)) is not None:
        inner = forbidden_reason(v4)
        return f"{inner} (embedded in {ip})" if inner else None
    if not ip.is_global:
        return "reserved"
    return None


def _normalise_host(text: str) -> str | None:
    name = text.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():  # "1.2.3" is neither an address nor a name
        return None
    return name


def normalise_host(text: str) -> str | None:
    """The form names are compared in (lower case, no trailing dot, IDNA), or None if ``text``
    is not a valid host name."""
    return _normalise_host(text)


@dataclass(frozen=True)
class Rule:
    """One parsed allow/deny entry; ``entry`` is the text as given (what errors and logs name)."""

    entry: str
    kind: RuleKind
    name: str = ""  # domain / wildcard: the normalised name (without "*.")
    network: IPNetwork | None = None

    def matches(self, host: str | None, ip: IPAddress | None) -> bool:
        """Whether a connection to ``host`` (None when asked by address) at ``ip`` matches."""
        if self.kind == "all":
            return True
        if self.kind == "network":
            assert self.network is not None
            return ip is not None and ip.version == self.network.version and ip in self.network
        if host is None:
            return False
        if self.kind == "domain":
            return host == self.name
        return host.endswith("." + self.name)

    def covers_name(self, other: Rule) -> bool:
        """Whether every name ``other`` (a domain or wildcard rule) matches, this rule matches."""
        if self.kind == "all":
            return True
        if other.kind == "domain":
            return self.matches(other.name, None)
        if other.kind == "wildcard" and self.kind == "wildcard":
            return other.name == self.name or other.name.endswith("." + self.name)
        return False


def parse_rule(entry: Any, where: str = "allow_out") -> Rule:
    """Parse one entry; raises InvalidRequest naming it (``field="network"``)."""
    if not isinstance(entry, str) or not entry.strip():
        raise InvalidRequest(
            f"network.{where}: {entry!r} is not a domain, IP address or CIDR", field="network", entry=entry
        )
    text = entry.strip()
    if text in ("0.0.0.0/0", "::/0"):
        return Rule(entry=entry, kind="all")
    if "/" in text or ":" in text or text.replace(".", "").isdigit():
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise InvalidRequest(
                f"network.{where}: {entry!r} is not a valid IP address or CIDR ({exc})", field="network", entry=entry
            ) from None
        return Rule(entry=entry, kind="network", network=network)
    wildcard = text.startswith("*.")
    name = _normalise_host(text[2:] if wildcard else text)
    if name is None:
        raise InvalidRequest(
            f"network.{where}: {entry!r} is not a domain (or '*.domain'), IP address or CIDR",
            field="network",
            entry=entry,
        )
    return Rule(entry=entry, kind="wildcard" if wildcard else "domain", name=name)


def _parse_rules(entries: Any, where: str) -> tuple[Rule, ...]:
    if entries is None:
        return ()
    if isinstance(entries, str) or not isinstance(entries, Iterable):
        raise InvalidRequest(f"network.{where} must be a list of entries", field="network", entry=entries)
    return tuple(parse_rule(entry, where) for entry in entries)


@dataclass(frozen=True)
class Decision:
    """The verdict on one connection: allowed or not, and why (said in the log and to the client)."""

    allowed: bool
    reason: str
    rule: str | None = None  # the entry that decided, if one did

    @classmethod
    def allow(cls, reason: str, rule: str | None = None) -> Decision:
        return cls(True, reason, rule)

    @classmethod
    def deny(cls, reason: str, rule: str | None = None) -> Decision:
        return cls(False, reason, rule)


def _verdict(
    allow: tuple[Rule, ...], deny: tuple[Rule, ...], default: bool, host: str | None, ip: IPAddress
) -> tuple[bool, Rule | None]:
    for rule in allow:
        if rule.matches(host, ip):
            return True, rule
    for rule in deny:
        if rule.matches(host, ip):
            return False, rule
    return default, None


def _name_verdict(
    allow: tuple[Rule, ...], deny: tuple[Rule, ...], default: bool, host: str
) -> tuple[bool | None, Rule | None]:
    """The verdict on ``host`` if no resolved address can change it, else (None, None)."""
    for rule in allow:
        if rule.matches(host, None):
            return True, rule
    if any(rule.kind == "network" for rule in allow):
        return None, None
    for rule in deny:
        if rule.matches(host, None):
            return False, rule
    if default and any(rule.kind == "network" for rule in deny):
        return None, None
    return default, None


@dataclass(frozen=True)
class OperatorPolicy:
    """The service-wide bound on egress (``cellbox serve --egress-allow/--egress-deny/--egress-permit``).

    ``permit`` lifts the floor for the ranges it lists (``"127.0.0.2/32"`` for tests,
    ``"10.1.0.0/16"`` for a private mirror, the address an inspecting proxy answers from;
    ``"loopback"``, ``"private"`` and ``"link-local"`` are shorthands): keep it narrow, since
    ``internet: true`` then reaches them too. It does not widen ``allow``: with an operator allow
    list, a permitted range must also be in it. ``own_addresses`` are the service's addresses (its listen
    address, the host's interfaces): refused even inside a permitted range unless ``permit_own``.
    ``ports`` restricts destination ports (None: any). ``enabled=False`` refuses every sandbox that
    asks for egress."""

    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    permit: tuple[IPNetwork, ...] = ()
    own_addresses: frozenset[IPAddress] = frozenset()
    permit_own: bool = False
    ports: frozenset[int] | None = None
    enabled: bool = True

    @classmethod
    def build(
        cls,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        permit: Iterable[str] = (),
        own_addresses: Iterable[str] = (),
        permit_own: bool = False,
        ports: Iterable[int] | None = None,
        enabled: bool = True,
    ) -> OperatorPolicy:
        """Build from settings strings; raises ValueError naming a bad entry (settings validators
        turn it into a startup error)."""
        try:
            allow_rules = tuple(parse_rule(entry, "egress_allow") for entry in allow)
            deny_rules = tuple(parse_rule(entry, "egress_deny") for entry in deny)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        networks: list[IPNetwork] = []
        for entry in permit:
            for text in PERMIT_ALIASES.get(entry.strip().lower(), (entry,)):
                try:
                    networks.append(ipaddress.ip_network(text.strip(), strict=True))
                except ValueError as exc:
                    raise ValueError(
                        f"egress_permit: {entry!r} is not a CIDR or one of {sorted(PERMIT_ALIASES)} ({exc})"
                    ) from None
        own: set[IPAddress] = set()
        for text in own_addresses:
            try:
                own.add(canonical_ip(ipaddress.ip_address(text)))
            except ValueError:
                raise ValueError(f"own address {text!r} is not an IP address") from None
        port_set = None if ports is None else frozenset(int(p) for p in ports)
        if port_set is not None and any(not 0 < p < 65536 for p in port_set):
            raise ValueError(f"egress ports must be 1..65535, got {sorted(port_set)}")
        return cls(allow_rules, deny_rules, tuple(networks), frozenset(own), permit_own, port_set, enabled)

    @property
    def default_allow(self) -> bool:
        """For the operator an allow list alone is an allow list."""
        return not self.allow

    def permits(self, ip: IPAddress) -> bool:
        ip = canonical_ip(ip)
        return any(ip.version == net.version and ip in net for net in self.permit)

    def floor(self, ip: IPAddress) -> tuple[str | None, bool]:
        """(why ``ip`` is special or None, whether the operator permits it)."""
        ip = canonical_ip(ip)
        if ip in self.own_addresses:
            return "the service's own address", self.permit_own and self.permits(ip)
        reason = forbidden_reason(ip)
        return reason, reason is not None and self.permits(ip)

    def check_entry(self, rule: Rule) -> None:
        """Raise InvalidRequest if a sandbox's allow entry asks for more than this policy gives."""
        if rule.kind == "all":
            if not self.default_allow and not any(r.kind == "all" for r in self.allow):
                raise InvalidRequest(
                    f"network.allow_out: {rule.entry!r} asks for all traffic; "
                    "this service allows only its egress allow list",
                    field="network",
                    entry=rule.entry,
                )
            return
        if rule.kind == "network":
            net = rule.network
            assert net is not None
            permitted = any(_subnet(net, p) for p in self.permit)
            own = net.num_addresses == 1 and canonical_ip(net.network_address) in self.own_addresses
            if own and not self.permit_own:
                raise InvalidRequest(
                    f"network.allow_out: {rule.entry!r} is this service's own address",
                    field="network",
                    entry=rule.entry,
                )
            for special, label in _SPECIAL:
                if _subnet(net, special):
                    if not permitted:
                        raise InvalidRequest(
                            f"network.allow_out: {rule.entry!r} is in a {label} range this service does not permit",
                            field="network",
                            entry=rule.entry,
                        )
                    break
            nets_allowed = [r.network for r in self.allow if r.network is not None]
            if any(r.kind == "all" for r in self.allow) or any(_overlaps(net, n) for n in nets_allowed):
                return
            nets_denied = [r.network for r in self.deny if r.network is not None]
            in_deny = any(r.kind == "all" for r in self.deny) or any(_subnet(net, n) for n in nets_denied)
            if in_deny or not self.default_allow:
                raise InvalidRequest(
                    f"network.allow_out: {rule.entry!r} is outside this service's egress policy",
                    field="network",
                    entry=rule.entry,
                )
            return
        # A domain or wildcard: refuse only what the operator's name rules refuse for sure.
        if any(r.covers_name(rule) for r in self.allow):
            return
        if any(r.kind == "network" for r in self.allow):
            return  # the name may resolve into an allowed range: decided at connect time
        denied_by_name = any(r.kind in ("domain", "wildcard") and r.covers_name(rule) for r in self.deny)
        if denied_by_name or any(r.kind == "all" for r in self.deny) or not self.default_allow:
            raise InvalidRequest(
                f"network.allow_out: {rule.entry!r} is outside this service's egress policy",
                field="network",
                entry=rule.entry,
            )


@dataclass(frozen=True)
class SandboxPolicy:
    """One sandbox's effective egress policy: its own rules inside the operator's."""

    internet: bool = False
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    operator: OperatorPolicy = field(default_factory=OperatorPolicy)

    @property
    def wants_egress(self) -> bool:
        """Whether any connection could be allowed: if not, the sandbox needs no proxy at all."""
        if self.allow:
            return True
        return self.internet and not any(rule.kind == "all" for rule in self.deny)

    def to_spec(self) -> dict[str, Any]:
        """The ``network`` spec back (for the sandbox's info)."""
        return {
            "internet": self.internet,
            "allow_out": [r.entry for r in self.allow],
            "deny_out": [r.entry for r in self.deny],
        }

    def decide_name(self, host: str, port: int) -> Decision | None:
        """A refusal that needs no DNS lookup (so a refused name is never even resolved), or None
        when the resolved address matters. Never returns an allow: the floor needs the address."""
        op = self.operator
        if op.ports is not None and port not in op.ports:
            return Decision.deny(f"port {port} is not allowed by the service")
        name = _normalise_host(host)
        if name is None:
            return Decision.deny(f"{host!r} is not a valid host name")
        verdict, rule = _name_verdict(op.allow, op.deny, op.default_allow, name)
        if verdict is False:
            return Decision.deny("refused by the service's egress policy", rule.entry if rule else None)
        verdict, rule = _name_verdict(self.allow, self.deny, self.internet, name)
        if verdict is False:
            if rule is not None:
                return Decision.deny(f"deny_out {rule.entry!r}", rule.entry)
            return Decision.deny("no internet access and not in allow_out" if not self.internet else "denied")
        return None

    def decide(self, host: str | None, ip: IPAddress, port: int) -> Decision:
        """The verdict on connecting to ``ip``:``port``, reached by the name ``host`` (None when
        the sandbox asked by address). Called by the proxy for each resolved address, before it
        connects to exactly that address."""
        op = self.operator
        name = _normalise_host(host) if host is not None else None
        if host is not None and name is None:
            return Decision.deny(f"{host!r} is not a valid host name")
        ip = canonical_ip(ip)
        if op.ports is not None and port not in op.ports:
            return Decision.deny(f"port {port} is not allowed by the service")
        special, permitted = op.floor(ip)
        if special is not None and not permitted:
            what = f"{host} resolves to " if host is not None else ""
            return Decision.deny(f"{what}{ip}: {special} address, not permitted by the service")
        ok, rule = _verdict(op.allow, op.deny, op.default_allow, name, ip)
        if not ok:
            return Decision.deny("refused by the service's egress policy", rule.entry if rule else None)
        for rule in self.allow:
            if rule.matches(name, ip):
                return Decision.allow(f"allow_out {rule.entry!r}", rule.entry)
        for rule in self.deny:
            if rule.matches(name, ip):
                return Decision.deny(f"deny_out {rule.entry!r}", rule.entry)
        if self.internet:
            return Decision.allow("internet")
        return Decision.deny("no internet access and not in allow_out")


_SPEC_KEYS = frozenset({"internet", "allow_out", "deny_out"})


def parse_network(spec: Any, operator: OperatorPolicy | None = None) -> SandboxPolicy:
    """Parse a sandbox's ``network`` spec (a mapping, a pydantic model, or None for the default
    of no egress) and check it against ``operator``.

    Raises InvalidRequest (``field="network"``, ``entry=...``) for a malformed entry, an unknown
    key, or an entry beyond the operator's policy. Called by the manager at create, before
    anything is provisioned."""
    operator = operator if operator is not None else OperatorPolicy()
    if spec is None:
        return SandboxPolicy(operator=operator)
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    if not isinstance(spec, Mapping):
        raise InvalidRequest("network must be an object", field="network")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise InvalidRequest(
            f"network: unknown key {unknown[0]!r} (expected {sorted(_SPEC_KEYS)})", field="network", entry=unknown[0]
        )
    internet = spec.get("internet", False)
    if not isinstance(internet, bool):
        raise InvalidRequest(
            f"network.internet must be true or false, got {internet!r}", field="network", entry="internet"
        )
    allow = _parse_rules(spec.get("allow_out"), "allow_out")
    deny = _parse_rules(spec.get("deny_out"), "deny_out")
    policy = SandboxPolicy(internet=internet, allow=allow, deny=deny, operator=operator)
    if policy.wants_egress and not operator.enabled:
        entry = allow[0].entry if allow else "internet"
        raise InvalidRequest(
            f"network: egress is disabled on this service (asked: {entry!r})", field="network", entry=entry
        )
    for rule in allow:
        operator.check_entry(rule)
    return policy
