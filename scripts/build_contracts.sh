#!/usr/bin/env bash
# Recompiles devtools/paygate_dev/chain/contracts/*.sol (and the solady sources they import) with the
# npm solc pinned in scripts/chain and rewrites the checked-in
# devtools/paygate_dev/chain/contracts/build.json (ABI + creation/runtime code).
# tests/integration/paygate_dev/chain/test_devchain.py fails when the checked-in file differs from a fresh build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
[[ -d scripts/chain/node_modules/solc && -d scripts/chain/node_modules/solady ]] || npm ci --prefix scripts/chain --ignore-scripts --no-audit --no-fund
exec .venv/bin/python -m paygate_dev.chain.build
