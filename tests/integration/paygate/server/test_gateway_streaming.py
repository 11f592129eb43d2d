"""Streaming through the gateway: chunk by chunk, backpressure, and caller disconnects."""

from __future__ import annotations

import asyncio
import json

import enclave
from tests.fixtures.gateway_support import eventually, running_stack, without_signed_receipt

HOLD_CHAT = {"model": "fake-hold", "messages": [{"role": "user", "content": "hi"}]}


async def test_ndjson_first_chunk_arrives_before_the_upstream_finishes() -> None:
    async with running_stack() as s:
        resp = await s.client.post(s.url + "/api/chat", json=HOLD_CHAT)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        first = await asyncio.wait_for(resp.content.readline(), 5)
        assert json.loads(first)["done"] is False
        # The fake is still holding the rest of the reply: nothing has completed upstream.
        assert s.fake.completed["POST /api/chat"] == 0
        s.fake.release.set()
        rest = await asyncio.wait_for(resp.read(), 5)
        lines = [json.loads(line) for line in rest.splitlines()]
        assert lines[-1]["done"] is True
        await eventually(lambda: s.fake.completed["POST /api/chat"] == 1)


async def test_sse_first_event_arrives_before_the_upstream_finishes() -> None:
    async with running_stack() as s:
        body = {**HOLD_CHAT, "stream": True}
        resp = await s.client.post(s.url + "/v1/chat/completions", json=body)
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert first.startswith(b"data: {")
        assert s.fake.completed["POST /v1/chat/completions"] == 0
        s.fake.release.set()
        rest = await asyncio.wait_for(resp.read(), 5)
        assert rest.endswith(b"data: [DONE]\n\n")


async def test_sealed_v2_stream_opens_incrementally_before_the_upstream_finishes() -> None:
    async with running_stack() as s:
        path = "/v1/chat/completions"
        plain = json.dumps({**HOLD_CHAT, "stream": True}).encode()
        sealed = enclave.seal_v2(s.key.public_key, plain, method="POST", path=path)
        resp = await s.client.post(
            s.url + path, data=sealed.blob, headers={"Content-Type": enclave.CONTENT_TYPE}
        )
        assert resp.status == 200
        assert resp.headers["Content-Type"] == enclave.CONTENT_TYPE
        assert resp.headers["X-Paygate-Content-Type"] == "text/event-stream"
        assert "Content-Length" not in resp.headers
        opener = sealed.reply.opener()
        got: list[bytes] = []
        async with asyncio.timeout(5):
            while not got:
                got += opener.feed(await resp.content.readany())
        assert got[0].startswith(b"data: {")
        assert s.fake.completed["POST /v1/chat/completions"] == 0
        s.fake.release.set()
        async with asyncio.timeout(5):
            while data := await resp.content.readany():
                got += opener.feed(data)
        opener.close()  # the authenticated final frame arrived: no truncation
        direct = await s.client.post(
            s.fake_url + path, json={**HOLD_CHAT, "model": "m", "stream": True}
        )
        expected = (await direct.read()).replace(b'"model": "m"', b'"model": "fake-hold"')
        assert without_signed_receipt(b"".join(got)) == expected


async def test_caller_disconnect_cancels_the_upstream_request() -> None:
    async with running_stack() as s:
        resp = await s.client.post(s.url + "/api/generate", json={"model": "fake-hold"})
        await asyncio.wait_for(resp.content.readline(), 5)
        resp.close()  # the caller goes away mid-stream
        await eventually(lambda: s.fake.cancelled["POST /api/generate"] == 1)
        assert s.fake.completed["POST /api/generate"] == 0
        assert s.fake.hits["POST /api/generate"] == 1  # no retry


async def test_caller_disconnect_while_the_upstream_stalls_before_headers() -> None:
    async with running_stack() as s:
        task = asyncio.create_task(
            s.client.post(s.url + "/api/generate", json={"model": "fake-stall-first"})
        )
        await eventually(lambda: s.fake.hits["POST /api/generate"] == 1)
        task.cancel()
        await eventually(lambda: s.fake.cancelled["POST /api/generate"] == 1)


async def test_slow_reader_backpressure_stops_the_upstream() -> None:
    # 64 MiB of stream: far more than the socket buffers on the path can hold. If the gateway
    # buffered without bound the fake would finish while the caller reads nothing.
    async with running_stack() as s:
        body = {"model": "m", "prompt": "p", "fake": {"chunks": 4096, "pad": 16 * 1024}}
        resp = await s.client.post(s.url + "/api/generate", json=body)
        assert resp.status == 200
        await asyncio.sleep(1.0)
        assert s.fake.completed["POST /api/generate"] == 0
        total = 0
        async with asyncio.timeout(20):
            while data := await resp.content.readany():
                total += len(data)
        assert total > 64 * 1024 * 1024
        await eventually(lambda: s.fake.completed["POST /api/generate"] == 1)
