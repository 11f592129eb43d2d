"""Malformed HTTP on a raw socket: every refusal is JSON in the caller's error shape with a
stable code and X-Paygate-Error, and quotes none of the offending bytes. Query strings on
routes that take none are refused and never forwarded."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.fixtures.gateway_support import running_stack

MARK = b"Zq9MarkXy"  # planted in every bad request: must never come back
CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"

CASES = {
    "oversized header": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + MARK + b"a" * 20000
                         + b"\r\n\r\n", 431, "headers_too_large"),
    "too many headers": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                         + b"".join(b"X-H%d: " % i + MARK + b"\r\n" for i in range(200))
                         + b"\r\n", 431, "headers_too_large"),
    "bad content-length": (CHAT + b"Content-Length: 1" + MARK + b"\r\n\r\n{}",
                           400, "malformed_http"),
    "content-length and transfer-encoding": (
        CHAT + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\nX-M: " + MARK
        + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400, "malformed_http"),
    "bad chunk size": (CHAT + b"Transfer-Encoding: chunked\r\nContent-Type: application/json"
                       b"\r\n\r\n" + MARK + b"\r\n{}\r\n0\r\n\r\n", 400, "malformed_http"),
    "NUL in a header": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-N: a\x00" + MARK + b"\r\n\r\n",
                        400, "malformed_http"),
    "folded header": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-F: a\r\n " + MARK + b"\r\n\r\n",
                      400, "malformed_http"),
}  # fmt: skip


async def _exchange(host: str, port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(1 << 20), 10)
    finally:
        writer.close()


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize("case", sorted(CASES))
async def test_malformed_http_is_json_with_a_stable_code(case: str) -> None:
    raw, status, code = CASES[case]
    async with running_stack() as s:
        answer = await _exchange(*s.host_port, raw)
        got, headers, body = _parse(answer)
        assert got == status, answer[:200]
        assert headers["x-paygate-error"] == code
        assert headers["content-type"].startswith("application/json")
        assert MARK not in answer
        if b"chunked" in headers.get("transfer-encoding", "").encode():
            body = body.split(b"\r\n", 1)[1]
        error = json.loads(body[: int(headers["content-length"])])["error"]
        assert error["code"] == code  # the OpenAI shape of a /v1 path
        # The gateway keeps serving.
        async with s.client.get(s.url + "/health/live") as response:
            assert response.status == 200
        assert not [hit for hit in s.fake.hits if "chat" in hit]


async def test_query_strings_are_refused_on_routes_that_take_none() -> None:
    async with running_stack() as s:
        for path in ("/api/tags?secret=1", "/v1/models?x", "/health?" + MARK.decode()):
            async with s.client.get(s.url + path) as response:
                assert response.status == 400, path
                assert response.headers["X-Paygate-Error"] == "query_not_allowed"
                assert MARK not in await response.read()
        assert not s.fake.hits  # nothing reached the model server


TARGETS = {
    # authority-form is CONNECT's; on another method it is not valid HTTP/1.1
    "authority-form GET": (b"GET 127.0.0.1:8402 HTTP/1.1", 400, "malformed_http"),
    "authority-form CONNECT": (b"CONNECT 127.0.0.1:8402 HTTP/1.1", 404, "route_not_found"),
    "asterisk-form": (b"OPTIONS * HTTP/1.1", 404, "route_not_found"),
    "asterisk-form GET": (b"GET * HTTP/1.1", 400, "malformed_http"),  # OPTIONS only
    "absolute-form without a path": (b"GET http://127.0.0.1:8402 HTTP/1.1", 404,
                                     "route_not_found"),
    "absolute-form, no path, a query": (b"POST http://x?" + MARK + b" HTTP/1.1", 404,
                                        "route_not_found"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TARGETS))
async def test_every_request_target_form_gets_a_json_error(case: str) -> None:
    line, status, code = TARGETS[case]
    async with running_stack() as s:
        answer = await _exchange(*s.host_port, line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        got, headers, body = _parse(answer)
        assert got == status, answer[:200]
        assert headers["x-paygate-error"] == code
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body[: int(headers["content-length"])])["error"]["code"] == code
        assert MARK not in answer
        assert not s.fake.hits  # nothing reached the model server


async def test_absolute_form_with_a_path_is_served_like_origin_form() -> None:
    # RFC 9112 §3.2.2: a server accepts absolute-form; only the path is routed.
    async with running_stack() as s:
        answer = await _exchange(
            *s.host_port, b"GET http://x/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert _parse(answer)[0] == 200
        assert s.fake.hits["GET /v1/models"] == 1
