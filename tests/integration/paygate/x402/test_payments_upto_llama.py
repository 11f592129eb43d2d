"""A model that never stops by itself, metered: llama.cpp's real llama-server with the tiny
generated model built ``--no-eos`` (scripts/make_tiny_gguf.py: it repeats its sentence forever).

A request naming no ``max_tokens`` is cut at the cap the gateway sets, and settles what the
server reports — never more than the authorized maximum — whole or streamed (the server's
usage, asked for by the gateway, is stripped from the stream of a caller who did not ask).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from paygate_dev.llama import LlamaBuild, LlamaServer, LlamaStartFailed

from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.payment_support import paid_stack, records
from tests.fixtures.upto_support import (
    CAP,
    charge,
    decoded,
    receipt_header,
    sdk_upto_client,
    upto_settings,
    usage_of_receipt,
)

ROOT = Path(__file__).resolve().parents[4]
CHAT = "/v1/chat/completions"
BODY = {"model": "tiny-no-eos", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


@pytest.fixture(scope="module")
def no_eos_server(llama: LlamaBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("no-eos")
    model = work / "tiny-no-eos.gguf"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_gguf.py"), str(model), "--no-eos"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server = LlamaServer(llama.server, model, "tiny-no-eos", work / "server.log")
    try:
        server.start()
    except LlamaStartFailed as exc:
        pytest.fail(str(exc))
    try:
        yield server.url
    finally:
        server.stop()


async def test_a_model_that_never_stops_is_cut_at_the_cap_and_settles_what_it_reported(
    no_eos_server, facilitator, usdc, upto_payer, seller, tmp_path
):
    ledger = tmp_path / "payments.db"
    async with (
        paid_stack(
            seller=seller,
            facilitator_url=facilitator.url,
            ledger=ledger,
            upstream_url=no_eos_server,
            upstream_kind="llama-server",
            **upto_settings(),
        ) as stack,
        sdk_upto_client(upto_payer) as client,
    ):
        whole = await client.post(stack.url + CHAT, json=BODY)
        assert whole.status_code == 200, whole.text
        async with client.stream(
            "POST", stack.url + CHAT, json={**BODY, "stream": True}
        ) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines()]
    reply = whole.json()
    usage = reply["usage"]
    assert usage["completion_tokens"] == CAP  # stopped by the cap, not by the model
    assert reply["choices"][0]["finish_reason"] == "length"
    first = receipt_header(whole.headers)
    assert first["amount"] == str(charge(usage["prompt_tokens"], CAP))
    events = [line for line in lines if line.startswith("data: {")]
    assert all('"usage"' not in event for event in events)  # not asked for: stripped
    (comment,) = [line for line in lines if line.startswith(": x402-payment-response ")]
    second = decoded(comment.split(" ", 2)[2])
    streamed = usage_of_receipt(second)
    assert streamed["completionTokens"] == CAP
    assert streamed["source"] == "upstream"
    assert second["amount"] == str(charge(streamed["promptTokens"], CAP))
    total = int(first["amount"]) + int(second["amount"])
    assert usdc.balance_of(seller) == total
    assert usdc.balance_of(upto_payer.address) == PAYER_FUNDS - total
    for record in await records(ledger):
        assert record.settled_amount is not None
        assert record.settled_amount <= record.amount  # never more than the authorized maximum
        assert record.tokens_in is not None
        assert record.tokens_in <= len(json.dumps({**BODY, "stream": True})) + 24
