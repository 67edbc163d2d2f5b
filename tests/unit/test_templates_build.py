"""Dockerfile templates, the parts that need no buildah: reading Dockerfiles, base image
names, apt sources for mmdebstrap, the build's pip settings, progress from buildah's output,
the registry's view of a rootfs template."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from cellbox.api.routes import templates as templates_route
from cellbox.build import base, builder, dockerfile, layer
from cellbox.build.events import BuildEvent
from cellbox.egress.hosttrust import HostConfig, PipConfig
from cellbox.interpreter.errors import Conflict, InvalidRequest
from cellbox.interpreter.templates import TemplateRegistry, template_kind
from cellbox.runtimes.specs import TemplateInfo

REPO = Path(__file__).resolve().parents[2]

MULTI = """\
# syntax=docker/dockerfile:1
ARG SUITE=bookworm
FROM debian:${SUITE} AS builder
# a comment
RUN echo one \\
    && echo two
ARG X=1

FROM builder
COPY a /a
RUN false
FROM scratch
COPY --from=0 /a /a
"""


def test_stages_steps_and_lines() -> None:
    parsed = dockerfile.parse(MULTI)
    assert [s.base for s in parsed.stages] == ["debian:bookworm", "builder", "scratch"]
    assert [s.steps for s in parsed.stages] == [3, 3, 2]
    run = parsed.instruction_at(1, 2)
    assert run is not None and (run.line, run.keyword, run.args) == (5, "RUN", "echo one && echo two")
    failing = parsed.instruction_at(2, 3)
    assert failing is not None and (failing.line, failing.args) == (11, "false")
    assert parsed.offset(2) == 3 and parsed.steps == 8
    assert parsed.base_images() == ["debian:bookworm"]
    assert dockerfile.parse(MULTI, {"SUITE": "trixie"}).base_images() == ["debian:trixie"]


def test_progress_maps_buildah_steps_to_dockerfile_lines() -> None:
    events: list[BuildEvent] = []
    progress = builder._Progress(events.append, total=10)
    progress.begin("dockerfile", dockerfile.parse(MULTI))
    for text in [
        "[1/3] STEP 1/3: FROM debian:bookworm AS builder",
        "[1/3] STEP 2/3: RUN echo one     && echo two",
        "--> Using cache 247f98ba7e7",
        "[2/3] STEP 3/3: RUN false",
        "oops on stderr",
        "subprocess exited with status 1",
        'Error: building at STEP "RUN false": exit status 1',
    ]:
        progress(text)
    steps = [(e.step, e.line) for e in events if e.type == "step"]
    assert steps == [(1, 3), (2, 5), (6, 11)]
    assert [e.type for e in events].count("cached") == 1
    failure = progress.failure("build")
    assert failure.message == "Dockerfile line 11: RUN false failed with exit status 1"
    assert failure.details["line"] == 11
    assert "oops on stderr" in failure.details["output"]


@pytest.mark.parametrize(
    ("image", "suite"),
    [
        ("debian:bookworm", "bookworm"),
        ("debian:12", "bookworm"),
        ("debian:12-slim", "bookworm"),
        ("docker.io/library/debian:trixie", "trixie"),
        ("debian:sid", "sid"),
        ("debian:latest", None),
        ("ubuntu:22.04", None),
        ("quay.io/debian:bookworm", None),
    ],
)
def test_debian_suite(image: str, suite: str | None) -> None:
    assert base.debian_suite(image) == suite


def test_mmdebstrap_sources_follow_the_host(tmp_path: Path) -> None:
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    (tmp_path / "etc/apt/sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    (tmp_path / "etc/apt/sources.list.d/other.list").write_text("deb http://apt.example/pkgs stable main\n")
    found = base.host_debian_sources(tmp_path)
    assert [s.uri for s in found] == ["http://mirror.example/debian", "http://mirror.example/debian-security"]
    signed = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    assert base.mmdebstrap_sources("trixie", found) == [
        f"deb {signed} http://mirror.example/debian trixie main",
        f"deb {signed} http://mirror.example/debian trixie-updates main",
        "deb http://mirror.example/debian-security trixie-security main",
    ]
    assert base.mmdebstrap_sources("sid", []) == ["deb http://deb.debian.org/debian sid main"]


class _Store:
    """The one Buildah method ensure_base asks first."""

    def __init__(self, images: set[str]) -> None:
        self.images = images

    def image_exists(self, name: str) -> bool:
        return name in self.images


def test_missing_base_names_both_ways(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(base, "REGISTRIES_CONF", (tmp_path / "none.conf", tmp_path / "none.d"))
    store = _Store({"localhost/mine:1"})
    assert base.ensure_base("localhost/mine:1", store, print) == "local"  # type: ignore[arg-type]
    with pytest.raises(base.BaseImageMissing) as caught:
        base.ensure_base("ubuntu:22.04", store, print)  # type: ignore[arg-type]
    message = caught.value.message
    assert "ubuntu:22.04" in message and "registries.conf" in message
    assert "FROM debian:bookworm" in message and "cellbox template base debian:bookworm" in message


def test_registry_for_reads_registries_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(
        'unqualified-search-registries = ["docker.io"]\n'
        '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
        '[[registry.mirror]]\nlocation = "mirror.example:5000"\n'
    )
    monkeypatch.setattr(base, "REGISTRIES_CONF", (conf, tmp_path / "none.d"))
    assert base.registry_for("ubuntu:22.04") == ["mirror.example:5000", "docker.io"]
    assert base.registry_for("quay.io/x/y:1") == ["quay.io"]
    assert base.registry_for("localhost/x:1") == []


def test_build_pip_conf_carries_host_settings_and_breaks_system_packages() -> None:
    host = HostConfig(
        ca_bundle="/etc/ssl/certs/ca-certificates.crt",
        pip=PipConfig(index_url="https://pypi.example/simple", find_links=("/opt/wheels",), timeout="60"),
    )
    text = builder._pip_conf(host, "/etc/ssl/certs/ca-certificates.crt")
    assert "index-url = https://pypi.example/simple" in text
    assert "find-links = /opt/wheels" in text
    assert "break-system-packages = true" in text
    assert "cert = /etc/ssl/certs/ca-certificates.crt" in text


def test_layer_requirements_match_kernel_image() -> None:
    """The cellbox layer installs the kernel's part of kernel_image/requirements.txt, same ranges."""
    ranges: dict[str, str] = {}
    for line in (REPO / "kernel_image/requirements.txt").read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0]
            ranges[name.lower().replace("_", "-")] = requirement.replace(" ", "")
    for requirement in layer.LAYER_REQUIREMENTS:
        name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert ranges.get(name) == requirement, f"{requirement} differs from kernel_image's {ranges.get(name)}"


def test_layer_containerfile_restores_the_user(tmp_path: Path) -> None:
    text = layer.containerfile("sha256:abc", "app", "pip-26.0-py3-none-any.whl")
    lines = text.splitlines()
    assert lines[0] == "FROM sha256:abc" and lines[1] == "USER root" and lines[-1] == "USER app"
    assert len(lines) == layer.LAYER_STEPS + 1
    assert "RUN sh /opt/cellbox/build/make-venv.sh pip-26.0-py3-none-any.whl" in text
    wheel = tmp_path / "pip-26.0-py3-none-any.whl"
    wheel.write_bytes(b"zip")
    layer.write_context(layer.Layer(REPO / "kernel_image", wheel), tmp_path / "ctx")
    names = sorted(p.name for p in (tmp_path / "ctx").iterdir())
    assert names == sorted(
        [
            "ensure-python.sh",
            "ensure-user.sh",
            "install-js.sh",
            "jsbridge.py",
            "make-venv.sh",
            wheel.name,
            "requirements.txt",
            "startup",
        ]
    )
    assert sorted(p.name for p in (tmp_path / "ctx/startup").iterdir()) == sorted(
        p.name for p in (REPO / "kernel_image/startup").iterdir()
    )


def test_template_kind(tmp_path: Path) -> None:
    assert template_kind(REPO / "kernel_image") == "venv"  # requirements.txt: today's default template
    assert template_kind(REPO / "kernel_image", "rootfs") == "rootfs"
    (tmp_path / "Dockerfile").write_text("FROM debian:bookworm\n")
    assert template_kind(tmp_path) == "rootfs"
    with pytest.raises(InvalidRequest):
        template_kind(tmp_path / "missing")


def test_registry_loads_a_rootfs_template(tmp_path: Path) -> None:
    (tmp_path / "guide/rootfs").mkdir(parents=True)
    (tmp_path / "guide.new-1234").mkdir()
    (tmp_path / "guide.new-1234/template.json").write_text("{}")
    doc = {
        "kind": "rootfs",
        "rootfs": "rootfs",
        "python": "/opt/cellbox/venv/bin/python",
        "kernels": ["python", "bash", "javascript"],
        "env": {"FOO": "bar"},
        "workdir": "/srv/app",
        "user": "app",
        "startup": ["/opt/cellbox/startup/00_images.py"],
    }
    (tmp_path / "guide/template.json").write_text(json.dumps(doc))
    registry = TemplateRegistry(tmp_path)
    assert "guide" in registry.names() and not any("." in n for n in registry.names())
    if "rootfs" not in {f.name for f in dataclasses.fields(TemplateInfo)}:
        with pytest.raises(InvalidRequest, match="root file system template"):
            registry.get("guide")
        return
    info = registry.get("guide")
    assert info.python == Path("/opt/cellbox/venv/bin/python") and info.env_dir is None
    assert sorted(info.kernels) == ["bash", "javascript", "python"]
    assert info.startup_files == [Path("/opt/cellbox/startup/00_images.py")]
    assert info.env == {"FOO": "bar"}
    fields = vars(info)  # the rootfs fields come with the rootfs runtime (cellbox/runtimes/specs.py)
    assert fields["rootfs"] == tmp_path / "guide/rootfs"
    assert (fields["workdir"], fields["user"]) == ("/srv/app", "app")


def test_build_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        builder.build_rootfs_template(tmp_path, tmp_path / "t", "bad name")
    with pytest.raises(InvalidRequest, match="no Dockerfile"):
        builder.build_rootfs_template(tmp_path, tmp_path / "t", "ok")


def test_one_build_per_name(tmp_path: Path) -> None:
    with builder.build_lock(tmp_path, "x"):
        with pytest.raises(Conflict, match="being built"):
            with builder.build_lock(tmp_path, "x"):
                pass
        with builder.build_lock(tmp_path, "y"):
            pass
    with builder.build_lock(tmp_path, "x"):  # released
        pass


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"FROM debian:bookworm\n") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


@pytest.mark.parametrize(
    "members",
    [
        [_file("../evil")],
        [_file("/abs")],
        [_file("Dockerfile"), _link("x", "/etc/passwd")],
        [_file("Dockerfile"), _link("d/x", "../../etc")],
    ],
)
def test_uploaded_context_stays_inside(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with pytest.raises(InvalidRequest, match="tar archive has"):
        templates_route._unpack(_tar(*members), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_uploaded_context_unpacks(tmp_path: Path) -> None:
    templates_route._unpack(_tar(_file("Dockerfile"), _file("app/main.py", b"print(1)\n")), tmp_path)
    assert (tmp_path / "app/main.py").read_text() == "print(1)\n"
    with pytest.raises(InvalidRequest, match="not a readable tar"):
        templates_route._unpack(b"not a tar", tmp_path)
