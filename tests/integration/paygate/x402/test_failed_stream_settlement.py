"""A stream whose settlement is refused for good after its content went out: the payer moves
the funds between verify and settle, so the transfer the facilitator sends reverts. On real
components (the gateway, the FAKE model server, anvil with the SDK's facilitator).

The content cannot be taken back, but nothing may claim it was paid for: the stream's end
carries the refusing x402 receipt (what a whole reply's 402 carries) and, in the signed
receipt's place, the appliance's signed refusal (kind ``refusal``, charging nothing) — a reply
receipt would state ``charged`` with ``transaction: pending`` for a charge that failed.
paygate's client raises the refusal at the stream's end rather than ending it cleanly (a
verifying client only on the signed refusal: test_refusal_middlebox.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from typing import Any

import aiohttp
import httpx
import pytest

from enclave import SoftwareKey, receipts
from paygate import wire
from paygate.client import AsyncPaygateTransport, PaymentRefused, SpendPolicy
from paygate.server.receipts import NDJSON_KEY as SIGNED_RECEIPT_KEY
from paygate.server.receipts import SSE_PREFIX as SIGNED_RECEIPT_LINE
from paygate.tlog import assembly as tlog_assembly
from paygate.x402.inband import NDJSON_KEY as PAYMENT_RECEIPT_KEY
from paygate.x402.inband import SSE_PREFIX as PAYMENT_RECEIPT_LINE
from paygate.x402.ledger import PaymentState
from tests.fixtures.gateway_support import eventually
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    drain_wallet,
    paid_stack,
    records,
    v2_header,
)
from tests.fixtures.tlog_support import ORIGIN

GENERATE = "/api/generate"
STREAMS = [
    (CHAT, {**CHAT_BODY, "stream": True, "fake": {"chunks": 4}}),
    (GENERATE, {"model": "fake-llama", "prompt": "hi", "fake": {"chunks": 4}}),
]


async def _read(url: str, path: str, header: str, body: Any) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client,
        client.post(url + path, json=body, headers={wire.PAYMENT_SIGNATURE: header}) as response,
    ):
        return response.status, await response.read()  # raises if the stream was cut


def _signed_refusal(path: str, raw: bytes) -> dict[str, Any]:
    if path == CHAT:
        (line,) = [ln for ln in raw.splitlines() if ln.startswith(SIGNED_RECEIPT_LINE)]
        token = line[len(SIGNED_RECEIPT_LINE) :].decode()
    else:
        token = json.loads(raw.splitlines()[-1])[SIGNED_RECEIPT_KEY]
    return receipts.unverified_claims(token)


def _payment_receipt(path: str, raw: bytes) -> dict[str, Any]:
    if path == CHAT:
        (line,) = [ln for ln in raw.splitlines() if ln.startswith(PAYMENT_RECEIPT_LINE)]
        value = line[len(PAYMENT_RECEIPT_LINE) :]
    else:
        done = json.loads(raw.splitlines()[-1])
        assert done["done"] is True
        value = done[PAYMENT_RECEIPT_KEY]
    return json.loads(base64.b64decode(value))


@pytest.mark.parametrize(("path", "body"), STREAMS, ids=["sse", "ndjson"])
async def test_a_stream_whose_settlement_failed_ends_with_the_refusal_signed_and_no_charge(
    facilitator, usdc, anvil, payer, seller, tmp_path, path, body
):
    ledger = tmp_path / "payments.db"
    facilitator.set_fault("slow", "settle", delay=2.0)
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        header = await v2_header(stack, payer, path, body)
        reading = asyncio.ensure_future(_read(stack.url, path, header, body))
        await eventually(lambda: facilitator.stats.settle_calls == 1, timeout=10)
        await asyncio.to_thread(drain_wallet, anvil, payer)
        status, raw = await reading
    assert status == 200
    assert b"fake" in raw  # the content went before its settlement
    receipt = _payment_receipt(path, raw)
    assert receipt["success"] is False
    assert receipt["errorReason"]
    signed = _signed_refusal(path, raw)  # last: after the x402 receipt, which it covers
    assert signed["kind"] == "refusal"
    assert signed["reason"] == receipt["errorReason"]
    assert signed["payment"]["charged"] == "0"
    assert signed["payment"]["transaction"] == "none"
    (record,) = await records(ledger)
    assert record.state is PaymentState.FAILED
    assert usdc.balance_of(seller) == 0


async def test_paygate_client_raises_the_refusal_at_a_sealed_streams_end(
    facilitator, usdc, anvil, payer, seller, tmp_path
):
    """Sealed v2: the final frame comes (the stream is whole, not cut) and holds the refusal
    and the signed refusal; the client hands out the content, then raises PaymentRefused. The
    refusal is inside the seal: authenticated by it, no path can forge or strip it."""
    ledger = tmp_path / "payments.db"
    facilitator.set_fault("slow", "settle", delay=2.0)
    spend = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])
    body = STREAMS[0][1]
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        transport = AsyncPaygateTransport(envelope="v2", wallet=payer, spend=spend)
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:

            async def read() -> tuple[bytes, BaseException | None]:
                plain = bytearray()
                async with http.stream("POST", stack.url + CHAT, json=body) as response:
                    assert response.status_code == 200
                    assert response.headers.get(wire.ENVELOPE_HEADER) == "v2"
                    try:
                        async for chunk in response.aiter_bytes():
                            plain.extend(chunk)
                    except PaymentRefused as exc:
                        return bytes(plain), exc
                return bytes(plain), None

            reading = asyncio.ensure_future(read())
            await eventually(lambda: facilitator.stats.settle_calls == 1, timeout=10)
            await asyncio.to_thread(drain_wallet, anvil, payer)
            plain, error = await reading
            sent = transport.last_payment
    assert isinstance(error, PaymentRefused), error
    assert b"data: [DONE]" in plain
    assert SIGNED_RECEIPT_LINE in plain  # the signed refusal (unverified without a policy)
    assert sent.receipt is not None
    assert not sent.settled
    assert error.reason == sent.receipt.error_reason
    (record,) = await records(ledger)
    assert record.state is PaymentState.FAILED
    assert usdc.balance_of(seller) == 0


@pytest.mark.parametrize("with_chain", [True, False], ids=["chain", "no-chain"])
async def test_a_stream_whose_settlement_is_in_doubt_gets_no_signed_refusal(
    facilitator, usdc, anvil, payer, seller, tmp_path, with_chain
):
    """The payer front-runs the settlement with a cancel: the facilitator says "nonce already
    used". With a chain the cancel is proven (FAILED): a signed refusal. Without one nobody
    here can tell a cancel from a transfer to the seller, so the payment is flagged for review
    (SETTLING) and may yet be recorded as paid: a signed refusal there would be the appliance's
    word that nothing was charged for a payment it may later charge (and sign a settlement
    receipt for)."""
    ledger = tmp_path / "payments.db"
    settings = {"chain_rpc_url": anvil.rpc_url} if with_chain else {}
    facilitator.set_fault("slow", "settle", delay=2.0)
    path, body = STREAMS[0]
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, **settings
    ) as stack:
        header = await v2_header(stack, payer, path, body)
        reading = asyncio.ensure_future(_read(stack.url, path, header, body))
        await eventually(lambda: facilitator.stats.settle_calls == 1, timeout=10)
        nonce = json.loads(base64.b64decode(header))["payload"]["authorization"]["nonce"]
        await asyncio.to_thread(usdc.chain.cancel_authorization, payer, nonce)
        status, raw = await reading
    assert status == 200
    assert b"fake" in raw  # the content went before its settlement
    receipt = _payment_receipt(path, raw)
    assert receipt["success"] is False
    (record,) = await records(ledger)
    if with_chain:
        assert record.state is PaymentState.FAILED
        signed = _signed_refusal(path, raw)
        assert signed["kind"] == "refusal"
        assert signed["reason"] == record.error
    else:
        assert record.state is PaymentState.SETTLING
        assert record.needs_review
        assert receipt["errorReason"] == "settlement_pending"
        assert SIGNED_RECEIPT_LINE not in raw  # neither a refusal nor a charge is known
    assert usdc.balance_of(seller) == 0


async def test_a_signed_refusal_is_proven_in_the_transparency_log_and_charges_nothing(
    facilitator, usdc, anvil, payer, seller, tmp_path
):
    """The refusal is recorded in the log before the stream's end goes out: `paygate receipts
    audit` proves it included, and its period's receipts entry counts no charge."""
    ledger = tmp_path / "payments.db"
    facilitator.set_fault("slow", "settle", delay=2.0)
    path, body = STREAMS[0]
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger,
        transparency_log=True, log_origin=ORIGIN, log_receipt_period=1,
    ) as stack:  # fmt: skip
        key = stack.key
        assert isinstance(key, SoftwareKey)
        vkey = tlog_assembly.log_identity(ORIGIN, key).key
        header = await v2_header(stack, payer, path, body)
        reading = asyncio.ensure_future(_read(stack.url, path, header, body))
        await eventually(lambda: facilitator.stats.settle_calls == 1, timeout=10)
        await asyncio.to_thread(drain_wallet, anvil, payer)
        _, raw = await reading
        (line,) = [ln for ln in raw.splitlines() if ln.startswith(SIGNED_RECEIPT_LINE)]
        token = line[len(SIGNED_RECEIPT_LINE) :].decode()
        assert receipts.unverified_claims(token)["kind"] == "refusal"
        audit = None
        for _ in range(40):  # a period is cut every second
            audit = await asyncio.to_thread(
                _cli, "receipts", "audit", stack.url, token, "--log-key", vkey
            )
            assert audit.returncode == 0, audit.stderr
            if "1 receipts proven" in audit.stdout:
                break
            await asyncio.sleep(0.5)
        assert audit is not None
        assert "1 receipts proven" in audit.stdout, audit.stdout
        shown = await asyncio.to_thread(_cli, "log", "show", stack.url, "--log-key", vkey)
        assert shown.returncode == 0, shown.stderr
        periods = [
            json.loads(ln[ln.index("{") :])
            for ln in shown.stdout.splitlines()
            if '"type": "receipts"' in ln
        ]
        assert periods, shown.stdout
        assert all(p["charged"] in (0, "0") for p in periods), shown.stdout
    (record,) = await records(ledger)
    assert record.state is PaymentState.FAILED


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
