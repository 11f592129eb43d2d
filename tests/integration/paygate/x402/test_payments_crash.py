"""`paygate serve` SIGKILLed mid-payment, restarted on the same ledger: settled exactly once.

The gateway is a real process (killed by its own PID); the facilitator, anvil and the FAKE model
server run in this process. The chain's balances are the proof.
"""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from paygate import wire
from paygate.x402.ledger import PaymentState
from tests.fixtures.gateway_support import running_stack
from tests.fixtures.ledger_support import hold_write_lock, let_go
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    records,
    states,
    until,
    v2_header,
)
from tests.fixtures.serve_support import gateway_process, process_settings


@pytest.mark.parametrize(
    "fault",
    [
        "hold_settle",  # killed with the settle request unanswered and not executed
        "settle_then_hang",  # killed after the transfer went through, before the answer
    ],
)
async def test_killed_between_serving_and_settling_settles_once_after_restart(
    facilitator, anvil, usdc, payer, seller, tmp_path, key_file, fault
):
    ledger = tmp_path / "payments.db"
    async with running_stack() as fake_stack:
        settings = process_settings(key_file, ledger, seller, facilitator.url, fake_stack)
        settings["chain_rpc_url"] = anvil.rpc_url
        async with gateway_process(**settings) as (url, proc):
            facilitator.set_fault(fault)
            fake_stack.url = url  # v2_header asks this gateway for its challenge
            header = await v2_header(fake_stack, payer)
            request = asyncio.ensure_future(
                fake_stack.client.post(
                    url + CHAT, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: header}
                )
            )
            await until(ledger, lambda found: states(found) == [PaymentState.SETTLING])
            assert fake_stack.fake.completed["POST /v1/chat/completions"] == 1
            proc.send_signal(signal.SIGKILL)  # by the gateway's own PID
            await asyncio.to_thread(proc.wait, 10)
            with pytest.raises(Exception):  # noqa: B017, PT011 - the connection just died
                await request
        sent = facilitator.stats.transactions  # reset() clears them
        facilitator.reset()
        # Restart on the same ledger: the owed settlement is finished from the record alone.
        async with gateway_process(**settings):
            await until(ledger, lambda found: states(found) == [PaymentState.SETTLED])
    (record,) = await records(ledger)
    # Proven on chain: the receipt of the transaction that used the nonce (for settle_then_hang
    # found through its AuthorizationUsed log: the facilitator's answer never came).
    assert record.transaction in sent + facilitator.stats.transactions
    assert usdc.balance_of(seller) == PRICE_ATOMIC  # exactly once
    assert usdc.balance_of(payer.address) == 100_000_000 - PRICE_ATOMIC


async def test_killed_before_serving_releases_the_reservation_on_restart(
    facilitator, usdc, payer, seller, tmp_path, key_file
):
    ledger = tmp_path / "payments.db"
    held = {**CHAT_BODY, "stream": True, "model": "fake-stall-first"}  # no head, no chunk
    async with running_stack() as fake_stack:
        settings = process_settings(key_file, ledger, seller, facilitator.url, fake_stack)
        async with gateway_process(**settings) as (url, proc):
            fake_stack.url = url
            header = await v2_header(fake_stack, payer, body=held)
            sent = asyncio.ensure_future(
                fake_stack.client.post(
                    url + CHAT, json=held, headers={wire.PAYMENT_SIGNATURE: header}
                )
            )
            async with asyncio.timeout(10):  # forwarded: the upstream has it, nothing went out
                while not fake_stack.fake.hits["POST /v1/chat/completions"]:
                    await asyncio.sleep(0.05)
            # verified, not yet served: VERIFIED is recorded with SERVED (one transaction)
            await until(ledger, lambda found: states(found) == [PaymentState.RESERVED])
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            with pytest.raises(Exception):  # noqa: B017, PT011 - cut, whichever way the client says
                await sent
        async with gateway_process(**settings) as (url, _):
            assert states(await records(ledger)) == [PaymentState.RELEASED]
            # The caller was never served: the same authorization buys the reply now.
            async with fake_stack.client.post(
                url + CHAT, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: header}
            ) as again:
                assert again.status == 200
                await again.read()
            await until(ledger, lambda found: states(found) == [PaymentState.SETTLED])
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_killed_after_its_streams_first_chunk_is_charged_once_on_restart(
    facilitator, usdc, payer, seller, tmp_path, key_file
):
    """Its first chunk went out, so its progress was recorded (SERVED): a crash there is
    charged as a disconnect there is (`exact`: the price), by the restarted process, once —
    not released for the same authorization to buy the whole reply again."""
    ledger = tmp_path / "payments.db"
    held = {**CHAT_BODY, "stream": True, "model": "fake-hold"}
    async with running_stack() as fake_stack:
        settings = process_settings(key_file, ledger, seller, facilitator.url, fake_stack)
        async with gateway_process(**settings) as (url, proc):
            fake_stack.url = url
            header = await v2_header(fake_stack, payer, body=held)
            response = await fake_stack.client.post(
                url + CHAT, json=held, headers={wire.PAYMENT_SIGNATURE: header}
            )
            await asyncio.wait_for(response.content.readline(), 10)
            await until(ledger, lambda found: states(found) == [PaymentState.SERVED])
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            response.close()
        async with gateway_process(**settings) as (url, _):
            await until(ledger, lambda found: states(found) == [PaymentState.SETTLED])
            status = await fake_stack.client.post(
                url + CHAT, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: header}
            )
            assert status.status == 402  # used: charged once, for what went out
            status.close()
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_free_requests_are_answered_while_another_process_holds_the_ledger_write_lock(
    facilitator, anvil, usdc, payer, seller, tmp_path, key_file
):
    """The gateway runs a payment's ledger statements on its event loop: it must never wait
    there for the file's write lock. While another process holds it, a paid request waits (its
    call handed to the ledger's worker thread) and free requests keep being answered."""
    ledger = tmp_path / "payments.db"
    async with running_stack() as fake_stack:
        settings = process_settings(key_file, ledger, seller, facilitator.url, fake_stack)
        settings["chain_rpc_url"] = anvil.rpc_url
        settings["extra_env"] = {"PAYGATE_ROUTE_PRICES": json.dumps({"GET /api/tags": "0"})}
        async with gateway_process(**settings) as (url, _):
            fake_stack.url = url
            header = await v2_header(fake_stack, payer)
            holder = await asyncio.to_thread(hold_write_lock, ledger)
            try:
                paid = asyncio.ensure_future(
                    fake_stack.client.post(
                        url + CHAT, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: header}
                    )
                )
                for _ in range(5):
                    async with fake_stack.client.get(url + "/api/tags") as response:
                        assert response.status == 200
                assert not paid.done()  # the free ones went by while it waits for the lock
            finally:
                await asyncio.to_thread(let_go, holder)
            async with asyncio.timeout(30):
                response = await paid
            async with response:
                assert response.status == 200, await response.text()
                await response.read()
            await until(ledger, lambda found: states(found) == [PaymentState.SETTLED])
    assert usdc.balance_of(seller) == PRICE_ATOMIC
