#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh) and runs every check: ruff lint, ruff format, all tests.
# The tests start their real components themselves (SoftHSM2, swtpm, ...): see tests/fixtures/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [[ $# -gt 0 ]]; then
    exec .venv/bin/pytest "$@"
fi
# The 30 slowest tests listed at the end: the suite must stay well under 15 minutes.
.venv/bin/pytest --ignore=tests/fuzz --durations=30
# The fuzz profile (tests/conftest.py): 10,000 examples per untrusted parser, after the main suite.
HYPOTHESIS_PROFILE=fuzz exec .venv/bin/pytest tests/fuzz -q --timeout=900
