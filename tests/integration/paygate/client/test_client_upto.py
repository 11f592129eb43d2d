"""Our client pays metered (`upto`) requests: the ``openai`` package through PaygateTransport,
sealed, against the real gateway offering only `upto`, settled on anvil by the SDK's upto
facilitator. The transport signs within its SpendPolicy (max per request, max price per million
tokens, total — the maximum counted until the receipt), checks the receipt's settled amount
against the usage and the offered prices, and exposes both."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from paygate.client import AttestationPolicy, PaygateTransport, SpendPolicy, SpendRefused
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.gateway_support import Stack, ThreadedStack
from tests.fixtures.payment_support import paid_settings
from tests.fixtures.upto_support import charge, upto_settings

MODEL = "fake-llama:latest"
MESSAGES = [{"role": "user", "content": "hello appliance"}]  # two prompt tokens for the FAKE
SPEND = SpendPolicy(
    max_per_request="0.1", max_total="1", networks=["base-sepolia"], max_price_per_million="400"
)


@pytest.fixture
def stack(facilitator: Any, seller: str, tmp_path: Path) -> Iterator[Stack]:
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=tmp_path / "ledger.db",
        require_encryption=True,
        **upto_settings(payment_schemes=["upto"]),
    )
    with ThreadedStack(**settings) as running:
        yield running


def _openai(stack: Stack, transport: httpx.BaseTransport) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=transport, timeout=30),
    )


def test_the_transport_pays_upto_and_checks_the_receipt(
    stack: Stack, usdc: Any, upto_payer: Any, seller: str
) -> None:
    transport = PaygateTransport(wallet=upto_payer, spend=SPEND)
    client = _openai(stack, transport)
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4
    whole = transport.last_payment
    assert whole is not None
    assert whole.scheme == "upto"
    assert whole.receipt_error is None
    assert (whole.tokens_in, whole.tokens_out) == (2, 4)
    assert whole.charged == Decimal(charge(2, 4)).scaleb(-6)
    assert whole.charged < whole.amount  # the maximum it signed for

    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks)  # not asked for: stripped
    streamed = transport.last_payment
    assert streamed is not None
    assert streamed.receipt_source == "stream"
    assert streamed.receipt_error is None
    assert streamed.tokens_out == 4
    owed = 2 * charge(2, 4)
    assert usdc.balance_of(seller) == owed
    assert usdc.balance_of(upto_payer.address) == PAYER_FUNDS - owed
    # Spent counts what was settled, not the maxima signed for.
    assert transport.spent == Decimal(owed).scaleb(-6)


def test_token_prices_above_the_policy_are_declined_before_signing(
    stack: Stack, usdc: Any, upto_payer: Any, seller: str
) -> None:
    cheap = SpendPolicy(max_per_request="0.1", networks=["base-sepolia"], max_price_per_million="1")
    client = _openai(stack, PaygateTransport(wallet=upto_payer, spend=cheap))
    with pytest.raises(SpendRefused, match="max price per million"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert usdc.balance_of(seller) == 0


def test_the_authorized_maximum_counts_against_the_total_until_the_receipt(
    stack: Stack, usdc: Any, upto_payer: Any, seller: str
) -> None:
    # The maximum of one request (~0.04 USDC here) fits the total once, not twice over.
    tight = SpendPolicy(
        max_per_request="0.1",
        max_total="0.05",
        networks=["base-sepolia"],
        max_price_per_million="400",
    )
    transport = PaygateTransport(wallet=upto_payer, spend=tight)
    client = _openai(stack, transport)
    client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    record = transport.last_payment
    assert record is not None
    assert record.amount <= Decimal("0.05") < 2 * record.amount
    # Settled for far less than its maximum, so the next one fits again.
    client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert usdc.balance_of(seller) == 2 * charge(2, 4)


def test_the_verified_receipt_equals_the_chain_and_the_model_servers_usage(
    stack: Stack, usdc: Any, upto_payer: Any, seller: str
) -> None:
    """Attested (the policy accepts this software key's kind ``none``), sealed and metered:
    the signed receipt the client verified names exactly what moved on chain and the usage the
    model server reported."""
    transport = PaygateTransport(
        wallet=upto_payer, spend=SPEND, attestation=AttestationPolicy(allow_unattested=True)
    )
    for stream in (False, True):
        before = usdc.balance_of(seller)
        completion = _openai(stack, transport).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        )
        if stream:
            usage = [c.usage for c in completion if c.usage is not None][-1]  # type: ignore[union-attr]
        else:
            usage = completion.usage  # type: ignore[union-attr]
        claims = transport.last_signed_receipt
        assert claims is not None
        assert usage is not None
        payment = claims["payment"]
        record = transport.last_payment
        assert record is not None
        assert payment["scheme"] == "upto"
        assert payment["id"] == record.nonce.lower()
        assert int(payment["authorized"]) == record.amount_atomic
        # The model server's own count, and the charge it makes at the offered prices.
        assert claims["usage"]["prompt_tokens"] == usage.prompt_tokens
        assert claims["usage"]["completion_tokens"] == usage.completion_tokens
        assert claims["usage"]["source"] == "reported"
        assert int(payment["charged"]) == charge(usage.prompt_tokens, usage.completion_tokens)
        # The chain's settlement: the transaction moved that amount from the payer to payTo.
        mined = usdc.chain.wait_for_receipt(payment["transaction"])
        (moved,) = usdc.chain.token().events.Transfer().process_receipt(mined)
        assert moved["args"]["from"] == payment["payer"] == upto_payer.address
        assert moved["args"]["to"] == payment["pay_to"] == seller
        assert moved["args"]["value"] == int(payment["charged"])
        assert usdc.balance_of(seller) - before == int(payment["charged"])
