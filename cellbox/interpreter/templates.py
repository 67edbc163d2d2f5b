"""Templates: what a sandbox starts from.

A built template is a directory ``TEMPLATES_DIR/<name>/`` holding ``template.json`` and one of:

* kind ``venv`` (``build_template`` below, from a directory like ``kernel_image/`` with a
  ``requirements.txt``; :data:`KERNEL_IMAGE`, shipped in the package, when none is given): a
  Python virtual environment ``venv/`` (ipykernel and the packages users expect) and
  ``startup/*.py`` files run in every new Python kernel; the sandbox sees the host's read-only
  /usr under it;
* kind ``rootfs`` (:func:`cellbox.build.build_rootfs_template`, from a directory with a
  Dockerfile): a root file system ``rootfs/`` exported from the image buildah built, with
  cellbox's layer in it; ``template.json`` names the interpreter and startup files as paths
  *inside* the rootfs and records the image's ENV, WORKDIR, USER and CMD.

``cellbox template build DIR`` picks the kind: ``requirements.txt`` → venv, else a Dockerfile →
rootfs (``--kind`` overrides).

When no ``default`` template was built, the service's own Python serves as the ``default``
kernel environment if it can import ipykernel (a laptop after ``pip install
'cellbox[server,kernel]'``), with a warning: user ``pip install`` then lands in the
service's environment.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellbox.interpreter.errors import InvalidRequest, TemplateBuildFailed, TemplateNotFound
from cellbox.interpreter.models import Limits
from cellbox.runtimes.specs import KernelSpec, TemplateInfo

log = logging.getLogger("cellbox.templates")

# The default template's source (requirements.txt, startup/, template.json, a Dockerfile), shipped
# inside the package so `cellbox template build --name default` works from a pip install; the
# checkout's kernel_image/ is a link to it.
KERNEL_IMAGE = Path(__file__).resolve().parents[1] / "kernel_image"

PYTHON_KERNEL = KernelSpec("python", ["{python}", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
BASH_KERNEL = KernelSpec("bash", ["{python}", "-m", "bash_kernel", "-f", "{connection_file}"], interrupt_mode="signal")
# Deno's kernel (rootfs templates whose image has node: cellbox.build.layer installs it) binds
# TCP only: the bridge binds the IPC endpoints of {connection_file} and relays them to it on the
# sandbox's own loopback. NO_COLOR: plain text/plain results, not ANSI-coloured ones. Interrupts
# go as a control message (Deno stops the running cell and keeps its state; SIGINT does not).
JAVASCRIPT_KERNEL = KernelSpec(
    "javascript",
    [
        "{python}",
        "/opt/cellbox/jsbridge.py",
        "{connection_file}",
        "--",
        "/opt/cellbox/js/node_modules/deno/deno",
        "jupyter",
        "--kernel",
        "--conn",
        "{tcp_connection_file}",
    ],
    env={"NO_COLOR": "1"},
)
TEMPLATE_KINDS = ("venv", "rootfs")


def _kernels_for(python: Path, available: list[str] | None) -> dict[str, KernelSpec]:
    kernels = {"python": PYTHON_KERNEL}
    if available is None or "bash" in available:
        kernels["bash"] = BASH_KERNEL
    if available is not None and "javascript" in available:
        kernels["javascript"] = JAVASCRIPT_KERNEL
    return kernels


class TemplateRegistry:
    """Finds templates by name. Cheap to call per request: reads ``template.json`` on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        found = (
            sorted(p.parent.name for p in self.root.glob("*/template.json") if _valid_name(p.parent.name))
            if self.root.exists()
            else []
        )
        if "default" not in found and self._host_python_usable():
            found.insert(0, "default")
        return found

    def get(self, name: str) -> TemplateInfo:
        """The template called ``name``; raises TemplateNotFound naming the known ones."""
        path = self.root / name / "template.json"
        if _valid_name(name) and path.exists():
            return self._load(name, path)
        if name == "default" and self._host_python_usable():
            log.warning(
                "no built 'default' template under %s: kernels run on the service's own Python (%s)",
                self.root,
                sys.executable,
            )
            return TemplateInfo(
                name="default",
                python=Path(sys.executable),
                env_dir=Path(sys.prefix),
                kernels=_kernels_for(Path(sys.executable), self._host_kernels()),
            )
        raise TemplateNotFound(f"no template named {name!r}", known=self.names())

    def _load(self, name: str, path: Path) -> TemplateInfo:
        doc: dict[str, Any] = json.loads(path.read_text())
        base = path.parent
        if doc.get("kind") == "rootfs" or "rootfs" in doc:
            return self._load_rootfs(name, base, doc)
        python = base / doc.get("python", "venv/bin/python")
        startup = sorted((base / "startup").glob("*.py")) if (base / "startup").is_dir() else []
        return TemplateInfo(
            name=name,
            python=python,
            env_dir=base / "venv",
            kernels=_kernels_for(python, doc.get("kernels")),
            startup_files=startup,
            env={str(k): str(v) for k, v in doc.get("env", {}).items()},
            limits=Limits(**doc.get("limits", {})),
            preload=[str(m) for m in doc.get("preload", [])],
        )

    @staticmethod
    def _load_rootfs(name: str, base: Path, doc: dict[str, Any]) -> TemplateInfo:
        """A rootfs template: ``python`` and the startup files are paths inside the rootfs."""
        extra: dict[str, Any] = {
            "rootfs": base / str(doc.get("rootfs", "rootfs")),
            "workdir": doc.get("workdir") or None,
            "user": doc.get("user") or None,
        }
        known = {f.name for f in dataclasses.fields(TemplateInfo)}
        if "rootfs" not in known:
            raise InvalidRequest(
                f"template {name!r} is a root file system template, which this service's runtime cannot run",
                field="template",
            )
        python = Path(str(doc.get("python", "/opt/cellbox/venv/bin/python")))
        return TemplateInfo(
            name=name,
            python=python,
            env_dir=None,
            kernels=_kernels_for(python, doc.get("kernels")),
            startup_files=[Path(str(p)) for p in doc.get("startup", [])],
            env={str(k): str(v) for k, v in doc.get("env", {}).items()},
            limits=Limits(**doc.get("limits", {})),
            preload=[str(m) for m in doc.get("preload", [])],
            **{k: v for k, v in extra.items() if k in known},
        )

    @staticmethod
    def _host_python_usable() -> bool:
        return importlib.util.find_spec("ipykernel") is not None

    @staticmethod
    def _host_kernels() -> list[str]:
        kernels = ["python"]
        if importlib.util.find_spec("bash_kernel") is not None:
            kernels.append("bash")
        return kernels


def _valid_name(name: str) -> bool:
    """Letters, digits, - and _ (no dots: staging and retired trees are never templates)."""
    return bool(name) and name.replace("-", "").replace("_", "").isalnum()


def template_kind(source: Path, kind: str = "auto") -> str:
    """The kind ``cellbox template build SOURCE`` makes: ``venv`` for a directory with a
    requirements.txt (kernel_image/, the default template), else ``rootfs`` for one with a
    Dockerfile/Containerfile; ``kind`` other than auto is taken as given. InvalidRequest for a
    directory with neither."""
    if kind in TEMPLATE_KINDS:
        return kind
    if kind != "auto":
        raise InvalidRequest(f"kind is one of auto, {', '.join(TEMPLATE_KINDS)}", field="kind")
    if (source / "requirements.txt").is_file():
        return "venv"
    if (source / "Dockerfile").is_file() or (source / "Containerfile").is_file():
        return "rootfs"
    raise InvalidRequest(f"{source} has neither a requirements.txt nor a Dockerfile", field="source")


def default_template_python() -> Path:
    """The interpreter a template venv is made from: the system Python when there is one
    (isolated sandboxes then only need /usr mounted), else the service's own."""
    system = Path("/usr/bin/python3")
    return system if system.exists() else Path(sys.executable)


def build_template(
    source: Path,
    root: Path,
    name: str,
    *,
    python: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Path:
    """Build template ``name`` under ``root`` from a directory like ``kernel_image/``
    (``requirements.txt``, optional ``startup/*.py`` and ``template.json``).

    Builds into a temporary directory and renames it into place, so a failed build leaves the
    previous template untouched. Calls ``on_line`` with every line of pip's output. Raises
    InvalidRequest for a bad source directory, TemplateBuildFailed when pip fails.
    """
    if not _valid_name(name):
        raise InvalidRequest("a template name is letters, digits, - and _", field="name")
    requirements = source / "requirements.txt"
    if not requirements.is_file():
        raise InvalidRequest(f"{source} has no requirements.txt", field="source")
    doc: dict[str, Any] = {}
    if (source / "template.json").is_file():
        doc = json.loads((source / "template.json").read_text())
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        python = python or default_template_python()
        _run([str(python), "-m", "venv", str(staging / "venv")], on_line)
        pip = [str(staging / "venv" / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
        _run([*pip, "install", "--progress-bar", "off", "-r", str(requirements)], on_line)
        if (source / "startup").is_dir():
            shutil.copytree(source / "startup", staging / "startup")
        doc["python"] = "venv/bin/python"
        doc.setdefault("kernels", ["python", "bash"])
        (staging / "template.json").write_text(json.dumps(doc, indent=2))
        target = root / name
        relocate_venv(staging / "venv", staging / "venv", target / "venv")
        add_user_packages_path(staging / "venv")
        old = root / f".{name}.old"
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return target
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# Put ~/.local/lib/pythonX.Y/site-packages (where a sandbox's `pip install` goes: the template
# is read-only) first on sys.path of the template's interpreter, when the directory exists. One
# line: a .pth line that starts with "import" is executed at start-up.
_USER_PACKAGES_PTH = (
    "import os, sys; _p = os.path.expanduser('~/.local/lib/python%d.%d/site-packages' % sys.version_info[:2]); "
    "os.path.isdir(_p) and _p not in sys.path and sys.path.insert(0, _p); del _p\n"
)


def add_user_packages_path(venv: Path) -> None:
    """Let the template's Python see what a sandbox installed into its home (see above)."""
    for site_packages in venv.glob("lib/python3*/site-packages"):
        (site_packages / "_cellbox_user_packages.pth").write_text(_USER_PACKAGES_PTH)


def relocate_venv(venv: Path, built_at: Path, final: Path) -> None:
    """Point a venv built at ``built_at`` to where it will live (``final``): its scripts'
    shebangs (pip, ...), the activate scripts and pyvenv.cfg name the build path, which the
    atomic rename would leave dangling ("pip: cannot execute: required file not found")."""
    old, new = str(built_at).encode(), str(final).encode()
    for path in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data and b"\0" not in data[:1024]:
            path.write_bytes(data.replace(old, new))


def _run(argv: list[str], on_line: Callable[[str], None] | None) -> None:
    tail: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = [*tail[-19:], line.rstrip()]
            if on_line is not None:
                on_line(line.rstrip())
    if proc.returncode != 0:
        raise TemplateBuildFailed(f"{' '.join(argv[:4])} ... failed", output="\n".join(tail))
