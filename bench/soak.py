"""A bounded soak: N minutes of mixed traffic against `paygate serve` as its own process, its RSS
sampled. Not part of the test suite.

Loopback only: anvil with the USDC stand-in, the official x402 SDK facilitator (in this
process), the FAKE model server (in this process), and the gateway as a child process
(software key, facilitator mode; /api/generate free, /v1/chat/completions paid). Traffic, in
``--workers`` concurrent loops: free plain requests, sealed (v1) requests, free streams,
streams the caller abandons after the first line, paid requests (SDK-signed), and unpaid floods
(402 answered from the headers). Prints and writes bench/results/soak.json: request counts by
kind and status, RSS at start / after warm-up / at the end / max, and the growth.

    .venv/bin/python -m bench.soak [--minutes 3] [--workers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from paygate_dev.fake_model import FakeModelServer

from enclave.envelope_v1 import seal_v1
from paygate import wire

RESULTS = Path(__file__).parent / "results" / "soak.json"
PAYGATE = str(Path(sys.executable).with_name("paygate"))
CHAT = "/v1/chat/completions"
GENERATE = "/api/generate"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def _wait_live(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError("paygate serve exited")
            try:
                async with client.get(url + wire.LIVE_PATH) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("paygate serve did not come up")


class Traffic:
    def __init__(self, url: str, client: aiohttp.ClientSession, pubkey: bytes, payer: Any) -> None:
        self.url, self.client, self.pubkey, self.payer = url, client, pubkey, payer
        self.counts: collections.Counter[str] = collections.Counter()
        self.accepted: dict[str, Any] | None = None

    async def plain(self) -> int:
        body = {"model": "m", "prompt": "p", "stream": False}
        async with self.client.post(self.url + GENERATE, json=body) as r:
            await r.read()
            return r.status

    async def sealed(self) -> int:
        blob = seal_v1(
            self.pubkey, json.dumps({"model": "m", "prompt": "p", "stream": False}).encode()
        )
        headers = {"Content-Type": "application/x-obol-encrypted"}
        async with self.client.post(self.url + GENERATE, data=blob, headers=headers) as r:
            await r.read()
            return r.status

    async def stream(self) -> int:
        body = {"model": "m", "prompt": "p", "fake": {"chunks": 10, "pace": 0.005}}
        async with self.client.post(self.url + GENERATE, json=body) as r:
            await r.read()
            return r.status

    async def aborted(self) -> int:
        body = {"model": "m", "prompt": "p", "fake": {"chunks": 50, "pace": 0.02}}
        r = await self.client.post(self.url + GENERATE, json=body)
        await r.content.readline()
        r.close()  # walk away mid-stream
        return r.status

    async def unpaid(self) -> int:
        async with self.client.post(self.url + CHAT, json=BODY) as r:
            await r.read()
            if self.accepted is None and r.status == 402:
                self.accepted = json.loads(base64.b64decode(r.headers[wire.PAYMENT_REQUIRED]))
            return r.status

    async def paid(self) -> int:
        from paygate_dev.chain.payer import encode_header, sign_v2_payment

        if self.accepted is None:
            return await self.unpaid()
        required = self.accepted
        header = await asyncio.to_thread(
            lambda: encode_header(
                sign_v2_payment(
                    self.payer, required["accepts"][0], resource=required["resource"]["url"]
                )
            )
        )
        headers = {wire.PAYMENT_SIGNATURE: header}
        async with self.client.post(self.url + CHAT, json=BODY, headers=headers) as r:
            await r.read()
            return r.status

    async def worker(self, deadline: float) -> None:
        kinds = [self.plain, self.sealed, self.stream, self.aborted, self.unpaid, self.unpaid,
                 self.paid]  # fmt: skip
        while time.monotonic() < deadline:
            kind = random.choice(kinds)
            try:
                status = await asyncio.wait_for(kind(), 30)
            except (TimeoutError, aiohttp.ClientError) as exc:
                status = type(exc).__name__
            self.counts[f"{kind.__name__} {status}"] += 1


async def soak(minutes: float, workers: int) -> dict[str, Any]:
    from paygate_dev.chain.accounts import FACILITATOR, new_account
    from paygate_dev.chain.anvil import start_anvil
    from paygate_dev.chain.facilitator import FacilitatorServer, FacilitatorSettings

    chain = start_anvil()
    facilitator = FacilitatorServer(
        FacilitatorSettings(rpc_url=chain.rpc_url, private_key=chain.accounts[FACILITATOR].key)
    ).start()
    fake = FakeModelServer()
    fake_runner, fake_url = await _serve(fake.app)
    payer = new_account()
    chain.mint(payer.address, 10**12)
    proc: subprocess.Popen[bytes] | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            key = Path(tmp) / "key.pem"
            subprocess.run([PAYGATE, "keys", "create", "--backend", "software", "--key-file",
                            str(key)], check=True, capture_output=True, timeout=60)  # fmt: skip
            port = 20000 + random.randrange(20000)
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
                "PAYGATE_KEY_BACKEND": "software",
                "PAYGATE_KEY_FILE": str(key),
                "PAYGATE_PAYMENT_MODE": "facilitator",
                "PAYGATE_FACILITATOR_URL": facilitator.url,
                "PAYGATE_PAY_TO": new_account().address,
                "PAYGATE_NETWORK": "base-sepolia",
                "PAYGATE_LEDGER_PATH": str(Path(tmp) / "payments.db"),
                "PAYGATE_ROUTE_PRICES": json.dumps({GENERATE: "0"}),
                "PAYGATE_LOG_LEVEL": "WARNING",
            }
            proc = subprocess.Popen(
                [PAYGATE, "serve", "--listen", f"127.0.0.1:{port}", "--upstream-url", fake_url],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            await _wait_live(url, proc)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
                async with client.get(url + wire.PUBKEY_PATH) as r:
                    pubkey = bytes.fromhex((await r.json())["pubkey"])
                traffic = Traffic(url, client, pubkey, payer)
                samples: list[tuple[float, int]] = [(0.0, rss_kib(proc.pid))]
                started = time.monotonic()
                deadline = started + minutes * 60
                tasks = [asyncio.create_task(traffic.worker(deadline)) for _ in range(workers)]
                while time.monotonic() < deadline:
                    await asyncio.sleep(5)
                    samples.append((round(time.monotonic() - started, 1), rss_kib(proc.pid)))
                await asyncio.gather(*tasks)
                samples.append((round(time.monotonic() - started, 1), rss_kib(proc.pid)))
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # by the child's own PID
            proc.wait(timeout=30)
        await fake_runner.cleanup()
        facilitator.stop()
        chain.stop()
    warm = next((rss for t, rss in samples if t >= 30), samples[-1][1])
    return {
        "minutes": minutes,
        "workers": workers,
        "requests": sum(traffic.counts.values()),
        "by_kind_and_status": dict(sorted(traffic.counts.items())),
        "rss_kib": {
            "start": samples[0][1],
            "after_30s": warm,
            "end": samples[-1][1],
            "max": max(rss for _, rss in samples),
            "growth_after_warmup": samples[-1][1] - warm,
        },
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    result = asyncio.run(soak(args.minutes, args.workers))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
