"""What the logs say of a channel's payments (real components: the SDK's batch-settlement
client, the gateway in chain mode on anvil). A voucher's charge moves no money — it is a charge
to the channel in the ledger — so its line must not say "settled", and at INFO it would be one
line per request (~1.3 % of a voucher request's CPU, profiled): it is DEBUG. Money moves at the
claim: one INFO line per claim transaction proven on chain, naming it."""

from __future__ import annotations

import logging
import re

import pytest

from tests.fixtures.batch_settlement_support import (
    chain_batch,
    claimer,
    sdk_batch_client,
    sdk_batch_scheme,
)
from tests.fixtures.payment_support import CHAT, CHAT_BODY, PRICE_ATOMIC

_SETTLED = re.compile(r"payment \S+ settled")  # the line of a settle whose money moved


async def test_a_vouchers_charge_logs_at_debug_and_the_claim_at_info(
    anvil, usdc, payer, seller, tmp_path, gas_key, caplog: pytest.LogCaptureFixture
):
    ledger = tmp_path / "payments.db"
    caplog.set_level(logging.DEBUG, logger="paygate.x402")
    scheme = sdk_batch_scheme(payer, deposit=10 * PRICE_ATOMIC)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        async with sdk_batch_client(scheme) as client:
            for _ in range(3):
                response = await client.post(stack.url + CHAT, json=CHAT_BODY)
                assert response.status_code == 200, response.text
        payments = [r for r in caplog.records if r.getMessage().startswith("payment ")]
        said = [r.getMessage() for r in payments if _SETTLED.fullmatch(r.getMessage())]
        assert not said, said  # no money moved yet (the ledger's own state moves aside)
        charged = [r for r in payments if "charged to its channel" in r.getMessage()]
        assert len(charged) == 3
        assert {r.levelno for r in charged} == {logging.DEBUG}
        caplog.clear()
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
            (claim,) = await channels.store.claims()
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    settled = [m for m in info if m.startswith("claim ")]
    assert len(settled) == 1, info
    assert claim.tx_hash in settled[0]
    assert "1 channel" in settled[0]
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC
