#!/usr/bin/env bash
# Set up what the Jupyter end-to-end tests (tests/e2e/, -m e2e) need, as root, repeatably (CI):
#   .venv-jupyter/        jupyter_server + jupyterlab, a real Jupyter frontend server run in
#                         gateway mode against cellbox (kept apart from the service's .venv:
#                         jupyter_server drags in nbconvert, terminado, ... that the service never
#                         imports);
#   .venv-jupyter/node/   playwright-core from npm: a driver only, it never downloads a browser;
#   /usr/bin/chromium     Debian's chromium, launched by the tests with executablePath and
#                         --headless --no-sandbox --disable-gpu --disable-background-networking.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (sudo $0): it installs Debian's chromium" >&2
  exit 1
fi

VENV=${CELLBOX_JUPYTER_VENV:-.venv-jupyter}
PY=${CELLBOX_PYTHON:-python3}

# Pinned ranges: the gateway client contract was verified against jupyter_server 2.21 and
# JupyterLab 4.6 (shared/reference/jupyter-gateway.md); a new major must be re-verified.
JUPYTER_PKGS=(
  "jupyter_server>=2.21,<3"
  "jupyterlab>=4.6,<5"
  "ipykernel>=6.29,<8"  # jupyter_server wants a local kernelspec to start; never used by the tests
  # the widget manager JupyterLab renders ipywidgets with; 3.0 pairs with the kernel
  # template's ipywidgets 8.1 (kernel_image/requirements.txt)
  "jupyterlab_widgets>=3.0.15,<4"
)
PLAYWRIGHT_CORE="playwright-core@>=1.50 <2"

export DEBIAN_FRONTEND=noninteractive
# chromium: the browser JupyterLab runs in (headless); fonts-liberation: readable screenshots.
PKGS=(chromium fonts-liberation)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
# node + npm to run playwright-core: Debian's only when the machine has none (a NodeSource
# nodejs conflicts with Debian's npm).
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${JUPYTER_PKGS[@]}"

# PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core has no install hook today; keep it that way.
mkdir -p "$VENV/node"
if [ ! -f "$VENV/node/node_modules/playwright-core/package.json" ]; then
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$VENV/node" --no-audit --no-fund \
    --silent "$PLAYWRIGHT_CORE"
fi

"$VENV/bin/jupyter" server --version >/dev/null
"$VENV/bin/jupyter" lab --version >/dev/null
/usr/bin/chromium --version
(cd "$VENV/node" && node -e "require('playwright-core'); console.log('playwright-core', require('playwright-core/package.json').version)")
echo "jupyter e2e ready: $VENV (jupyter_server $("$VENV/bin/python" -c 'import jupyter_server; print(jupyter_server.__version__)'))"
