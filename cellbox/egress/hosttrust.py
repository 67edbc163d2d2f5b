"""What a sandbox inherits from its host so pip, npm, git, curl and apt use the egress proxy and
trust what the host trusts: the CA bundle, the package-index configuration, apt's sources.

Two steps, both testable on fixtures:

* :func:`read_host_config` reads the host (files under an injectable ``root``, an injectable
  environment and home): the CA bundle, pip's settings in pip's own order (global files, user
  files, ``PIP_CONFIG_FILE``, then ``PIP_*`` variables; ``[install]`` over ``[global]``), npm's
  registry, apt's sources and their keyrings.
* :func:`sandbox_trust` turns that into what the runtime gives a sandbox: environment variables
  (the proxy variables in both cases, the CA variables, ``PIP_*`` / ``npm_config_*``), files to
  bind read-only (each at the same path inside, so host configuration that names a path keeps
  working) and small generated files (apt's proxy snippet).

Nothing secret crosses over: index URLs carrying credentials (``https://user:token@host/``) are
left out, and npm's auth settings are never read; :attr:`SandboxTrust.notes` says what was left
out. Programs that ignore proxy variables get no egress at all (the sandbox has only loopback).
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = [
    "CA_BUNDLE_CANDIDATES",
    "AptConfig",
    "Bind",
    "HostConfig",
    "NpmConfig",
    "PipConfig",
    "SandboxTrust",
    "proxy_env",
    "read_host_config",
    "sandbox_trust",
]

# Where distributions keep the system bundle (Debian/Ubuntu, Fedora/RHEL, openSUSE, Alpine).
CA_BUNDLE_CANDIDATES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)
NO_PROXY = "localhost,127.0.0.1,::1"
APT_PROXY_CONF = "/etc/apt/apt.conf.d/99cellbox-proxy"


@dataclass(frozen=True)
class Bind:
    """A host file or directory bound read-only into the sandbox at ``target``."""

    source: Path
    target: str


@dataclass(frozen=True)
class PipConfig:
    """pip's effective index settings (multi-valued ones in order)."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    cert: str | None = None
    no_index: bool = False
    timeout: str | None = None


@dataclass(frozen=True)
class NpmConfig:
    registry: str | None = None
    cafile: str | None = None
    strict_ssl: str | None = None


@dataclass(frozen=True)
class AptConfig:
    sources: tuple[str, ...] = ()  # sources.list and sources.list.d entries (host paths, unprefixed)
    keyrings: tuple[str, ...] = ()  # keyrings the sources name (Signed-By) and trusted.gpg.d


@dataclass(frozen=True)
class HostConfig:
    """What :func:`read_host_config` found. Paths are as the host names them (absolute, without
    ``root``); :attr:`root` is where they are read from (``/`` except in tests)."""

    root: Path = Path("/")
    ca_bundle: str | None = None
    pip: PipConfig = field(default_factory=PipConfig)
    npm: NpmConfig = field(default_factory=NpmConfig)
    apt: AptConfig = field(default_factory=AptConfig)

    def host_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")


@dataclass
class SandboxTrust:
    """What the runtime gives a sandbox at create: ``env`` to set for every process (agent,
    kernels, commands), ``binds`` to mount read-only, ``files`` (sandbox path → content) to write
    into its writable layer, and ``notes`` on what was left out and why (log them at INFO)."""

    env: dict[str, str] = field(default_factory=dict)
    binds: list[Bind] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- reading the host ------------------------------------------------------------------------


def _split(value: str) -> list[str]:
    return value.split()


def _exists(root: Path, path: str, *, file: bool = False) -> bool:
    target = root / path.lstrip("/")
    return target.is_file() if file else target.exists()


def _read_pip(root: Path, env: Mapping[str, str], home: str) -> PipConfig:
    xdg_dirs = [d for d in env.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":") if d]
    xdg_home = env.get("XDG_CONFIG_HOME") or f"{home}/.config"
    files = [f"{d}/pip/pip.conf" for d in xdg_dirs] + [
        "/etc/pip.conf",
        f"{home}/.pip/pip.conf",
        f"{xdg_home}/pip/pip.conf",
    ]
    config_file = env.get("PIP_CONFIG_FILE")
    if config_file == os.devnull:
        files = []
    elif config_file:
        files.append(config_file)
    values: dict[str, str] = {}
    for path in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read_string((root / path.lstrip("/")).read_text(), source=path)
        except (OSError, UnicodeDecodeError, configparser.Error):
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                for key, value in parser.items(section):
                    values[key.replace("_", "-")] = value
    for key, value in env.items():
        if key.startswith("PIP_") and key != "PIP_CONFIG_FILE":
            values[key[4:].lower().replace("_", "-")] = value

    def many(*keys: str) -> tuple[str, ...]:
        out: list[str] = []
        for key in keys:
            out.extend(_split(values.get(key, "")))
        return tuple(out)

    no_index = values.get("no-index", "").strip().lower() in {"1", "true", "yes", "on"}
    return PipConfig(
        index_url=values.get("index-url", "").strip() or values.get("i", "").strip() or None,
        extra_index_urls=many("extra-index-url"),
        find_links=many("find-links", "f"),
        trusted_hosts=many("trusted-host"),
        constraints=many("constraint", "c"),
        cert=values.get("cert", "").strip() or None,
        no_index=no_index,
        timeout=(values.get("default-timeout") or values.get("timeout") or "").strip() or None,
    )


_NPM_LINE = re.compile(r"^\s*([^=;#\s][^=]*?)\s*=\s*(.*?)\s*$")


def _read_npm(root: Path, env: Mapping[str, str], home: str) -> NpmConfig:
    values: dict[str, str] = {}
    # builtin / global (prefix /usr and /usr/local), Debian's /etc/npmrc, then the user's file
    for path in ("/usr/etc/npmrc", "/usr/local/etc/npmrc", "/etc/npmrc", f"{home}/.npmrc"):
        try:
            text = (root / path.lstrip("/")).read_text()
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            match = _NPM_LINE.match(line)
            if match:
                values[match.group(1).lower()] = match.group(2).strip("\"'")
    for key, value in env.items():
        if key.lower().startswith("npm_config_"):
            values[key[len("npm_config_") :].lower().replace("_", "-")] = value
    # Auth keys (_auth, _authToken, //host/:_password, certfile/keyfile) are never read.
    return NpmConfig(registry=values.get("registry"), cafile=values.get("cafile"), strict_ssl=values.get("strict-ssl"))


_SIGNED_BY_LIST = re.compile(r"signed-by=([^\s\]]+)")


def _read_apt(root: Path) -> AptConfig:
    sources: list[str] = []
    keyrings: list[str] = []
    base = root / "etc/apt"
    if (base / "sources.list").is_file():
        sources.append("/etc/apt/sources.list")
    listing = base / "sources.list.d"
    if listing.is_dir():
        for entry in sorted(listing.iterdir()):
            if entry.is_file() and entry.suffix in (".list", ".sources"):  # apt ignores other names
                sources.append(f"/etc/apt/sources.list.d/{entry.name}")
    for source in sources:
        try:
            text = (root / source.lstrip("/")).read_text()
        except (OSError, UnicodeDecodeError):
            continue
        found = _SIGNED_BY_LIST.findall(text)
        found += [m.group(1).strip() for m in re.finditer(r"(?im)^signed-by:\s*(/\S+)\s*$", text)]
        for keyring in found:
            if keyring.startswith("/") and keyring not in keyrings and _exists(root, keyring, file=True):
                keyrings.append(keyring)
    trusted = base / "trusted.gpg.d"
    if trusted.is_dir():
        for entry in sorted(trusted.iterdir()):
            if entry.is_file() and entry.suffix in (".gpg", ".asc"):
                keyrings.append(f"/etc/apt/trusted.gpg.d/{entry.name}")
    return AptConfig(tuple(sources), tuple(keyrings))


def read_host_config(
    root: Path = Path("/"),
    env: Mapping[str, str] | None = None,
    home: str | None = None,
) -> HostConfig:
    """Read the host's trust and package-index configuration (files under ``root``).

    Called once by the service at start (the result is the same for every sandbox); cheap enough
    to call again when the operator changes the host's configuration."""
    env = dict(os.environ if env is None else env)
    home = home if home is not None else env.get("HOME") or str(Path.home())
    pip = _read_pip(root, env, home)
    npm = _read_npm(root, env, home)
    ca: str | None = None
    for candidate in (
        env.get("SSL_CERT_FILE"),
        env.get("REQUESTS_CA_BUNDLE"),
        pip.cert,
        npm.cafile,
        *CA_BUNDLE_CANDIDATES,
    ):
        if candidate and candidate.startswith("/") and _exists(root, candidate, file=True):
            ca = candidate
            break
    return HostConfig(root=root, ca_bundle=ca, pip=pip, npm=npm, apt=_read_apt(root))


# -- what the sandbox gets -------------------------------------------------------------------


def proxy_env(port: int, host: str = "127.0.0.1", *, socks_all_proxy: bool = True) -> dict[str, str]:
    """HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY in both cases, for the bridge at ``host:port``.

    ALL_PROXY is ``socks5h://`` (names resolved by the proxy, never in the sandbox) for tools
    that honour it for what has no scheme-specific variable (curl and libcurl users for other
    schemes, several language package managers). git over ssh and ``git://`` ignore all of these
    (they need ``GIT_SSH_COMMAND`` / ``core.gitProxy``); git over https uses HTTPS_PROXY."""
    http = f"http://{host}:{port}"
    env = {"HTTP_PROXY": http, "HTTPS_PROXY": http, "NO_PROXY": NO_PROXY}
    if socks_all_proxy:
        env["ALL_PROXY"] = f"socks5h://{host}:{port}"
    env.update({key.lower(): value for key, value in env.items()})
    return env


def _has_credentials(url: str) -> bool:
    return "@" in urlsplit(url).netloc


def _local_path(location: str) -> str | None:
    """The local path a pip location names (``file://`` URL or a plain path), else None."""
    if location.startswith("file:"):
        return unquote(urlsplit(location).path) or None
    if "://" in location:
        return None
    return location


def _index_root(path: str) -> str:
    """A PEP 503 index at ``.../simple`` links to its files relative to it (``../../files/``):
    bind its parent so those links resolve inside the sandbox too."""
    stripped = path.rstrip("/")
    return str(Path(stripped).parent) if Path(stripped).name == "simple" else stripped


def sandbox_trust(
    host: HostConfig,
    proxy_port: int | None,
    *,
    proxy_host: str = "127.0.0.1",
    include_apt: bool = True,
    include_constraints: bool = True,
    socks_all_proxy: bool = True,
    cache_index_url: str | None = None,
    npm_cache_url: str | None = None,
) -> SandboxTrust:
    """The env, binds and files for a sandbox whose bridge listens on ``proxy_host:proxy_port``
    inside it (``proxy_port=None``: a sandbox without egress, which still gets the CA bundle and
    the host's local package indexes, and a pip that fails fast instead of retrying).
    ``cache_index_url`` (the package cache's, :data:`cellbox.egress.cache.CACHE_INDEX_URL`)
    replaces the host's pip index: the cache fetches from that index on the sandbox's behalf;
    ``npm_cache_url`` (:data:`cellbox.egress.npm.NPM_REGISTRY_URL`) likewise replaces npm's
    registry (and turns npm's audit off: the cache does not serve it).

    Pure: reads nothing but ``host``. Called by the runtime at create."""
    out = SandboxTrust()
    binds: dict[str, Bind] = {}

    def bind(path: str, what: str) -> bool:
        if not path.startswith("/"):
            out.notes.append(f"{what}: {path!r} is not an absolute path; not passed")
            return False
        if not host.host_path(path).exists():
            out.notes.append(f"{what}: {path} does not exist on the host; not passed")
            return False
        binds.setdefault(path, Bind(host.host_path(path), path))
        return True

    if proxy_port is not None:
        out.env.update(proxy_env(proxy_port, proxy_host, socks_all_proxy=socks_all_proxy))

    ca = host.ca_bundle
    if ca is not None and bind(ca, "CA bundle"):
        for key in (
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "PIP_CERT",
            "NODE_EXTRA_CA_CERTS",
            "GIT_SSL_CAINFO",
        ):
            out.env[key] = ca
        out.env["npm_config_cafile"] = ca
    else:
        ca = None

    pip = host.pip

    def locations(values: Iterable[str], what: str, *, index: bool) -> list[str]:
        kept: list[str] = []
        for value in values:
            if _has_credentials(value):
                out.notes.append(f"pip {what}: a URL with credentials is not passed into sandboxes")
                continue
            local = _local_path(value)
            if local is not None and not bind(_index_root(local) if index else local, f"pip {what}"):
                continue
            kept.append(value)
        return kept

    trusted = list(pip.trusted_hosts)
    if cache_index_url is not None and proxy_port is not None:
        out.env["PIP_INDEX_URL"] = cache_index_url
        cache_host = urlsplit(cache_index_url).hostname
        if cache_host and cache_host not in trusted:
            trusted.append(cache_host)  # plain http:// inside the sandbox, to its own proxy
    elif pip.index_url is not None:
        kept = locations([pip.index_url], "index-url", index=True)
        if kept:
            out.env["PIP_INDEX_URL"] = kept[0]
    extra = locations(pip.extra_index_urls, "extra-index-url", index=True)
    if extra:
        out.env["PIP_EXTRA_INDEX_URL"] = " ".join(extra)
    links = locations(pip.find_links, "find-links", index=False)
    if links:
        out.env["PIP_FIND_LINKS"] = " ".join(links)
    if trusted:
        out.env["PIP_TRUSTED_HOST"] = " ".join(trusted)
    if include_constraints:
        constraints = [c for c in pip.constraints if bind(c, "pip constraint")]
        if constraints:
            out.env["PIP_CONSTRAINT"] = " ".join(constraints)
    if pip.no_index:
        out.env["PIP_NO_INDEX"] = "1"
    if pip.timeout is not None:
        out.env["PIP_DEFAULT_TIMEOUT"] = pip.timeout
    out.env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if proxy_port is None:
        out.env["PIP_RETRIES"] = "0"  # no network: fail at once instead of backing off 5 times

    npm = host.npm
    if npm_cache_url is not None and proxy_port is not None:
        out.env["npm_config_registry"] = npm_cache_url
        out.env["npm_config_audit"] = "false"
    elif npm.registry is not None:
        if _has_credentials(npm.registry):
            out.notes.append("npm registry: a URL with credentials is not passed into sandboxes")
        else:
            out.env["npm_config_registry"] = npm.registry
    if npm.strict_ssl is not None:
        out.env["npm_config_strict_ssl"] = npm.strict_ssl
    if proxy_port is not None:
        out.env["npm_config_proxy"] = out.env["npm_config_https_proxy"] = f"http://{proxy_host}:{proxy_port}"

    if include_apt and host.apt.sources:
        for path in (*host.apt.sources, *host.apt.keyrings):
            bind(path, "apt")
        if proxy_port is not None:
            lines = [
                f'Acquire::http::Proxy "http://{proxy_host}:{proxy_port}";',
                f'Acquire::https::Proxy "http://{proxy_host}:{proxy_port}";',
            ]
            if ca is not None:
                lines.append(f'Acquire::https::CaInfo "{ca}";')
            out.files[APT_PROXY_CONF] = (
                "// written by cellbox: apt goes through the egress proxy\n" + "\n".join(lines) + "\n"
            )

    out.binds = list(binds.values())
    return out
