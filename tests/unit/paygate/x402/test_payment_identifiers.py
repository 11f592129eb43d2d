"""The payment-identifier rules (paygate.x402.idempotency) over both real ledger stores: what a
retry with a known identifier is answered, and when the identifier is free again."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import Any

import pytest

from paygate.x402.idempotency import PaymentIdentifiers, record_fingerprint
from paygate.x402.ledger import PaymentRecord, PaymentState
from paygate.x402.ledger_base import Ledger
from paygate.x402.models import SettleResponse
from paygate.x402.results import Receipt
from tests.fixtures.ledger_support import PATHS, request, tx
from tests.fixtures.ledgers import Opener

S = PaymentState
KEY = "pay_7d5d747be160e280504c099d984bcfe0"
TTL = 3600.0


@pytest.fixture
async def ledger(ledger_store: Opener) -> Ledger:
    return await ledger_store()


def _receipt(record: PaymentRecord) -> Receipt:
    return Receipt(
        record.x402_version,
        SettleResponse(
            success=record.state is S.SETTLED,
            error_reason=record.error,
            transaction=record.transaction or "",
            network=record.network,
        ),
    )


def gate(ledger: Ledger, *, now: float | None = None, settles: bool = True) -> PaymentIdentifiers:
    return PaymentIdentifiers(
        ledger,
        receipt=_receipt,
        settles=settles,
        ttl=TTL,
        clock=(lambda: now) if now is not None else time.time,
    )


async def paid(ledger: Ledger, state: PaymentState, n: int = 1, **kw: Any) -> PaymentRecord:
    record = await ledger.reserve(**request(n, idempotency_key=KEY, **kw))
    for step in PATHS[state]:
        record = await ledger.transition(
            record.id, step, transaction=tx(n) if step is S.SETTLED else None
        )
    return record


async def test_unknown_identifier_goes_on(ledger: Ledger) -> None:
    assert await gate(ledger).outcome(KEY, "f" * 64) is None


@pytest.mark.parametrize(
    ("state", "status", "code"),
    [
        (S.RESERVED, 409, "payment_in_progress"),
        (S.VERIFIED, 409, "payment_in_progress"),
        (S.SERVED, 409, "payment_already_served"),
        (S.SETTLING, 409, "payment_already_served"),
        (S.SETTLED, 409, "payment_already_served"),
        (S.FAILED, 402, "settlement_failed"),
    ],
)
async def test_a_retry_gets_the_recorded_outcome(
    ledger: Ledger, state: PaymentState, status: int, code: str
) -> None:
    record = await paid(ledger, state)
    if state is S.SERVED:  # served and over: its request let it go for a reconciler
        record = await ledger.let_go(record.id, record.lease)
    refusal = await gate(ledger).outcome(KEY, record_fingerprint(record))
    assert refusal is not None
    assert (refusal.status, refusal.code) == (status, code)
    if state is S.SETTLED:  # the receipt of the one settlement
        receipt = json.loads(base64.b64decode(refusal.headers["PAYMENT-RESPONSE"]))
        assert (receipt["success"], receipt["transaction"]) == (True, tx(1))
    assert (await ledger.by_idempotency_key(KEY)) == record  # nothing changed


async def test_a_retry_while_a_stream_with_its_progress_recorded_goes_out_waits(
    ledger: Ledger,
) -> None:
    """A stream's progress is recorded SERVED after its first chunk, its lease held live while
    it goes out: a retry then is in progress (Retry-After, its outcome to come), not served
    (no receipt yet, not settled); its replica presumed dead (lease ran out), it is owed."""
    record = await paid(ledger, S.SERVED)
    now = time.time()
    refusal = await gate(ledger, now=now).outcome(KEY, record_fingerprint(record))
    assert refusal is not None
    assert (refusal.status, refusal.code) == (409, "payment_in_progress")
    assert "Retry-After" in refusal.headers
    assert not refusal.server_side
    assert record.lease_until is not None
    later = gate(ledger, now=record.lease_until + 1)
    refusal = await later.outcome(KEY, record_fingerprint(record))
    assert refusal is not None
    assert (refusal.status, refusal.code) == (409, "payment_already_served")


async def test_another_fingerprint_is_a_conflict(ledger: Ledger) -> None:
    record = await paid(ledger, S.SETTLED)
    other = [
        record_fingerprint(await paid_copy(record, route="completions")),
        record_fingerprint(await paid_copy(record, amount=2000)),
        record_fingerprint(await paid_copy(record, payer="0x" + "ab" * 20)),
    ]
    for fingerprint in other:
        refusal = await gate(ledger).outcome(KEY, fingerprint)
        assert refusal is not None
        assert (refusal.status, refusal.code) == (409, "idempotency_key_reused")


async def paid_copy(record: PaymentRecord, **changes: Any) -> PaymentRecord:
    return dataclasses.replace(record, **changes)


async def test_a_released_payment_frees_its_identifier(ledger: Ledger) -> None:
    record = await paid(ledger, S.RELEASED)
    assert await gate(ledger).outcome(KEY, "any fingerprint") is None
    assert await ledger.by_idempotency_key(KEY) is None
    # The retry's new authorization takes the identifier; the old record keeps its history.
    second = await ledger.reserve(**request(2, idempotency_key=KEY))
    assert (await ledger.by_idempotency_key(KEY)) == second
    assert (await ledger.get(record.id)) is not None


async def test_an_ended_payment_is_forgotten_after_the_ttl_and_an_open_one_never(
    ledger: Ledger,
) -> None:
    settled = await paid(ledger, S.SETTLED)
    later = time.time() + TTL + 60
    assert await gate(ledger, now=time.time() + TTL - 60).outcome(KEY, "x") is not None
    assert await gate(ledger, now=later).outcome(KEY, "x") is None
    assert await ledger.by_idempotency_key(KEY) is None
    assert (await ledger.get(settled.id)).state is S.SETTLED  # the payment itself stays

    # Settling (outcome unknown, maybe under review): forgetting could charge twice.
    open_ = await paid(ledger, S.SETTLING, n=3)
    refusal = await gate(ledger, now=later).outcome(KEY, record_fingerprint(open_))
    assert refusal is not None
    assert refusal.code == "payment_already_served"
    assert await ledger.by_idempotency_key(KEY) == open_


async def test_verify_only_ends_served(ledger: Ledger) -> None:
    await paid(ledger, S.SERVED)
    later = time.time() + TTL + 60
    assert await gate(ledger, now=later, settles=True).outcome(KEY, "x") is not None
    assert await gate(ledger, now=later, settles=False).outcome(KEY, "x") is None


async def test_forgetting_is_conditional_on_the_state_it_was_read_in(ledger: Ledger) -> None:
    record = await paid(ledger, S.VERIFIED)
    # A caller that read it RELEASED a moment ago must not free it now that it moved on.
    freed = await ledger.forget_idempotency_key(
        KEY, payment_id=record.id, ended=(S.SETTLED, S.FAILED), before=time.time() + 10
    )
    assert freed is False
    assert (await ledger.by_idempotency_key(KEY)) == record
