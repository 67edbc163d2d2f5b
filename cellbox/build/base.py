"""Base images: the local store first, then a registry if one is configured and answers, and
``debian:<suite>`` bootstrapped with mmdebstrap from the host's own apt sources when neither
has it (this machine has no registry; air-gapped hosts have only their Debian mirror).

A Dockerfile's ``FROM debian:bookworm`` (also ``debian:12``, ``debian:bookworm-slim``,
``docker.io/library/debian:...``) then works anywhere apt works. Any other image that is neither
local nor pullable fails before the build starts, with an error naming both ways out.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cellbox.build.buildah import Buildah
from cellbox.egress.hosttrust import read_host_config
from cellbox.interpreter.errors import TemplateBuildFailed

__all__ = [
    "DEBIAN_SUITES",
    "BaseImageMissing",
    "AptSource",
    "debian_suite",
    "host_debian_sources",
    "bootstrap_debian",
    "ensure_base",
    "registry_for",
]

# Debian's version numbers and names, for ``debian:12`` and the like.
DEBIAN_SUITES = {"10": "buster", "11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}
_KNOWN_SUITES = {*DEBIAN_SUITES.values(), "sid", "unstable", "testing", "stable", "oldstable"}
_DEBIAN_IMAGE = re.compile(r"^(?:(?:docker\.io/)?library/|docker\.io/|localhost/)?debian:([a-z0-9]+)(-slim)?$")
REGISTRIES_CONF = (Path("/etc/containers/registries.conf"), Path("/etc/containers/registries.conf.d"))
PROBE_TIMEOUT = 5.0  # seconds to find out whether a registry answers at all


class BaseImageMissing(TemplateBuildFailed):
    """A Dockerfile's base image is neither in the local store nor pullable."""

    code = "base_image_missing"


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None


def debian_suite(image: str) -> str | None:
    """The Debian suite an image name stands for (``debian:12-slim`` → ``bookworm``), or None."""
    match = _DEBIAN_IMAGE.match(image)
    if match is None:
        return None
    suite = DEBIAN_SUITES.get(match.group(1), match.group(1))
    return suite if suite in _KNOWN_SUITES else None


def _parse_sources(text: str) -> list[AptSource]:
    out: list[AptSource] = []
    if re.search(r"(?im)^types:", text):  # deb822
        for block in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                out.append(
                    AptSource(
                        uri,
                        tuple(fields.get("suites", "").split()),
                        tuple(fields.get("components", "").split()),
                        fields.get("signed-by") or None,
                    )
                )
        return out
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        signed_by = None
        options = re.match(r"^deb\s+\[([^\]]*)\]\s*", line)
        if options:
            found = re.search(r"signed-by=(\S+)", options.group(1))
            signed_by = found.group(1) if found else None
            rest = line[options.end() :].split()
        else:
            rest = line.split()[1:]
        if len(rest) >= 2:
            out.append(AptSource(rest[0], (rest[1],), tuple(rest[2:]), signed_by))
    return out


def host_debian_sources(root: Path = Path("/")) -> list[AptSource]:
    """The host's Debian archive sources (security ones included), in apt's order."""
    sources: list[AptSource] = []
    for path in read_host_config(root=root, env={}, home="/nonexistent").apt.sources:
        try:
            sources.extend(_parse_sources((root / path.lstrip("/")).read_text()))
        except (OSError, UnicodeDecodeError):
            continue
    return [s for s in sources if "debian" in s.uri or (s.signed_by or "").endswith("debian-archive-keyring.gpg")]


def mmdebstrap_sources(suite: str, host: list[AptSource]) -> list[str]:
    """One-line apt sources for ``suite`` on the host's mirrors: the archive (with -updates) and
    the security archive, as the host names them; deb.debian.org when the host has none."""
    main = next((s for s in host if "security" not in s.uri and not any("-security" in x for x in s.suites)), None)
    security = next((s for s in host if "security" in s.uri or any(x.endswith("-security") for x in s.suites)), None)

    def line(source: AptSource | None, fallback: str, dist: str) -> str:
        uri = source.uri if source else fallback
        opts = f"[signed-by={source.signed_by}] " if source and source.signed_by else ""
        return f"deb {opts}{uri} {dist} main"

    lines = [line(main, "http://deb.debian.org/debian", suite)]
    if suite not in {"sid", "unstable"}:
        lines.append(line(main, "http://deb.debian.org/debian", f"{suite}-updates"))
        if suite != "buster":  # buster's security suite was still "buster/updates"
            lines.append(line(security, "http://deb.debian.org/debian-security", f"{suite}-security"))
    return lines


def _apt_proxy_options() -> list[str]:
    """The host's apt proxy settings (mmdebstrap runs apt with its own configuration)."""
    out: list[str] = []
    try:
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return out
    for line in dump.splitlines():
        match = re.match(r'^(Acquire::https?::Proxy(?:::[^ ]+)?) "(.*)";$', line)
        if match:
            out += ["--aptopt", f'{match.group(1)} "{match.group(2)}"']
    return out


def bootstrap_debian(
    image: str,
    buildah: Buildah,
    on_line: Callable[[str], None],
    *,
    suite: str | None = None,
    include: tuple[str, ...] = ("ca-certificates",),
    workdir: Path | None = None,
) -> str:
    """Make the local image ``image`` (``debian:<suite>``) with mmdebstrap (variant minbase:
    Essential + apt, as Docker's debian images) from the host's apt sources; ``include`` adds
    packages (ca-certificates: https mirrors and TLS work without a build-time mount).
    Returns the image id. Raises TemplateBuildFailed when mmdebstrap is missing or fails."""
    suite = suite or debian_suite(image)
    if suite is None:
        raise BaseImageMissing(f"{image!r} is not a Debian image name (debian:<suite>)", image=image)
    if shutil.which("mmdebstrap") is None:
        raise TemplateBuildFailed(
            f"cannot bootstrap {image}: mmdebstrap is not installed (apt-get install mmdebstrap)", image=image
        )
    sources = mmdebstrap_sources(suite, host_debian_sources())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cellbox-base-", dir=workdir) as tmp:
        tar = Path(tmp) / "rootfs.tar"
        argv = [
            "mmdebstrap",
            "--variant=minbase",
            "--format=tar",
            "--mode=root",
            f"--include={','.join(include)}",
            *_apt_proxy_options(),
            suite,
            str(tar),
            *sources,
        ]
        on_line(f"bootstrapping {image} with mmdebstrap from {', '.join(sources)}")
        tail: list[str] = []
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
        ) as proc:
            assert proc.stdout is not None
            for raw in proc.stdout:
                tail = [*tail[-29:], raw.rstrip()]
                on_line(raw.rstrip())
        if proc.returncode != 0:
            raise TemplateBuildFailed(f"mmdebstrap {suite} failed", image=image, output="\n".join(tail))
        name = image if "/" in image else f"localhost/{image}"
        image_id = buildah.import_rootfs_tar(
            tar,
            name,
            [
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd",
                "bash",
                "--label",
                f"org.cellbox.base=mmdebstrap {suite}",
            ],
        )
    on_line(f"made {name} ({image_id[:12]}) in {time.monotonic() - started:.1f} s")
    return image_id


# -- registries -----------------------------------------------------------------------------


def _registries_conf() -> tuple[list[str], list[dict[str, object]]]:
    """(unqualified-search-registries, [[registry]] tables) of containers-registries.conf(5)."""
    search: list[str] = []
    tables: list[dict[str, object]] = []
    files: list[Path] = []
    main, drop_in = REGISTRIES_CONF
    if main.is_file():
        files.append(main)
    if drop_in.is_dir():
        files += sorted(drop_in.glob("*.conf"))
    for path in files:
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        found = doc.get("unqualified-search-registries")
        if isinstance(found, list):
            search = [str(r) for r in found]  # later files override
        registry = doc.get("registry")
        if isinstance(registry, list):
            tables += [t for t in registry if isinstance(t, dict)]
    return search, tables


def _domain(image: str) -> str | None:
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def registry_for(image: str) -> list[str]:
    """The registry hosts (mirrors first) buildah would ask for ``image``; empty: none."""
    search, tables = _registries_conf()
    domain = _domain(image)
    hosts = [domain] if domain else list(search)
    out: list[str] = []
    for host in hosts:
        if host == "localhost":
            continue
        for table in tables:
            prefix = str(table.get("prefix") or table.get("location") or "")
            if prefix and (host == prefix or host.startswith(prefix + "/")):
                mirrors = table.get("mirror")
                if isinstance(mirrors, list):
                    out += [str(m.get("location")) for m in mirrors if isinstance(m, dict) and m.get("location")]
                if table.get("blocked") is True:
                    host = ""
        if host:
            out.append(host)
    return out


def _answers(host: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether something accepts a TCP connection for registry ``host`` (``name[:port][/path]``)."""
    netloc = urlsplit(f"//{host}").netloc
    hostname, _, port = netloc.partition(":")
    try:
        with socket.create_connection((hostname, int(port or 443)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _missing_message(image: str, hosts: list[str]) -> str:
    asked = (
        f"no registry configured for it answered ({', '.join(hosts)})"
        if hosts
        else "no registry is configured (unqualified-search-registries in /etc/containers/registries.conf)"
    )
    return (
        f"base image {image!r} is not in the local image store and {asked}. Either make it "
        "reachable: configure a registry or mirror in /etc/containers/registries.conf, or `buildah "
        f"pull` / `buildah tag` it into the local store; or build on Debian, bootstrapped here from "
        "the host's apt sources: `FROM debian:bookworm` in the Dockerfile (made automatically), or "
        "`cellbox template base debian:bookworm` beforehand."
    )


def ensure_base(image: str, buildah: Buildah, on_line: Callable[[str], None]) -> str:
    """Make sure ``image`` is in the local store: there already; ``debian:<suite>``
    bootstrapped; or pulled from a configured registry that answers. Returns how it was had
    (``local``, ``bootstrapped``, ``pulled``); raises BaseImageMissing otherwise."""
    if buildah.image_exists(image):
        return "local"
    suite = debian_suite(image)
    hosts = registry_for(image)
    reachable = [h for h in hosts if _answers(h)]
    if reachable:
        on_line(f"pulling {image} (registry {reachable[0]})")
        tail: list[str] = []

        def keep(line: str) -> None:
            nonlocal tail
            tail = [*tail[-19:], line]
            on_line(line)

        if buildah.stream(["pull", image], keep) == 0:
            return "pulled"
        if suite is None:
            raise BaseImageMissing(f"pulling {image!r} failed", image=image, output="\n".join(tail))
    if suite is not None:
        bootstrap_debian(image, buildah, on_line, suite=suite, workdir=_tmp_dir())
        return "bootstrapped"
    raise BaseImageMissing(_missing_message(image, hosts), image=image)


def _tmp_dir() -> Path | None:
    """Where the bootstrap's tarball goes: /var/tmp (disk) over a small /tmp tmpfs."""
    for candidate in (os.environ.get("TMPDIR"), "/var/tmp"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None
