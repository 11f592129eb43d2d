#!/usr/bin/env bash
# Installs everything paygate and its tests need on a fresh Debian 12 machine, idempotently:
# Debian packages (SoftHSM2, swtpm, tpm2-tools, the TSS headers tpm2-pytss builds against),
# then a virtualenv in .venv with the project, its hardware extras and its dev tools.
# Run it as often as you like: each step is skipped when already done.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

apt_packages=(
  softhsm2 opensc                                    # PKCS#11 token + pkcs11-tool
  swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config  # TPM 2.0 simulator + TSS for tpm2-pytss
  openssl                                            # EK CA checks in scripts/make_swtpm_ek_state.sh
  tpm2-abrmd libtss2-tcti-tabrmd0 dbus               # one TPM shared by several workers (tests: workers + TPM)
  systemd                                            # systemd-analyze for the unit checks
  docker.io busybox-static debootstrap              # container tests: engine, probe image, rootfs
  cmake g++ ninja-build                              # llama.cpp's llama-server (setup_llama.sh)
  postgresql nginx wrk                               # scale-out: shared ledger, load balancer, bench (also bench.compare)
  chromium chromium-driver                           # the console's browser tests (Playwright on the system Chromium)
)

log() { printf '[setup] %s\n' "$*" >&2; }

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]] && ! command -v sudo >/dev/null; then
    log "need root to install: ${missing[*]} (apt-get install ${missing[*]})"
    exit 1
  fi
  sudo_cmd=(); [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  log "apt-get install ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv"
  "$python" -m venv .venv
fi

# Reinstall only when the dependency declaration changed since the last successful install.
stamp=.venv/.paygate-setup
want=$(sha256sum pyproject.toml devtools/pyproject.toml scripts/setup.sh | sha256sum | cut -c1-64)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  log "pip install -e .[hardware,postgres,dev] -e devtools (tpm2-pytss builds from source: about a minute)"
  .venv/bin/python -m pip install -q --upgrade pip
  # devtools/ is the test and demo tooling (paygate-dev): installed here, never shipped.
  .venv/bin/python -m pip install -q -e ".[hardware,postgres,dev,bench]" -e devtools
  echo "$want" > "$stamp"
fi
# Local chain tools for the tests and the demo: anvil (a local EVM), solc and the real contracts the
# registry ships (Circle's FiatToken, Uniswap's Permit2, Solady's smart account), from npm, pinned by
# scripts/chain/package-lock.json. Reinstalled only when package.json or the lock changed. Install
# scripts stay off: anvil's binary comes in its optional platform package, nothing is downloaded.
if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
  log "node and npm are needed for the local chain tools: install Node.js 20+ with npm (Debian: apt-get install nodejs npm)"
  exit 1
fi
chain_stamp=scripts/chain/node_modules/.paygate-setup
chain_want=$(sha256sum scripts/chain/package.json scripts/chain/package-lock.json | sha256sum | cut -c1-64)
if [[ ! -f $chain_stamp || $(cat "$chain_stamp") != "$chain_want" ]]; then
  log "npm ci --prefix scripts/chain (anvil, solc, contracts)"
  npm ci --prefix scripts/chain --ignore-scripts --no-audit --no-fund --loglevel=error
  echo "$chain_want" > "$chain_stamp"
fi
# The real model server (llama-server, SmolLM2 and the tiny test model), cached outside the
# clone: about 5 minutes the first time on 2 cores, nothing after that.
PYTHON="$root/.venv/bin/python" bash scripts/setup_llama.sh >/dev/null
log "ready: $root/.venv"
