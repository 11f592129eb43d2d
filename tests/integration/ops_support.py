"""A paid, sealed run through the real gateway for the operations tests (metrics, logs)."""

from __future__ import annotations

from typing import Any

import httpx

from paygate.client import AsyncPaygateTransport, SpendPolicy

PROMPT = "the treasure is under the third oak tree"
SPEND = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])


async def paid_sealed_run(url: str, payer: Any) -> list[str]:
    """One whole and one streamed chat completion, v2-sealed and paid; the reply texts."""
    transport = AsyncPaygateTransport(envelope="v2", wallet=payer, spend=SPEND)
    replies = []
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:
        body = {"model": "fake-llama", "messages": [{"role": "user", "content": PROMPT}]}
        whole = await client.post(url + "/v1/chat/completions", json=body)
        assert whole.status_code == 200, whole.text
        replies.append(whole.json()["choices"][0]["message"]["content"])
        async with client.stream(
            "POST", url + "/v1/chat/completions", json={**body, "stream": True}
        ) as streamed:
            assert streamed.status_code == 200
            replies.append((await streamed.aread()).decode())
    records = transport.payments
    assert len(records) == 2
    assert all(record.settled for record in records)
    return replies
