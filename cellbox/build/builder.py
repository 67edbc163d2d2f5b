"""``cellbox template build DIR --name N`` for a directory with a Dockerfile: a rootfs template.

1. base images: the Dockerfile's FROM images are made local first (:mod:`cellbox.build.base`);
2. the Dockerfile: ``buildah bud --layers --isolation chroot --network host`` with the host's
   trust passed in for the build only (CA bundle, a generated pip.conf with the host's index
   settings and ``break-system-packages``, npm's registry, proxy build args): the image is
   tagged ``localhost/cellbox/N:dockerfile``;
3. cellbox's layer on top (:mod:`cellbox.build.layer`): ``localhost/cellbox/N:template``;
4. export: the image's root file system copied to ``TEMPLATES/N.new-XXXX/rootfs`` (a tar pipe
   from a buildah mount: ownership, modes, xattrs, ACLs and hardlinks kept; faster than
   ``cp -a`` here), ``template.json`` written (the image's ENV, WORKDIR, USER, CMD), then
   renamed into place. The replaced tree is moved to ``TEMPLATES/.retired/`` and deleted only
   after ``retain_old`` seconds (a sandbox still running on it keeps working: it has the tree
   mounted, and its files are not unlinked under it). When the final image is the one the
   template already has, nothing is exported.

One build per template name at a time (a lock file next to the template): a second gets
Conflict. Progress goes to ``on_event`` (:mod:`cellbox.build.events`).
"""

from __future__ import annotations

import configparser
import fcntl
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cellbox.build import dockerfile as df
from cellbox.build.base import ensure_base
from cellbox.build.buildah import Buildah
from cellbox.build.events import BuildEvent, OnEvent
from cellbox.build.layer import LAYER_PREFIX, LAYER_PYTHON, LAYER_STEPS, Layer, containerfile, pip_wheel, write_context
from cellbox.egress.hosttrust import HostConfig, read_host_config
from cellbox.interpreter.errors import Conflict, InvalidRequest, TemplateBuildFailed
from cellbox.interpreter.templates import KERNEL_IMAGE

__all__ = [
    "BuildResult",
    "DEFAULT_KERNEL_IMAGE",
    "RETAIN_OLD",
    "build_lock",
    "build_rootfs_template",
    "export_rootfs",
    "find_dockerfile",
]

DEFAULT_KERNEL_IMAGE = KERNEL_IMAGE  # its startup/ and env go into cellbox's layer of every image
RETAIN_OLD = 25 * 3600.0  # a replaced tree outlives the longest sandbox timeout (24 h) before deletion
CA_TARGET = "/etc/ssl/certs/ca-certificates.crt"  # where Debian, Ubuntu and Alpine keep the bundle
_STEP = re.compile(r"^(?:\[(\d+)/(\d+)\] )?STEP (\d+)/(\d+): (.*)$")
_PROXY_ARGS = ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")


@dataclass
class BuildResult:
    path: Path
    image: str
    exported: bool
    cached_steps: int
    steps: int
    duration_s: float
    export_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def find_dockerfile(source: Path) -> Path | None:
    for name in ("Dockerfile", "Containerfile"):
        if (source / name).is_file():
            return source / name
    return None


@contextmanager
def build_lock(root: Path, name: str) -> Iterator[None]:
    """Held while template ``name`` builds (a lock file beside it, so the CLI and the service
    see each other's builds); Conflict when another build holds it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f".{name}.build-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"template {name!r} is being built already; try again when that build ends") from None
        yield
    finally:
        os.close(fd)


def _pip_conf(host: HostConfig, ca: str | None) -> str:
    conf = configparser.RawConfigParser()
    conf.add_section("global")
    pip = host.pip
    values = {
        "index-url": pip.index_url,
        "extra-index-url": " ".join(pip.extra_index_urls) or None,
        "find-links": " ".join(pip.find_links) or None,
        "trusted-host": " ".join(pip.trusted_hosts) or None,
        "timeout": pip.timeout,
        "cert": ca,
        "no-index": "true" if pip.no_index else None,
        # `pip3 install x` into an image's system Python, as the E2B guide's Dockerfiles do
        # (PEP 668 refuses it on Debian 12+ / Ubuntu 23.04+ without this); build time only
        "break-system-packages": "true",
        "root-user-action": "ignore",
        "disable-pip-version-check": "true",
    }
    for key, value in values.items():
        if value:
            conf.set("global", key, value)
    out = io.StringIO()
    conf.write(out)
    return "# written by cellbox for template builds (mounted at build time only)\n" + out.getvalue()


def _local_dirs(host: HostConfig) -> list[str]:
    """Local package locations pip's settings name (find-links dirs, file:// indexes)."""
    out: list[str] = []
    for value in (*host.pip.find_links, *(filter(None, [host.pip.index_url])), *host.pip.extra_index_urls):
        path = value[len("file://") :] if value.startswith("file://") else value
        if path.startswith("/") and Path(path).exists():
            parent = Path(path).parent if Path(path).name == "simple" else Path(path)
            out.append(str(parent))
    return out


def _trust_args(host: HostConfig, workdir: Path) -> list[str]:
    """``buildah bud`` options passing the host's trust and package settings into RUN steps
    without putting any of it in the image."""
    args: list[str] = []
    ca = None
    if host.ca_bundle:
        ca = CA_TARGET
        args += ["-v", f"{host.host_path(host.ca_bundle)}:{CA_TARGET}:ro"]
    (workdir / "pip.conf").write_text(_pip_conf(host, ca))
    args += ["-v", f"{workdir / 'pip.conf'}:/etc/pip.conf:ro"]
    for path in _local_dirs(host):
        args += ["-v", f"{path}:{path}:ro"]
    npm = []
    if host.npm.registry and "@" not in host.npm.registry.split("//", 1)[-1].split("/", 1)[0]:
        npm.append(f"registry={host.npm.registry}")
    if ca:
        npm.append(f"cafile={ca}")
    if host.npm.strict_ssl:
        npm.append(f"strict-ssl={host.npm.strict_ssl}")
    if npm:
        (workdir / "npmrc").write_text("\n".join(npm) + "\n")
        args += ["-v", f"{workdir / 'npmrc'}:/etc/npmrc:ro"]
    for key in _PROXY_ARGS:
        value = os.environ.get(key) or os.environ.get(key.lower())
        if value:
            args += ["--build-arg", f"{key}={value}", "--build-arg", f"{key.lower()}={value}"]
    return args


class _Progress:
    """Turns buildah's output into events; remembers the step a failure belongs to."""

    def __init__(self, on_event: OnEvent, total: int) -> None:
        self.on_event = on_event
        self.total = total
        self.done = 0  # steps of the earlier phases
        self.current = 0
        self.cached = 0
        self.phase = ""
        self.dockerfile: df.Dockerfile | None = None
        self.instruction: str | None = None
        self.line: int | None = None
        self.tail: deque[str] = deque(maxlen=40)
        self.error_text: str | None = None

    def begin(self, phase: str, dockerfile: df.Dockerfile | None) -> None:
        self.done = self.current
        self.phase = phase
        self.dockerfile = dockerfile

    def step(self, phase: str, instruction: str, line: int | None = None) -> None:
        self.current += 1
        self.phase, self.instruction, self.line = phase, instruction, line
        self.tail.clear()
        self.on_event(
            BuildEvent("step", step=self.current, total=self.total, phase=phase, instruction=instruction, line=line)
        )

    def __call__(self, text: str) -> None:
        match = _STEP.match(text)
        if match:
            stage = int(match.group(1) or 1)
            step = int(match.group(3))
            line = None
            if self.dockerfile is not None:
                found = self.dockerfile.instruction_at(stage, step)
                line = found.line if found else None
                self.current = self.done + self.dockerfile.offset(stage) + step - 1
            self.step(self.phase, match.group(5), line)
            return
        if text.startswith("--> Using cache "):
            self.cached += 1
            self.on_event(BuildEvent("cached", step=self.current, total=self.total, phase=self.phase))
        if text.startswith("Error: ") or text.startswith("error building at STEP"):
            self.error_text = text.removeprefix("Error: ")
        else:
            self.tail.append(text)
        self.on_event(BuildEvent("log", text=text))

    def failure(self, what: str) -> TemplateBuildFailed:
        where = f"Dockerfile line {self.line}: " if self.line is not None and self.phase == "dockerfile" else ""
        step = f"{self.instruction}" if self.instruction else what
        status = re.search(r"exit status \d+", self.error_text or "")
        reason = f" with {status.group(0)}" if status else (f": {self.error_text}" if self.error_text else "")
        prefix = "cellbox layer: " if self.phase == "cellbox" else where
        message = f"{prefix}{step} failed{reason}"
        details: dict[str, Any] = {"output": "\n".join(self.tail), "phase": self.phase}
        if self.line is not None and self.phase == "dockerfile":
            details["line"] = self.line
        if self.instruction:
            details["instruction"] = self.instruction
        return TemplateBuildFailed(message, **details)


def _bud(
    buildah: Buildah,
    progress: _Progress,
    containerfile_path: Path,
    context: Path,
    tag: str,
    extra: list[str],
    what: str,
) -> str:
    iid = containerfile_path.parent / f".iid-{secrets.token_hex(4)}"
    argv = [
        "bud",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--layers",
        "--force-rm",  # no working container left behind by a failed step
        "--pull=never",
        "-f",
        str(containerfile_path),
        "-t",
        tag,
        "--iidfile",
        str(iid),
        *extra,
        str(context),
    ]
    try:
        if buildah.stream(argv, progress) != 0:
            raise progress.failure(what)
        return iid.read_text().strip()
    finally:
        iid.unlink(missing_ok=True)


def _env_dict(env: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in env or []:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def _image_config(buildah: Buildah, image: str) -> dict[str, Any]:
    doc = buildah.inspect_image(image)
    config: dict[str, Any] = (doc.get("OCIv1") or {}).get("config") or {}
    return config


def export_rootfs(buildah: Buildah, image: str, dest: Path) -> None:
    """Copy ``image``'s root file system to ``dest`` (created), keeping owners (numeric),
    modes, xattrs, ACLs, hardlinks and special files."""
    dest.mkdir(parents=True)
    with buildah.mounted(image) as mounted:
        flags = ["--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner"]
        with subprocess.Popen(
            ["tar", "-C", str(mounted), *flags, "-cpf", "-", "."], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as reader:
            assert reader.stdout is not None and reader.stderr is not None
            writer = subprocess.run(
                ["tar", "-C", str(dest), *flags, "-xpf", "-"], stdin=reader.stdout, capture_output=True, check=False
            )
            reader.stdout.close()
            read_err = reader.stderr.read()
    if reader.returncode != 0 or writer.returncode != 0:
        raise TemplateBuildFailed(
            "exporting the image's root file system failed", output=(read_err + writer.stderr).decode(errors="replace")
        )


def _drop_mountpoints(rootfs: Path) -> None:
    """Remove the empty files buildah leaves where the build-time mounts were (pip.conf and
    npmrc the image did not have): an empty /etc/pip.conf is harmless, but it is not the image's."""
    for path in ("etc/pip.conf", "etc/npmrc"):
        target = rootfs / path
        try:
            st = target.lstat()
        except FileNotFoundError:
            continue
        if st.st_size == 0 and (st.st_mode & 0o777) == 0o755 and target.is_file() and not target.is_symlink():
            target.unlink()


def _kernels(rootfs: Path) -> list[str]:
    kernels = ["python"]
    if any(os.path.lexists(rootfs / p) for p in ("usr/bin/bash", "bin/bash")):
        kernels.append("bash")
    if (rootfs / LAYER_PREFIX.lstrip("/") / "js/node_modules/deno/deno").exists():
        kernels.append("javascript")
    return kernels


def _retire(root: Path, target: Path, retain_old: float) -> None:
    """Move ``target`` (a template's tree being replaced) to ``root/.retired/NAME-SECONDS-XXX``;
    delete the trees retired more than ``retain_old`` seconds ago (the time is in the name)."""
    retired = root / ".retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    os.chmod(retired, 0o700)
    now = time.time()
    moved = None
    if target.exists():
        moved = retired / f"{target.name}-{int(now)}-{secrets.token_hex(3)}"
        target.rename(moved)
    for old in retired.iterdir():
        match = re.search(r"-(\d+)-[0-9a-f]+$", old.name)
        if old != moved and match and now - int(match.group(1)) > retain_old:
            shutil.rmtree(old, ignore_errors=True)


def build_rootfs_template(
    source: Path,
    root: Path,
    name: str,
    *,
    on_event: OnEvent | None = None,
    buildah: Buildah | None = None,
    kernel_image: Path | None = None,
    build_args: dict[str, str] | None = None,
    cache_dir: Path | None = None,
    retain_old: float = RETAIN_OLD,
    locked: bool = False,
) -> BuildResult:
    """Build template ``name`` under ``root`` from ``source`` (a directory with a Dockerfile);
    see the module docstring. Raises InvalidRequest (bad name or directory), Conflict (a build
    of ``name`` is running; ``locked``: the caller holds :func:`build_lock`), BaseImageMissing,
    TemplateBuildFailed (a step failed: its Dockerfile line and output are in the details)."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise InvalidRequest("a template name is letters, digits, - and _", field="name")
    dockerfile_path = find_dockerfile(source)
    if dockerfile_path is None:
        raise InvalidRequest(f"{source} has no Dockerfile", field="source")
    emit: OnEvent = on_event or (lambda event: None)
    buildah = buildah or Buildah()
    kernel_image = kernel_image or DEFAULT_KERNEL_IMAGE
    started = time.monotonic()
    timings: dict[str, float] = {}
    parsed = df.parse(dockerfile_path.read_text(), build_args)
    if not parsed.stages:
        raise InvalidRequest("the Dockerfile has no FROM", field="source")
    with nullcontext() if locked else build_lock(root, name):
        missing = [image for image in parsed.base_images() if not buildah.image_exists(image)]
        total = len(missing) + parsed.steps + LAYER_STEPS + 1 + 1  # + USER restore, export
        progress = _Progress(emit, total)
        for image in missing:
            progress.step("base", f"base image {image}")
            ensure_base(image, buildah, progress)
        timings["base"] = time.monotonic() - started
        tag = name.lower()
        host = read_host_config()
        with tempfile.TemporaryDirectory(prefix=f".{name}-build-", dir=root) as tmp:
            work = Path(tmp)
            trust = _trust_args(host, work)
            args = [arg for key, value in (build_args or {}).items() for arg in ("--build-arg", f"{key}={value}")]
            progress.begin("dockerfile", parsed)
            t0 = time.monotonic()
            user_image = _bud(
                buildah,
                progress,
                dockerfile_path,
                source,
                f"localhost/cellbox/{tag}:dockerfile",
                [*trust, *args],
                "build",
            )
            timings["dockerfile"] = time.monotonic() - t0
            config = _image_config(buildah, user_image)
            user = config.get("User") or None
            context = work / "layer"
            wheel = pip_wheel((cache_dir or root / ".cache") / "pip")
            write_context(Layer(kernel_image, wheel), context)
            (context / "Containerfile").write_text(containerfile(user_image, user, wheel.name))
            progress.begin("cellbox", None)
            t0 = time.monotonic()
            image = _bud(
                buildah,
                progress,
                context / "Containerfile",
                context,
                f"localhost/cellbox/{tag}:template",
                trust,
                "layer",
            )
            timings["cellbox"] = time.monotonic() - t0
        progress.current = total - 1
        target = root / name
        current = target / "template.json"
        if current.is_file() and (target / "rootfs").is_dir():
            try:
                previous = json.loads(current.read_text()).get("image", {}).get("id")
            except (OSError, ValueError):
                previous = None
            if previous == image:
                progress.step("export", "unchanged: the template already has this image")
                result = BuildResult(target, image, False, progress.cached, total, time.monotonic() - started)
                result.timings = timings
                emit(_done(name, result))
                return result
        progress.step("export", f"export the root file system to {target}")
        t0 = time.monotonic()
        staging = root / f"{name}.new-{secrets.token_hex(4)}"
        try:
            # root's only: an image may hold setuid-root files and device nodes, which host users
            # must not reach (sandboxes get the tree through an idmapped nosuid,nodev mount)
            staging.mkdir(mode=0o700)
            os.chmod(staging, 0o700)
            export_rootfs(buildah, image, staging / "rootfs")
            _drop_mountpoints(staging / "rootfs")
            export_s = time.monotonic() - t0
            timings["export"] = export_s
            doc = _template_doc(source, kernel_image, image, user_image, config, staging / "rootfs")
            doc.setdefault("description", f"built from a Dockerfile (FROM {parsed.stages[-1].base})")
            doc["build"] = {"seconds": {k: round(v, 2) for k, v in timings.items()}}
            (staging / "template.json").write_text(json.dumps(doc, indent=2))
            _retire(root, target, retain_old)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        result = BuildResult(target, image, True, progress.cached, total, time.monotonic() - started, export_s)
        result.timings = timings
        emit(_done(name, result))
        return result


def _done(name: str, result: BuildResult) -> BuildEvent:
    return BuildEvent(
        "done",
        step=result.steps,
        total=result.steps,
        template=name,
        path=str(result.path),
        image=result.image,
        duration_ms=int(result.duration_s * 1000),
        cached_steps=result.cached_steps,
        exported=result.exported,
    )


def _template_doc(
    source: Path, kernel_image: Path, image: str, user_image: str, config: dict[str, Any], rootfs: Path
) -> dict[str, Any]:
    """template.json of a rootfs template: the image's ENV/WORKDIR/USER/CMD, where Python and
    the startup files are inside the root file system, the kernels it has."""
    own: dict[str, Any] = {}  # the source directory's own template.json: description, limits, env
    if (source / "template.json").is_file():
        own = json.loads((source / "template.json").read_text())
    kernel_env: dict[str, str] = {}
    if (kernel_image / "template.json").is_file():
        kernel_env = json.loads((kernel_image / "template.json").read_text()).get("env", {})
    image_env = _env_dict(config.get("Env"))
    env = {**kernel_env, **image_env, **own.get("env", {})}
    env["PATH"] = f"{LAYER_PREFIX}/venv/bin:" + image_env.get(
        "PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    )
    startup = sorted(
        f"{LAYER_PREFIX}/startup/{p.name}" for p in (rootfs / LAYER_PREFIX.lstrip("/") / "startup").glob("*.py")
    )
    return {
        "kind": "rootfs",
        **({"description": own["description"]} if "description" in own else {}),
        "rootfs": "rootfs",
        "python": LAYER_PYTHON,
        "kernels": _kernels(rootfs),
        "env": env,
        "image_env": image_env,
        "workdir": config.get("WorkingDir") or None,
        "user": config.get("User") or None,
        "cmd": config.get("Cmd"),
        "entrypoint": config.get("Entrypoint"),
        "startup": startup,
        "limits": own.get("limits", {}),
        "preload": own.get("preload", []),
        "image": {"id": image, "dockerfile_image": user_image},
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
