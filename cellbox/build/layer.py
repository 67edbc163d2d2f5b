"""cellbox's own layer, built on top of any image so every Dockerfile gives a working code
interpreter template: a Containerfile and its build context, generated.

What the layer adds, all under ``/opt/cellbox``:

* ``venv/``: a virtual environment on the image's own ``python3`` with
  ``--system-site-packages``, so what the Dockerfile installed system-wide (``pip3 install
  pandas``, ``apt-get install python3-numpy``) is importable in the kernel, plus the kernel's
  needs (:data:`LAYER_REQUIREMENTS`: ipykernel, bash_kernel, matplotlib with the inline backend,
  e2b-charts, ipywidgets). pip comes from a wheel passed in the build context, so the image
  needs no ``python3-venv``/ensurepip. An image that has its own environment says so with
  ``ENV CELLBOX_PYTHON=/path/to/venv/bin/python``: the kernel's packages go into that venv and
  ``venv`` is a link to it (kernel_image/ as a rootfs template keeps its pandas and scipy).
* a ``user`` with uid 1000 and a home, when the image has no uid 1000 (sandboxes run as it);
* ``startup/``: the kernel startup files of ``kernel_image/startup`` (PIL's show, E2B's chart
  and data formats).
* ``js/``: when the image has node and npm, Deno from npm (``deno@2``, its Linux binary is an
  npm package) and a kernelspec for the ``javascript`` context (``deno jupyter``). Deno's kernel
  binds TCP only; ``jsbridge.py`` binds the IPC endpoints cellbox connects to and relays them
  to it on the sandbox's own loopback.

An image without ``python3 >= 3.9`` gets one from its package manager (apt-get on
Debian/Ubuntu, apk on Alpine, dnf/microdnf on Fedora/RHEL); an image with none of those fails
with a message saying to install Python in the Dockerfile. The in-sandbox agent is stdlib-only
and runs on the same interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cellbox.interpreter.errors import TemplateBuildFailed

__all__ = [
    "LAYER_PREFIX",
    "LAYER_PYTHON",
    "LAYER_REQUIREMENTS",
    "LAYER_STEPS",
    "Layer",
    "containerfile",
    "pip_wheel",
    "write_context",
]

LAYER_PREFIX = "/opt/cellbox"
LAYER_PYTHON = f"{LAYER_PREFIX}/venv/bin/python"
DENO_PACKAGE = "deno@2"
# The kernel side of kernel_image/requirements.txt (same ranges; a unit test keeps them equal):
# the scientific stack is the Dockerfile's business.
LAYER_REQUIREMENTS = (
    "ipykernel>=6.29",
    "bash_kernel>=0.9",
    "matplotlib>=3.10.3",
    "numpy>=2.2.6",
    "e2b-charts>=1.0",
    "ipywidgets>=8.1",
)

_ENSURE_PYTHON = r"""#!/bin/sh
# cellbox layer: make sure the image has python3 >= 3.9 (the kernel's and the agent's).
set -e
ok() {
  command -v python3 >/dev/null 2>&1 &&
    python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 9))' 2>/dev/null
}
fail() { echo "cellbox: $1: install Python 3.9 or newer in your Dockerfile" >&2; exit 1; }
ok && exit 0
[ -n "${CELLBOX_PYTHON:-}" ] && "$CELLBOX_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' && exit 0
echo "cellbox: the image has no python3 >= 3.9; installing one"
if command -v apt-get >/dev/null 2>&1; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3
  rm -rf /var/lib/apt/lists/*
elif command -v apk >/dev/null 2>&1; then
  apk add --no-cache python3
elif command -v dnf >/dev/null 2>&1; then
  dnf install -y python3 && dnf clean all
elif command -v microdnf >/dev/null 2>&1; then
  microdnf install -y python3 && microdnf clean all
else
  fail "no python3 >= 3.9 in the image and no apt-get, apk or dnf to install one"
fi
ok || fail "python3 is still missing or older than 3.9 after installing it"
"""

_ENSURE_USER = r"""#!/bin/sh
# cellbox layer: sandboxes run as uid 1000 by default; give it a name and a home when the image
# has no such user (written directly: minimal images have no useradd).
set -e
if ! grep -q '^[^:]*:[^:]*:1000:' /etc/passwd; then
  grep -q '^user:' /etc/group || echo 'user:x:1000:' >>/etc/group
  echo 'user:x:1000:1000::/home/user:/bin/sh' >>/etc/passwd
  mkdir -p /home/user && chown 1000:1000 /home/user
fi
"""

_MAKE_VENV = rf"""#!/bin/sh
# cellbox layer: the kernel's environment at {LAYER_PREFIX}/venv. $1: the pip wheel to bootstrap with.
set -e
pip_install() {{
  "$1" "/opt/cellbox/build/$WHEEL/pip" install --no-cache-dir --progress-bar off --disable-pip-version-check \
    "/opt/cellbox/build/$WHEEL" -r /opt/cellbox/build/requirements.txt
}}
WHEEL=$1
if [ -n "${{CELLBOX_PYTHON:-}}" ]; then
  # the image names its own Python environment (a venv): the kernel runs there, with its packages
  "$CELLBOX_PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' ||
    {{ echo "cellbox: CELLBOX_PYTHON=$CELLBOX_PYTHON is not the python of a venv" >&2; exit 1; }}
  ln -sfn "$("$CELLBOX_PYTHON" -c 'import sys; print(sys.prefix)')" {LAYER_PREFIX}/venv
  pip_install "$CELLBOX_PYTHON"
else
  python3 -m venv --without-pip --system-site-packages {LAYER_PREFIX}/venv
  pip_install {LAYER_PYTHON}
fi
{LAYER_PYTHON} -c 'import ipykernel, bash_kernel, matplotlib_inline'
"""

_INSTALL_JS = rf"""#!/bin/sh
# cellbox layer: a JavaScript/TypeScript kernel (Deno's) when the image has node and npm.
set -e
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "cellbox: no node/npm in the image: no javascript context"
  exit 0
fi
npm install --prefix {LAYER_PREFIX}/js --no-audit --no-fund --no-update-notifier {DENO_PACKAGE}
{LAYER_PREFIX}/js/node_modules/deno/deno --version
mkdir -p {LAYER_PREFIX}/venv/share/jupyter/kernels/javascript
cat >{LAYER_PREFIX}/venv/share/jupyter/kernels/javascript/kernel.json <<'EOF'
{{"argv": ["{LAYER_PYTHON}", "{LAYER_PREFIX}/jsbridge.py", "{{connection_file}}", "--",
          "{LAYER_PREFIX}/js/node_modules/deno/deno", "jupyter", "--kernel", "--conn", "{{tcp_connection_file}}"],
 "display_name": "JavaScript (Deno)", "language": "typescript", "env": {{"NO_COLOR": "1"}}}}
EOF
"""


@dataclass(frozen=True)
class Layer:
    """What the layer build needs from cellbox's side: ``kernel_image`` (its startup/ and
    template.json env) and a pip wheel."""

    kernel_image: Path
    pip_wheel: Path


def containerfile(base: str, user: str | None, wheel: str = "pip-0-py3-none-any.whl") -> str:
    """The layer's Containerfile on top of ``base`` (an image id or name). ``user`` is the
    base's USER, restored at the end (the layer's steps run as root); ``wheel`` the pip wheel's
    file name in the context (pip installs a wheel only under its proper name)."""
    lines = [
        f"FROM {base}",
        "USER root",
        "COPY ensure-python.sh ensure-user.sh /opt/cellbox/build/",
        "RUN sh /opt/cellbox/build/ensure-python.sh && sh /opt/cellbox/build/ensure-user.sh",
        f"COPY requirements.txt make-venv.sh {wheel} /opt/cellbox/build/",
        f"RUN sh /opt/cellbox/build/make-venv.sh {wheel}",
        f"COPY startup/ {LAYER_PREFIX}/startup/",
        f"COPY jsbridge.py install-js.sh {LAYER_PREFIX}/",
        f"RUN sh {LAYER_PREFIX}/install-js.sh",
    ]
    if user:
        lines.append(f"USER {user}")
    return "\n".join(lines) + "\n"


# FROM + the instructions above (the USER restore is one more when the base has a USER)
LAYER_STEPS = len(containerfile("x", None).splitlines())


def write_context(layer: Layer, directory: Path) -> None:
    """Fill the layer's build context ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ensure-python.sh").write_text(_ENSURE_PYTHON)
    (directory / "ensure-user.sh").write_text(_ENSURE_USER)
    (directory / "install-js.sh").write_text(_INSTALL_JS)
    (directory / "make-venv.sh").write_text(_MAKE_VENV)
    (directory / "requirements.txt").write_text("\n".join(LAYER_REQUIREMENTS) + "\n")
    shutil.copyfile(layer.pip_wheel, directory / layer.pip_wheel.name)
    shutil.copyfile(Path(__file__).with_name("jsbridge.py"), directory / "jsbridge.py")
    startup = layer.kernel_image / "startup"
    if startup.is_dir():
        shutil.copytree(startup, directory / "startup", dirs_exist_ok=True)
    else:
        (directory / "startup").mkdir(exist_ok=True)


def pip_wheel(cache: Path) -> Path:
    """A pip wheel to bootstrap the layer's venv: downloaded once with the host's pip settings
    into ``cache``, else the host's Debian copy (python3-pip-whl)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("pip-*.whl"))
    if found:
        return found[-1]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(cache), "pip"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    found = sorted(cache.glob("pip-*.whl"))
    if found:
        return found[-1]
    debian = sorted(Path("/usr/share/python-wheels").glob("pip-*.whl"))
    if debian:
        return debian[-1]
    raise TemplateBuildFailed(
        "no pip wheel for the cellbox layer: downloading one failed and python3-pip-whl is not installed",
        output=(proc.stderr or proc.stdout)[-2000:],
    )
