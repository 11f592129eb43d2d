"""A replica frozen past its lease, on real components (two gateways on one SQLite ledger, the
FAKE model server, anvil with the SDK's facilitator, or chain-mode batch-settlement with the
SDK's client): it is taken for dead — another replica's start releases its reservation — and
the payer goes on there. When it wakes up with its reply in hand, it must neither charge a
second time nor send a reply whose signed receipt claims a charge the ledger never recorded:
its fenced charge is refused (`lease_lost`), and that refusal is what the caller gets (503,
`lease_lost`, no receipt), not the reply.

The freeze is made in the process: the reply stage of the first request "a" handles waits
for a wake-up, and no lease of "a" is renewed meanwhile (as a SIGSTOP would leave them); the
other replica's start is the reconciler's release of what nobody renewed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import httpx
import pytest

from paygate import wire
from paygate.client import AsyncPaygateTransport, ClientError, SpendPolicy
from paygate.server.receipts import SSE_PREFIX as SIGNED_RECEIPT_LINE
from paygate.server.replies import Replies
from paygate.x402.inband import SSE_PREFIX as PAYMENT_RECEIPT_LINE
from paygate.x402.leases import HeldLeases
from paygate.x402.ledger import PaymentState
from paygate.x402.session import PaymentSession
from tests.fixtures.batch_settlement_support import (
    chain_batch,
    claimer,
    sdk_batch_client,
    sdk_batch_scheme,
)
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    paid_stack,
    receipt_of,
    records,
    until,
    v2_header,
)
from tests.fixtures.scale_support import ledger_records

LEASE = 3.0  # the frozen replica's leases: they run out soon after it stops renewing
STREAM_BODY = {**CHAT_BODY, "stream": True, "fake": {"chunks": 4}}


class Freeze:
    """Armed, the next reply waits until :meth:`wake` — in the reply stage with its upstream's
    answer here and nothing sent yet (``Replies.send``), or once its body has gone out, before
    its charge (``PaymentSession.reply_ended``) — and meanwhile no lease of any replica is
    renewed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: Any = Replies, name: str = "send"):
        self.armed = False
        self.reached = asyncio.Event()
        self._woken = asyncio.Event()
        real, real_renew = getattr(at, name), HeldLeases.renew_all
        freeze = self

        async def frozen(self: Any, *args: Any, **kwargs: Any) -> Any:
            if freeze.armed and not freeze.reached.is_set():
                freeze.reached.set()
                await asyncio.wait_for(freeze._woken.wait(), timeout=60)
            return await real(self, *args, **kwargs)

        async def renew_all(self: HeldLeases) -> int:
            return 0 if freeze.armed else await real_renew(self)

        monkeypatch.setattr(at, name, frozen)
        monkeypatch.setattr(HeldLeases, "renew_all", renew_all)

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        """Frozen from here until the block ends; its lease runs out first."""
        self.armed = True
        try:
            await asyncio.wait_for(self.reached.wait(), timeout=30)
            await asyncio.sleep(LEASE + 0.5)
            yield
        finally:
            self.wake()

    def wake(self) -> None:
        self.armed = False
        self._woken.set()


async def _post(url: str, header: str, body: Any) -> tuple[int, Any, bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client,
        client.post(url + CHAT, json=body, headers={wire.PAYMENT_SIGNATURE: header}) as response,
    ):
        return response.status, response.headers, await response.read()


def _refused_lease_lost(status: int, headers: Any, body: bytes) -> None:
    """The frozen replica's answer: no reply, no receipt of a charge."""
    assert (status, headers.get(wire.ERROR_HEADER)) == (503, "lease_lost"), body
    assert wire.RECEIPT_HEADER not in headers
    assert wire.PAYMENT_RESPONSE not in headers
    assert b"fake" not in body  # the model's reply stayed on the frozen replica


@pytest.mark.parametrize("body", [CHAT_BODY, STREAM_BODY], ids=["buffered", "streamed"])
@pytest.mark.parametrize("first", ["successor", "woken"])
@pytest.mark.parametrize(
    ("mode", "store"),
    [("facilitator", "sqlite"), ("verify-only", "sqlite"), ("facilitator", "postgresql")],
)
async def test_exact_a_frozen_replica_woken_after_its_reservation_was_released_claims_no_charge(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch, request, first, body, mode, store
):
    """``successor``: the payer's retry of the same authorization is served and settled by the
    other replica before the frozen one wakes; ``woken``: the frozen one wakes first, refuses,
    and the payer's retry is served and settled then. Either way: settled once, and the only
    reply the payer got is the one that was charged. Verify-only: the charge recorded is the
    SERVED the operator settles from, once."""
    freeze = Freeze(monkeypatch)
    ledger = (
        f"sqlite:///{tmp_path / 'payments.db'}"
        if store == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    settings = {
        "seller": seller,
        "facilitator_url": facilitator.url,
        "ledger": ledger,
        "payment_mode": mode,
    }
    async with paid_stack(replica_id="a", lease_seconds=LEASE, **settings) as a:
        header = await v2_header(a, payer, body=body)
        late = asyncio.ensure_future(_post(a.url, header, body))
        async with freeze.frozen(), paid_stack(replica_id="b", **settings) as b:
            (released,) = await ledger_records(ledger)
            assert released.state is PaymentState.RELEASED  # b's start let it go
            if first == "successor":
                status, _, _ = await _post(b.url, header, body)
                assert status == 200
                freeze.wake()
                _refused_lease_lost(*await late)
            else:
                freeze.wake()
                _refused_lease_lost(*await late)
                status, _headers, _ = await _post(b.url, header, body)
                assert status == 200
    (record,) = await ledger_records(ledger)
    if mode == "verify-only":
        assert (record.state, record.served) == (PaymentState.SERVED, True)
        assert facilitator.stats.calls("settle") == 0
        return
    assert record.state is PaymentState.SETTLED
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_exact_a_stream_whose_replica_froze_before_its_charge_ends_cut_without_a_receipt(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch
):
    """Frozen after its stream's body went out, before its charge: its progress was recorded
    (SERVED) right after its first content, so the other replica's reconciler settles it once
    for what a disconnect there would be charged (`exact`: the price; the caller got the body),
    never releases it — a short stream inside its first lease window is charged like a long
    one (docs/PAYMENTS.md "A stream stalled mid-way"). Woken, the frozen replica's own charge is
    refused (its lease gone), so the stream's end — the payment receipt and the signed receipt
    — never goes: the caller sees the transfer cut, and no second charge is made."""
    freeze = Freeze(monkeypatch, PaymentSession, "reply_ended")
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    async with paid_stack(replica_id="a", lease_seconds=LEASE, **settings) as a:
        header = await v2_header(a, payer, body=STREAM_BODY)
        received = bytearray()

        async def read() -> int:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client,
                client.post(
                    a.url + CHAT, json=STREAM_BODY, headers={wire.PAYMENT_SIGNATURE: header}
                ) as response,
            ):
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    async for chunk in response.content.iter_any():
                        received.extend(chunk)
                return response.status

        late = asyncio.ensure_future(read())
        async with freeze.frozen(), paid_stack(replica_id="b", **settings):
            await until(ledger, lambda found: found[0].state is PaymentState.SETTLED)  # by b
        assert await late == 200  # its head went out before the freeze
        assert b"data:" in received  # and its body
        assert PAYMENT_RECEIPT_LINE not in received
        assert SIGNED_RECEIPT_LINE not in received
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLED
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC


@pytest.mark.parametrize("at", ["before-its-head", "mid-stream"])
async def test_a_sealed_v2_stream_of_a_frozen_replica_is_refused_or_cut_never_closed_as_paid(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch, at
):
    """paygate's own client, sealed (v2 frames): frozen before its head left, the stream is
    refused 503 `lease_lost` in the clear (the client's own retry of a withheld reply off:
    on, below); frozen after its body went out, the stream never gets its final frame (nor the
    receipts sealed in it), and the client's opener refuses it as truncated — never sent again
    (its retry on: a stream that started is not withheld), and no receipt says it was paid.
    Before its head nothing is settled (released); mid-stream its progress was recorded after
    its first frame, so it is settled once, by the other replica, as a disconnect there is."""
    where = (Replies, "send") if at == "before-its-head" else (PaymentSession, "reply_ended")
    freeze = Freeze(monkeypatch, *where)
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    spend = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])
    async with paid_stack(replica_id="a", lease_seconds=LEASE, **settings) as a:
        retries = 0 if at == "before-its-head" else 1
        transport = AsyncPaygateTransport(
            envelope="v2", wallet=payer, spend=spend, withheld_retries=retries
        )
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:

            async def read() -> tuple[int, str | None, bytes]:
                async with http.stream("POST", a.url + CHAT, json=STREAM_BODY) as response:
                    body = await response.aread()
                    return response.status_code, response.headers.get(wire.ERROR_HEADER), body

            late = asyncio.ensure_future(read())
            async with freeze.frozen(), paid_stack(replica_id="b", **settings):
                # Mid-stream its progress (SERVED) was recorded after its first frame: settled
                # by b for it (a disconnect there is charged too), never released.
                done = PaymentState.RELEASED if at == "before-its-head" else PaymentState.SETTLED
                await until(ledger, lambda found: found[0].state is done)
            if at == "before-its-head":
                status, code, _ = await late
                assert (status, code) == (503, "lease_lost")
            else:
                with pytest.raises((ClientError, httpx.TransportError)):
                    await late
            assert transport.payments[0].withheld == 0
    (record,) = await records(ledger)
    assert record.state is done
    assert facilitator.stats.calls("settle") == (done is PaymentState.SETTLED)
    assert usdc.balance_of(seller) == (PRICE_ATOMIC if done is PaymentState.SETTLED else 0)


async def test_paygates_client_sends_a_stream_withheld_by_a_frozen_replica_again_charged_once(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch
):
    """The same freeze before the stream's head, the client's retry on (its default): the 503
    `lease_lost` never reaches the app — after its Retry-After the client sends the same
    authorization again (re-sealed), the woken replica serves it, and it is settled once; the
    released payment counts once against max_total."""
    freeze = Freeze(monkeypatch)
    ledger = tmp_path / "payments.db"
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    spend = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])
    async with paid_stack(replica_id="a", lease_seconds=LEASE, **settings) as a:
        transport = AsyncPaygateTransport(envelope="v2", wallet=payer, spend=spend)
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:

            async def read() -> tuple[int, bytes]:
                async with http.stream("POST", a.url + CHAT, json=STREAM_BODY) as response:
                    return response.status_code, await response.aread()

            late = asyncio.ensure_future(read())
            async with freeze.frozen(), paid_stack(replica_id="b", **settings):
                (released,) = await records(ledger)
                assert released.state is PaymentState.RELEASED
            status, body = await late
            assert status == 200, body
            assert body.count(b"data:") >= 4
            (payment,) = transport.payments
            assert (payment.withheld, payment.settled) == (1, True)
            assert transport.spent == Decimal(PRICE_ATOMIC) / 10**6
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLED
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_batch_settlement_a_frozen_replica_woken_after_its_reservation_was_released_claims_no_charge(  # noqa: E501
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """A voucher's request frozen with its reply in hand; the payer goes on at the other
    replica. Woken, the frozen replica neither charges its voucher (the channel's total is what
    the other replica charged) nor answers with a receipt claiming it did."""
    freeze = Freeze(monkeypatch)
    ledger = tmp_path / "payments.db"
    scheme = sdk_batch_scheme(payer, deposit=10 * PRICE_ATOMIC)
    async with (
        sdk_batch_client(scheme) as client,
        chain_batch(seller, ledger, anvil, gas_key, replica_id="a", lease_seconds=LEASE) as a,
    ):
        first = await client.post(a.url + CHAT, json=CHAT_BODY)
        assert first.status_code == 200, first.text
        channel_id = receipt_of(first.headers)["extra"]["channelState"]["channelId"]
        late = asyncio.ensure_future(client.post(a.url + CHAT, json=CHAT_BODY))
        async with (
            freeze.frozen(),
            chain_batch(seller, ledger, anvil, gas_key, replica_id="b") as b,
        ):
            response = await client.post(b.url + CHAT, json=CHAT_BODY)
            assert response.status_code == 200, (response.headers, response.text)
            freeze.wake()
            woken = await late
            assert (woken.status_code, woken.headers.get(wire.ERROR_HEADER)) == (
                503,
                "lease_lost",
            ), woken.text
            assert wire.RECEIPT_HEADER not in woken.headers
            assert wire.PAYMENT_RESPONSE not in woken.headers
            async with claimer(ledger, anvil, gas_key) as channels:
                channel = await channels.store.get(channel_id)
    assert channel is not None
    assert (channel.pending_owner, channel.charged) == (None, 2 * PRICE_ATOMIC)
    found = await records(ledger)
    assert [r.state for r in found].count(PaymentState.SETTLED) == 2  # the first, and b's


@pytest.mark.parametrize("body", [CHAT_BODY, STREAM_BODY], ids=["buffered", "streamed"])
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_upfront_a_replica_frozen_after_settling_sends_no_second_reply_for_one_charge(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch, request, body, store
):
    """Settled upfront, then frozen with its reply in hand: the payer's retry of the settled
    authorization is served by the other replica (the reply it bought). Woken, the frozen one
    must not send a second reply for the one charge, nor say what `lease_lost` says (nothing
    charged, send the payment again: paygate's client would, to be refused 402): 409
    `payment_already_served`, no Retry-After, no receipt."""
    freeze = Freeze(monkeypatch)
    ledger = (
        f"sqlite:///{tmp_path / 'payments.db'}"
        if store == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    settings = {
        "seller": seller,
        "facilitator_url": facilitator.url,
        "ledger": ledger,
        "settle_timing": "upfront",
    }
    async with paid_stack(replica_id="a", lease_seconds=LEASE, **settings) as a:
        header = await v2_header(a, payer, body=body)
        late = asyncio.ensure_future(_post(a.url, header, body))
        async with freeze.frozen(), paid_stack(replica_id="b", **settings) as b:
            status, _, served = await _post(b.url, header, body)
            assert status == 200, served
            assert b"fake" in served
            freeze.wake()
            status, headers, withheld = await late
            code = headers.get(wire.ERROR_HEADER)
            assert (status, code) == (409, "payment_already_served"), withheld
            assert "Retry-After" not in headers
            assert wire.RECEIPT_HEADER not in headers
            assert wire.PAYMENT_RESPONSE not in headers
            assert b"fake" not in withheld
            again, _, _ = await _post(b.url, header, body)
            assert again == 402  # used: its one reply went out
    (record,) = await ledger_records(ledger)
    assert (record.state, record.served) == (PaymentState.SETTLED, True)
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC
