"""A paid stream whose replica froze mid-way, past its lease, on real components (two gateways
on one ledger, the FAKE model server, anvil with the SDK's facilitator): what the caller got
before the stall is charged as a disconnect at that point would be (the whole price for
`exact`, the tokens delivered for `upto`), once, by the replica that took the payment over —
never nothing, never more; and the woken replica sends nothing more.

The freeze is made in the process (as in test_lease_lost_reply): after ``AFTER`` chunks the
stream of replica "a" waits for a wake-up and no lease is renewed meanwhile (as a SIGSTOP
would leave them); replica "b"'s start is the reconciler that takes over what nobody
renewed. The last test makes it with a real SIGSTOP of a `paygate serve` replica on
PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from paygate_dev.fake_model import FakeModelServer

from paygate import wire
from paygate.server import replies
from paygate.server.receipts import SSE_PREFIX as SIGNED_RECEIPT_LINE
from paygate.x402.inband import SSE_PREFIX as PAYMENT_RECEIPT_LINE
from paygate.x402.leases import HeldLeases
from paygate.x402.ledger import PaymentRecord, PaymentState
from paygate.x402.ledger_base import Ledger
from tests.fixtures.payment_support import CHAT, CHAT_BODY, PRICE_ATOMIC, paid_stack, v2_header
from tests.fixtures.scale_support import (
    Env,
    fake_upstream,
    ledger_records,
    replicas,
    sign,
    until_records,
)
from tests.fixtures.serve_support import make_key
from tests.fixtures.upto_support import charge, sdk_upto_client, upto_settings

LEASE = 3.0  # a's leases: its window (four fifths) passes within the stream, before the stall
CHUNKS = 30
AFTER = 20  # chunks a stream sends before its replica freezes (≈ 4 s: past a's window)
BODY = {**CHAT_BODY, "stream": True, "fake": {"chunks": CHUNKS, "pace": 0.2}}


class MidStreamFreeze:
    """The next stream freezes after ``AFTER`` chunks went out until :meth:`wake`; meanwhile no
    lease of any replica is renewed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, renewed: bool = False) -> None:
        """``renewed``: the keeper's last renewal comes after the ``AFTER`` chunks went out,
        right before the freeze (else the freeze comes at once)."""
        self.reached = asyncio.Event()
        self._woken = asyncio.Event()
        self._frozen = False
        self._last_renewal: asyncio.Event | None = asyncio.Event() if renewed else None
        real_pump, real_renew = replies._pump, HeldLeases.renew_all
        freeze = self

        async def pump(response: Any, chunks: AsyncIterator[bytes], *args: Any) -> None:
            async def held() -> AsyncIterator[bytes]:
                sent = 0
                async for chunk in chunks:
                    yield chunk
                    sent += 1
                    if sent == AFTER and not freeze.reached.is_set():
                        if freeze._last_renewal is not None:
                            freeze._last_renewal.set()  # the keeper's next pass, then frozen
                            await asyncio.wait_for(freeze.reached.wait(), timeout=30)
                        else:
                            freeze._frozen = True
                            freeze.reached.set()
                        await asyncio.wait_for(freeze._woken.wait(), timeout=60)

            await real_pump(response, held(), *args)

        async def renew_all(self: HeldLeases) -> int:
            if freeze._frozen:
                return 0
            last = freeze._last_renewal
            if last is None or not last.is_set():
                return await real_renew(self)
            renewed = await real_renew(self)
            freeze._frozen = True
            freeze.reached.set()
            return renewed

        monkeypatch.setattr(replies, "_pump", pump)
        monkeypatch.setattr(HeldLeases, "renew_all", renew_all)

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        """Frozen from the stall until the block ends; its lease runs out first."""
        try:
            await asyncio.wait_for(self.reached.wait(), timeout=30)
            await asyncio.sleep(LEASE + 1.5)
            yield
        finally:
            self.wake()

    def wake(self) -> None:
        self._frozen = False
        self._woken.set()


async def _settled(ledger: str, timeout: float = 30.0) -> PaymentRecord:
    async with asyncio.timeout(timeout):
        while True:
            (record,) = await ledger_records(ledger)
            if record.state in (PaymentState.SETTLED, PaymentState.FAILED, PaymentState.RELEASED):
                return record
            await asyncio.sleep(0.1)


async def _read(response: Any) -> bytes:
    received = bytearray()
    with contextlib.suppress(aiohttp.ClientPayloadError):
        async for chunk in response.content.iter_any():
            received.extend(chunk)
    return bytes(received)


def _cut_without_its_end(received: bytes) -> int:
    """The woken replica's stream: cut, nothing after the stall, no receipt; its content
    events counted."""
    content = received.count(b'"content"')
    assert AFTER <= content < CHUNKS, received  # nothing (or at most one) after the stall
    assert PAYMENT_RECEIPT_LINE not in received
    assert SIGNED_RECEIPT_LINE not in received
    return content


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_exact_a_stream_stalled_mid_way_is_charged_once_by_the_successor(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch, request, store
):
    freeze = MidStreamFreeze(monkeypatch)
    ledger = (
        f"sqlite:///{tmp_path / 'payments.db'}"
        if store == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    settings = {"seller": seller, "facilitator_url": facilitator.url, "ledger": ledger}
    async with paid_stack(replica_id="a", lease_seconds=LEASE, **settings) as a:
        header = await v2_header(a, payer, body=BODY)

        async def read() -> tuple[int, bytes]:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client,
                client.post(a.url + CHAT, json=BODY, headers={wire.PAYMENT_SIGNATURE: header}) as r,
            ):
                return r.status, await _read(r)

        late = asyncio.ensure_future(read())
        async with freeze.frozen(), paid_stack(replica_id="b", **settings):
            record = await _settled(ledger)  # b took it over: settled, not released
        status, received = await late
        assert status == 200
        _cut_without_its_end(received)
    assert record.state is PaymentState.SETTLED, record
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def _upto_stall(
    freeze: MidStreamFreeze, facilitator, upto_payer, seller, tmp_path
) -> tuple[PaymentRecord, int]:
    """An upto stream from replica a, frozen mid-way by ``freeze`` while replica b takes its
    payment over: b's settled record, and the content the caller received (the stream cut
    without its end)."""
    ledger = f"sqlite:///{tmp_path / 'payments.db'}"
    settings = {
        "seller": seller,
        "facilitator_url": facilitator.url,
        "ledger": ledger,
        "fake": FakeModelServer(engine="vllm"),
        "upstream_kind": "vllm",
        **upto_settings(),
    }
    async with paid_stack(replica_id="a", lease_seconds=LEASE, **settings) as a:
        received = bytearray()

        async def read() -> int:
            async with (
                sdk_upto_client(upto_payer) as client,
                client.stream("POST", a.url + CHAT, json=BODY) as response,
            ):
                with contextlib.suppress(Exception):
                    async for chunk in response.aiter_bytes():
                        received.extend(chunk)
                return response.status_code

        late = asyncio.ensure_future(read())
        async with freeze.frozen(), paid_stack(replica_id="b", **settings):
            record = await _settled(ledger)
        assert await late == 200
        return record, _cut_without_its_end(bytes(received))


async def test_upto_a_stream_stalled_mid_way_is_charged_for_what_it_delivered_never_more(
    facilitator, usdc, upto_payer, seller, tmp_path, monkeypatch
):
    freeze = MidStreamFreeze(monkeypatch)
    record, content = await _upto_stall(freeze, facilitator, upto_payer, seller, tmp_path)
    assert record.state is PaymentState.SETTLED, record
    assert (record.usage_source, record.tokens_in) == ("running", 1)
    assert record.tokens_out is not None
    assert 0 < record.tokens_out <= content  # never more than the caller got
    assert record.settled_amount == charge(1, record.tokens_out) < record.amount
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == record.settled_amount


async def test_upto_a_stream_stalled_after_its_leases_renewal_is_charged_what_it_had_delivered_then(
    facilitator, usdc, upto_payer, seller, tmp_path, monkeypatch
):
    """Its lease kept renewed by the keeper (so no write passes the window), the stream stalls
    right after a renewal: that renewal kept the progress delivered by then (the running
    counts), so the successor charges the tokens the caller had got — not only what the first
    chunk's record said. What a stall leaves uncharged: what went out since the last renewal."""
    freeze = MidStreamFreeze(monkeypatch, renewed=True)
    record, content = await _upto_stall(freeze, facilitator, upto_payer, seller, tmp_path)
    assert record.state is PaymentState.SETTLED, record
    assert record.usage_source == "running"
    assert record.tokens_out is not None
    assert AFTER <= record.tokens_out <= content  # what it had delivered at the renewal
    assert record.settled_amount == charge(1, record.tokens_out)
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == record.settled_amount


async def test_a_streams_first_chunk_waits_for_no_ledger_write_and_its_writes_stay_two(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch
):
    """The move that records a stream's progress (SERVED) starts after its first chunk went
    out: held back until the caller has that chunk, the stream still flows; at its end the
    charge waits for it, and the payment's writes after its reservation are that move and
    SETTLING (then the outcome) — no write more for a normal stream."""
    gate = asyncio.Event()
    moves: list[PaymentState] = []
    real = Ledger.transition

    async def transition(self: Ledger, payment_id: str, to: PaymentState, **kw: Any) -> Any:
        moves.append(to)
        if to is PaymentState.SERVED:
            await asyncio.wait_for(gate.wait(), timeout=30)
        return await real(self, payment_id, to, **kw)

    monkeypatch.setattr(Ledger, "transition", transition)
    ledger = f"sqlite:///{tmp_path / 'payments.db'}"
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": 6, "pace": 0.05}}
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as a:
        header = await v2_header(a, payer, body=body)
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client,
            client.post(a.url + CHAT, json=body, headers={wire.PAYMENT_SIGNATURE: header}) as r,
        ):
            assert r.status == 200
            first = await asyncio.wait_for(r.content.readline(), timeout=10)
            assert first.startswith(b"data:")  # while the progress move is held back
            assert moves == [PaymentState.SERVED]
            gate.set()
            rest = await r.content.read()
        assert PAYMENT_RECEIPT_LINE in rest
        record = await _settled(ledger)
    assert record.state is PaymentState.SETTLED
    assert moves == [PaymentState.SERVED, PaymentState.SETTLING, PaymentState.SETTLED]
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_upto_a_long_stream_not_stalled_settles_its_final_usage_over_its_progress(
    facilitator, usdc, upto_payer, seller, tmp_path
):
    """Past its lease window the stream records its progress (SERVED); ending normally, it
    settles the engine's final usage, not that progress, with its receipts in-band."""
    ledger = f"sqlite:///{tmp_path / 'payments.db'}"
    async with (
        paid_stack(
            seller=seller,
            facilitator_url=facilitator.url,
            ledger=ledger,
            replica_id="a",
            lease_seconds=LEASE,
            fake=FakeModelServer(engine="vllm"),
            upstream_kind="vllm",
            **upto_settings(),
        ) as a,
        sdk_upto_client(upto_payer) as client,
        client.stream("POST", a.url + CHAT, json=BODY) as response,
    ):
        received = b"".join([chunk async for chunk in response.aiter_bytes()])
        assert response.status_code == 200
    assert received.count(b'"content"') == CHUNKS
    assert PAYMENT_RECEIPT_LINE in received
    assert SIGNED_RECEIPT_LINE in received
    record = await _settled(ledger)
    assert (record.state, record.usage_source) == (PaymentState.SETTLED, "upstream")
    assert record.tokens_out == CHUNKS
    assert record.settled_amount == charge(1, CHUNKS)
    assert usdc.balance_of(seller) == charge(1, CHUNKS)


async def test_a_replica_sigstopped_mid_stream_is_charged_once_by_another_and_sends_no_more(
    facilitator, usdc, payer, seller, tmp_path, pg_url
):
    """`paygate serve` replicas on PostgreSQL: the replica streaming a paid reply is SIGSTOPped
    once its stream is past its lease window; another replica's reconciler settles the payment
    (the whole price, `exact`) after the lease runs out; SIGCONT: the stream ends cut, no
    receipt, nothing of the rest."""
    chunks = 40
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": chunks, "pace": 0.2}}
    async with fake_upstream() as (_, upstream):
        env = Env(
            make_key(tmp_path / "key.pem"), pg_url, seller, facilitator.url, upstream, tmp_path
        )
        async with (
            replicas(env, ["r1", "r2"]) as (holder, _other),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as client,
        ):
            header = await sign(client, holder.url, payer)
            received = bytearray()
            async with client.post(
                holder.url + CHAT, json=body, headers={wire.PAYMENT_SIGNATURE: header}
            ) as response:
                assert response.status == 200
                async for line in response.content:
                    received.extend(line)
                    if received.count(b'"content"') == AFTER:  # ≈ 4 s: past its window
                        break
                os.kill(holder.pid, signal.SIGSTOP)
                try:
                    (record,) = await until_records(pg_url, lambda found: found[0].terminal)
                finally:
                    os.kill(holder.pid, signal.SIGCONT)
                received.extend(await _read(response))
            assert holder.proc.poll() is None
    content = received.count(b'"content"')
    assert AFTER <= content < chunks
    assert PAYMENT_RECEIPT_LINE not in received
    assert SIGNED_RECEIPT_LINE not in received
    assert record.state is PaymentState.SETTLED, record
    assert facilitator.stats.calls("settle") == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC
