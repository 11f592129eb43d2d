#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh) and runs the demo: `paygate demo`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
exec .venv/bin/paygate demo "$@"
