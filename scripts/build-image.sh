#!/bin/sh
# Build the paygate image from this checkout: wheels first (paygate and its runtime dependencies;
# tpm2-pytss and python-pkcs11 are compiled here once and need libtss2-dev and pkg-config), then
# `docker build` with them in the context. Usage: scripts/build-image.sh [TAG] [docker build args ...]
set -eu
cd "$(dirname "$0")/.."
tag="${1:-paygate:latest}"
[ $# -gt 0 ] && shift
rm -rf wheels
python3 -m pip wheel --wheel-dir wheels '.[tpm,pkcs11,postgres]'
docker build -t "$tag" "$@" .
