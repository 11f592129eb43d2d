"""Admission fairness: what unpaid callers do cannot consume what paid callers need.

Slow-body floods come from 127.0.0.2, paying callers from 127.0.0.3 (both loopback addresses
reach the gateway on 127.0.0.1 with their own source address). Deadlines are shortened so that
the floods are cut within the test's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp
import pytest
from paygate_dev.chain.accounts import new_account

from paygate import wire
from tests.fixtures.chain import encode_header, sign_v2_payment
from tests.fixtures.gateway_support import running_stack
from tests.fixtures.payment_support import CHAT, CHAT_BODY, challenge_of, paid_stack

FLOOD = "127.0.0.2"
PAYING = "127.0.0.3"
DEADLINES = {"body_first_byte_timeout": 1.5, "body_read_timeout": 3.0}
PAID_REQUESTS = 6


async def _slow_upload(host: str, port: int, headers: dict[str, str]) -> tuple[bytes, float]:
    """Send a POST's headers promising 100,000 bytes, then trickle one byte every 0.3 s until
    the gateway answers or closes; the status line and the seconds it took."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port, local_addr=(FLOOD, 0))
    lines = [f"POST {CHAT} HTTP/1.1", "Host: gateway", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append("Content-Length: 100000")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    status = b""
    try:
        async with asyncio.timeout(20):
            read = asyncio.ensure_future(reader.readline())
            while not read.done():
                with contextlib.suppress(ConnectionError):
                    writer.write(b" ")
                    await writer.drain()
                await asyncio.wait({read}, timeout=0.3)
            # A reset after the answer (the gateway closes without reading the body) is fine.
            with contextlib.suppress(ConnectionError):
                status = read.result()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return status, time.monotonic() - started


def _paying_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(PAYING, 0), limit=4),
        timeout=aiohttp.ClientTimeout(total=20),
    )


async def _unfunded_headers(stack: Any, count: int) -> list[str]:
    """Well-formed payments whose signatures verify, from a wallet holding nothing."""
    required = await challenge_of(stack)
    broke = new_account()
    return [
        encode_header(
            sign_v2_payment(broke, required["accepts"][0], resource=required["resource"]["url"])
        )
        for _ in range(count)
    ]


async def _paid_requests(stack: Any, payer: Any, body: dict[str, Any]) -> list[int]:
    statuses = []
    async with _paying_session() as session:
        for _ in range(PAID_REQUESTS):
            required = await challenge_of(stack, CHAT, body)
            header = encode_header(
                sign_v2_payment(payer, required["accepts"][0], resource=required["resource"]["url"])
            )
            async with session.post(
                stack.url + CHAT, json=body, headers={wire.PAYMENT_SIGNATURE: header}
            ) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


def _flood(stack: Any, headers: list[dict[str, str]]) -> list[asyncio.Task[tuple[bytes, float]]]:
    host, port = stack.host_port
    return [asyncio.ensure_future(_slow_upload(host, port, h)) for h in headers]


async def _ended(tasks: list[asyncio.Task[tuple[bytes, float]]]) -> list[tuple[bytes, float]]:
    async with asyncio.timeout(30):
        return await asyncio.gather(*tasks)


async def test_unpaid_and_unfunded_slow_uploads_do_not_starve_paid_callers(
    facilitator_process, usdc, payer, seller, tmp_path
):
    # The facilitator in its own process, as in production: its 100 verifications of the
    # unfunded wallet must not take this process's interpreter from the gateway.
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator_process.url,
        ledger=tmp_path / "p.db",
        **DEADLINES,
    ) as stack:
        unfunded = await _unfunded_headers(stack, 100)
        flood = _flood(
            stack,
            [{}] * 400 + [{wire.PAYMENT_SIGNATURE: header} for header in unfunded],
        )
        await asyncio.sleep(0.5)  # the flood is in
        statuses = await _paid_requests(stack, payer, CHAT_BODY)
        ended = await _ended(flood)
        assert statuses == [200] * PAID_REQUESTS
        # No payment header: the 402 comes from the headers alone, no body byte awaited.
        assert {status[:12] for status, _ in ended[:400]} == {b"HTTP/1.1 402"}, sorted(
            (status, round(seconds, 1)) for status, seconds in ended
        )[:20]
        # A signed payment from an empty wallet: refused by verification, body never read.
        assert {status[:12] for status, _ in ended[400:]} == {b"HTTP/1.1 402"}
        assert max(seconds for _, seconds in ended) < 15
        assert stack.fake.hits[f"POST {CHAT}"] == PAID_REQUESTS
    assert usdc.balance_of(seller) == PAID_REQUESTS * 1000


async def test_slow_uploads_on_a_body_priced_route_are_bounded_per_address(
    facilitator_process, usdc, payer, seller, tmp_path
):
    prices = {"model_prices": {"fake-llama": "0.002"}}
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator_process.url,
        ledger=tmp_path / "p.db",
        **DEADLINES,
        **prices,
    ) as stack:
        flood = _flood(stack, [{}] * 500)
        await asyncio.sleep(0.5)
        statuses = await _paid_requests(stack, payer, CHAT_BODY)
        ended = await _ended(flood)
        assert statuses == [200] * PAID_REQUESTS
        codes = [status.split(b" ")[1] for status, _ in ended]
        # The price needs the body, so a few of the flood are read — an address holds at most
        # per_ip_body_slots of the unverified pool at once — and cut by the body deadline; the
        # rest are refused at once.
        assert codes.count(b"429") >= 400
        assert set(codes) <= {b"429", b"408"}
        assert max(seconds for _, seconds in ended) < 15
        assert stack.fake.hits[f"POST {CHAT}"] == PAID_REQUESTS
    assert usdc.balance_of(seller) == PAID_REQUESTS * 2000


@pytest.mark.parametrize("flood_size", [500])
async def test_with_payments_off_a_slow_flood_does_not_block_free_routes(flood_size: int):
    async with running_stack(**DEADLINES) as stack:
        flood = _flood(stack, [{}] * flood_size)
        await asyncio.sleep(0.5)
        statuses = []
        async with _paying_session() as session:
            for _ in range(PAID_REQUESTS):
                async with session.post(stack.url + CHAT, json=CHAT_BODY) as response:
                    assert json.loads(await response.read())["object"] == "chat.completion"
                    statuses.append(response.status)
        ended = await _ended(flood)
        assert statuses == [200] * PAID_REQUESTS
        codes = [status.split(b" ")[1] for status, _ in ended]
        assert codes.count(b"429") >= flood_size - 100
        assert set(codes) <= {b"429", b"408"}
        assert max(seconds for _, seconds in ended) < 15
        assert stack.fake.hits[f"POST {CHAT}"] == PAID_REQUESTS
