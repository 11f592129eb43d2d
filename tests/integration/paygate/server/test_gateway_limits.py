"""Body size (413, never truncation), header size and concurrency (503 + Retry-After)."""

from __future__ import annotations

import asyncio
import json

from tests.fixtures.gateway_support import running_stack

LIMIT = 1024


async def _raw(host: str, port: int, head: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + body)
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        rest = await asyncio.wait_for(reader.read(65536), 5)
        return status, rest
    finally:
        writer.close()


async def test_declared_length_over_the_limit_is_413_before_any_body_byte() -> None:
    async with running_stack(max_body_bytes=LIMIT) as s:
        # Headers only: the answer comes without the gateway waiting for a single body byte.
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {LIMIT + 1}\r\n\r\n".encode()
        )
        status, rest = await _raw(*s.host_port, head)
        assert status.startswith(b"HTTP/1.1 413")
        assert b'"body_too_large"' in rest
        assert sum(s.fake.hits.values()) == 0


async def test_chunked_body_over_the_limit_is_413() -> None:
    async with running_stack(max_body_bytes=LIMIT) as s:
        head = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"x" * 600
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2))
        status, rest = await _raw(*s.host_port, head, body)  # no terminating chunk needed
        assert status.startswith(b"HTTP/1.1 413")
        assert b"larger than 1024 bytes" in rest
        assert sum(s.fake.hits.values()) == 0


async def test_body_at_the_limit_is_forwarded_whole() -> None:
    async with running_stack(max_body_bytes=LIMIT) as s:
        body = json.dumps({"model": "m", "prompt": "p", "stream": False}).encode()
        body = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
        assert len(body) == LIMIT
        for chunked in (False, True):
            data = body if not chunked else _gen(body)
            resp = await s.client.post(
                s.url + "/api/generate", data=data, headers={"Content-Type": "application/json"}
            )
            assert resp.status == 200
            assert s.fake.received[-1].body == body


async def _gen(body: bytes):  # an async generator: a chunked upload
    for i in range(0, len(body), 100):
        yield body[i : i + 100]


async def test_oversized_headers_are_refused_before_routing() -> None:
    async with running_stack(max_header_bytes=1024, max_headers=20) as s:
        resp = await s.client.get(s.url + "/api/tags", headers={"X-Big": "a" * 2000})
        assert 400 <= resp.status < 500
        many = {f"X-H{i}": "v" for i in range(40)}
        resp = await s.client.get(s.url + "/api/tags", headers=many)
        assert 400 <= resp.status < 500
        assert sum(s.fake.hits.values()) == 0
        assert (await s.client.get(s.url + "/api/tags")).status == 200


async def test_concurrency_limit_is_503_with_retry_after() -> None:
    async with running_stack(max_concurrent_requests=1, retry_after_seconds=3) as s:
        held = await s.client.post(s.url + "/api/generate", json={"model": "fake-hold"})
        await asyncio.wait_for(held.content.readline(), 5)
        resp = await s.client.post(s.url + "/v1/completions", json={"model": "m"})
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "3"
        assert (await resp.json())["error"]["code"] == "overloaded"
        assert (await s.client.get(s.url + "/health")).status == 200  # free routes still answer
        s.fake.release.set()
        await asyncio.wait_for(held.read(), 5)
        resp = await s.client.post(s.url + "/v1/completions", json={"model": "m"})
        assert resp.status == 200
        assert s.fake.hits["POST /v1/completions"] == 1
