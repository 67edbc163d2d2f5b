#!/usr/bin/env bash
# Install what the e2e tests with the real E2B SDKs need, the same way on a laptop and in CI:
#   .venv-e2e   a venv with cellbox (editable, server and kernel extras) and the Python SDKs
#               e2b + e2b-code-interpreter from tests/e2e/requirements.txt;
#   tests/e2e/js/node_modules   the JavaScript SDKs e2b + @e2b/code-interpreter from the
#               committed package-lock.json (npm ci), for node's test runner.
# The SDKs get their own venv so their dependencies never change the service's .venv.
# Run the tests afterwards with:  .venv-e2e/bin/python -m pytest -m e2e tests/e2e
# Idempotent. Needs python3 (with venv) and, for the JavaScript tests, node >= 20 and npm.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${CELLBOX_PYTHON:-python3}
if [ ! -x .venv-e2e/bin/python ]; then
  "$PY" -m venv .venv-e2e
fi
.venv-e2e/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv-e2e/bin/python -m pip install -q --disable-pip-version-check -e '.[server,kernel]' -r tests/e2e/requirements.txt
.venv-e2e/bin/python -m pip list --disable-pip-version-check 2>/dev/null | grep -Ei '^(e2b|e2b-code-interpreter) '

if command -v npm >/dev/null 2>&1; then
  (
    cd tests/e2e/js
    if [ -f package-lock.json ]; then
      npm ci --no-audit --no-fund --loglevel=error
    else
      npm install --no-audit --no-fund --loglevel=error
    fi
    npm ls e2b @e2b/code-interpreter
  )
else
  echo "npm not found: the JavaScript e2e tests will be skipped" >&2
fi
