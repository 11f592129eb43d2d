"""Gateway overhead: the same requests sent to the FAKE model server directly and via paygate.

Both run as real processes (``paygate fake-upstream`` and ``paygate serve`` with a throw-away
software key) on loopback; the client is aiohttp in this process. Measures, for a bounded number
of sequential requests: total latency of a small non-streaming request, and time to the first
chunk of a stream, plaintext and sealed v2. Prints a table, writes bench/results/gateway.json.

    .venv/bin/python -m bench.gateway [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

import enclave

RESULTS = Path(__file__).parent / "results" / "gateway.json"
PAYGATE = str(Path(sys.executable).with_name("paygate"))
SMALL = {"model": "m", "prompt": "hello", "stream": False}
STREAM = {"model": "m", "prompt": "hello", "stream": True, "fake": {"chunks": 8}}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_up(url: str, timeout: float = 20) -> None:
    async with aiohttp.ClientSession() as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                async with client.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def _timed(n: int, one: Callable[[], Awaitable[float]]) -> list[float]:
    for _ in range(min(20, n)):  # warm-up: connections, caches
        await one()
    return [await one() for _ in range(n)]


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 3),
        "n": len(ordered),
    }


async def _measure(gateway: str, fake: str, pubkey: bytes, n: int) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        overheads: list[float] = []

        def small(base: str) -> Callable[[], Awaitable[float]]:
            async def one() -> float:
                start = time.perf_counter()
                async with client.post(base + "/api/generate", json=SMALL) as resp:
                    await resp.read()
                    if "X-Paygate-Overhead-Ms" in resp.headers:
                        overheads.append(float(resp.headers["X-Paygate-Overhead-Ms"]))
                return time.perf_counter() - start

            return one

        def first_chunk(base: str, sealed: bool) -> Callable[[], Awaitable[float]]:
            async def one() -> float:
                data = json.dumps(STREAM).encode()
                headers = {"Content-Type": "application/json"}
                opener = None
                start = time.perf_counter()
                if sealed:
                    req = enclave.seal_v2(pubkey, data, method="POST", path="/api/generate")
                    data, opener = req.blob, req.reply.opener()
                    headers["Content-Type"] = enclave.CONTENT_TYPE
                async with client.post(base + "/api/generate", data=data, headers=headers) as resp:
                    while True:
                        chunk = await resp.content.readany()
                        if opener is None or opener.feed(chunk) or not chunk:
                            break
                    elapsed = time.perf_counter() - start
                    await resp.read()
                return elapsed

            return one

        results = {
            "small_direct": _summary(await _timed(n, small(fake))),
            "small_gateway": _summary(await _timed(n, small(gateway))),
        }
        results["small_gateway_reported_overhead_median_ms"] = round(
            statistics.median(overheads), 3
        )
        results["ttfc_direct"] = _summary(await _timed(n, first_chunk(fake, False)))
        results["ttfc_gateway"] = _summary(await _timed(n, first_chunk(gateway, False)))
        results["ttfc_gateway_sealed_v2"] = _summary(await _timed(n, first_chunk(gateway, True)))
        return results


def _print(results: dict[str, Any]) -> None:
    print(f"{'measure':32} {'median ms':>10} {'p95 ms':>10} {'n':>6}")
    for name, row in results.items():
        if isinstance(row, dict) and "median_ms" in row:
            print(f"{name:32} {row['median_ms']:>10.3f} {row['p95_ms']:>10.3f} {row['n']:>6}")
    added = results["small_gateway"]["median_ms"] - results["small_direct"]["median_ms"]
    ttfc = results["ttfc_gateway"]["median_ms"] - results["ttfc_direct"]["median_ms"]
    sealed = results["ttfc_gateway_sealed_v2"]["median_ms"] - results["ttfc_direct"]["median_ms"]
    print(f"added latency, small request (median): {added:.3f} ms")
    print(f"added time to first chunk (median): plaintext {ttfc:.3f} ms, sealed v2 {sealed:.3f} ms")
    print(
        "gateway-reported overhead (X-Paygate-Overhead-Ms, median): "
        f"{results['small_gateway_reported_overhead_median_ms']:.3f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="samples per measure (≤ 2000)")
    args = parser.parse_args()
    n = max(10, min(args.requests, 2000))
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key.pem"
        subprocess.run(
            [PAYGATE, "keys", "create", "--backend", "software", "--key-file", str(key_file)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        fake_port, gw_port = _port(), _port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")}
        env.update(PAYGATE_KEY_BACKEND="software", PAYGATE_KEY_FILE=str(key_file))
        fake_url, gw_url = f"http://127.0.0.1:{fake_port}", f"http://127.0.0.1:{gw_port}"
        procs = [
            subprocess.Popen(
                [PAYGATE, "fake-upstream", "--listen", f"127.0.0.1:{fake_port}"],
                env=env,
                stderr=subprocess.DEVNULL,
            ),
            subprocess.Popen(
                [PAYGATE, "serve", "--listen", f"127.0.0.1:{gw_port}", "--upstream-url", fake_url],
                env=env,
                stderr=subprocess.DEVNULL,
            ),
        ]
        try:

            async def run() -> dict[str, Any]:
                await _wait_up(fake_url + "/")
                await _wait_up(gw_url + "/health/live")
                async with (
                    aiohttp.ClientSession() as client,
                    client.get(gw_url + "/v1/enclave/pubkey") as resp,
                ):
                    pubkey = bytes.fromhex((await resp.json())["pubkey"])
                return await _measure(gw_url, fake_url, pubkey, n)

            results = asyncio.run(run())
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    results["environment"] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "note": "loopback, sequential requests, fake upstream with zero pace",
    }
    _print(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
