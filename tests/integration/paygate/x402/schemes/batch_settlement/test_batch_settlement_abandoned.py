"""`batch-settlement` after a replica died mid-request (chain mode, a real anvil, the real
gateway and ledger, the official SDK's batch-settlement client): the reconciler that releases
the dead replica's reservation gives back the channel hold that reservation took, in the same
transaction — the payer's next voucher is served at once, not refused `…_channel_busy` until
the hold runs out (PAYGATE_MAX_TIMEOUT_SECONDS, 300 s by default). A refund refused busy says
when to ask again, as a paid request does."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from paygate import wire
from paygate.x402.leases import HeldLeases
from paygate.x402.processor import PaymentProcessor
from paygate.x402.schemes.batch_settlement.bound import BoundBatchSettlement
from tests.fixtures.batch_settlement_support import (
    batch_offer,
    chain_batch,
    claimer,
    header_for,
    opened_channel,
    sdk_batch_client,
    sdk_batch_scheme,
)
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    post,
    receipt_of,
)

DEPOSIT = 10 * PRICE_ATOMIC
LEASE = 3.0  # the dying replica's payment leases: they run out soon after it is gone
BUSY = "invalid_batch_settlement_evm_channel_busy"
# A second model at twice the price: the payer's next voucher there is not the one held.
DOUBLE = "fake-llama-double"
PRICES = {"model_prices": {DOUBLE: "0.002"}}
DOUBLE_BODY = {**CHAT_BODY, "model": DOUBLE}


def _required_of(headers: Any) -> dict[str, Any]:
    """A 402's PAYMENT-REQUIRED, decoded."""
    return json.loads(base64.b64decode(headers[wire.PAYMENT_REQUIRED]))


async def _channel(ledger, anvil, gas_key, channel_id: str):
    async with claimer(ledger, anvil, gas_key) as channels:
        found = await channels.store.get(channel_id)
    assert found is not None
    return found


def _dies_while_verifying(monkeypatch) -> tuple[list[bool], asyncio.Event]:
    """Armed (the list holds True), the next voucher's verify never ends — after the channel
    was taken with its reservation — and the process "dies" there: cut short, it writes
    nothing more (no release of the reservation or the hold), as a killed replica would."""
    armed: list[bool] = []
    verifying = asyncio.Event()
    real = BoundBatchSettlement.verify

    async def verify(self, settler, payment, requirements):
        answer = await real(self, settler, payment, requirements)
        if armed:
            armed.clear()
            verifying.set()
            await asyncio.sleep(120)
        return answer

    async def dead(self, admission, record) -> None:
        return None

    monkeypatch.setattr(BoundBatchSettlement, "verify", verify)
    monkeypatch.setattr(PaymentProcessor, "_let_down", dead)
    return armed, verifying


@pytest.mark.parametrize(
    ("store", "next_replica"),
    [("sqlite", "b"), ("sqlite", "a"), ("postgresql", "b")],
    ids=["sqlite-another-replica", "sqlite-restarted", "postgresql-another-replica"],
)
async def test_a_replica_that_died_holding_a_channel_leaves_it_free_once_released(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch, request, store, next_replica
):
    """Replica "a" dies while a voucher's request holds the channel (taken with its
    reservation). The next replica to start — another one once a's lease ran out, or "a"
    itself restarted — releases that reservation and, with it, the channel: the payer's next
    voucher (another one: a dearer model) is served at once and charged from where the
    channel stood; the voucher cut short is never charged."""
    ledger = tmp_path / "payments.db" if store == "sqlite" else request.getfixturevalue("pg_url")
    armed, verifying = _dies_while_verifying(monkeypatch)
    scheme = sdk_batch_scheme(payer, deposit=DEPOSIT)
    async with sdk_batch_client(scheme) as client:
        async with chain_batch(
            seller, ledger, anvil, gas_key, replica_id="a", lease_seconds=LEASE, **PRICES
        ) as dying:
            first = await client.post(dying.url + CHAT, json=CHAT_BODY)
            assert first.status_code == 200, first.text
            channel_id = receipt_of(first.headers)["extra"]["channelState"]["channelId"]
            armed.append(True)
            cut = asyncio.ensure_future(client.post(dying.url + CHAT, json=CHAT_BODY))
            await asyncio.wait_for(verifying.wait(), timeout=30)
            held = await _channel(ledger, anvil, gas_key, channel_id)
            assert held.pending_owner is not None  # taken with the reservation
            cut.cancel()
            await asyncio.gather(cut, return_exceptions=True)
        # "a" is gone, its reservation and the hold left behind; its lease runs out unrenewed.
        assert (await _channel(ledger, anvil, gas_key, channel_id)).pending_owner is not None
        await asyncio.sleep(LEASE + 0.5)
        async with chain_batch(
            seller, ledger, anvil, gas_key, replica_id=next_replica, **PRICES
        ) as survivor:
            # Its start released the reservation (the reconciler's step), and the hold with it.
            freed = await _channel(ledger, anvil, gas_key, channel_id)
            assert (freed.pending_owner, freed.charged) == (None, PRICE_ATOMIC)
            served = survivor.fake.completed["POST /v1/chat/completions"]
            response = await client.post(survivor.url + CHAT, json=DOUBLE_BODY)
            assert response.status_code == 200, (response.headers, response.text)
            state = receipt_of(response.headers)["extra"]["channelState"]
            assert state["chargedCumulativeAmount"] == str(3 * PRICE_ATOMIC)
            assert survivor.fake.completed["POST /v1/chat/completions"] == served + 1


async def test_a_refund_on_a_channel_another_request_holds_is_told_when_to_retry(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """A refund is an operation, answered without serving the route; refused because another
    request holds the channel, it carries a Retry-After as the same refusal of a paid request
    does (the hold lasts one request); once that request let go, the refund asked again is
    made."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, _, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        async with claimer(ledger, anvil, gas_key) as other:
            assert await other.store.take(channel.channel_id, "another request") is not None
            status, headers, _ = await post(stack, header_for(required, channel.refund()))
            assert (status, headers[wire.ERROR_HEADER], headers.get("Retry-After")) == (
                402,
                BUSY,
                "1",
            )
            await other.store.release(channel.channel_id, "another request")
        status, headers, body = await post(stack, header_for(required, channel.refund()))
        assert status == 200, body
        assert int(receipt_of(headers)["amount"]) == DEPOSIT - PRICE_ATOMIC


async def test_a_refund_under_a_stale_voucher_carries_the_channel_state_to_resync(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """A refund's voucher must be the channel's charges exactly; a payer that lost count is
    refused `…_cumulative_amount_mismatch` with the channel's state and last voucher (as a
    paid request is), which the SDK's refund resynchronises from before asking again."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, _, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        channel.charged = 0  # the payer lost count of the first request's charge
        status, headers, _ = await post(stack, header_for(required, channel.refund()))
        assert (status, headers[wire.ERROR_HEADER]) == (
            402,
            "invalid_batch_settlement_evm_cumulative_amount_mismatch",
        )
        corrective = batch_offer(_required_of(headers))["extra"]
        assert corrective["channelState"]["chargedCumulativeAmount"] == str(PRICE_ATOMIC)
        assert corrective["voucherState"]["signedMaxClaimable"] == str(PRICE_ATOMIC)
        channel.charged = PRICE_ATOMIC
        status, headers, body = await post(stack, header_for(required, channel.refund()))
        assert status == 200, body


async def test_a_late_verify_on_a_replica_whose_reservation_was_released_takes_nothing(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """Replica "a" freezes in a voucher's verify (its leases unrenewed) and is taken for dead:
    another replica's reconciler releases its reservation and the channel, and the payer goes
    on there. When "a" wakes up and its verify goes on, it neither takes the channel back (a
    hold that would refuse the payer busy) nor charges its voucher (its lease is lost)."""
    ledger = tmp_path / "payments.db"
    frozen: list[bool] = []
    verifying, wake = asyncio.Event(), asyncio.Event()
    real_verify = BoundBatchSettlement.verify
    real_renew = HeldLeases.renew_all

    async def verify(self, settler, payment, requirements):
        if frozen and not verifying.is_set():  # a's verify (b's go on)
            verifying.set()
            await asyncio.wait_for(wake.wait(), timeout=60)
        return await real_verify(self, settler, payment, requirements)

    async def renew_all(self) -> int:
        return 0 if frozen else await real_renew(self)

    monkeypatch.setattr(BoundBatchSettlement, "verify", verify)
    monkeypatch.setattr(HeldLeases, "renew_all", renew_all)
    scheme = sdk_batch_scheme(payer, deposit=DEPOSIT)
    async with (
        sdk_batch_client(scheme) as client,
        chain_batch(
            seller, ledger, anvil, gas_key, replica_id="a", lease_seconds=LEASE, **PRICES
        ) as a,
    ):
        first = await client.post(a.url + CHAT, json=CHAT_BODY)
        assert first.status_code == 200, first.text
        channel_id = receipt_of(first.headers)["extra"]["channelState"]["channelId"]
        frozen.append(True)
        late = asyncio.ensure_future(client.post(a.url + CHAT, json=CHAT_BODY))
        await asyncio.wait_for(verifying.wait(), timeout=30)
        assert (await _channel(ledger, anvil, gas_key, channel_id)).pending_owner
        await asyncio.sleep(LEASE + 0.5)  # a's lease runs out
        async with chain_batch(seller, ledger, anvil, gas_key, replica_id="b", **PRICES) as b:
            assert (await _channel(ledger, anvil, gas_key, channel_id)).pending_owner is None
            response = await client.post(b.url + CHAT, json=DOUBLE_BODY)
            assert response.status_code == 200, (response.headers, response.text)
            frozen.clear()
            wake.set()  # a wakes up: its verify goes on
            await asyncio.gather(late, return_exceptions=True)
            after = await _channel(ledger, anvil, gas_key, channel_id)
            assert (after.pending_owner, after.charged) == (None, 3 * PRICE_ATOMIC)
            response = await client.post(b.url + CHAT, json=CHAT_BODY)
            assert response.status_code == 200, (response.headers, response.text)
            state = receipt_of(response.headers)["extra"]["channelState"]
            assert state["chargedCumulativeAmount"] == str(4 * PRICE_ATOMIC)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_late_verify_whose_reservation_found_the_channel_held_takes_nothing_once_released(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch, request, store
):
    """Replica "a" reserves a voucher while another request holds the channel (its
    reservation takes nothing: the take waits for its verify), then freezes before that verify
    (its leases unrenewed). The other request ends; "a" is taken for dead and another
    replica's reconciler releases its reservation — with nothing of the channel to give back.
    When "a" wakes up its verify must not take the channel now free: that hold would be
    nobody's to give back (its reservation is gone) and would refuse the payer busy until it
    ran out. The payer's voucher, sent again, is served."""
    ledger = tmp_path / "payments.db" if store == "sqlite" else request.getfixturevalue("pg_url")
    frozen: list[bool] = []
    verifying, wake = asyncio.Event(), asyncio.Event()
    real_verify = BoundBatchSettlement.verify
    real_renew = HeldLeases.renew_all

    async def verify(self, settler, payment, requirements):
        if frozen and not verifying.is_set():  # a's verify (b's go on)
            verifying.set()
            await asyncio.wait_for(wake.wait(), timeout=60)
        return await real_verify(self, settler, payment, requirements)

    async def renew_all(self) -> int:
        return 0 if frozen else await real_renew(self)

    monkeypatch.setattr(BoundBatchSettlement, "verify", verify)
    monkeypatch.setattr(HeldLeases, "renew_all", renew_all)
    scheme = sdk_batch_scheme(payer, deposit=DEPOSIT)
    async with (
        sdk_batch_client(scheme) as client,
        chain_batch(
            seller, ledger, anvil, gas_key, replica_id="a", lease_seconds=LEASE, **PRICES
        ) as a,
    ):
        first = await client.post(a.url + CHAT, json=CHAT_BODY)
        assert first.status_code == 200, first.text
        channel_id = receipt_of(first.headers)["extra"]["channelState"]["channelId"]
        async with claimer(ledger, anvil, gas_key) as other:
            assert await other.store.take(channel_id, "another request") is not None
            frozen.append(True)
            late = asyncio.ensure_future(client.post(a.url + CHAT, json=CHAT_BODY))
            await asyncio.wait_for(verifying.wait(), timeout=30)
            held = await other.store.get(channel_id)
            assert held is not None
            assert held.pending_owner == "another request"
            await asyncio.sleep(LEASE + 0.5)  # a's lease runs out
            await other.store.release(channel_id, "another request")
        async with chain_batch(seller, ledger, anvil, gas_key, replica_id="b", **PRICES) as b:
            # b's start released a's reservation (the reconciler's step).
            frozen.clear()
            wake.set()  # a wakes up: its verify goes on
            answered = (await asyncio.gather(late, return_exceptions=True))[0]
            assert getattr(answered, "status_code", None) != 200
            after = await _channel(ledger, anvil, gas_key, channel_id)
            assert (after.pending_owner, after.charged) == (None, PRICE_ATOMIC)
            served = b.fake.completed["POST /v1/chat/completions"]
            response = await client.post(b.url + CHAT, json=CHAT_BODY)
            assert response.status_code == 200, (response.headers, response.text)
            state = receipt_of(response.headers)["extra"]["channelState"]
            assert state["chargedCumulativeAmount"] == str(2 * PRICE_ATOMIC)
            assert b.fake.completed["POST /v1/chat/completions"] == served + 1
