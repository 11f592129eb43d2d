"""Scale-out: requests/s through `paygate serve --workers N` (N = 1, 2, 4), and the paid path on
each ledger store (SQLite file, PostgreSQL 15).

- Throughput: the real `paygate serve` (payments off) with N workers in front of the FAKE model
  server (`paygate fake-upstream`, its own process), loaded by `wrk` (POST, non-streamed chat
  completions, 32 connections, fixed duration). Everything shares this machine's cores: on a
  2-core machine the load generator, the fake and the workers compete, so the figures say what
  workers buy *here*, not on a bigger host.
- Paid path: one `paygate serve` per store, facilitator mode against anvil + the SDK facilitator;
  pre-signed authorizations sent sequentially (latency) and then 8 at a time (requests/s), each
  settled on chain once (checked by the seller's balance).

Prints a table, writes bench/results/scaling.json.

    .venv/bin/python -m bench.scaling [--seconds 8] [--paid 30]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from paygate_dev.services import Postgres
from paygate_dev.stack import free_port, require

from paygate import wire

RESULTS = Path(__file__).parent / "results" / "scaling.json"
PAYGATE = str(Path(sys.executable).with_name("paygate"))
BODY = {"model": "fake-llama", "messages": [{"role": "user", "content": "hello"}]}
PATH = "/v1/chat/completions"
WRK_SCRIPT = f"""wrk.method = "POST"
wrk.body = '{json.dumps(BODY)}'
wrk.headers["Content-Type"] = "application/json"
"""


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=out)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _wait_live(url: str, proc: subprocess.Popen[bytes], path: str = "/health/live") -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited ({proc.returncode})")
            try:
                async with client.get(url + path) as response:
                    if response.status < 500:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")}
    env.update({f"PAYGATE_{k.upper()}": v for k, v in settings.items()})
    return env


def _key(work: Path) -> Path:
    path = work / "key.pem"
    if not path.exists():
        subprocess.run(
            [PAYGATE, "keys", "create", "--backend", "software", "--key-file", str(path)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return path


def _wrk(url: str, seconds: int, work: Path) -> dict[str, float]:
    wrk = require("wrk", "wrk")
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    out = subprocess.run(
        [wrk, "-t2", "-c32", f"-d{seconds}s", "--latency", "-s", str(script), url + PATH],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {
        "requests_per_second": rps,
        "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else float("nan"),
        "non_2xx": int(bad.group(1)) if bad else 0,
    }


async def _throughput(workers: int, seconds: int, work: Path, upstream: str) -> dict[str, float]:
    port = free_port()
    proc = _start(
        [PAYGATE, "serve", "--workers", str(workers)],
        _env(
            listen=f"127.0.0.1:{port}",
            upstream_url=upstream,
            upstream_monitor="false",
            key_backend="software",
            key_file=str(_key(work)),
            max_concurrent_requests="256",
        ),
        work / f"serve-{workers}.log",
    )
    try:
        await _wait_live(f"http://127.0.0.1:{port}", proc)
        _wrk(f"http://127.0.0.1:{port}", 2, work)  # warm-up
        return await asyncio.to_thread(_wrk, f"http://127.0.0.1:{port}", seconds, work)
    finally:
        _stop(proc)


async def _paid(
    store: str, ledger_url: str, n: int, work: Path, upstream: str, chain: Any, facilitator: str
) -> dict[str, float]:
    from paygate_dev.chain.accounts import new_account
    from paygate_dev.chain.payer import encode_header, sign_v2_payment

    seller, payer = new_account().address, new_account()
    chain.mint(payer.address, 10**9)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(
        [PAYGATE, "serve"],
        _env(
            listen=f"127.0.0.1:{port}",
            upstream_url=upstream,
            upstream_monitor="false",
            key_backend="software",
            key_file=str(_key(work)),
            payment_mode="facilitator",
            pay_to=seller,
            network="base-sepolia",
            facilitator_url=facilitator,
            ledger_url=ledger_url,
        ),
        work / f"paid-{store}.log",
    )
    try:
        await _wait_live(url, proc)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
            async with client.post(url + PATH, json=BODY) as response:
                accepted = json.loads(base64.b64decode(response.headers[wire.PAYMENT_REQUIRED]))
            requirement = accepted["accepts"][0]
            headers = [encode_header(sign_v2_payment(payer, requirement)) for _ in range(2 * n)]

            async def one(header: str) -> float:
                started = time.perf_counter()
                async with client.post(
                    url + PATH, json=BODY, headers={wire.PAYMENT_SIGNATURE: header}
                ) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{store}: paid request answered {response.status}")
                return time.perf_counter() - started

            sequential = [await one(h) for h in headers[:n]]
            gate = asyncio.Semaphore(8)

            async def bounded(header: str) -> float:
                async with gate:
                    return await one(header)

            started = time.perf_counter()
            await asyncio.gather(*(bounded(h) for h in headers[n:]))
            concurrent_rps = n / (time.perf_counter() - started)
        deadline = time.monotonic() + 60
        while chain.balance_of(seller) < 2 * n * 1000 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # settlements finish after their replies
        if chain.balance_of(seller) != 2 * n * 1000:
            raise RuntimeError(f"{store}: seller holds {chain.balance_of(seller)}")
    finally:
        _stop(proc)
    ordered = sorted(sequential)
    return {
        "n": n,
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[int(0.9 * (n - 1))] * 1000,
        "sequential_rps": n / sum(sequential),
        "concurrent8_rps": concurrent_rps,
    }


async def _run(seconds: int, paid: int) -> dict[str, Any]:
    from paygate_dev.chain.accounts import FACILITATOR
    from paygate_dev.chain.anvil import start_anvil
    from paygate_dev.chain.facilitator import FacilitatorServer, FacilitatorSettings

    results: dict[str, Any] = {"workers": {}, "paid": {}}
    with tempfile.TemporaryDirectory(prefix="paygate-bench-") as tmp:
        work = Path(tmp)
        fake_port = free_port()
        fake = _start(
            [PAYGATE, "fake-upstream", "--listen", f"127.0.0.1:{fake_port}"],
            _env(),
            work / "fake.log",
        )
        upstream = f"http://127.0.0.1:{fake_port}"
        try:
            await _wait_live(upstream, fake, "/")
            for workers in (1, 2, 4):
                results["workers"][str(workers)] = await _throughput(
                    workers, seconds, work, upstream
                )
            chain = start_anvil()
            facilitator = FacilitatorServer(
                FacilitatorSettings(
                    rpc_url=chain.rpc_url, private_key=chain.accounts[FACILITATOR].key
                )
            ).start()
            pg = Postgres().start()
            try:
                stores = {
                    "sqlite": f"sqlite:///{work / 'ledger' / 'payments.db'}",
                    "postgresql": pg.url(),
                }
                for store, url in stores.items():
                    results["paid"][store] = await _paid(
                        store, url, paid, work, upstream, chain, facilitator.url
                    )
            finally:
                pg.stop()
                facilitator.stop()
                chain.stop()
        finally:
            _stop(fake)
    return results


def _print(results: dict[str, Any]) -> None:
    print(f"{'paygate serve, payments off (wrk -c32)':<44} {'req/s':>9} {'p50 ms':>8}")
    for workers, row in results["workers"].items():
        label = f"  --workers {workers}"
        print(f"{label:<44} {row['requests_per_second']:>9.0f} {row['p50_ms']:>8.2f}")
    print()
    print(
        f"{'paid request (facilitator, settle on anvil)':<44} {'median ms':>9} {'p90 ms':>8}"
        f" {'seq req/s':>9} {'8x req/s':>9}"
    )
    for store, row in results["paid"].items():
        print(
            f"  {store:<42} {row['median_ms']:>9.2f} {row['p90_ms']:>8.2f}"
            f" {row['sequential_rps']:>9.1f} {row['concurrent8_rps']:>9.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8, help="wrk run per worker count")
    parser.add_argument("--paid", type=int, default=30, help="paid requests per phase and store")
    args = parser.parse_args()
    results = asyncio.run(_run(max(args.seconds, 2), max(args.paid, 5)))
    _print(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": platform.platform(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        **results,
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
