"""Settlement receipts: a payment whose settlement completes after its reply gets a signed
settlement receipt at ``GET /v1/receipts/{payment_id}``; receipts are kept in the ledger (with
the usage of every scheme); ``paygate receipts list|show|verify`` read and check them.

The real gateway (software key, kept across two runs), the x402 SDK facilitator on anvil told
to leave its settlement pending, then a restart that proves it on the chain.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from enclave import SoftwareKey, receipts
from paygate import wire
from paygate.x402.ledger import PaymentState
from paygate.x402.ledger_sqlite import SqliteLedger
from tests.fixtures.payment_support import CHAT, CHAT_BODY, paid_stack, records, v2_header

NONCE = "ab" * 32


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any], str]:
    async with session.get(url) as response:
        return response.status, dict(response.headers), await response.text()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "receipts", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
        check=False,
    )


async def test_a_settlement_after_the_reply_gets_its_signed_receipt(
    facilitator: Any, anvil: Any, usdc: Any, payer: Any, seller: str, tmp_path: Path
) -> None:
    key = SoftwareKey.generate()
    ledger = tmp_path / "ledger.db"
    facilitator.set_fault("settlement_pending")
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, key=key
    ) as stack:
        header = await v2_header(stack, payer)
        async with stack.client.post(
            stack.url + CHAT,
            json=CHAT_BODY,
            headers={wire.PAYMENT_SIGNATURE: header, wire.REQUEST_NONCE_HEADER: NONCE},
        ) as response:
            assert response.status == 200
            reply = await response.read()
            token = response.headers[wire.RECEIPT_HEADER]
        claims = receipts.verify(token, key.receipt_public_key)
        payment = claims["payment"]
        assert payment["transaction"] == "pending"  # a hash proves nothing until settled
        assert payment["charged"] == payment["authorized"]
        assert claims["request_digest"] == receipts.request_digest(
            method="POST",
            path=CHAT,
            body=json.dumps(CHAT_BODY).encode(),
            nonce=bytes.fromhex(NONCE),
        )
        assert claims["reply_digest"] == receipts.body_digest(reply)
        nonce = payment["id"]
        status, headers, _ = await _get(stack.client, f"{stack.url}/v1/receipts/{nonce}")
        assert status == 404
        assert headers[wire.ERROR_HEADER] == "receipt_pending"
    (transaction,) = facilitator.stats.transactions
    facilitator.reset()
    # The next run proves the pending settlement on the chain, after the reply was long gone.
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        key=key,
        chain_rpc_url=anvil.rpc_url,
    ) as stack:
        url = f"{stack.url}/v1/receipts/{nonce}"
        answers: list[tuple[int, dict[str, Any], str]] = []

        async def settled() -> bool:
            answers.append(await _get(stack.client, url))
            return answers[-1][0] == 200

        async with asyncio.timeout(20):
            while not await settled():
                await asyncio.sleep(0.2)
        body = json.loads(answers[-1][2])
        settlement = receipts.verify(body["receipt"], key.receipt_public_key)
        assert settlement["kind"] == "settlement"
        assert settlement["request_digest"] == claims["request_digest"]
        moved = settlement["payment"]
        assert moved["id"] == nonce
        assert moved["transaction"] == transaction
        assert moved["charged"] == str(usdc.balance_of(seller))
        assert (moved["payer"], moved["pay_to"]) == (payer.address, seller)
        # Kept: the same bytes every time (what a log hashes).
        again = json.loads((await _get(stack.client, url))[2])["receipt"]
        assert receipts.signed_bytes(again) == receipts.signed_bytes(body["receipt"])
        for bad, code in (("0x12", "invalid_payment_id"), ("0x" + "cd" * 32, "receipt_not_found")):
            status, headers, _ = await _get(stack.client, f"{stack.url}/v1/receipts/{bad}")
            assert (status, headers[wire.ERROR_HEADER]) == (
                400 if code == "invalid_payment_id" else 404,
                code,
            )
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLED
    assert record.scheme == "exact"
    assert (record.tokens_in, record.tokens_out) == (  # usage recorded for exact too
        claims["usage"]["prompt_tokens"],
        claims["usage"]["completion_tokens"],
    )
    async with await SqliteLedger.open(ledger, read_only=True) as store:
        kept = {k.kind: k.token for k in await store.receipts(record.id)}
    assert kept == {"reply": token, "settlement": body["receipt"]}

    listed = _cli("list", "--ledger-path", str(ledger), "--json")
    assert listed.returncode == 0, listed.stderr
    assert {item["kind"] for item in json.loads(listed.stdout)} == {"reply", "settlement"}
    shown = _cli("show", nonce, "--ledger-path", str(ledger), "--json")
    assert shown.returncode == 0, shown.stderr
    assert [item["token"] for item in json.loads(shown.stdout)] == [token, body["receipt"]]
    verified = _cli("verify", body["receipt"], "--receipt-key", key.receipt_public_key.hex())
    assert verified.returncode == 0, verified.stderr
    assert "verified: a settlement receipt" in verified.stdout
    other = SoftwareKey.generate().receipt_public_key.hex()
    refused = _cli("verify", body["receipt"], "--receipt-key", other)
    assert refused.returncode != 0
    assert "does not verify" in refused.stderr


async def test_a_reply_settled_on_chain_before_it_leaves_names_its_transaction(
    facilitator: Any, anvil: Any, usdc: Any, payer: Any, seller: str, tmp_path: Path
) -> None:
    """Only a charge in the ledger (no transaction to name) has its reply receipt signed
    before it: a payment settled through the facilitator has it signed after, naming the
    hash, and kept in the ledger as sent."""
    key = SoftwareKey.generate()
    ledger = tmp_path / "ledger.db"
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, key=key
    ) as stack:
        header = await v2_header(stack, payer)
        async with stack.client.post(
            stack.url + CHAT, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: header}
        ) as response:
            assert response.status == 200
            token = response.headers[wire.RECEIPT_HEADER]
    (transaction,) = facilitator.stats.transactions
    payment = receipts.verify(token, key.receipt_public_key)["payment"]
    assert payment["transaction"] == transaction
    (record,) = await records(ledger)
    assert (record.state, record.transaction) == (PaymentState.SETTLED, transaction)
    async with await SqliteLedger.open(ledger, read_only=True) as reader:
        assert [(r.kind, r.token) for r in await reader.receipts(record.id)] == [("reply", token)]
