"""The client end to end: the ``openai`` package through our transport, against the real gateway
(FAKE model server behind it) charging real x402 payments on anvil through the SDK facilitator.

Every test checks what reached the wallets on chain, not only what the client says.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from paygate_dev.fake_model import reply_words

from enclave import SoftwareKey, p256
from paygate.client import (
    AsyncPaygateTransport,
    AttestationFailed,
    EnclaveKey,
    PaygateTransport,
    PaymentRefused,
    PinMismatch,
    SpendPolicy,
    SpendRefused,
)
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.gateway_support import Stack, ThreadedStack
from tests.fixtures.payment_support import PRICE_ATOMIC, paid_settings, paid_stack

MODEL = "fake-llama:latest"
PROMPT = "hello appliance"
WORDS = reply_words(PROMPT, 4)
MESSAGES = [{"role": "user", "content": PROMPT}]
SPEND = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])


@pytest.fixture
def stack(facilitator: Any, seller: str, tmp_path: Path) -> Iterator[Stack]:
    """A paid gateway that refuses plaintext bodies: whatever passes was sealed on the wire."""
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=tmp_path / "ledger.db",
        require_encryption=True,
    )
    with ThreadedStack(**settings) as running:
        yield running


def _openai(stack: Stack, transport: httpx.BaseTransport) -> openai.OpenAI:
    # No SDK retries: a retried paid call would sign again, and the tests count payments.
    return openai.OpenAI(
        base_url=stack.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=transport, timeout=30),
    )


def _paid(usdc: Any, payer: Any, seller: str, count: int) -> None:
    assert usdc.balance_of(seller) == count * PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - count * PRICE_ATOMIC


@pytest.mark.parametrize("envelope", ["v2", "v1"])
def test_openai_chat_completion_sealed_and_paid(
    stack: Stack, usdc: Any, payer: Any, seller: str, envelope: Any
) -> None:
    transport = PaygateTransport(envelope=envelope, wallet=payer, spend=SPEND)
    client = _openai(stack, transport)
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == " " + " ".join(WORDS)
    record = transport.last_payment
    assert record is not None
    assert record.settled
    assert record.receipt_source == "header"
    assert record.x402_version == 2
    assert record.network == "eip155:84532"
    assert transport.last_receipt == record.receipt
    assert usdc.authorization_state(payer.address, record.nonce)
    _paid(usdc, payer, seller, 1)


@pytest.mark.parametrize("envelope", ["v2", "v1"])
def test_openai_chat_stream_sealed_and_paid(
    stack: Stack, usdc: Any, payer: Any, seller: str, envelope: Any
) -> None:
    transport = PaygateTransport(envelope=envelope, wallet=payer, spend=SPEND)
    client = _openai(stack, transport)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    deltas = [chunk.choices[0].delta.content for chunk in stream]
    assert deltas == [" " + word for word in WORDS] + [None]
    record = transport.last_payment
    assert record is not None
    assert record.settled, record
    # v2 streams carry the receipt inside the sealed stream (read after the SDK's [DONE]);
    # v1 replies are sealed whole, so the gateway settles first and sends the header.
    assert record.receipt_source == ("stream" if envelope == "v2" else "header")
    _paid(usdc, payer, seller, 1)


def test_openai_completion_paid_with_x402_v1(
    stack: Stack, usdc: Any, payer: Any, seller: str
) -> None:
    transport = PaygateTransport(wallet=payer, spend=SPEND, x402_version=1)
    client = _openai(stack, transport)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, stream=True)
    assert "".join(choice.text for chunk in stream for choice in chunk.choices) == "".join(
        " " + word for word in WORDS
    )
    record = transport.last_payment
    assert record is not None
    assert record.x402_version == 1
    assert record.network == "base-sepolia"
    assert record.settled
    _paid(usdc, payer, seller, 1)


async def test_async_openai_stream_and_embeddings(
    facilitator: Any, usdc: Any, payer: Any, seller: str, tmp_path: Path
) -> None:
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=tmp_path / "ledger.db"
    ) as running:
        transport = AsyncPaygateTransport(wallet=payer, spend=SPEND)
        client = openai.AsyncOpenAI(
            base_url=running.url + "/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=transport, timeout=30),
        )
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        embedded = await client.embeddings.create(model="fake-embed:latest", input="x")
        await client.close()
    assert text == "".join(" " + word for word in WORDS)
    assert len(embedded.data[0].embedding) == 8
    assert [p.receipt_source for p in transport.payments] == ["stream", "header"]
    assert all(p.settled for p in transport.payments)
    _paid(usdc, payer, seller, 2)


def test_ollama_ndjson_stream_receipt_in_band(
    stack: Stack, usdc: Any, payer: Any, seller: str
) -> None:
    transport = PaygateTransport(wallet=payer, spend=SPEND)
    body = {"model": MODEL, "messages": MESSAGES}
    with (
        httpx.Client(transport=transport, base_url=stack.url, timeout=30) as client,
        client.stream("POST", "/api/chat", json=body) as reply,
    ):
        lines = list(reply.iter_lines())
        info = reply.extensions["paygate"]
    assert reply.headers["content-type"] == "application/x-ndjson"
    assert info.envelope == "v2"
    assert info.payment.receipt_source == "stream"
    assert info.payment.settled
    assert len(lines) == len(WORDS) + 1
    assert '"x402PaymentResponse"' in lines[-1]
    _paid(usdc, payer, seller, 1)


def test_spend_policy_total_is_enforced_across_requests(
    stack: Stack, usdc: Any, payer: Any, seller: str
) -> None:
    transport = PaygateTransport(
        wallet=payer, spend=SpendPolicy(max_per_request=1, max_total="0.0025")
    )
    client = _openai(stack, transport)
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(SpendRefused, match="max total"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert transport.spent == Decimal("0.002")
    _paid(usdc, payer, seller, 2)


def test_without_a_wallet_the_402_reaches_the_caller(
    stack: Stack, usdc: Any, payer: Any, seller: str
) -> None:
    client = _openai(stack, PaygateTransport())
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert raised.value.status_code == 402
    assert stack.fake.hits == {}
    _paid(usdc, payer, seller, 0)


def test_refused_payment_raises_with_the_servers_reason(
    stack: Stack, usdc: Any, seller: str
) -> None:
    from paygate_dev.chain.accounts import new_account

    transport = PaygateTransport(wallet=new_account(), spend=SPEND)  # holds no USDC
    client = _openai(stack, transport)
    with pytest.raises(PaymentRefused) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert "insufficient_balance" in refused.value.reason  # the facilitator's own reason
    assert stack.fake.hits == {}
    assert usdc.balance_of(seller) == 0


def test_facilitator_outage_is_a_503_and_moves_nothing(
    stack: Stack, facilitator: Any, usdc: Any, payer: Any, seller: str
) -> None:
    facilitator.down()
    client = _openai(stack, PaygateTransport(wallet=payer, spend=SPEND))
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert raised.value.status_code == 503
    assert stack.fake.hits == {}
    _paid(usdc, payer, seller, 0)


def test_pinned_key_is_used_and_attested_once(
    stack: Stack, usdc: Any, payer: Any, seller: str
) -> None:
    seen: list[EnclaveKey] = []
    transport = PaygateTransport(
        wallet=payer,
        spend=SPEND,
        pin=p256.fingerprint(stack.key.public_key),
        attest=seen.append,
    )
    client = _openai(stack, transport)
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert [key.public_key for key in seen] == [stack.key.public_key]
    assert transport.key(stack.url) == seen[0]
    _paid(usdc, payer, seller, 2)


def test_pin_mismatch_seals_and_pays_nothing(
    stack: Stack, usdc: Any, payer: Any, seller: str
) -> None:
    other = SoftwareKey.generate().public_key
    transport = PaygateTransport(wallet=payer, spend=SPEND, pin=other.hex())
    client = _openai(stack, transport)
    with pytest.raises(PinMismatch) as mismatch:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert mismatch.value.code == "pin_mismatch"
    assert transport.key(stack.url) is None
    assert transport.payments == []
    assert stack.fake.hits == {}
    _paid(usdc, payer, seller, 0)


def test_attestation_hook_refusal_seals_nothing(stack: Stack, payer: Any) -> None:
    def refuse(key: EnclaveKey) -> None:
        raise ValueError("quote does not match the expected measurement")

    transport = PaygateTransport(wallet=payer, spend=SPEND, attest=refuse)
    with (
        httpx.Client(transport=transport, base_url=stack.url, timeout=30) as client,
        pytest.raises(AttestationFailed, match="expected measurement"),
    ):
        client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
    assert transport.key(stack.url) is None
    assert stack.fake.hits == {}
