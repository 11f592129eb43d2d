"""Each upstream clock (connect, first byte, idle, total) and the caller's body clock."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from enclave import SoftwareKey
from tests.fixtures.gateway_support import eventually, running_stack
from tests.fixtures.upstream_support import unaccepting_listener

FAST = {"connect_timeout": 0.3, "first_byte_timeout": 0.5, "idle_timeout": 0.5}


async def test_connect_timeout_is_504() -> None:
    with unaccepting_listener() as port:
        async with running_stack(upstream_url=f"http://127.0.0.1:{port}", **FAST) as s:
            resp = await s.client.post(s.url + "/api/chat", json={"model": "m"})
            assert resp.status == 504
            assert await resp.json() == {"error": "the model server timed out (connect timeout)"}


async def test_first_byte_timeout_is_504_and_the_upstream_is_released() -> None:
    async with running_stack(**FAST) as s:
        resp = await s.client.post(s.url + "/v1/completions", json={"model": "fake-stall-first"})
        assert resp.status == 504
        error = (await resp.json())["error"]
        assert error["code"] == "upstream_timeout"
        assert "first_byte" in error["message"]
        await eventually(lambda: s.fake.cancelled["POST /v1/completions"] == 1)


async def test_idle_timeout_on_a_buffered_sealed_reply_is_504() -> None:
    async with running_stack(**FAST) as s:
        caller = SoftwareKey.generate()
        resp = await s.client.post(
            s.url + "/api/chat",
            json={"model": "fake-stall-mid"},
            headers={"X-Obol-Reply-Pubkey": caller.public_key.hex()},
        )
        assert resp.status == 504
        assert await resp.json() == {"error": "the model server timed out (idle timeout)"}


async def test_idle_timeout_mid_stream_cuts_the_transfer() -> None:
    async with running_stack(**FAST) as s:
        resp = await s.client.post(s.url + "/api/chat", json={"model": "fake-stall-mid"})
        assert resp.status == 200
        await asyncio.wait_for(resp.content.readline(), 5)
        # No clean end: the caller can tell an incomplete stream from a finished one.
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 5)
        await eventually(lambda: s.fake.cancelled["POST /api/chat"] == 1)


async def test_total_timeout_is_504() -> None:
    async with running_stack(total_timeout=0.5, idle_timeout=5) as s:
        caller = SoftwareKey.generate()
        body = {"model": "m", "prompt": "p", "fake": {"chunks": 100, "pace": 0.05}}
        resp = await s.client.post(
            s.url + "/v1/completions",
            json={**body, "stream": True},
            headers={"X-Obol-Reply-Pubkey": caller.public_key.hex()},
        )
        assert resp.status == 504
        assert "total timeout" in (await resp.json())["error"]["message"]


async def test_malformed_upstream_stream() -> None:
    async with running_stack(**FAST) as s:
        caller = SoftwareKey.generate()
        resp = await s.client.post(
            s.url + "/api/generate",
            json={"model": "fake-malformed"},
            headers={"X-Obol-Reply-Pubkey": caller.public_key.hex()},
        )
        assert resp.status == 502
        assert await resp.json() == {"error": "the model server sent a broken response"}
        resp = await s.client.post(s.url + "/api/generate", json={"model": "fake-malformed"})
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 5)


async def test_slow_request_body_is_408() -> None:
    async with running_stack(body_read_timeout=0.3) as s:
        host, port = s.host_port
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 408")
        writer.close()
        assert sum(s.fake.hits.values()) == 0
