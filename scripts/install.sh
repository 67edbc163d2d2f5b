#!/usr/bin/env bash
# Set up cellbox on a fresh Debian 12 / Ubuntu machine, as root:
#   system packages, the service venv (.venv), the default sandbox template;
#   with --start, also start the service on 127.0.0.1:8080 in the background.
# Idempotent: running it again updates what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

START=0
for arg in "$@"; do
  case "$arg" in
    --start) START=1 ;;
    *) echo "usage: $0 [--start]" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (sudo $0): it installs system packages and owns /var/lib/cellbox" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# python3-venv: the service venv and template venvs; bubblewrap, python3-seccomp, e2fsprogs,
# util-linux: sandbox isolation (namespaces, syscall filter, quota'd home images);
# procps: ps/kill inside sandboxes; curl: the README's tour;
# buildah, mmdebstrap, debian-archive-keyring: templates from Dockerfiles (`cellbox template
# build DIR` for a DIR with a Dockerfile): buildah builds them as root with --isolation chroot
# and its overlay storage driver (the kernel's overlayfs: no fuse-overlayfs, crun or runc
# needed; buildah pulls in uidmap), mmdebstrap makes debian:<suite> base images from this
# host's apt sources where no registry is reachable.
PKGS=(python3 python3-venv python3-pip bubblewrap python3-seccomp e2fsprogs util-linux procps curl
  buildah mmdebstrap debian-archive-keyring)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${CELLBOX_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

DATA_DIR=${CELLBOX_DATA_DIR:-/var/lib/cellbox}
# Rebuild the default template only when its source (cellbox/kernel_image, linked as kernel_image/)
# or the build code changed (by content, not mtime: a fresh clone has new mtimes everywhere).
SRC_HASH=$( (find cellbox/kernel_image -type f -print0; printf 'cellbox/interpreter/templates.py\0') | sort -z \
  | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
TPL="$DATA_DIR/templates/default"
if [ ! -f "$TPL/template.json" ] || [ "$(cat "$TPL/.source-sha256" 2>/dev/null)" != "$SRC_HASH" ]; then
  .venv/bin/cellbox template build kernel_image --name default --data-dir "$DATA_DIR"
  echo "$SRC_HASH" >"$TPL/.source-sha256"
else
  echo "template 'default' is up to date in $DATA_DIR/templates"
fi

if [ "$START" -eq 1 ]; then
  mkdir -p "$DATA_DIR"
  PIDFILE="$DATA_DIR/cellbox.pid"
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "cellbox already running (pid $(cat "$PIDFILE"))"
  else
    nohup .venv/bin/cellbox serve --data-dir "$DATA_DIR" >>"$DATA_DIR/cellbox.log" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 100); do
      if curl -fsS http://127.0.0.1:${CELLBOX_PORT:-8080}/healthz >/dev/null 2>&1; then break; fi
      kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$DATA_DIR/cellbox.log"; exit 1; }
      sleep 0.2
    done
    curl -fsS http://127.0.0.1:${CELLBOX_PORT:-8080}/healthz; echo
    echo "cellbox serving on http://127.0.0.1:${CELLBOX_PORT:-8080} (pid $(cat "$PIDFILE"), log $DATA_DIR/cellbox.log)"
  fi
fi
