"""Seal/open latency of envelopes v1 and v2 per key backend, and the per-chunk stream cost.

Run: ``.venv/bin/python -m bench.envelopes`` (prints a table, writes bench/results/envelopes.json).
Backends: software, PKCS#11 (a throw-away SoftHSM2 token) and TPM 2.0 (a throw-away swtpm),
all real. Each figure is the median of a bounded number of runs (at most ``--max-runs``, and at
most about ``--budget`` seconds per cell); the run counts are in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from paygate_dev import stack as devstack

import enclave
from enclave import KeyBackend, SoftwareKey

SIZES = {"1 KB": 1024, "64 KB": 64 * 1024, "1 MB": 1024 * 1024}
CHUNK_SIZES = {"64 B": 64, "1 KB": 1024, "16 KB": 16 * 1024}
OUT = Path(__file__).resolve().parent / "results" / "envelopes.json"


def _median_ms(fn: Callable[[], object], max_runs: int, budget: float) -> tuple[float, int]:
    fn()  # warm-up (first PKCS#11/TPM call, allocator)
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    while len(samples) < max_runs and (len(samples) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), len(samples)


@contextlib.contextmanager
def _backends(workdir: Path) -> Iterator[list[tuple[str, KeyBackend]]]:
    from enclave.keys.pkcs11 import Pkcs11Key
    from enclave.keys.tpm import TpmKey

    token = devstack.init_softhsm_token(workdir / "softhsm")
    os.environ.update(token.env())
    tpm = devstack.start_swtpm(workdir / "swtpm")
    keys: list[tuple[str, KeyBackend]] = [("software", SoftwareKey.generate())]
    try:
        keys.append(
            ("pkcs11", Pkcs11Key.generate(token.module_path, token.token_label, token.pin, "b"))
        )
        keys.append(("tpm", TpmKey.generate(tpm.tcti, workdir / "tpm-key")))
        yield keys
    finally:
        for _, key in keys:
            key.close()
        tpm.stop()


def _envelope_rows(
    key_name: str, key: KeyBackend, max_runs: int, budget: float
) -> list[dict[str, Any]]:
    rows = []
    route = {"method": "POST", "path": "/v1/chat/completions"}
    for size_name, size in SIZES.items():
        body = os.urandom(size)
        v1_blob = enclave.seal_v1(key.public_key, body)
        v2_blob = enclave.seal_v2(key.public_key, body, **route).blob
        cells: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
            (
                "v1",
                partial(enclave.seal_v1, key.public_key, body),
                partial(enclave.open_v1, key, v1_blob),
            ),
            (
                "v2",
                partial(enclave.seal_v2, key.public_key, body, **route),
                partial(enclave.open_v2, key, v2_blob, **route),
            ),
        ]
        for version, seal, open_ in cells:
            seal_ms, seal_n = _median_ms(seal, max_runs, budget)
            open_ms, open_n = _median_ms(open_, max_runs, budget)
            rows.append(
                {
                    "backend": key_name,
                    "envelope": version,
                    "size": size_name,
                    "bytes": size,
                    "seal_ms": round(seal_ms, 3),
                    "open_ms": round(open_ms, 3),
                    "runs": min(seal_n, open_n),
                }
            )
    return rows


def _stream_rows(chunks_per_run: int) -> list[dict[str, Any]]:
    keys = enclave.ReplyKeys(reply_secret=os.urandom(32), enc=SoftwareKey.generate().public_key)
    rows = []
    for name, size in CHUNK_SIZES.items():
        chunk = os.urandom(size)
        sealer = keys.sealer()
        start = time.perf_counter()
        frames = [sealer.seal(chunk) for _ in range(chunks_per_run)]
        frames.append(sealer.finish())
        seal_us = (time.perf_counter() - start) * 1e6 / chunks_per_run
        opener = keys.opener()
        start = time.perf_counter()
        for frame in frames:
            opener.feed(frame)
        opener.close()
        open_us = (time.perf_counter() - start) * 1e6 / chunks_per_run
        rows.append(
            {
                "chunk": name,
                "bytes": size,
                "seal_us_per_chunk": round(seal_us, 2),
                "open_us_per_chunk": round(open_us, 2),
                "overhead_bytes_per_chunk": len(frames[0]) - 33 - size,
                "chunks": chunks_per_run,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-runs", type=int, default=200)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per cell (soft)")
    parser.add_argument("--chunks", type=int, default=5000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="paygate-bench-") as tmp, _backends(Path(tmp)) as keys:
        envelope_rows = [
            row
            for name, key in keys
            for row in _envelope_rows(name, key, args.max_runs, args.budget)
        ]
    stream_rows = _stream_rows(args.chunks)

    print(f"{'backend':9} {'env':4} {'size':>6} {'seal ms':>9} {'open ms':>9} {'runs':>5}")
    for r in envelope_rows:
        print(
            f"{r['backend']:9} {r['envelope']:4} {r['size']:>6} {r['seal_ms']:>9.3f} "
            f"{r['open_ms']:>9.3f} {r['runs']:>5}"
        )
    print(f"\n{'chunk':6} {'seal µs/chunk':>14} {'open µs/chunk':>14} {'overhead B':>11}")
    for r in stream_rows:
        print(
            f"{r['chunk']:6} {r['seal_us_per_chunk']:>14.2f} {r['open_us_per_chunk']:>14.2f} "
            f"{r['overhead_bytes_per_chunk']:>11}"
        )
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                "envelopes": envelope_rows,
                "stream": stream_rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
