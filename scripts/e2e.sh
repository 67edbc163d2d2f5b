#!/usr/bin/env bash
# The end-to-end tests with the official E2B SDKs (Python and JavaScript) against a real cellbox
# server: installs them (scripts/e2e-setup.sh, idempotent), then runs tests/e2e with the venv
# that holds them. Extra arguments go to pytest. E2E_ISOLATION=bwrap (as root) runs the same
# tests on isolated sandboxes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/e2e-setup.sh
exec .venv-e2e/bin/python -m pytest -m e2e tests/e2e "$@"
