"""A voucher request's signed reply receipt (chain mode, a real anvil, a software receipt key).

The reply receipt states no channel state and, for a charge made in the ledger, no transaction:
it is signed before the charge and kept in the one transaction that records the charge and
SETTLED. When that transaction is not made, the usual steps charge and the receipt is kept on
its own; when the charge is refused for good the reply is withheld and its receipt is neither
kept nor given out. In every case the receipt the caller gets is the one the ledger keeps."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

from enclave import SoftwareKey, receipts
from enclave.tlog import merkle
from paygate import wire
from paygate.server.receipts import ReceiptIssuer
from paygate.x402.ledger import LedgerUnavailable, PaymentState
from paygate.x402.ledger_sqlite import SqliteLedger
from paygate.x402.schemes.batch_settlement import store as channel_store
from paygate.x402.schemes.batch_settlement.store import CHARGE_LOST, ChannelStore
from paygate.x402.settlements import Settlements
from tests.fixtures.batch_settlement_support import chain_batch, header_for, opened_channel
from tests.fixtures.payment_support import (
    PRICE_ATOMIC,
    post,
    receipt_of,
    records,
    until,
)
from tests.fixtures.tlog_support import ORIGIN

DEPOSIT = 10 * PRICE_ATOMIC


async def _kept(ledger, payment_id: str) -> list[tuple[str, str]]:
    async with await SqliteLedger.open(ledger, read_only=True) as reader:
        return [(r.kind, r.token) for r in await reader.receipts(payment_id)]


def _calls(monkeypatch) -> list[tuple[str, str, str | None]]:
    """The ledger's transition and add_receipt calls: (call, payment id, receipt token)."""
    seen: list[tuple[str, str, str | None]] = []
    transition, add_receipt = SqliteLedger.transition, SqliteLedger.add_receipt

    async def watched_transition(self, payment_id, to, **change):
        seen.append((f"transition {to.value}", payment_id, change.get("reply_receipt")))
        return await transition(self, payment_id, to, **change)

    async def watched_add_receipt(self, payment_id, kind, token, **more):
        seen.append((f"add_receipt {kind}", payment_id, token))
        return await add_receipt(self, payment_id, kind, token, **more)

    monkeypatch.setattr(SqliteLedger, "transition", watched_transition)
    monkeypatch.setattr(SqliteLedger, "add_receipt", watched_add_receipt)
    return seen


def _published(monkeypatch) -> list[str]:
    """The tokens given to the transparency log (its hook is ReceiptIssuer.publish)."""
    tokens: list[str] = []
    publish = ReceiptIssuer.publish

    async def watched(self, token):
        tokens.append(token)
        await publish(self, token)

    monkeypatch.setattr(ReceiptIssuer, "publish", watched)
    return tokens


async def test_the_reply_receipt_is_kept_in_the_transaction_of_the_charge_and_settled(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    ledger = tmp_path / "payments.db"
    key = SoftwareKey.generate()
    async with chain_batch(seller, ledger, anvil, gas_key, key=key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        seen = _calls(monkeypatch)
        published = _published(monkeypatch)
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body
        token = headers[wire.RECEIPT_HEADER]
        state = receipt_of(headers)["extra"]["channelState"]
        assert state["chargedCumulativeAmount"] == str(2 * PRICE_ATOMIC)
    claims = receipts.verify(token, key.receipt_public_key)
    assert claims["reply_digest"] == receipts.body_digest(body)
    payment = claims["payment"]
    assert (payment["charged"], payment["transaction"]) == (str(PRICE_ATOMIC), "pending")
    settled = [r for r in await records(ledger) if r.nonce == payment["id"]]
    assert [(r.state, r.settled_amount) for r in settled] == [(PaymentState.SETTLED, PRICE_ATOMIC)]
    payment_id = settled[0].id
    # One ledger call after the reservation: the charge, SETTLED and the receipt together.
    assert seen == [("transition settled", payment_id, token)]
    assert await _kept(ledger, payment_id) == [("reply", token)]
    assert published == [token]


async def test_a_charge_not_made_with_settled_still_keeps_the_receipt_the_caller_got(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    ledger = tmp_path / "payments.db"
    key = SoftwareKey.generate()
    real = SqliteLedger.transition
    armed: list[bool] = []

    async def transition(self, payment_id, to, **change):
        if to is PaymentState.SETTLED and armed and change.get("write") is not None:
            armed.clear()  # the one transaction with the charge fails; nothing is recorded
            raise LedgerUnavailable("the disk failed")
        return await real(self, payment_id, to, **change)

    monkeypatch.setattr(SqliteLedger, "transition", transition)
    async with chain_batch(seller, ledger, anvil, gas_key, key=key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        armed.append(True)
        published = _published(monkeypatch)
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body
        assert not armed
        token = headers[wire.RECEIPT_HEADER]
        state = receipt_of(headers)["extra"]["channelState"]
        assert state["chargedCumulativeAmount"] == str(2 * PRICE_ATOMIC)
    payment = receipts.verify(token, key.receipt_public_key)["payment"]
    assert (payment["charged"], payment["transaction"]) == (str(PRICE_ATOMIC), "pending")
    (settled,) = [r for r in await records(ledger) if r.nonce == payment["id"]]
    assert (settled.state, settled.settled_amount) == (PaymentState.SETTLED, PRICE_ATOMIC)
    assert await _kept(ledger, settled.id) == [("reply", token)]
    assert published == [token]  # logged once, by the usual steps' path


async def test_a_charge_refused_for_good_withholds_the_reply_and_keeps_no_receipt(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    ledger = tmp_path / "payments.db"
    key = SoftwareKey.generate()

    async def lost(*args, **kwargs):
        raise ValueError(CHARGE_LOST)

    async with chain_batch(seller, ledger, anvil, gas_key, key=key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        # The charge cannot go with SETTLED (the channel as taken is not chargeable) and the
        # store refuses it: the voucher's charge was lost (store.ChannelStore.commit).
        monkeypatch.setattr(channel_store, "_fits", lambda *args: False)
        monkeypatch.setattr(ChannelStore, "commit", lost)
        published = _published(monkeypatch)
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 402, body
        assert wire.RECEIPT_HEADER not in headers
        assert headers[wire.ERROR_HEADER] == "settlement_failed"
        assert receipt_of(headers)["errorReason"] == CHARGE_LOST
        assert published == []  # signed before the charge, never given out nor logged
    (failed,) = [r for r in await records(ledger) if r.state is PaymentState.FAILED]
    assert failed.error == CHARGE_LOST
    assert await _kept(ledger, failed.id) == []


async def test_a_caller_gone_during_the_charge_leaves_its_kept_receipt_logged(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The caller disconnects while the charge's transaction (shielded: it goes on) is being
    made: the reply receipt that transaction keeps is logged all the same, so the ledger never
    keeps a reply receipt the transparency log was not given (its periods would miss the
    charge it states)."""
    ledger = tmp_path / "payments.db"
    key = SoftwareKey.generate()
    real_transition, real_finish = SqliteLedger.transition, Settlements.finish
    charging, ended = asyncio.Event(), asyncio.Event()
    gone: list[bool] = []
    armed: list[bool] = []

    async def transition(self, payment_id, to, **change):
        if to is PaymentState.SETTLED and armed and change.get("write") is not None:
            charging.set()
            await asyncio.wait_for(ended.wait(), 10)  # the request ends (cancelled) first
        return await real_transition(self, payment_id, to, **change)

    async def finish(self, admission, *, succeeded, caller_gone):
        gone.append(caller_gone)
        await real_finish(self, admission, succeeded=succeeded, caller_gone=caller_gone)
        ended.set()

    monkeypatch.setattr(SqliteLedger, "transition", transition)
    logged = {"transparency_log": True, "log_origin": ORIGIN, "log_receipt_period": 3600}
    async with chain_batch(seller, ledger, anvil, gas_key, key=key, **logged) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        monkeypatch.setattr(Settlements, "finish", finish)
        armed.append(True)
        published = _published(monkeypatch)
        caller = asyncio.create_task(post(stack, header_for(required, channel.pay(offer))))
        await asyncio.wait_for(charging.wait(), 10)
        caller.cancel()  # the caller goes away: its connection closes, its handler is cancelled
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        await asyncio.wait_for(ended.wait(), 10)
        assert gone == [True]
        await until(ledger, lambda found: sum(r.state is PaymentState.SETTLED for r in found) == 2)
        for _ in range(40):  # the settlement's task goes on after its record (bounded)
            if published:
                break
            await asyncio.sleep(0.05)
    payment_id = max(r.id for r in await records(ledger) if r.state is PaymentState.SETTLED)
    kept = await _kept(ledger, payment_id)
    assert [kind for kind, _ in kept] == ["reply"]
    assert published == [kept[0][1]]
    # In the log's own store (the ledger's database): the receipt's leaf, once.
    leaf = merkle.leaf_hash(receipts.signed_bytes(kept[0][1]))
    with contextlib.closing(sqlite3.connect(ledger, timeout=10)) as db:
        leaves = [bytes(row[0]) for row in db.execute("SELECT leaf FROM tlog_receipts")]
    assert leaves.count(leaf) == 1


async def test_a_charge_whose_channel_moved_keeps_no_receipt_when_then_refused(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The one transaction is tried (the receipt in it) but the channel changed since it was
    taken: its compare-and-set fails and the whole transaction, the receipt too, is rolled
    back; the usual steps' charge is then refused for good and the reply withheld: no receipt
    is left in the ledger, none logged."""
    ledger = tmp_path / "payments.db"
    key = SoftwareKey.generate()
    real = SqliteLedger.transition
    armed: list[bool] = []
    tried: list[str | None] = []

    async def transition(self, payment_id, to, **change):
        if to is PaymentState.SETTLED and armed and change.get("write") is not None:
            armed.clear()
            tried.append(change.get("reply_receipt"))
            with contextlib.closing(sqlite3.connect(ledger, timeout=10)) as db, db:
                db.execute("UPDATE bs_channels SET version = version + 1")  # another's change
        return await real(self, payment_id, to, **change)

    async def lost(*args, **kwargs):
        raise ValueError(CHARGE_LOST)

    monkeypatch.setattr(SqliteLedger, "transition", transition)
    async with chain_batch(seller, ledger, anvil, gas_key, key=key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        monkeypatch.setattr(ChannelStore, "commit", lost)
        published = _published(monkeypatch)
        armed.append(True)
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 402, body
        assert headers[wire.ERROR_HEADER] == "settlement_failed"
        assert wire.RECEIPT_HEADER not in headers
        assert published == []
    assert len(tried) == 1
    assert tried[0] is not None  # the receipt was in the transaction tried
    (failed,) = [r for r in await records(ledger) if r.state is PaymentState.FAILED]
    assert await _kept(ledger, failed.id) == []
