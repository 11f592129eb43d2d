"""paygate's client keeps its batch-settlement channel across restarts (``channel_state``).

Against paygate in chain mode (anvil, Circle's FiatToken as USDC, the x402BatchSettlement
stand-in at its canonical address), through the real sealed v2 flow. The caller's later lives
are real processes (tests/fixtures/channel_client.py) on the same state file, some of which die
mid-request (``os._exit``). The chain is the proof: one deposit for the channel's whole life,
the seller claims exactly the requests served, a refund returns exactly the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from paygate.client import AsyncPaygateTransport, ChannelStateInUse
from paygate.x402.schemes.batch_settlement.channel import SETTLEMENT_ADDRESS
from tests.fixtures.batch_settlement_support import DEPOSIT_ATOMIC, chain_batch, claimer, spend
from tests.fixtures.channel_client import DIED
from tests.fixtures.payment_support import CHAT, CHAT_BODY, PRICE_ATOMIC

ROOT = Path(__file__).resolve().parents[4]
SPEND = {
    "max_per_request": "0.01",
    "max_total": "0.05",
    "networks": ["base-sepolia"],
    "channel_deposit": "0.02",
}


async def caller(payer: Any, url: str, state: Path, requests: int, **orders: Any) -> Any:
    """Another life of the caller: a new process on ``state``; its exit code and payments."""
    document = {
        "key": payer.key.hex(),
        "spend": SPEND,
        "state": str(state),
        "url": url + CHAT,
        "body": CHAT_BODY,
        "requests": requests,
        **orders,
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "devtools")])}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fixtures.channel_client",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(json.dumps(document).encode()), 180)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    return process.returncode, lines, err.decode()[-2000:]


def ends(lines: list[dict[str, Any]]) -> list[int]:
    return [int(line["nonce"].partition(":")[2]) // PRICE_ATOMIC for line in lines]


async def test_a_recreated_client_continues_its_channel_and_refunds_exactly_the_rest(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    ledger, state = tmp_path / "payments.db", tmp_path / "caller" / "channels.json"
    escrow, funds = usdc.balance_of(SETTLEMENT_ADDRESS), usdc.balance_of(payer.address)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        first = AsyncPaygateTransport(wallet=payer, spend=spend(), channel_state=state)
        async with httpx.AsyncClient(transport=first, timeout=60) as http:
            for _ in range(3):
                assert (await http.post(stack.url + CHAT, json=CHAT_BODY)).status_code == 200
            # One holder at a time: a second transport on the file is refused, in this
            # process or another, before it pays anything.
            with pytest.raises(ChannelStateInUse):
                AsyncPaygateTransport(wallet=payer, spend=spend(), channel_state=state)
            code, lines, err = await caller(payer, stack.url, state, 1)
            assert (code, lines) == (1, [])
            assert "ChannelStateInUse" in err
        assert [r.deposit for r in first.payments] == [Decimal("0.02"), 0, 0]

        code, lines, err = await caller(payer, stack.url, state, 3)
        assert code == 0, err
        assert [(line["status"], line["deposit"]) for line in lines] == [(200, "0")] * 3
        assert ends(lines) == [4, 5, 6]  # the same channel's next cumulative vouchers
        assert [Decimal(line["spent"]) for line in lines] == [Decimal("0.02")] * 3
        assert [line["receipt_error"] for line in lines] == [None] * 3
        # One deposit on chain for both lives.
        assert usdc.balance_of(payer.address) == funds - DEPOSIT_ATOMIC
        assert usdc.balance_of(SETTLEMENT_ADDRESS) == escrow + DEPOSIT_ATOMIC

        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
        assert usdc.balance_of(seller) == 6 * PRICE_ATOMIC

        third = AsyncPaygateTransport(wallet=payer, spend=spend(), channel_state=state)
        try:
            assert third.spent == Decimal("0.02")
            (receipt,) = await third.refund(stack.url)
            assert receipt.success
            assert receipt.amount == str(DEPOSIT_ATOMIC - 6 * PRICE_ATOMIC)
            assert third.spent == Decimal("0.006")
        finally:
            await third.aclose()
    assert usdc.balance_of(payer.address) == funds - 6 * PRICE_ATOMIC
    assert usdc.balance_of(seller) == 6 * PRICE_ATOMIC
    assert usdc.balance_of(SETTLEMENT_ADDRESS) == escrow
    # The drained channel is forgotten; what it spent still counts in the next life.
    fourth = AsyncPaygateTransport(wallet=payer, spend=spend(), channel_state=state)
    assert fourth.spent == Decimal("0.006")
    await fourth.aclose()


async def test_a_caller_dying_between_a_voucher_and_its_reply_never_pays_twice(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """The second voucher reached the gateway and was charged, but the process died before
    its reply: the next life's voucher is stale, the corrective 402 names a voucher the file
    says we signed, and the request is paid once more. A voucher signed but never sent is
    simply the next life's voucher again."""
    ledger, state = tmp_path / "payments.db", tmp_path / "channels.json"
    funds = usdc.balance_of(payer.address)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        code, lines, _ = await caller(payer, stack.url, state, 2, die="after")
        assert code == DIED
        assert ends(lines) == [1]  # the second (2) was served, its reply never read

        code, lines, err = await caller(payer, stack.url, state, 1)
        assert code == 0, err
        assert [(line["status"], line["deposit"]) for line in lines] == [(200, "0")]
        assert ends(lines) == [3]  # resynchronised past the lost 2, paid once

        code, lines, _ = await caller(payer, stack.url, state, 1, die="before")
        assert code == DIED  # voucher 4 signed (and written), never sent
        code, lines, err = await caller(payer, stack.url, state, 1)
        assert code == 0, err
        assert [(line["status"], line["receipt_error"]) for line in lines] == [(200, None)]
        assert ends(lines) == [4]

        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
    # Four requests served, four charged; one deposit.
    assert usdc.balance_of(seller) == 4 * PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == funds - DEPOSIT_ATOMIC


async def test_a_caller_dying_around_its_deposit_opens_one_channel(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """Death before the deposit left: the next life's voucher finds no channel at the gateway
    and pays again with a deposit (the lost authorization stays counted against max_total).
    Death after the deposit landed: the next life resynchronises on the same channel."""
    ledger = tmp_path / "payments.db"
    funds = usdc.balance_of(payer.address)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        never = tmp_path / "never.json"
        code, _, _ = await caller(payer, stack.url, never, 1, die="before")
        assert code == DIED
        assert usdc.balance_of(payer.address) == funds
        code, lines, err = await caller(payer, stack.url, never, 1)
        assert code == 0, err
        assert [(line["status"], line["deposit"]) for line in lines] == [(200, "0.02")]
        assert Decimal(lines[0]["spent"]) == Decimal("0.04")
        assert usdc.balance_of(payer.address) == funds - DEPOSIT_ATOMIC

        landed = tmp_path / "landed.json"
        code, _, _ = await caller(payer, stack.url, landed, 1, die="after")
        assert code == DIED
        assert usdc.balance_of(payer.address) == funds - 2 * DEPOSIT_ATOMIC
        code, lines, err = await caller(payer, stack.url, landed, 1)
        assert code == 0, err
        assert [(line["status"], line["deposit"]) for line in lines] == [(200, "0")]
        assert Decimal(lines[0]["spent"]) == Decimal("0.02")
        assert ends(lines) == [2]

        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 2
    assert usdc.balance_of(payer.address) == funds - 2 * DEPOSIT_ATOMIC
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC
