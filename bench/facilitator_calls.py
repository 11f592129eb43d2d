"""CPU of one facilitator ``/verify`` call on the gateway's side: ``FacilitatorSettler.verify``.

Run: ``.venv/bin/python -m bench.facilitator_calls [--calls N] [--concurrency C]``. The
facilitator here is a plain aiohttp server on loopback in its own thread that answers every
``/verify`` with a valid ``VerifyResponse`` (the facilitator's own work is not what is measured);
the figure is the CPU time of the calling thread (``time.thread_time``) divided by the calls: the
settler, its HTTP client and the event loop's socket work, under uvloop as the gateway runs.
To measure another tree (main before a change), put it first on ``PYTHONPATH`` and run this file
by its path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.models import PaymentPayload

ANSWER = json.dumps({"isValid": True, "payer": "0x" + "ab" * 20}).encode()
ADDRESS = "0x" + "cd" * 20
ACCEPTED: dict[str, Any] = {
    "scheme": "exact",
    "network": "eip155:84532",
    "amount": "1000",
    "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    "payTo": ADDRESS,
    "maxTimeoutSeconds": 60,
    "extra": {"name": "USDC", "version": "2"},
}
PAYMENT: dict[str, Any] = {
    "x402Version": 2,
    "resource": {"url": "http://127.0.0.1/v1/chat/completions", "mimeType": "application/json"},
    "accepted": ACCEPTED,
    "payload": {
        "signature": "0x" + "11" * 65,
        "authorization": {
            "from": "0x" + "ab" * 20,
            "to": ADDRESS,
            "value": "1000",
            "validAfter": "0",
            "validBefore": "9999999999",
            "nonce": "0x" + "22" * 32,
        },
    },
}


def _serve(port: list[int], ready: threading.Event) -> None:
    async def verify(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/verify", verify)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port.append(runner.addresses[0][1])
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


async def _measure(url: str, calls: int, concurrency: int) -> float:
    payment = PaymentPayload.model_validate(PAYMENT)
    async with aiohttp.ClientSession() as session:
        settler = FacilitatorSettler(session, url, timeout=10.0, settle_timeout=10.0)

        async def worker(n: int) -> None:
            for _ in range(n):
                answer = await settler.verify(payment, ACCEPTED)
                assert answer.is_valid

        await worker(100)  # warm: connections, caches
        start = time.thread_time()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        used = time.thread_time() - start
        await settler.close()
    return used / (calls // concurrency * concurrency) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port: list[int] = []
    ready = threading.Event()
    threading.Thread(target=_serve, args=(port, ready), daemon=True).start()
    if not ready.wait(10):
        raise SystemExit("the stand-in facilitator did not start")
    url = f"http://127.0.0.1:{port[0]}"
    figures = [uvloop.run(_measure(url, args.calls, args.concurrency)) for _ in range(args.rounds)]
    print(
        f"{statistics.median(figures):.0f} us of CPU per /verify call (median of "
        f"{', '.join(f'{f:.0f}' for f in figures)}; {args.calls} calls, {args.concurrency} "
        "concurrent)"
    )


if __name__ == "__main__":
    main()
