#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh) and runs every check: ruff lint, ruff format, all tests.
# The tests start their real components themselves (SoftHSM2, swtpm, ...): see tests/fixtures/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
