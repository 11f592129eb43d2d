"""What a payment costs: the local checks alone, and a paid request end to end per mode.

Everything runs on loopback in this process: anvil with the USDC stand-in, the official x402
SDK facilitator over HTTP (paygate_dev.chain), the FAKE model server, and the gateway (software
key). Payments are signed beforehand by the SDK's client, so the timings are the gateway's
(local checks, ledger writes, verify, serve, settle), not the caller's signing. Requests are
sequential; anvil mines instantly, so "settle" is a real transaction without block time.
Prints a table, writes bench/results/payments.json.

    .venv/bin/python -m bench.payments [--requests 40]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import statistics
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from paygate_dev.fake_model import FakeModelServer

from enclave import SoftwareKey
from paygate import wire
from paygate.config import load_settings
from paygate.server.app import build_app, server_options
from paygate.x402 import codec
from paygate.x402.models import ResourceInfo
from paygate.x402.networks import resolve_network
from paygate.x402.offers import Acceptance, PaymentTerms, challenge
from paygate.x402.schemes.exact.verify import check_authorization
from paygate.x402.verify import match_offer

RESULTS = Path(__file__).parent / "results" / "payments.json"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
PATH = "/v1/chat/completions"


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(samples),
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
    }


async def _serve(app: web.Application, **options: Any) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, **options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def _local_checks(payer: Any, seller: str, n: int) -> dict[str, float]:
    from paygate_dev.chain.payer import encode_header, sign_v2_payment

    network = resolve_network("base-sepolia")
    assert network.usdc is not None
    terms = PaymentTerms(pay_to=seller, accepted=(Acceptance(network, network.usdc),))
    offers = terms.offers(Decimal("0.001"))
    resource = ResourceInfo(url="http://127.0.0.1" + PATH)
    accepted = challenge(offers, resource, error="payment_required").v2.accepts[0].wire()
    header = encode_header(sign_v2_payment(payer, accepted))
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        payment = codec.decode_payment(header, header=wire.PAYMENT_SIGNATURE)
        check_authorization(payment, match_offer(payment, offers), now=int(time.time()), skew=5)
        samples.append(time.perf_counter() - started)
    return _summary(samples)


async def _paid_requests(url: str, headers: list[str | None]) -> list[float]:
    samples = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        for header in headers:
            extra = {wire.PAYMENT_SIGNATURE: header} if header else {}
            started = time.perf_counter()
            async with client.post(url + PATH, json=BODY, headers=extra) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"request failed: {response.status}")
            samples.append(time.perf_counter() - started)
    return samples


async def _mode(
    mode: str, n: int, chain: Any, facilitator_url: str, work: Path, fake_url: str
) -> dict[str, float]:
    from paygate_dev.chain.accounts import GATEWAY_GAS, new_account
    from paygate_dev.chain.payer import encode_header, sign_v2_payment

    seller = new_account().address
    payer = new_account()
    chain.mint(payer.address, 10**9)
    overrides: dict[str, Any] = {"upstream_url": fake_url, "payment_mode": mode}
    if mode != "off":
        overrides |= {
            "pay_to": seller,
            "network": "base-sepolia",
            "ledger_path": work / f"{mode}.db",
            "facilitator_url": facilitator_url if mode != "chain" else None,
        }
    if mode == "chain":
        overrides |= {"chain_rpc_url": chain.rpc_url, "gas_key": chain.accounts[GATEWAY_GAS].key}
    settings = load_settings(None, **overrides)
    runner, url = await _serve(
        build_app(settings, key=SoftwareKey.generate()), **server_options(settings)
    )
    try:
        if mode == "off":
            headers: list[str | None] = [None] * (n + 5)
        else:
            async with (
                aiohttp.ClientSession() as client,
                client.post(url + PATH, json=BODY) as response,
            ):
                required = response.headers[wire.PAYMENT_REQUIRED]
            accepted = json.loads(base64.b64decode(required))["accepts"][0]
            headers = [encode_header(sign_v2_payment(payer, accepted)) for _ in range(n + 5)]
        await _paid_requests(url, headers[:5])  # warm-up
        samples = await _paid_requests(url, headers[5:])
    finally:
        await runner.cleanup()
    if mode in ("facilitator", "chain"):
        expected = (n + 5) * 1000
        if chain.balance_of(seller) != expected:
            raise RuntimeError(f"{mode}: seller holds {chain.balance_of(seller)}, not {expected}")
    return _summary(samples)


async def _run(n: int) -> dict[str, Any]:
    from paygate_dev.chain.accounts import FACILITATOR, new_account
    from paygate_dev.chain.anvil import start_anvil
    from paygate_dev.chain.facilitator import FacilitatorServer, FacilitatorSettings

    results: dict[str, Any] = {}
    chain = start_anvil()
    facilitator = FacilitatorServer(
        FacilitatorSettings(rpc_url=chain.rpc_url, private_key=chain.accounts[FACILITATOR].key)
    ).start()
    fake = FakeModelServer()
    fake_runner, fake_url = await _serve(fake.app)
    try:
        results["local_checks"] = _local_checks(new_account(), new_account().address, n * 10)
        with tempfile.TemporaryDirectory(prefix="paygate-bench-") as tmp:
            for mode in ("off", "verify-only", "facilitator", "chain"):
                results[mode] = await _mode(mode, n, chain, facilitator.url, Path(tmp), fake_url)
    finally:
        await fake_runner.cleanup()
        facilitator.stop()
        chain.stop()
    return results


def _print(results: dict[str, Any]) -> None:
    labels = {
        "local_checks": "local checks only (decode, match, EIP-712 recover)",
        "off": "request, payments off",
        "verify-only": "request, verify-only (ledger + facilitator /verify)",
        "facilitator": "request, facilitator (verify + serve + settle on anvil)",
        "chain": "request, chain mode (eth_call checks + own transaction)",
    }
    print(f"{'what':<58} {'n':>5} {'median ms':>10} {'p90 ms':>8}")
    for key, label in labels.items():
        row = results[key]
        print(f"{label:<58} {row['n']:>5} {row['median_ms']:>10.2f} {row['p90_ms']:>8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    results = asyncio.run(_run(max(args.requests, 5)))
    _print(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {"machine": platform.platform(), "python": platform.python_version(), **results}
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
