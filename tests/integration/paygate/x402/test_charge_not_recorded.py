"""A paid reply whose charge the ledger failed to record — the write that records it (SETTLING
before the settle call, or verify-only's SERVED) refused once by the store (locked too long,
disk full): the ledger is otherwise fine, and the payer is told so (503 `ledger_unavailable`,
"send the payment again"). On real components (a gateway on SQLite, the FAKE model server,
anvil with the SDK's facilitator); the one fault is made in the process, at the ledger's own
``transition``, as the store would raise it.

Nothing may be lost or charged for a reply withheld so: the reservation is released at once
(not left in progress until its lease runs out and a reconciler's pass, up to
``reconcile_interval_seconds`` later, which would refuse the retry the 503 invites), and the
withheld reply is not marked served afterwards by the request's exit (which would charge it and
refuse the retry as already served). The payer's retry of the same authorization is served and
charged once."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from enclave import SoftwareKey, receipts
from enclave.tlog import merkle
from paygate import wire
from paygate.client import AsyncPaygateTransport, SpendPolicy
from paygate.server.receipts import SSE_PREFIX as SIGNED_RECEIPT_LINE
from paygate.tlog.open_store import open_log_store
from paygate.tlog.recovery import RecoveryConfig
from paygate.tlog.service import LogConfig, TransparencyLog
from paygate.x402.inband import SSE_PREFIX as PAYMENT_RECEIPT_LINE
from paygate.x402.ledger import LedgerUnavailable, PaymentState
from paygate.x402.ledger_base import Ledger
from paygate.x402.ledger_store import LedgerLocation
from tests.fixtures.batch_settlement_support import (
    chain_batch,
    claimer,
    sdk_batch_client,
    sdk_batch_scheme,
)
from tests.fixtures.chain import encode_header, sign_v2_payment
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    challenge_of,
    paid_stack,
    post,
    receipt_of,
    records,
    until,
    v2_header,
)
from tests.fixtures.tlog_support import ORIGIN

BATCH = "/v1/batch/chat/completions"
BATCH_BODY = [
    {"model": "fake-llama", "messages": [{"role": "user", "content": "hi"}], "fake": {"chunks": 2}},
    {"model": "fake-llama", "messages": [{"role": "user", "content": "yo"}], "fake": {"chunks": 3}},
]
STREAM_BODY = {**CHAT_BODY, "stream": True, "fake": {"chunks": 4}}


async def _read_cut(url: str, header: str, body: Any) -> tuple[int, bytes]:
    """A stream's status and what arrived of it before it ended or was cut."""
    received = bytearray()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client,
        client.post(url + CHAT, json=body, headers={wire.PAYMENT_SIGNATURE: header}) as response,
    ):
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received.extend(chunk)
        return response.status, bytes(received)


def fail_once(monkeypatch: pytest.MonkeyPatch, into: PaymentState) -> list[str]:
    """The next ledger move into ``into`` is refused as the store would refuse it; returns the
    ids it was refused for."""
    real = Ledger.transition
    refused: list[str] = []

    async def transition(self: Ledger, payment_id: str, to: PaymentState, **kw: Any) -> Any:
        if to is into and not refused:
            refused.append(payment_id)
            raise LedgerUnavailable("the store refused this write (injected)")
        return await real(self, payment_id, to, **kw)

    monkeypatch.setattr(Ledger, "transition", transition)
    return refused


@pytest.mark.parametrize(
    ("mode", "path", "body"),
    [
        ("facilitator", CHAT, CHAT_BODY),
        ("facilitator", CHAT, STREAM_BODY),
        ("facilitator", BATCH, BATCH_BODY),
        ("verify-only", CHAT, CHAT_BODY),
        ("verify-only", BATCH, BATCH_BODY),
    ],
    ids=["exact-buffered", "exact-streamed", "exact-batch", "verify-only", "verify-only-batch"],
)
async def test_a_reply_whose_charge_the_ledger_failed_to_record_is_released_and_the_retry_served(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch, mode, path, body
):
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    async with paid_stack(payment_mode=mode, **settings) as stack:
        required = await challenge_of(stack, path, body)
        offer = required["accepts"][0]
        header = encode_header(sign_v2_payment(payer, offer, resource=required["resource"]["url"]))
        into = PaymentState.SERVED if mode == "verify-only" else PaymentState.SETTLING
        refused = fail_once(monkeypatch, into)
        if body is STREAM_BODY:
            # Its head went before its charge: the stream is cut without its end (no receipt).
            status, raw = await _read_cut(stack.url, header, body)
            assert refused, "the charge's write was not made"
            assert status == 200
            assert b"data:" in raw
            assert PAYMENT_RECEIPT_LINE not in raw
            assert SIGNED_RECEIPT_LINE not in raw
            # Its content went out after its progress was recorded (SERVED, at its first
            # chunk): owed for it as a disconnect there is (not released: the same
            # authorization is not served a second stream), let go for any reconciler.
            await until(ledger, lambda found: found[0].owner is None)
            (owed,) = await records(ledger)
            assert owed.state is PaymentState.SERVED
        else:
            status, headers, raw = await post(stack, header, path=path, json=body)
            assert refused, "the charge's write was not made"
            assert (status, headers.get(wire.ERROR_HEADER)) == (503, "ledger_unavailable"), raw
            assert headers.get("Retry-After")
            assert wire.RECEIPT_HEADER not in headers
            assert wire.PAYMENT_RESPONSE not in headers
            assert b"fake" not in raw  # the model's reply stayed here
        if body is STREAM_BODY:
            monkeypatch.undo()
            async with paid_stack(payment_mode=mode, **settings):  # its start reconciles
                await until(ledger, lambda found: found[0].state is PaymentState.SETTLED)
            (record,) = await records(ledger)
            assert record.state is PaymentState.SETTLED
            assert facilitator.stats.calls("settle") == 1
            assert usdc.balance_of(seller) == int(offer["amount"])
            return
        (withheld,) = await records(ledger)
        assert withheld.state is PaymentState.RELEASED  # at once: nothing charged or held
        assert not withheld.served
        # The retry the 503 invites: the same authorization, served now and charged once.
        status, headers, raw = await post(stack, header, path=path, json=body)
        assert status == 200, (headers.get(wire.ERROR_HEADER), raw)
    (record,) = await records(ledger)
    assert record.served
    if mode == "verify-only":
        assert record.state is PaymentState.SERVED
        assert facilitator.stats.calls("settle") == 0
        return
    assert record.state is PaymentState.SETTLED
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == int(offer["amount"])
    assert int(offer["amount"]) in (PRICE_ATOMIC, 2 * PRICE_ATOMIC)


def _logged_leaves(ledger: Path) -> list[bytes]:
    """The receipt leaves the transparency log (in the ledger's database) has recorded."""
    with contextlib.closing(sqlite3.connect(ledger, timeout=10)) as db:
        return [bytes(row[0]) for row in db.execute("SELECT leaf FROM tlog_receipts")]


async def test_a_withheld_replys_receipt_is_never_published_in_the_transparency_log(
    facilitator, payer, seller, tmp_path, monkeypatch
):
    """Verify-only keeps a whole reply's signed receipt with its SERVED, in one write: that
    write refused, the reply is withheld, and its receipt — signed already — must not reach
    the public log either (it would state a charge for a reply nobody got, and a second
    receipt for the same payment once the retry is served). The retry's receipt is logged."""
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    logged = {"transparency_log": True, "log_origin": ORIGIN, "log_receipt_period": 3600}
    async with paid_stack(payment_mode="verify-only", **settings, **logged) as stack:
        header = await v2_header(stack, payer)
        refused = fail_once(monkeypatch, PaymentState.SERVED)
        status, headers, raw = await post(stack, header)
        assert refused
        assert (status, headers.get(wire.ERROR_HEADER)) == (503, "ledger_unavailable"), raw
        assert _logged_leaves(ledger) == []
        status, headers, raw = await post(stack, header)
        assert status == 200, raw
        token = headers[wire.RECEIPT_HEADER]
        assert _logged_leaves(ledger) == [merkle.leaf_hash(receipts.signed_bytes(token))]


async def test_a_withheld_replys_receipt_is_not_kept_for_the_logs_recovery_to_publish(
    facilitator, payer, seller, tmp_path, monkeypatch
):
    """The log's recovery records every receipt the ledger kept that the log lacks
    (paygate.tlog.recovery: a crash between the two). So a withheld reply's receipt must not be
    kept either — verify-only's SERVED refused once, the receipt was kept on its own — else a
    recovery pass, any replica's, publishes it: a charge for a reply nobody got, beside the
    served retry's. After the retry, the ledger keeps the retry's receipt alone, and a recovery
    pass finds nothing to add."""
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    logged = {"transparency_log": True, "log_origin": ORIGIN, "log_receipt_period": 3600}
    async with paid_stack(payment_mode="verify-only", **settings, **logged) as stack:
        header = await v2_header(stack, payer)
        refused = fail_once(monkeypatch, PaymentState.SERVED)
        status, headers, raw = await post(stack, header)
        assert refused
        assert (status, headers.get(wire.ERROR_HEADER)) == (503, "ledger_unavailable"), raw
        assert _kept_tokens(ledger) == []
        # The retry in the next second: its receipt (issued_at in seconds) differs from the
        # withheld one's, so the log would tell the two apart.
        await asyncio.sleep(1.1)
        status, headers, raw = await post(stack, header)
        assert status == 200, raw
        token = headers[wire.RECEIPT_HEADER]
    assert _kept_tokens(ledger) == [token]
    store = await open_log_store(LedgerLocation(kind="sqlite", path=ledger))
    config = LogConfig(origin=ORIGIN, replica="later", recovery=RecoveryConfig(grace=0.0))
    recovering = TransparencyLog(config, store, SoftwareKey.generate())
    try:
        assert (await recovering.recovery.pass_once()).recorded == 0
    finally:
        await recovering.close()
    assert _logged_leaves(ledger) == [merkle.leaf_hash(receipts.signed_bytes(token))]


def _kept_tokens(ledger: Path) -> list[str]:
    """The signed reply receipts the ledger keeps (what the log's recovery reads)."""
    with contextlib.closing(sqlite3.connect(ledger, timeout=10)) as db:
        return [str(row[0]) for row in db.execute("SELECT token FROM receipts")]


async def test_a_vouchers_charge_the_ledger_failed_to_record_gives_its_channel_back_at_once(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """batch-settlement (chain mode, the SDK's client): the channel's charge and its SETTLING
    both refused once by the store. The reply is withheld (503 `ledger_unavailable`), the
    voucher is not charged, and the hold its reservation took on the channel is given back
    with the release — not left until the reconciler's next pass — so the payer's next
    request on the channel is served at once, and the channel is charged for it alone."""
    ledger = tmp_path / "payments.db"
    scheme = sdk_batch_scheme(payer, deposit=10 * PRICE_ATOMIC)
    async with (
        sdk_batch_client(scheme) as client,
        chain_batch(seller, ledger, anvil, gas_key) as stack,
    ):
        first = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert first.status_code == 200, first.text
        channel_id = receipt_of(first.headers)["extra"]["channelState"]["channelId"]
        charge = fail_once(monkeypatch, PaymentState.SETTLED)
        usual = fail_once(monkeypatch, PaymentState.SETTLING)
        withheld = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert charge, "the channel's charge was not refused"
        assert usual, "the usual SETTLING was not refused"
        assert (withheld.status_code, withheld.headers.get(wire.ERROR_HEADER)) == (
            503,
            "ledger_unavailable",
        ), withheld.text
        assert wire.PAYMENT_RESPONSE not in withheld.headers
        assert wire.RECEIPT_HEADER not in withheld.headers
        again = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert again.status_code == 200, (again.headers, again.text)
        async with claimer(ledger, anvil, gas_key) as channels:
            channel = await channels.store.get(channel_id)
    assert channel is not None
    assert (channel.pending_owner, channel.charged) == (None, 2 * PRICE_ATOMIC)
    found = await records(ledger)
    states = [r.state for r in found]
    assert states.count(PaymentState.SETTLED) == 2  # the first request's, and the retry's
    assert set(states) <= {PaymentState.SETTLED, PaymentState.RELEASED}


@pytest.mark.parametrize("envelope", ["v1", "v2"])
async def test_a_sealed_whole_reply_whose_charge_was_not_recorded_is_refused_in_the_clear(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch, envelope
):
    """paygate's own client, sealed (v1; v2 with a whole reply), its own retry of a withheld
    reply off (on: tests/integration/paygate/client/test_client_withheld.py): the refusal
    comes in the clear with its code and nothing sealed; the app's retry (the client pays anew)
    is served and charged once, the withheld payment released."""
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    spend = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])
    async with paid_stack(**settings) as stack:
        transport = AsyncPaygateTransport(
            envelope=envelope, wallet=payer, spend=spend, withheld_retries=0
        )
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            refused = fail_once(monkeypatch, PaymentState.SETTLING)
            withheld = await http.post(stack.url + CHAT, json=CHAT_BODY)
            assert refused
            assert (withheld.status_code, withheld.headers.get(wire.ERROR_HEADER)) == (
                503,
                "ledger_unavailable",
            )
            assert not wire.is_sealed(withheld.headers.get("content-type"))
            assert wire.RECEIPT_HEADER not in withheld.headers
            assert wire.PAYMENT_RESPONSE not in withheld.headers
            served = await http.post(stack.url + CHAT, json=CHAT_BODY)
            assert served.status_code == 200, served.text
    states = sorted(r.state.value for r in await records(ledger))
    assert states == ["released", "settled"]
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC


def made_but_answer_lost(monkeypatch: pytest.MonkeyPatch, into: PaymentState) -> list[str]:
    """The next ledger move into ``into`` is made, and its answer lost (a PostgreSQL connection
    cut after its COMMIT went: the store raises as for a write not made); returns the ids."""
    real = Ledger.transition
    lost: list[str] = []

    async def transition(self: Ledger, payment_id: str, to: PaymentState, **kw: Any) -> Any:
        moved = await real(self, payment_id, to, **kw)
        if to is into and not lost:
            lost.append(payment_id)
            raise LedgerUnavailable("the connection was lost after the COMMIT (injected)")
        return moved

    monkeypatch.setattr(Ledger, "transition", transition)
    return lost


@pytest.mark.parametrize("mode", ["facilitator", "verify-only"], ids=["exact", "verify-only"])
async def test_a_charge_recorded_whose_answer_was_lost_is_served_not_withheld(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch, mode
):
    """exact: SETTLING was written, only its answer lost; verify-only: SERVED (what its
    operator settles). The ledger holds the charge, so withholding the reply as "nothing
    charged" would charge a reply never sent, and the payer's retry a second time: the ledger
    is asked what it holds, and the reply is served (exact: settled once)."""
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    async with paid_stack(payment_mode=mode, **settings) as stack:
        required = await challenge_of(stack, CHAT, CHAT_BODY)
        offer = required["accepts"][0]
        header = encode_header(sign_v2_payment(payer, offer, resource=required["resource"]["url"]))
        into = PaymentState.SERVED if mode == "verify-only" else PaymentState.SETTLING
        lost = made_but_answer_lost(monkeypatch, into)
        status, headers, raw = await post(stack, header)
        assert lost, "the charge's write was not made"
        assert status == 200, (headers.get(wire.ERROR_HEADER), raw)
        assert wire.RECEIPT_HEADER in headers
    (record,) = await records(ledger)
    assert record.served
    if mode == "verify-only":
        assert (record.state, record.owner) == (PaymentState.SERVED, None)  # its lease let go
        assert facilitator.stats.calls("settle") == 0
        return
    assert receipt_of(headers)["success"] is True
    assert record.state is PaymentState.SETTLED
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == int(offer["amount"])


async def test_a_vouchers_charge_recorded_whose_answer_was_lost_is_served_not_withheld(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """batch-settlement (chain mode, the SDK's client): the channel's charge and its SETTLED
    record were made in one transaction whose answer was lost. The channel holds the charge,
    so the reply is served with its receipt (not a 503 telling the payer nothing was charged),
    and the payer's next request is charged once more, on top of it."""
    ledger = tmp_path / "payments.db"
    scheme = sdk_batch_scheme(payer, deposit=10 * PRICE_ATOMIC)
    async with (
        sdk_batch_client(scheme) as client,
        chain_batch(seller, ledger, anvil, gas_key) as stack,
    ):
        first = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert first.status_code == 200, first.text
        channel_id = receipt_of(first.headers)["extra"]["channelState"]["channelId"]
        lost = made_but_answer_lost(monkeypatch, PaymentState.SETTLED)
        second = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert lost, "the channel's charge was not made"
        assert second.status_code == 200, (second.headers, second.text)
        assert wire.RECEIPT_HEADER in second.headers
        monkeypatch.undo()
        third = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert third.status_code == 200, (third.headers, third.text)
        async with claimer(ledger, anvil, gas_key) as channels:
            channel = await channels.store.get(channel_id)
    assert channel is not None
    assert (channel.pending_owner, channel.charged) == (None, 3 * PRICE_ATOMIC)
    states = [r.state for r in await records(ledger)]
    assert states == [PaymentState.SETTLED] * 3
