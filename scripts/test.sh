#!/usr/bin/env bash
# Run the test suite (unit, integration, security) with the venv scripts/install.sh made.
set -euo pipefail
cd "$(dirname "$0")/.."
# --durations: the slowest tests in every log, to keep the suite inside its 10-minute budget.
exec .venv/bin/python -m pytest --durations=15 "$@"
