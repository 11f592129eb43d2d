"""paygate's own client re-sends a paid request whose connection dropped before any reply, with
the same payment and its payment-identifier, and is charged once (x402's payment-identifier
extension; the server's side is tests/integration/paygate/x402/test_payment_identifier.py).

The drop is real: a TCP relay in front of the gateway passes the paid request on, lets the
gateway answer, and closes the caller's connection at the answer's first byte."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx

from paygate import wire
from paygate.client import AsyncPaygateTransport, SpendPolicy
from paygate.x402.ledger import PaymentState
from tests.fixtures.payment_support import CHAT, CHAT_BODY, PRICE_ATOMIC, paid_stack, records

CHAT_HITS = "POST /v1/chat/completions"
PAYMENT_HEADERS = (wire.PAYMENT_SIGNATURE.lower().encode(), wire.X_PAYMENT.lower().encode())
SPEND = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])


class DropFirstPaidReply:
    """A relay on 127.0.0.1 that cuts the caller off when the gateway starts answering the first
    request that carries a payment (the connection closes without a byte of the answer)."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self.dropped = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> DropFirstPaidReply:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await asyncio.wait_for(self._server.wait_closed(), 10)

    async def _relay(self, caller_r: asyncio.StreamReader, caller_w: asyncio.StreamWriter) -> None:
        gateway_r, gateway_w = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        paid_sent = asyncio.Event()

        async def up() -> None:
            while data := await caller_r.read(65536):
                lowered = data.lower()
                if self.dropped == 0 and any(name in lowered for name in PAYMENT_HEADERS):
                    paid_sent.set()
                gateway_w.write(data)
                await gateway_w.drain()

        async def down() -> None:
            while data := await gateway_r.read(65536):
                if paid_sent.is_set() and self.dropped == 0:
                    self.dropped += 1
                    caller_w.transport.abort()  # the answer never reaches the caller
                    return
                caller_w.write(data)
                await caller_w.drain()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (caller_w, gateway_w):
            writer.close()


@contextlib.asynccontextmanager
async def relay(port: int) -> AsyncIterator[DropFirstPaidReply]:
    async with DropFirstPaidReply(port) as running:
        yield running


async def test_a_paid_request_whose_connection_dropped_is_sent_again_and_charged_once(
    facilitator, usdc, payer, seller, tmp_path
):
    ledger = tmp_path / "payments.db"
    payer_before = usdc.balance_of(payer.address)
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        port = int(stack.url.rsplit(":", 1)[1])
        transport = AsyncPaygateTransport(envelope="plain", wallet=payer, spend=SPEND)
        async with relay(port) as cut, httpx.AsyncClient(transport=transport, timeout=60) as http:
            response = await http.post(cut.url + CHAT, json=CHAT_BODY)
        assert cut.dropped == 1  # the first paid answer was lost on the way
        # The retry carried the same payment and identifier: the gateway answers from the
        # first attempt's record (served and paid) instead of serving and charging again.
        assert response.status_code == 409, response.text
        assert response.headers[wire.ERROR_HEADER] == "payment_already_served"
        (sent,) = transport.payments
        assert sent.retries == 1
        assert sent.identifier is not None
        assert sent.receipt is not None
        assert sent.receipt.success
        assert stack.fake.hits[CHAT_HITS] == 1
        for _ in range(300):  # settled after the reply, in the background
            found = await records(ledger)
            if [r.state for r in found] == [PaymentState.SETTLED]:
                break
            await asyncio.sleep(0.05)
        (record,) = await records(ledger)
        assert (record.state, record.idempotency_key) == (PaymentState.SETTLED, sent.identifier)
        assert sent.receipt.transaction == record.transaction
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == payer_before - PRICE_ATOMIC


async def test_without_a_payment_identifier_a_dropped_paid_request_is_not_sent_again(
    facilitator, usdc, payer, seller, tmp_path
):
    """x402 v1 carries no payment-identifier, so the server could not tell a retry from a new
    purchase: the caller hears the drop instead of risking a second charge."""
    ledger = tmp_path / "payments.db"
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        port = int(stack.url.rsplit(":", 1)[1])
        transport = AsyncPaygateTransport(
            envelope="plain", wallet=payer, spend=SPEND, x402_version=1
        )
        async with relay(port) as cut, httpx.AsyncClient(transport=transport, timeout=60) as http:
            try:
                await http.post(cut.url + CHAT, json=CHAT_BODY)
            except httpx.TransportError:
                pass
            else:
                raise AssertionError("the dropped paid request was answered")
        assert cut.dropped == 1
        (sent,) = transport.payments
        assert (sent.identifier, sent.retries) == (None, 0)
        assert stack.fake.hits[CHAT_HITS] == 1
