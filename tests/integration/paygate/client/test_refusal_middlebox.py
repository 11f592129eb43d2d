"""A hostile middlebox against the refusal at a plain stream's end. On real components: the
paid gateway, the FAKE model server, anvil with the SDK's facilitator; an in-test aiohttp proxy
on 127.0.0.1 rewrites the stream.

A stream's settlement is refused for good after its content went out when the payer moves the
funds between verify and settle (the facilitator's settle is slowed so the test can). The
stream then ends with the refusing x402 receipt and the appliance's signed refusal (bound to
the request and the bytes delivered, charging nothing). The x402 receipt is unsigned: a path
that rewrites a plain stream could make a client believe it was not charged when it was (or
take a refusal as proof). A client that verifies receipts (an attestation policy) raises
``PaymentRefused`` only on the signed refusal, ``RefusalUnauthenticated`` on a forged, stripped
or replayed one, and ``ContentAfterReceipt`` on bytes after the signed end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from aiohttp import web

from paygate.client import (
    AsyncPaygateTransport,
    AttestationPolicy,
    ContentAfterReceipt,
    PaymentRefused,
    RefusalUnauthenticated,
    SpendPolicy,
)
from paygate.x402.ledger import PaymentState
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.gateway_support import ThreadedServer, eventually
from tests.fixtures.payment_support import drain_wallet, paid_stack, records

MODEL = "fake-llama"
CHAT = "/v1/chat/completions"
GENERATE = "/api/generate"
SSE_BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "fake": {"chunks": 4},
}
NDJSON_BODY = {"model": MODEL, "prompt": "hi", "fake": {"chunks": 4}}
SPEND = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])
POLICY = AttestationPolicy(allow_unattested=True)  # a software key; the checks are the same
_HOP = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
)
_TIMEOUT = 30.0
_SIGNED_LINE = re.compile(rb": paygate-receipt [A-Za-z0-9_.-]+\n\n")
_SIGNED_ENTRY = re.compile(rb',"paygate_receipt":"[A-Za-z0-9_.-]+"')
_X402_LINE = re.compile(rb": x402-payment-response ([A-Za-z0-9+/=]+)")
_X402_ENTRY = re.compile(rb'"x402PaymentResponse":"([A-Za-z0-9+/=]+)"')


@dataclass
class Box:
    """The middlebox's mode, and the last reply it relayed untouched (for ``replay``)."""

    mode: str = "none"
    captured: bytes | None = None


def _forged(value: bytes) -> bytes:
    """An x402 receipt turned into a refusal (what any path can write: it is unsigned)."""
    receipt = json.loads(base64.b64decode(value))
    receipt.update(success=False, errorReason="invalid_exact_evm_insufficient_balance")
    return base64.b64encode(json.dumps(receipt).encode())


def _rewrite(box: Box, reply: bytes) -> bytes:
    if box.mode == "forge":  # a charged stream: its signed receipt gone, a refusal in its place
        reply = _SIGNED_ENTRY.sub(b"", _SIGNED_LINE.sub(b"", reply))
        reply = _X402_LINE.sub(lambda m: b": x402-payment-response " + _forged(m[1]), reply)
        return _X402_ENTRY.sub(lambda m: b'"x402PaymentResponse":"' + _forged(m[1]) + b'"', reply)
    if box.mode == "strip":  # a refusal without the appliance's signature on it
        return _SIGNED_ENTRY.sub(b"", _SIGNED_LINE.sub(b"", reply))
    if box.mode == "replay":  # another request's genuine refusal, signature and all
        assert box.captured is not None
        return box.captured
    if box.mode == "append":  # content after the signed end
        return reply + b'data: {"choices":[{"index":0,"delta":{"content":"more"}}]}\n\n'
    return reply


def _app(target: str, box: Box) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT)) as session,
            session.request(
                request.method, target + request.path_qs, headers=headers, data=body
            ) as upstream,
        ):
            status = upstream.status
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            reply = await upstream.read()
        if status == 200 and request.path in (CHAT, GENERATE):
            if box.mode == "none":
                box.captured = reply
            reply = _rewrite(box, reply)
        return web.Response(status=status, body=reply, headers=out)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _stream(
    url: str,
    payer: Any,
    path: str,
    body: Any,
    *,
    refuse: tuple[Any, Any] | None = None,
    envelope: Any = "plain",
) -> tuple[bytes, BaseException | None, Any, Any]:
    """One paid stream through the box, read to its end: (what was handed out, the error at
    the end, the payment record, the signed receipt). With ``refuse`` (anvil, the facilitator),
    the payer's funds move away once its settlement has begun: refused for good."""
    transport = AsyncPaygateTransport(
        envelope=envelope, wallet=payer, spend=SPEND, attestation=POLICY
    )
    async with httpx.AsyncClient(transport=transport, timeout=_TIMEOUT) as http:

        async def read() -> tuple[bytes, BaseException | None, Any]:
            plain = bytearray()
            async with http.stream("POST", url + path, json=body) as response:
                assert response.status_code == 200
                signed = response.extensions["paygate_receipt"]
                try:
                    async for chunk in response.aiter_bytes():
                        plain.extend(chunk)
                except (PaymentRefused, RefusalUnauthenticated, ContentAfterReceipt) as exc:
                    return bytes(plain), exc, signed
            return bytes(plain), None, signed

        reading = asyncio.ensure_future(read())
        if refuse is not None:
            anvil, facilitator = refuse
            await eventually(lambda: facilitator.stats.settle_calls >= 1, timeout=10)
            await asyncio.to_thread(drain_wallet, anvil, payer)
        plain, error, signed = await reading
        return plain, error, transport.last_payment, signed


@pytest.fixture
async def box_stack(facilitator: Any, seller: str, tmp_path: Any) -> Any:
    box = Box()
    ledger = tmp_path / "payments.db"
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        attestation_rate_per_minute=100_000,
        attestation_global_rate_per_minute=100_000,
    ) as stack:
        with ThreadedServer(_app(stack.url, box)) as server:
            yield box, server.url, ledger


@pytest.mark.parametrize(
    ("envelope", "path", "body"),
    [("plain", CHAT, SSE_BODY), ("plain", GENERATE, NDJSON_BODY), ("v2", CHAT, SSE_BODY)],
)
async def test_a_genuine_refusal_is_signed_and_raised(
    box_stack: Any, facilitator: Any, anvil: Any, payer: Any, envelope: str, path: str, body: Any
) -> None:
    """The control: through the box, untouched, the refusal verifies and is raised (sealed v2:
    both the x402 refusal and the signed one are inside the final frame)."""
    _, url, ledger = box_stack
    facilitator.set_fault("slow", "settle", delay=2.0)
    plain, error, sent, signed = await _stream(
        url, payer, path, body, refuse=(anvil, facilitator), envelope=envelope
    )
    assert isinstance(error, PaymentRefused), error
    assert signed.claims is not None
    assert signed.claims["kind"] == "refusal"
    assert signed.claims["payment"]["charged"] == "0"
    assert signed.claims["reason"] == error.reason == sent.receipt.error_reason
    assert sent.receipt_error is None
    assert b"fake" in plain  # the content went out before its settlement
    (record,) = await records(ledger)
    assert record.state is PaymentState.FAILED


@pytest.mark.parametrize(("path", "body"), [(CHAT, SSE_BODY), (GENERATE, NDJSON_BODY)])
async def test_a_forged_refusal_of_a_charged_stream_is_not_believed(
    box_stack: Any, payer: Any, usdc: Any, seller: str, path: str, body: Any
) -> None:
    """The box strips the charge's signed receipt and turns the x402 receipt into a refusal:
    the client must not believe it was not charged (it was)."""
    box, url, ledger = box_stack
    box.mode = "forge"
    _, error, sent, signed = await _stream(url, payer, path, body)
    assert isinstance(error, RefusalUnauthenticated), error
    assert signed.claims is None
    assert sent.receipt_error is not None
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLED
    assert usdc.balance_of(seller) > 0  # charged, whatever the forged receipt said


async def test_a_refusal_stripped_of_its_signature_is_not_believed(
    box_stack: Any, facilitator: Any, anvil: Any, payer: Any
) -> None:
    box, url, _ = box_stack
    box.mode = "strip"
    facilitator.set_fault("slow", "settle", delay=2.0)
    _, error, sent, signed = await _stream(url, payer, CHAT, SSE_BODY, refuse=(anvil, facilitator))
    assert isinstance(error, RefusalUnauthenticated), error
    assert signed.claims is None
    assert sent.receipt_error is not None


async def test_another_requests_refusal_replayed_is_not_believed(
    box_stack: Any, facilitator: Any, anvil: Any, payer: Any, usdc: Any, seller: str
) -> None:
    """A genuine signed refusal of one request, given as the answer to the next (which the box
    forwarded: it was served and charged)."""
    box, url, ledger = box_stack
    facilitator.set_fault("slow", "settle", delay=2.0)
    _, first, _, _ = await _stream(url, payer, CHAT, SSE_BODY, refuse=(anvil, facilitator))
    assert isinstance(first, PaymentRefused), first
    facilitator.reset()
    anvil.mint(payer.address, PAYER_FUNDS)  # funds again: the next one is charged
    box.mode = "replay"
    _, error, _, signed = await _stream(url, payer, CHAT, SSE_BODY)
    assert isinstance(error, RefusalUnauthenticated), error
    assert "another request" in str(error)
    assert signed.claims is None
    states = sorted(r.state.value for r in await records(ledger))
    assert states == sorted([PaymentState.FAILED.value, PaymentState.SETTLED.value])
    assert usdc.balance_of(seller) > 0


async def test_content_after_a_signed_refusal_is_refused(
    box_stack: Any, facilitator: Any, anvil: Any, payer: Any
) -> None:
    box, url, _ = box_stack
    box.mode = "append"
    facilitator.set_fault("slow", "settle", delay=2.0)
    plain, error, _, _ = await _stream(url, payer, CHAT, SSE_BODY, refuse=(anvil, facilitator))
    assert isinstance(error, ContentAfterReceipt), error
    assert b"more" not in plain


async def test_the_openai_sdk_never_sees_a_clean_end_of_a_forged_refusal(
    box_stack: Any, payer: Any
) -> None:
    """The SDK stops reading at [DONE]: the end is held until the receipts are checked, so a
    forged refusal reaches it as the error, never as a clean stop."""
    box, url, _ = box_stack
    box.mode = "forge"
    transport = AsyncPaygateTransport(
        envelope="plain", wallet=payer, spend=SPEND, attestation=POLICY
    )
    client = openai.AsyncOpenAI(
        base_url=url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=transport, timeout=_TIMEOUT),
    )
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=SSE_BODY["messages"],  # type: ignore[arg-type]
        stream=True,
        extra_body={"fake": {"chunks": 4}},
    )
    with pytest.raises(RefusalUnauthenticated):
        async for _ in stream:
            pass
