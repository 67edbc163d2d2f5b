"""Templates: what a sandbox starts from.

A built template is a directory ``TEMPLATES_DIR/<name>/`` holding ``template.json``, a Python
virtual environment ``venv/`` (ipykernel and the packages users expect) and ``startup/*.py``
files run in every new Python kernel. ``cellbox template build`` makes one from a directory
like ``kernel_image/``.

When no ``default`` template was built, the service's own Python serves as the ``default``
kernel environment if it can import ipykernel (a laptop after ``pip install
'cellbox[server,kernel]'``), with a warning: user ``pip install`` then lands in the
service's environment.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cellbox.interpreter.errors import TemplateNotFound
from cellbox.interpreter.models import Limits
from cellbox.runtimes.base import KernelSpec, TemplateInfo

log = logging.getLogger("cellbox.templates")

PYTHON_KERNEL = KernelSpec("python", ["{python}", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
BASH_KERNEL = KernelSpec(
    "bash", ["{python}", "-m", "bash_kernel", "-f", "{connection_file}"], interrupt_mode="signal"
)


def _kernels_for(python: Path, available: list[str] | None) -> dict[str, KernelSpec]:
    kernels = {"python": PYTHON_KERNEL}
    if available is None or "bash" in available:
        kernels["bash"] = BASH_KERNEL
    return kernels


class TemplateRegistry:
    """Finds templates by name. Cheap to call per request: reads ``template.json`` on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        found = sorted(p.parent.name for p in self.root.glob("*/template.json")) if self.root.exists() else []
        if "default" not in found and self._host_python_usable():
            found.insert(0, "default")
        return found

    def get(self, name: str) -> TemplateInfo:
        """The template called ``name``; raises TemplateNotFound naming the known ones."""
        path = self.root / name / "template.json"
        if name.replace("-", "").replace("_", "").isalnum() and path.exists():
            return self._load(name, path)
        if name == "default" and self._host_python_usable():
            log.warning(
                "no built 'default' template under %s: kernels run on the service's own Python (%s)",
                self.root, sys.executable,
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
