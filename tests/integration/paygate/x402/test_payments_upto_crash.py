"""`paygate serve` SIGKILLed between serving a metered (`upto`) request and settling it,
restarted on the same ledger: the same metered amount is settled exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import pytest

from paygate import wire
from paygate.x402.ledger import PaymentState
from tests.fixtures.chain import encode_header, sign_v2_payment
from tests.fixtures.gateway_support import running_stack
from tests.fixtures.payment_support import CHAT, CHAT_BODY, challenge_of, records, states, until
from tests.fixtures.serve_support import gateway_process, process_settings
from tests.fixtures.upto_support import CAP, TOKEN_PRICES, charge, upto_offer

UPTO_ENV = {
    "PAYGATE_PAYMENT_SCHEMES": "exact,upto",
    "PAYGATE_TOKEN_PRICES": json.dumps(TOKEN_PRICES),
    "PAYGATE_MAX_TOKENS_CAP": str(CAP),
}


@pytest.mark.parametrize(
    "fault",
    [
        "hold_settle",  # killed with the settle request unanswered and not executed
        "settle_then_hang",  # killed after the transfer went through, before the answer
    ],
)
async def test_killed_between_serving_and_settling_settles_the_metered_amount_once(
    facilitator, anvil, usdc, upto_payer, seller, tmp_path, key_file, fault
):
    ledger = tmp_path / "payments.db"
    # The chain RPC lets facilitator mode tell a spent Permit2 nonce's transfer (read-only).
    env = {**UPTO_ENV, "PAYGATE_CHAIN_RPC_URL": anvil.rpc_url}
    async with running_stack() as fake_stack:
        settings = process_settings(key_file, ledger, seller, facilitator.url, fake_stack)
        async with gateway_process(**settings, extra_env=env) as (url, proc):
            facilitator.set_fault(fault)
            fake_stack.url = url
            required = await challenge_of(fake_stack)
            payment = sign_v2_payment(upto_payer, upto_offer(required))
            request = asyncio.ensure_future(
                fake_stack.client.post(
                    url + CHAT,
                    json=CHAT_BODY,
                    headers={wire.PAYMENT_SIGNATURE: encode_header(payment)},
                )
            )
            await until(ledger, lambda found: states(found) == [PaymentState.SETTLING])
            (held,) = await records(ledger)
            assert (held.tokens_in, held.tokens_out, held.settle_amount) == (1, 4, charge(1, 4))
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            with contextlib.suppress(Exception):  # the connection died with the gateway
                await request
        facilitator.reset()
        async with gateway_process(**settings, extra_env=env):
            await until(ledger, lambda found: states(found) == [PaymentState.SETTLED])
    (record,) = await records(ledger)
    assert record.settled_amount == charge(1, 4)
    assert record.transaction is not None  # both ways, the hash of the one transfer
    assert usdc.balance_of(seller) == charge(1, 4)  # exactly once, the metered amount
