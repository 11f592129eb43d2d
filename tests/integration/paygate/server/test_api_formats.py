"""The Responses API and Anthropic's Messages API through the gateway: sealed, paid (anvil +
the x402 SDK facilitator) and metered like chat, with the OpenAI and Anthropic SDKs as callers.

The llama-server built for the tests serves neither API (it answers 404: checked below), so the
upstream is the FAKE model server speaking vLLM's (documented) shapes with ``upstream_kind
vllm``: deterministic words, and usage in each API's own objects and stream events.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from paygate_dev.fake_model import FakeModelServer, prompt_tokens, reply_words
from paygate_dev.llama import LlamaServer

from paygate import wire
from paygate.client import PaygateTransport, SpendPolicy
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.gateway_support import Stack, ThreadedStack, running_stack
from tests.fixtures.payment_support import PRICE_ATOMIC, paid_settings

SPEND = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])
MODEL = "fake-llama:latest"
PROMPT = "name four trees"
WORDS = 3  # below the FAKE's default length: the limit decides it


def _expected(body: dict[str, Any]) -> tuple[str, int]:
    """The FAKE's reply text and prompt tokens for ``body``."""
    return " " + " ".join(reply_words(PROMPT, WORDS)), prompt_tokens(body)


def _counter(stack: Stack, name: str) -> int:
    text = httpx.get(stack.url + "/metrics", timeout=10).text
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name)]
    return int(float(values[0])) if values else 0


def _http(stack: Stack, transport: httpx.BaseTransport) -> httpx.Client:
    return httpx.Client(transport=transport, timeout=30)


def _responses(stack: Stack, transport: httpx.BaseTransport, stream: bool) -> tuple[str, Any]:
    client = openai.OpenAI(
        base_url=stack.url + "/v1", api_key="unused", max_retries=0,
        http_client=_http(stack, transport),
    )  # fmt: skip
    if not stream:
        reply = client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=WORDS)
        return reply.output_text, reply.usage
    text, usage = [], None
    events = client.responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=WORDS, stream=True
    )
    for event in events:
        if event.type == "response.output_text.delta":
            text.append(event.delta)
        elif event.type == "response.completed":
            usage = event.response.usage
    return "".join(text), usage


def _messages(stack: Stack, transport: httpx.BaseTransport, stream: bool) -> tuple[str, Any]:
    client = anthropic.Anthropic(
        base_url=stack.url, api_key="unused", max_retries=0, http_client=_http(stack, transport)
    )
    messages: Any = [{"role": "user", "content": PROMPT}]
    if not stream:
        reply = client.messages.create(model=MODEL, max_tokens=WORDS, messages=messages)
        return "".join(block.text for block in reply.content if block.type == "text"), reply.usage
    with client.messages.stream(model=MODEL, max_tokens=WORDS, messages=messages) as events:
        text = "".join(events.text_stream)
        final = events.get_final_message()
    return text, final.usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("api", ["responses", "messages"])
def test_sealed_and_paid_through_the_sdks(
    request: pytest.FixtureRequest, tmp_path: Path, api: str, stream: bool
) -> None:
    facilitator = request.getfixturevalue("facilitator")
    seller = request.getfixturevalue("seller")
    wallet = request.getfixturevalue("payer")
    usdc = request.getfixturevalue("usdc")
    fake = FakeModelServer()
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=tmp_path / "l.db",
        upstream_kind="vllm",
        require_encryption=True,  # plaintext would be refused: these really are sealed
    )
    with ThreadedStack(fake=fake, **settings) as stack:
        transport = PaygateTransport(envelope="v2", wallet=wallet, spend=SPEND)
        ask = _responses if api == "responses" else _messages
        text, usage = ask(stack, transport, stream)
        sent = json.loads(fake.received[-1].body)
        expected_text, read = _expected(sent)
        assert text == expected_text
        assert (usage.input_tokens, usage.output_tokens) == (read, WORDS)
        # Metered on the API's own usage objects.
        assert _counter(stack, 'paygate_tokens_total{kind="prompt"}') == read
        assert _counter(stack, 'paygate_tokens_total{kind="completion"}') == WORDS
        record = transport.last_payment
        assert record is not None
        assert record.settled
        assert usdc.balance_of(seller) == PRICE_ATOMIC
        assert usdc.balance_of(wallet.address) == PAYER_FUNDS - PRICE_ATOMIC
        if api == "responses":
            # The payer's own salt, and no response kept by the engine between requests.
            assert len(sent["cache_salt"]) == 43
            assert sent["store"] is False
        else:
            assert "cache_salt" not in sent  # vLLM's Anthropic endpoint takes none (documented)


async def test_salts_differ_per_tenant_and_a_callers_own_is_refused() -> None:
    fake = FakeModelServer()
    settings = {"upstream_kind": "vllm", "trusted_proxies": ["127.0.0.1/32"]}
    async with running_stack(fake=fake, **settings) as stack:

        async def salt(address: str, path: str, body: dict[str, Any]) -> str:
            headers = {"X-Forwarded-For": address}
            async with stack.client.post(stack.url + path, json=body, headers=headers) as reply:
                assert reply.status == 200, await reply.text()
            return str(json.loads(fake.received[-1].body)["cache_salt"])

        chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
        responses = {"model": MODEL, "input": PROMPT}
        first = await salt("10.0.0.1", "/v1/chat/completions", chat)
        assert await salt("10.0.0.1", "/v1/responses", responses) == first  # one per tenant
        assert await salt("10.0.0.2", "/v1/chat/completions", chat) != first
        for path, body, code in (
            ("/v1/chat/completions", {**chat, "cache_salt": first}, "cache_parameter_refused"),
            ("/v1/responses", {**responses, "cache_salt": first}, "cache_parameter_refused"),
            (
                "/v1/responses",
                {**responses, "previous_response_id": "resp_x"},
                "server_state_refused",
            ),
            ("/v1/responses", {**responses, "background": True}, "server_state_refused"),
        ):
            async with stack.client.post(stack.url + path, json=body) as reply:
                assert reply.status == 400
                assert reply.headers[wire.ERROR_HEADER] == code


async def test_usage_is_read_from_each_apis_stream_events() -> None:
    fake = FakeModelServer()
    async with running_stack(fake=fake, upstream_kind="vllm") as stack:
        for path, body in (
            ("/v1/responses", {"model": MODEL, "input": PROMPT, "stream": True}),
            (
                "/v1/messages",
                {
                    "model": MODEL,
                    "max_tokens": 64,
                    "stream": True,
                    "messages": [{"role": "user", "content": PROMPT}],
                },
            ),
        ):
            async with stack.client.post(stack.url + path, json=body) as reply:
                assert reply.status == 200
                assert reply.headers["Content-Type"].startswith("text/event-stream")
                await reply.read()
        # The FAKE's default length (4 words) twice, read from response.completed and from
        # message_start (input) + message_delta (output).
        async with stack.client.get(stack.url + "/metrics") as reply:
            text = await reply.text()
        assert 'paygate_tokens_total{kind="completion"} 8' in text


def test_the_built_llama_server_serves_neither_api(smollm2_server: LlamaServer) -> None:
    for path in ("/v1/responses", "/v1/messages"):
        reply = httpx.post(smollm2_server.url + path, json={"model": "smollm2"}, timeout=10)
        assert reply.status_code == 404
