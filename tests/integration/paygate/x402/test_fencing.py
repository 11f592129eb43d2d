"""Fencing, step by step: two payment processors (two replicas) on one ledger, the real SDK
facilitator on anvil, one settable clock for the leases.

Replica A serves a payment, then "freezes" (the clock moves past its lease and it renews
nothing). Replica B claims the payment. A wakes up and tries to settle: its fenced move to
SETTLING — the last step before the settle call — is refused, so A makes no settle call at all;
B then settles it, once. Without the fence, SERVED → SETTLING is a legal move and A would settle.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import aiohttp

from paygate import wire
from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.ledger import EventAction, PaymentState
from paygate.x402.models import ResourceInfo
from paygate.x402.networks import resolve_network
from paygate.x402.offers import Acceptance, PaymentTerms, challenge
from paygate.x402.processor import PaymentProcessor
from paygate.x402.session import PaymentSession
from paygate.x402.settlement import SettleAfterReply
from tests.fixtures.chain import encode_header, sign_v2_payment
from tests.fixtures.ledger_support import Clock
from tests.fixtures.ledgers import Opener

PRICE = Decimal("0.001")
LEASE = 10.0
RESOURCE = ResourceInfo(url="http://127.0.0.1/v1/chat/completions")


async def test_a_replica_that_lost_its_lease_makes_no_settle_call(
    ledger_store: Opener, facilitator, usdc, payer, seller
) -> None:
    clock = Clock(now=time.time())
    network = resolve_network("base-sepolia")
    assert network.usdc is not None
    terms = PaymentTerms(pay_to=seller, accepted=(Acceptance(network, network.usdc),))
    async with aiohttp.ClientSession() as session:

        async def replica(name: str) -> tuple[PaymentProcessor, Any]:
            ledger = await ledger_store(clock=clock, replica=name, lease_seconds=LEASE)
            processor = PaymentProcessor(
                terms=terms,
                ledger=ledger,
                settler=FacilitatorSettler(session, facilitator.url, timeout=5, settle_timeout=10),
                settlement=SettleAfterReply(),
            )
            return processor, ledger

        (a, _), (b, ledger_b) = await replica("a"), await replica("b")
        accepted = challenge(terms.offers(PRICE), RESOURCE, error="x").v2.accepts[0].wire()
        header = encode_header(sign_v2_payment(payer, accepted, resource=RESOURCE.url))
        session = await a.admit(
            {wire.PAYMENT_SIGNATURE: header}, price=PRICE, resource=RESOURCE, route="chat"
        )
        assert isinstance(session, PaymentSession), session
        admission = session.admission
        await a.settlements.mark_served(admission)  # the reply went out: settlement is owed
        assert admission.record is not None
        assert (admission.record.state, admission.record.owner) == (PaymentState.SERVED, "a")

        clock.now += LEASE + 1  # A is frozen: no renewal, its lease runs out
        (claimed,) = await ledger_b.claim_unfinished(min_age=0)
        assert (claimed.owner, claimed.lease) == ("b", admission.record.lease + 1)

        # A wakes up and goes on with its settlement.
        assert await a.settlements.settle_now(admission) is None
        assert facilitator.stats.calls("settle") == 0  # refused before the call
        assert await a.recovery.renew_leases() == 0  # and it holds nothing any more

        assert await b.recovery.reconcile_once(min_age=0, adopted=[claimed]) == 1
        done = await ledger_b.get(claimed.id)
        history = await ledger_b.history(claimed.id)
    assert done is not None
    assert (done.state, done.owner) == (PaymentState.SETTLED, None)
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == 1000
    after_claim = history[[e.action for e in history].index(EventAction.CLAIMED) :]
    assert {e.replica for e in after_claim} == {"b"}
    assert not [e for e in history if e.replica == "a" and e.state is PaymentState.SETTLING]
