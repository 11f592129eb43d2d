"""Where and when the client writes its channel state (``channel_state``) before a payment.

Against paygate in chain mode (anvil, Circle's FiatToken as USDC, the x402BatchSettlement
stand-in), through the real sealed v2 flow, with real files. ``paygate.files.replace_atomically``
is wrapped (the real write still runs) to see which thread wrote and what the file held when
each paid request left: the async transport writes in a worker thread while its event loop runs
on, the sync one on the caller's thread, both before the voucher leaves; a write that fails
refuses the payment with nothing sent, on both.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from paygate import files, wire
from paygate.client import AsyncPaygateTransport, PaygateTransport, SpendRefused
from tests.fixtures.batch_settlement_support import DEPOSIT_ATOMIC, chain_batch, spend
from tests.fixtures.payment_support import CHAT, CHAT_BODY, PRICE_ATOMIC

# A bound on waiting for the event loop from inside a write (never reached when it runs).
LOOP_WAIT_SECONDS = 30


def signed_in(path: Path) -> int:
    """The highest voucher the state file says we signed (0: no file yet)."""
    if not path.is_file():
        return 0
    document = json.loads(path.read_bytes())
    return max((int(c["signed"]) for c in document["channels"]), default=0)


class Watch:
    """What happened, in order: each write of the state file (its thread, whether the event
    loop ran a callback while it was in progress, the voucher the file then held) and each
    paid request as it left (the voucher the file held at that moment)."""

    def __init__(self, state: Path, loop: asyncio.AbstractEventLoop | None) -> None:
        self.state = state
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self.events: list[tuple[Any, ...]] = []
        self._real = files.replace_atomically

    def replace_atomically(self, path: Path, data: bytes) -> None:
        ran = threading.Event()
        if self.loop is not None and threading.get_ident() != self.loop_thread:
            # The write is in progress until the loop has run this: only a loop this write
            # does not block can.
            self.loop.call_soon_threadsafe(ran.set)
            ran.wait(LOOP_WAIT_SECONDS)
        self._real(path, data)
        self.events.append(("write", threading.get_ident(), ran.is_set(), signed_in(path)))

    def sent(self, request: httpx.Request) -> None:
        if wire.PAYMENT_SIGNATURE in request.headers:
            self.events.append(("paid", signed_in(self.state)))

    def paid(self) -> list[tuple[Any, ...]]:
        """Each paid request with the write just before it."""
        out = []
        for i, event in enumerate(self.events):
            if event[0] == "paid":
                assert i > 0, self.events
                assert self.events[i - 1][0] == "write", self.events
                out.append((self.events[i - 1][1:], event[1]))
        return out


class AsyncSeen(httpx.AsyncHTTPTransport):
    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self.watch = watch

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.watch.sent(request)
        return await super().handle_async_request(request)


class SyncSeen(httpx.HTTPTransport):
    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self.watch = watch

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.watch.sent(request)
        return super().handle_request(request)


def watched(state: Path, monkeypatch: pytest.MonkeyPatch) -> Watch:
    """Every write of ``state`` seen (the real write still runs), against the running loop."""
    watch = Watch(state, asyncio.get_running_loop())
    monkeypatch.setattr(files, "replace_atomically", watch.replace_atomically)
    return watch


def async_transport(watch: Watch, payer: Any) -> AsyncPaygateTransport:
    return AsyncPaygateTransport(
        transport=AsyncSeen(watch), wallet=payer, spend=spend(), channel_state=watch.state
    )


async def test_the_async_transport_writes_off_the_loop_and_before_each_voucher_leaves(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    state = tmp_path / "caller" / "channels.json"
    watch = watched(state, monkeypatch)
    async with chain_batch(seller, tmp_path / "payments.db", anvil, gas_key) as stack:
        transport = async_transport(watch, payer)
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            for _ in range(3):
                assert (await http.post(stack.url + CHAT, json=CHAT_BODY)).status_code == 200
        assert [r.deposit for r in transport.payments] == [Decimal("0.02"), 0, 0]
    vouchers = [k * PRICE_ATOMIC for k in (1, 2, 3)]
    # Each voucher left only once a write holding it was done; that write ran in a worker
    # thread, and the event loop ran while it was in progress.
    assert [
        (thread != watch.loop_thread, ran, held) for (thread, ran, held), _ in watch.paid()
    ] == [(True, True, voucher) for voucher in vouchers]
    assert [at_send for _, at_send in watch.paid()] == vouchers


async def test_the_async_transport_writes_after_answers_and_at_close_off_the_loop_too(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The writes that follow the seller's answer (the channel's first receipt, a refund) and
    the last one at close run in the transport's own thread while the event loop runs on, and
    the file ends holding the last count."""
    state = tmp_path / "caller" / "channels.json"
    watch = watched(state, monkeypatch)
    async with chain_batch(seller, tmp_path / "payments.db", anvil, gas_key) as stack:
        transport = async_transport(watch, payer)
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            for _ in range(2):
                assert (await http.post(stack.url + CHAT, json=CHAT_BODY)).status_code == 200
            before_refund = len(watch.events)
            (refund,) = await transport.refund(stack.url)
            assert refund.success, refund
        # aclose (by the client's exit) waited for every queued write and wrote the last.
        writes = [e for e in watch.events if e[0] == "write"]
        assert len(writes) >= 4  # two before the vouchers, the first receipt, the refund
        assert any(e[0] == "write" for e in watch.events[before_refund:])
        assert [(thread != watch.loop_thread, ran) for _, thread, ran, _ in writes] == [
            (True, True)
        ] * len(writes)
    document = json.loads(state.read_bytes())
    # The refund drained the channel: the book forgot it and counts what it spent.
    assert document["channels"] == []
    assert Decimal(document["retired"]) == Decimal(2 * PRICE_ATOMIC) / 10**6


async def test_the_sync_transport_writes_on_the_callers_thread_before_each_voucher_leaves(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    state = tmp_path / "caller" / "channels.json"
    watch = Watch(state, None)
    monkeypatch.setattr(files, "replace_atomically", watch.replace_atomically)

    def caller(url: str) -> int:
        transport = PaygateTransport(
            transport=SyncSeen(watch), wallet=payer, spend=spend(), channel_state=state
        )
        with httpx.Client(transport=transport, timeout=60) as http:
            for _ in range(2):
                assert http.post(url + CHAT, json=CHAT_BODY).status_code == 200
        return threading.get_ident()

    async with chain_batch(seller, tmp_path / "payments.db", anvil, gas_key) as stack:
        thread = await asyncio.to_thread(caller, stack.url)
    # Each voucher left once a write holding it was done, on the thread that sent it.
    vouchers = [PRICE_ATOMIC, 2 * PRICE_ATOMIC]
    assert watch.paid() == [((thread, False, voucher), voucher) for voucher in vouchers]


async def test_a_failed_write_refuses_the_payment_with_nothing_sent_on_both_transports(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    funds = usdc.balance_of(payer.address)
    async with chain_batch(seller, tmp_path / "payments.db", anvil, gas_key) as stack:
        # Async: the write fails in its worker thread; the request is refused, nothing paid.
        state = tmp_path / "async" / "channels.json"
        watch = watched(state, monkeypatch)
        transport = async_transport(watch, payer)
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            os.mkdir(state)  # the write cannot replace a directory
            with pytest.raises(SpendRefused, match="not saved, nothing sent"):
                await http.post(stack.url + CHAT, json=CHAT_BODY)
            assert (transport.spent, transport.payments, watch.paid()) == (0, [], [])
            # Rolled back: once the file can be written, the same transport opens one
            # channel with one deposit.
            os.rmdir(state)
            assert (await http.post(stack.url + CHAT, json=CHAT_BODY)).status_code == 200
            assert [r.deposit for r in transport.payments] == [Decimal("0.02")]
            assert transport.spent == Decimal("0.02")

        # Sync: the same, on the caller's thread.
        state = tmp_path / "sync" / "channels.json"
        watch = Watch(state, None)
        monkeypatch.setattr(files, "replace_atomically", watch.replace_atomically)

        def refused(url: str) -> tuple[Any, ...]:
            sync = PaygateTransport(
                transport=SyncSeen(watch), wallet=payer, spend=spend(), channel_state=state
            )
            with httpx.Client(transport=sync, timeout=60) as http:
                os.mkdir(state)
                with pytest.raises(SpendRefused, match="not saved, nothing sent"):
                    http.post(url + CHAT, json=CHAT_BODY)
                return sync.spent, sync.payments, watch.paid()

        assert await asyncio.to_thread(refused, stack.url) == (0, [], [])
    # On chain: only the async transport's one deposit left the wallet.
    assert usdc.balance_of(payer.address) == funds - DEPOSIT_ATOMIC
