"""The economics store on both ledgers (SQLite file, PostgreSQL 15): what two replicas sharing
one store see of each other's tokens, claims and logins."""

from __future__ import annotations

import asyncio

from paygate.economics.open_store import economics_store
from paygate.economics.store import LimitEvent, PaymentFilter
from paygate.x402.ledger import PaymentState

PAYER = "0x" + "11" * 20
OTHER = "0x" + "22" * 20
ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"


async def _reserve(ledger, payer: str, nonce: int, *, model: str | None = None, amount=1000):
    return await ledger.reserve(
        network="eip155:84532",
        asset=ASSET,
        payer=payer,
        nonce="0x" + f"{nonce:064x}",
        pay_to=OTHER,
        amount=amount,
        x402_version=2,
        route="chat.completions",
        payload="{}",
        requirements="{}",
        idempotency_key=None,
        scheme="upto" if model else "exact",
        model=model,
    )


async def test_tokens_recorded_by_one_replica_count_for_another(ledger_store):
    a = economics_store(await ledger_store(replica="a"))
    b = economics_store(await ledger_store(replica="b"))
    await a.record_tokens(payer=PAYER, model="m1", tokens_in=10, tokens_out=5)
    await b.record_tokens(payer=PAYER, model="m2", tokens_in=1, tokens_out=2)
    await b.record_tokens(payer=OTHER, model="m1", tokens_in=100, tokens_out=0)
    since = a.now() - 60
    assert (await b.tokens(since=since, payer=PAYER)).tokens_in == 11
    assert (await a.tokens(since=since, payer=PAYER, model="m1")).tokens_out == 5
    assert (await a.tokens(since=since, model="m1")).tokens_in == 110
    assert (await a.tokens(since=a.now() + 1, payer=PAYER)).tokens_in == 0
    top = await a.top_token_payers(since=since, limit=10)
    assert [p.payer for p in top] == [OTHER, PAYER]


async def test_an_alert_key_is_claimed_once_across_replicas(ledger_store):
    a = economics_store(await ledger_store(replica="a"))
    b = economics_store(await ledger_store(replica="b"))
    won = await asyncio.gather(*(s.claim_alert("review:x") for s in (a, b, a, b)))
    assert sorted(won) == [False, False, False, True]


async def test_a_login_is_taken_once_and_never_after_it_expires(ledger_store):
    a = economics_store(await ledger_store(replica="a"))
    b = economics_store(await ledger_store(replica="b"))
    await a.put_login("h1", a.now() + 60)
    await a.put_login("h2", a.now() - 1)
    assert await b.take_login("h1")
    assert not await a.take_login("h1")
    assert not await a.take_login("h2")  # expired
    assert not await a.take_login("never-issued")


async def test_spend_and_search_filters(ledger_store):
    ledger = await ledger_store(replica="a")
    store = economics_store(ledger)
    one = await _reserve(ledger, PAYER, 1, model="<b>m</b>")
    two = await _reserve(ledger, PAYER, 2)
    await _reserve(ledger, OTHER, 3)
    await ledger.transition(two.id, PaymentState.RELEASED)
    assert await store.spent(payer=one.payer, asset=ASSET, since=0) == 1000  # released: 0
    found = await store.search(PaymentFilter(payer=one.payer), limit=10)
    assert {r.id for r in found} == {one.id, two.id}
    found = await store.search(PaymentFilter(scheme="upto", model="<b>m</b>"), limit=10)
    assert [r.id for r in found] == [one.id]
    found = await store.search(PaymentFilter(state=PaymentState.RELEASED), limit=10)
    assert [r.id for r in found] == [two.id]
    assert await store.search(PaymentFilter(since=store.now() + 10), limit=10) == []
    spenders = await store.top_spenders(since=0, limit=10)
    assert [(s.payer, s.spent) for s in spenders] == [
        (one.payer, 1000),
        (ledger_payer(OTHER), 1000),
    ]


def ledger_payer(address: str) -> str:
    from eth_utils import to_checksum_address

    return to_checksum_address(address)


async def test_limit_events_newest_first(ledger_store):
    store = economics_store(await ledger_store(replica="a"))
    for index in range(3):
        await store.record_limit_event(
            LimitEvent(float(index), "tokens", "*", PAYER, None, index % 2 == 0, f"e{index}")
        )
    events = await store.limit_events(since=1, limit=10)
    assert [e.detail for e in events] == ["e2", "e1"]
    assert [e.enforced for e in events] == [True, False]


async def test_settle_latencies_leave_out_vouchers_charged_in_the_ledger(ledger_store):
    """A batch-settlement voucher's charge is SERVED, SETTLING and SETTLED in one ledger
    transaction: no settlement with a latency (its money moves at the channel's claim;
    docs/CONSOLE.md). Kept in its row, it is not read; nor is one whose history is in
    payment_events (reserved again after a release: a withheld reply's retry). An exact
    payment's settlement is counted, SETTLING to SETTLED."""
    from paygate.x402.ledger import PaymentState as S
    from tests.fixtures.ledger_support import Clock, request, tx

    clock = Clock()
    ledger = await ledger_store(clock=clock, replica="one")
    store = economics_store(ledger)
    voucher = request(1, scheme="batch-settlement")
    released = await ledger.reserve(**voucher)
    await ledger.transition(released.id, S.RELEASED, lease=released.lease)
    again = await ledger.reserve(**voucher)  # the released row, claimed again
    assert again.id == released.id
    charged = (S.VERIFIED, S.SERVED, S.SETTLING)
    await ledger.transition(
        again.id, S.SETTLED, via=charged, lease=again.lease, settled_amount=1000
    )
    exact = await ledger.reserve(**request(2))
    await ledger.transition(exact.id, S.SETTLING, via=charged[:2], lease=exact.lease)
    clock.now += 3
    await ledger.transition(
        exact.id, S.SETTLED, lease=exact.lease, transaction=tx(2), settled_amount=1000
    )
    assert await store.settle_latencies(since=0) == [3.0]
