"""A metered stream the caller drops is settled for what was produced, never the maximum: the
official SDK's upto client reads k chunks and goes away; the chain shows ≈ k tokens' price.

Counted by the engine's running usage (vLLM ``continuous_usage_stats``, llama-server
``timings_per_token``), else its tokenizer on the text delivered (``running_usage`` off), else
the operator's fallback — by default the prompt alone (an engine with neither: Ollama). The
FAKE mirrors each engine (named as such); the real llama-server (SmolLM2) runs both counts.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from paygate_dev.fake_model import FakeModelServer

from paygate.x402.ledger import PaymentRecord, PaymentState
from tests.fixtures.payment_support import CHAT, CHAT_BODY, paid_stack, records
from tests.fixtures.upto_support import IN_ATOMIC, charge, sdk_upto_client, upto_settings

K = 5  # content chunks the caller reads before it goes away
SLACK = 4  # chunks the gateway may have read from the engine before it saw the caller gone


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "payments.db"


async def settled(ledger: Path, timeout: float = 20.0) -> PaymentRecord:
    """The one payment, once its settlement has finished (the caller is gone: no receipt)."""
    async with asyncio.timeout(timeout):
        while True:
            found = await records(ledger)
            if found and found[0].state in (PaymentState.SETTLED, PaymentState.FAILED):
                return found[0]
            await asyncio.sleep(0.1)


async def drop_after(stack: Any, payer: Any, body: dict[str, Any], k: int) -> int:
    """Stream ``body`` with the SDK's upto client, read ``k`` content chunks, hang up."""
    seen = 0
    async with (
        sdk_upto_client(payer) as client,
        client.stream("POST", stack.url + CHAT, json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                seen += 1
                if seen == k:
                    break
    return seen


@pytest.mark.parametrize(
    ("engine", "settings", "source"),
    [
        ("vllm", {}, "running"),
        ("llama-server", {}, "running"),
        ("llama-server", {"running_usage": False}, "tokenizer"),
    ],
)
async def test_a_dropped_stream_settles_about_k_chunks(
    facilitator, usdc, upto_payer, seller, ledger, engine, settings, source
):
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": 60, "pace": 0.05}}
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        fake=FakeModelServer(engine=engine),
        upstream_kind=engine,
        **upto_settings(**settings),
    ) as stack:
        assert await drop_after(stack, upto_payer, body, K) == K
        record = await settled(ledger)
    assert record.usage_source == source
    assert record.tokens_out is not None
    assert K <= record.tokens_out <= K + SLACK  # not the 64-token maximum
    assert record.tokens_in == 1  # the FAKE's prompt: one word, counted by the engine
    assert record.settled_amount == charge(1, record.tokens_out) < record.amount
    assert usdc.balance_of(seller) == record.settled_amount


async def test_nothing_to_count_charges_the_prompt_bound_by_default(
    facilitator, usdc, upto_payer, seller, ledger
):
    # The FAKE as Ollama: usage only on the final object, no tokenize route.
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": 60, "pace": 0.05}}
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        fake=FakeModelServer(engine="ollama"),
        **upto_settings(),
    ) as stack:
        await drop_after(stack, upto_payer, body, K)
        record = await settled(ledger)
    assert (record.usage_source, record.tokens_out) == ("fallback-prompt", 0)
    assert record.tokens_in is not None
    assert record.settled_amount == IN_ATOMIC * record.tokens_in < record.amount
    assert usdc.balance_of(seller) == record.settled_amount


async def test_an_upstream_cut_mid_stream_charges_what_it_produced(
    facilitator, usdc, upto_payer, seller, ledger
):
    # fake-malformed: the first chunk, then the connection is cut mid-transfer.
    body = {**CHAT_BODY, "model": "fake-malformed", "stream": True}
    async with (
        paid_stack(
            seller=seller,
            facilitator_url=facilitator.url,
            ledger=ledger,
            fake=FakeModelServer(engine="vllm"),
            upstream_kind="vllm",
            **upto_settings(),
        ) as stack,
        sdk_upto_client(upto_payer) as client,
    ):
        async with client.stream("POST", stack.url + CHAT, json=body) as response:
            with contextlib.suppress(httpx.HTTPError):
                [line async for line in response.aiter_lines()]
        record = await settled(ledger)
    assert (record.usage_source, record.tokens_in, record.tokens_out) == ("running", 1, 1)
    assert record.settled_amount == charge(1, 1)
    assert usdc.balance_of(seller) == charge(1, 1)


# --- the real llama-server (SmolLM2, real weights) ------------------------------------------

STORY = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
    "temperature": 0,
    "stream": True,
}


@pytest.mark.parametrize(
    ("settings", "source"), [({}, "running"), ({"running_usage": False}, "tokenizer")]
)
async def test_real_llama_server_dropped_stream_settles_about_k_tokens(
    smollm2_server, facilitator, usdc, upto_payer, seller, ledger, settings, source
):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        upstream_url=smollm2_server.url,
        upstream_kind="llama-server",
        **upto_settings(**settings),
    ) as stack:
        assert await drop_after(stack, upto_payer, STORY, K) == K
        record = await settled(ledger)
    assert record.usage_source == source
    assert record.tokens_out is not None
    assert K - 1 <= record.tokens_out <= K + SLACK + 4  # tokens, as the engine counts them
    assert record.tokens_in is not None
    assert 0 < record.tokens_in <= 40  # SmolLM2's chat template around one short message
    assert record.settled_amount == charge(record.tokens_in, record.tokens_out) < record.amount
    assert usdc.balance_of(seller) == record.settled_amount
