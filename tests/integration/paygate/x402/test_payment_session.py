"""The payment session's one exit (paygate.x402.session), on the real SDK facilitator on anvil
and both ledger stores: whatever way a request ends, its payment is finished once.

- a caller gone mid-reply (its handler cancelled inside ``async with session``) still settles
  what was served, once, and a second finish adds nothing;
- an upstream failure releases the reservation *before* the exit, so the same authorization
  can be used again at once, and the exit releases nothing twice;
- a session that never reported a status (the request failed before any reply) is released,
  never settled;
- verify-only: SERVED waits for the reply's signed receipt when one follows before the reply's
  end (one ledger transaction for both), and is recorded at the exit when none came.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import aiohttp

from paygate import wire
from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.ledger import EventAction, PaymentState
from paygate.x402.ledger_base import Ledger
from paygate.x402.models import ResourceInfo
from paygate.x402.networks import resolve_network
from paygate.x402.offers import Acceptance, PaymentTerms, challenge
from paygate.x402.processor import PaymentProcessor
from paygate.x402.session import PaymentSession
from paygate.x402.settlement import SettleAfterReply, Settlement, VerifyOnly
from tests.fixtures.chain import encode_header, sign_v2_payment
from tests.fixtures.ledgers import Opener

PRICE = Decimal("0.001")
RESOURCE = ResourceInfo(url="http://127.0.0.1/v1/chat/completions")


async def _processor(
    ledger_store: Opener,
    session: aiohttp.ClientSession,
    facilitator: Any,
    seller: str,
    settlement: Settlement | None = None,
) -> tuple[PaymentProcessor, Ledger, PaymentTerms]:
    network = resolve_network("base-sepolia")
    assert network.usdc is not None
    terms = PaymentTerms(pay_to=seller, accepted=(Acceptance(network, network.usdc),))
    ledger = await ledger_store()
    processor = PaymentProcessor(
        terms=terms,
        ledger=ledger,
        settler=FacilitatorSettler(session, facilitator.url, timeout=5, settle_timeout=10),
        settlement=settlement or SettleAfterReply(),
    )
    return processor, ledger, terms


def _header(terms: PaymentTerms, payer: Any) -> dict[str, str]:
    accepted = challenge(terms.offers(PRICE), RESOURCE, error="x").v2.accepts[0].wire()
    return {
        wire.PAYMENT_SIGNATURE: encode_header(
            sign_v2_payment(payer, accepted, resource=RESOURCE.url)
        )
    }


async def _admit(processor: PaymentProcessor, headers: dict[str, str]) -> PaymentSession:
    session = await processor.admit(headers, price=PRICE, resource=RESOURCE, route="chat")
    assert isinstance(session, PaymentSession), session
    return session


async def test_a_caller_gone_mid_reply_settles_once(
    ledger_store: Opener, facilitator, usdc, payer, seller
) -> None:
    async with aiohttp.ClientSession() as http:
        processor, ledger, terms = await _processor(ledger_store, http, facilitator, seller)
        session = await _admit(processor, _header(terms, payer))
        replying = asyncio.Event()

        async def handler() -> None:
            async with session:
                session.status = 200  # the upstream answered; the reply is going out
                replying.set()
                await asyncio.sleep(30)  # the caller goes away here

        task = asyncio.get_running_loop().create_task(handler())
        await asyncio.wait_for(replying.wait(), timeout=5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert session.caller_gone
        await processor.settlements.drain(10)
        await session.finish()  # the exit ran already: nothing more happens
        await processor.settlements.drain(10)
        assert session.admission.record is not None
        done = await ledger.get(session.admission.record.id)
    assert done is not None
    assert done.state is PaymentState.SETTLED
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == 1000
    # VERIFIED, SERVED and SETTLING are one transaction before the settle call (one instant).
    history = await ledger.history(done.id)
    moved = [(e.state, e.at) for e in history if e.action is EventAction.MOVED]
    assert [state for state, _ in moved] == [
        PaymentState.VERIFIED,
        PaymentState.SERVED,
        PaymentState.SETTLING,
        PaymentState.SETTLED,
    ]
    assert moved[0][1] == moved[1][1] == moved[2][1] < moved[3][1]


async def test_an_upstream_failure_releases_before_the_exit(
    ledger_store: Opener, facilitator, usdc, payer, seller
) -> None:
    async with aiohttp.ClientSession() as http:
        processor, ledger, terms = await _processor(ledger_store, http, facilitator, seller)
        headers = _header(terms, payer)
        async with await _admit(processor, headers) as session:
            session.status = 502  # the model server failed
            assert await session.reply_ended() is None  # released now, before the error
            assert session.admission.record is not None
            record = await ledger.get(session.admission.record.id)
            assert record is not None
            assert record.state is PaymentState.RELEASED
        history = await ledger.history(
            session.admission.record.id
        )  # the exit released nothing twice
        assert [e.state for e in history].count(PaymentState.RELEASED) == 1
        # The caller's immediate retry with the same authorization is admitted.
        async with await _admit(processor, headers) as retry:
            retry.status = 502
    assert facilitator.stats.calls("settle") == 0
    assert usdc.balance_of(seller) == 0


async def test_a_request_that_failed_before_any_reply_is_released(
    ledger_store: Opener, facilitator, usdc, payer, seller
) -> None:
    async with aiohttp.ClientSession() as http:
        processor, ledger, terms = await _processor(ledger_store, http, facilitator, seller)
        session = await _admit(processor, _header(terms, payer))
        try:
            async with session:
                raise ConnectionResetError  # the caller went away before the upstream answered
        except ConnectionResetError:
            pass
        await processor.settlements.drain(10)
        assert session.caller_gone
        assert session.admission.record is not None
        record = await ledger.get(session.admission.record.id)
    assert record is not None
    assert record.state is PaymentState.RELEASED
    assert facilitator.stats.calls("settle") == 0


async def test_verify_only_records_served_with_the_reply_s_receipt(
    ledger_store: Opener, facilitator, usdc, payer, seller
) -> None:
    async with aiohttp.ClientSession() as http:
        processor, ledger, terms = await _processor(
            ledger_store, http, facilitator, seller, VerifyOnly()
        )
        async with await _admit(processor, _header(terms, payer)) as session:
            session.status = 200
            assert await session.reply_ended(receipt_follows=True) is None
            assert session.admission.record is not None
            payment_id = session.admission.record.id
            waiting = await ledger.get(payment_id)
            assert waiting is not None
            assert not waiting.served  # SERVED waits for the receipt
            await session.keep_receipt(
                "signed.receipt", {"prompt_tokens": 3, "completion_tokens": 4}
            )
            served = await ledger.get(payment_id)
            assert served is not None
            assert (served.state, served.served, served.owner) == (PaymentState.SERVED, True, None)
            assert (served.tokens_in, served.tokens_out) == (3, 4)
            (kept,) = await ledger.receipts(payment_id)
            assert kept.token == "signed.receipt"
        history = await ledger.history(payment_id)  # the exit changed nothing more
        assert [e.state for e in history] == [
            PaymentState.RESERVED,
            PaymentState.VERIFIED,
            PaymentState.SERVED,
        ]
        assert kept.created_at == history[-1].at  # one transaction

        # The receipt never came (its signing failed): the exit records SERVED all the same.
        async with await _admit(processor, _header(terms, payer)) as unsigned:
            unsigned.status = 200
            await unsigned.reply_ended(receipt_follows=True)
        assert unsigned.admission.record is not None
        record = await ledger.get(unsigned.admission.record.id)
        assert record is not None
        assert (record.state, record.served, record.owner) == (PaymentState.SERVED, True, None)
        assert await ledger.receipts(record.id) == []

        # No receipt follows (a stream's comes after its end): SERVED before the end leaves.
        async with await _admit(processor, _header(terms, payer)) as streamed:
            streamed.status = 200
            await streamed.reply_ended()
            assert streamed.admission.record is not None
            now = await ledger.get(streamed.admission.record.id)
            assert now is not None
            assert now.state is PaymentState.SERVED
    assert facilitator.stats.calls("settle") == 0
