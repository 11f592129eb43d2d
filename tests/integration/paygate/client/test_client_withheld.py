"""paygate's own client sends a paid request again when the gateway withheld its reply (503
``ledger_unavailable`` / ``lease_lost``: the charge could not be recorded, the payment was
released at once), with the same payment, and is charged once.

On real components: the gateway on SQLite with the FAKE model server, anvil with the SDK's
facilitator (or chain-mode batch-settlement); the one fault is the ledger refusing the write
that records the charge, made in the process at the ledger's own ``transition`` as the store
would raise it (tests/integration/paygate/x402/test_charge_not_recorded.py). A stalled replica's
``lease_lost`` is in test_lease_lost_reply.py."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest

from paygate import wire
from paygate.client import AsyncPaygateTransport, PaygateTransport, SpendPolicy
from paygate.x402.ledger import LedgerUnavailable, PaymentState
from paygate.x402.ledger_base import Ledger
from paygate.x402.schemes.batch_settlement.channel import SETTLEMENT_ADDRESS
from tests.fixtures.batch_settlement_support import DEPOSIT_ATOMIC, chain_batch, claimer, spend
from tests.fixtures.gateway_support import ThreadedStack
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    paid_settings,
    paid_stack,
    records,
)
from tests.fixtures.upto_support import upto_settings

SPEND = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])
PRICE = Decimal(PRICE_ATOMIC) / 10**6


def refuse(monkeypatch: pytest.MonkeyPatch, into: PaymentState, times: int = 1) -> list[str]:
    """The next ``times`` ledger moves into ``into`` are refused as the store would refuse
    them; returns the ids they were refused for."""
    real = Ledger.transition
    refused: list[str] = []

    async def transition(self: Ledger, payment_id: str, to: PaymentState, **kw: Any) -> Any:
        if to is into and len(refused) < times:
            refused.append(payment_id)
            raise LedgerUnavailable("the store refused this write (injected)")
        return await real(self, payment_id, to, **kw)

    monkeypatch.setattr(Ledger, "transition", transition)
    return refused


@pytest.mark.parametrize("envelope", ["v2", "v1", "plain"])
async def test_a_withheld_reply_is_sent_again_with_the_same_payment_and_charged_once(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch, envelope
):
    """The charge's write refused once: the client waits the 503's Retry-After and sends the
    same authorization again (re-sealed: a fresh reply key), which is served and settled once;
    the app sees only the reply. Nothing new was signed: max_total counts the price once."""
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    async with paid_stack(**settings) as stack:
        transport = AsyncPaygateTransport(envelope=envelope, wallet=payer, spend=SPEND)
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            refused = refuse(monkeypatch, PaymentState.SETTLING)
            reply = await http.post(stack.url + CHAT, json=CHAT_BODY)
            assert refused, "the charge's write was not refused"
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"]  # opened
            (payment,) = transport.payments
            assert payment.withheld == 1
            assert payment.settled
            assert transport.spent == PRICE
            assert stack.fake.hits["POST /v1/chat/completions"] == 2  # the model ran twice
    (record,) = await records(ledger)  # one authorization, one record
    assert record.state is PaymentState.SETTLED
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    assert usdc.authorization_state(payer.address, payment.nonce)


async def test_past_the_bound_the_second_withheld_reply_reaches_the_app_counted_once(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch
):
    """Refused twice, with one retry allowed: the second 503 is the app's, as it came, and the
    payment (released, nothing charged) counts once against max_total, not once per send."""
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    async with paid_stack(**settings) as stack:
        transport = AsyncPaygateTransport(envelope="v2", wallet=payer, spend=SPEND)
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            refused = refuse(monkeypatch, PaymentState.SETTLING, times=3)
            withheld = await http.post(stack.url + CHAT, json=CHAT_BODY)
            assert len(refused) == 2  # the first send and its one retry, no more
            assert (withheld.status_code, withheld.headers.get(wire.ERROR_HEADER)) == (
                503,
                "ledger_unavailable",
            )
            assert withheld.headers.get("Retry-After")
            (payment,) = transport.payments
            assert payment.withheld == 1
            assert payment.receipt is None
            assert transport.spent == PRICE
    (record,) = await records(ledger)
    assert record.state is PaymentState.RELEASED
    assert facilitator.stats.calls("settle") == 0
    assert usdc.balance_of(seller) == 0


@pytest.mark.parametrize(
    "options",
    [{"withheld_retries": 0}, {"withheld_max_wait": 0.5}],
    ids=["retries-off", "retry-after-above-the-bound"],
)
async def test_with_retries_off_or_a_longer_retry_after_the_503_reaches_the_app(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch, options
):
    """``withheld_retries=0``, or the gateway's Retry-After (1 s) above ``withheld_max_wait``:
    nothing is sent again; the app gets the 503 and the payment stays released."""
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    async with paid_stack(**settings) as stack:
        transport = AsyncPaygateTransport(wallet=payer, spend=SPEND, **options)
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            refused = refuse(monkeypatch, PaymentState.SETTLING, times=2)
            withheld = await http.post(stack.url + CHAT, json=CHAT_BODY)
            assert len(refused) == 1
            assert (withheld.status_code, withheld.headers.get(wire.ERROR_HEADER)) == (
                503,
                "ledger_unavailable",
            )
            assert transport.payments[0].withheld == 0
            assert stack.fake.hits["POST /v1/chat/completions"] == 1
    (record,) = await records(ledger)
    assert record.state is PaymentState.RELEASED


def test_the_sync_transport_sends_a_withheld_reply_again(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch
):
    ledger = tmp_path / "payments.db"
    settings = paid_settings(seller=seller, facilitator_url=facilitator.url, ledger=ledger)
    with ThreadedStack(**settings) as stack:
        transport = PaygateTransport(wallet=payer, spend=SPEND)
        with httpx.Client(transport=transport, timeout=60) as http:
            refused = refuse(monkeypatch, PaymentState.SETTLING)
            reply = http.post(stack.url + CHAT, json=CHAT_BODY)
            assert refused
            assert reply.status_code == 200, reply.text
            assert transport.payments[0].withheld == 1
            assert transport.spent == PRICE
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_a_withheld_deposit_is_sent_again_as_its_voucher_alone_and_charged_once(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """batch-settlement, the channel's first request (a deposit and a voucher): the deposit
    is made on chain before the reply, then the charge's write is refused. Sent again with the
    deposit it would be refused (its authorization is spent); the client sends the same
    voucher alone, which is served and charged once, and the deposit counts once."""
    ledger = tmp_path / "payments.db"
    transport = AsyncPaygateTransport(wallet=payer, spend=spend())
    async with (
        chain_batch(seller, ledger, anvil, gas_key) as stack,
        httpx.AsyncClient(transport=transport, timeout=60) as http,
    ):
        charge = refuse(monkeypatch, PaymentState.SETTLED)
        usual = refuse(monkeypatch, PaymentState.SETTLING)
        reply = await http.post(stack.url + CHAT, json=CHAT_BODY)
        assert charge, "the channel's charge was not refused"
        assert usual, "the usual SETTLING was not refused"
        assert reply.status_code == 200, (reply.headers, reply.text)
        (payment,) = transport.payments
        assert (payment.withheld, payment.deposit, payment.settled) == (1, Decimal("0.02"), True)
        assert transport.spent == Decimal("0.02")  # the deposit, once
        # The channel goes on: the next voucher is the next one, served.
        assert (await http.post(stack.url + CHAT, json=CHAT_BODY)).status_code == 200
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
    assert usdc.balance_of(seller) == 2 * PRICE_ATOMIC
    states = [r.state for r in await records(ledger)]
    assert states.count(PaymentState.SETTLED) == 2
    assert set(states) <= {PaymentState.SETTLED, PaymentState.RELEASED}


async def test_a_deposit_withheld_before_it_was_made_is_made_on_the_retry(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The other ``ledger_unavailable``: the ledger refuses the reservation, before the deposit
    is sent. The voucher sent alone again finds no channel (402 ``channel_not_found``) and the
    transport deposits anew, as for any deposit that never landed: served, charged once, one
    deposit in escrow (the unused first authorization still counts against max_total)."""
    ledger = tmp_path / "payments.db"
    transport = AsyncPaygateTransport(wallet=payer, spend=spend())
    real = Ledger.reserve
    refused: list[bool] = []

    async def reserve(self: Ledger, **kw: Any) -> Any:
        if not refused:
            refused.append(True)
            raise LedgerUnavailable("the store refused this write (injected)")
        return await real(self, **kw)

    monkeypatch.setattr(Ledger, "reserve", reserve)
    escrow = usdc.balance_of(SETTLEMENT_ADDRESS)
    async with (
        chain_batch(seller, ledger, anvil, gas_key) as stack,
        httpx.AsyncClient(transport=transport, timeout=60) as http,
    ):
        reply = await http.post(stack.url + CHAT, json=CHAT_BODY)
        assert refused
        assert reply.status_code == 200, (reply.headers, reply.text)
        withheld, paid = transport.payments
        assert withheld.withheld == 1
        assert (paid.deposit, paid.settled) == (Decimal("0.02"), True)
        assert transport.spent == Decimal("0.04")
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    assert usdc.balance_of(SETTLEMENT_ADDRESS) == escrow + DEPOSIT_ATOMIC - PRICE_ATOMIC


async def test_a_withheld_metered_reply_is_sent_again_and_counts_what_was_settled(
    facilitator, usdc, upto_payer, seller, tmp_path, monkeypatch
):
    """``upto`` (Permit2): the same authorization sent again; its maximum is counted once while
    in flight, and what was settled once the receipt came."""
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    metered = SpendPolicy(
        max_per_request="0.1",
        max_total="1",
        networks=["base-sepolia"],
        max_price_per_million="400",
    )
    async with paid_stack(**settings, **upto_settings(payment_schemes=["upto"])) as stack:
        transport = AsyncPaygateTransport(wallet=upto_payer, spend=metered)
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            refused = refuse(monkeypatch, PaymentState.SETTLING)
            reply = await http.post(stack.url + CHAT, json=CHAT_BODY)
            assert refused
            assert reply.status_code == 200, reply.text
            (payment,) = transport.payments
            assert payment.withheld == 1
            assert payment.charged is not None
            assert payment.receipt_error is None
            assert 0 < payment.charged < payment.amount
            assert transport.spent == payment.charged
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLED
    assert usdc.balance_of(seller) == int(payment.charged * 10**6)
