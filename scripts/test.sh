#!/usr/bin/env bash
# Run the test suite (unit, integration, security) with the venv scripts/install.sh made.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest "$@"
