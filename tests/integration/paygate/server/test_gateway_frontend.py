"""The two HTTP front ends (``http_frontend``: fast | aiohttp) on raw sockets: the fast one
serves the forwarding routes itself and hands every other request, with its connection, to
aiohttp — so a caller cannot tell them apart: the same answers (status, error code, what
reached the model server) for the side doors of a request head, pipelined requests answered in
order across a hand-off, and an answer given before the body still letting the connection
serve its next request."""

from __future__ import annotations

import asyncio
import json

import pytest

from paygate.server import frontend, logs
from tests.fixtures.gateway_support import running_stack

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
FRONT_ENDS = ("fast", "aiohttp")


def chat(
    target: bytes = b"/v1/chat/completions", extra: bytes = b"", version: bytes = b"1.1"
) -> bytes:
    return (
        b"POST " + target + b" HTTP/" + version + b"\r\nHost: x\r\nContent-Type: application/json"
        b"\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
    )


async def _answers(host: str, port: int, raw: bytes, count: int) -> list[tuple[int, dict, bytes]]:
    """Send ``raw`` in one write; read ``count`` answers (Content-Length framed or to EOF)."""
    reader, writer = await asyncio.open_connection(host, port)
    answers = []
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            for _ in range(count):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:] if x)}
                if status == 100:
                    head = await reader.readuntil(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    status = int(lines[0].split()[1])
                    headers = {
                        k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:] if x)
                    }
                if raw.startswith(b"HEAD "):
                    body = b""  # a HEAD answer's length describes a body it does not send
                elif "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding") == "chunked":
                    body = b""
                    while size := int((await reader.readline()).strip(), 16):
                        body += (await reader.readexactly(size + 2))[:-2]
                    await reader.readline()
                else:
                    body = await reader.read()
                answers.append((status, headers, body))
    finally:
        writer.close()
    return answers


async def test_forwarding_requests_take_the_fast_front_end_only_when_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served: list[str] = []
    serve = frontend.FastProtocol._serve

    async def spy(self: frontend.FastProtocol, request: frontend.FastRequest) -> None:
        served.append(request.path)
        await serve(self, request)

    monkeypatch.setattr(frontend.FastProtocol, "_serve", spy)
    for front_end in FRONT_ENDS:
        async with running_stack(http_frontend=front_end) as s:
            [(status, _, body)] = await _answers(*s.host_port, chat(), 1)
            assert status == 200
            assert json.loads(body)["object"] == "chat.completion"
    assert served == ["/v1/chat/completions"]  # the fast one only; aiohttp served the other


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_pipelined_requests_are_answered_in_order_across_a_hand_off(front_end: str) -> None:
    async with running_stack(http_frontend=front_end) as s:
        raw = chat() + chat() + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + chat()
        answers = await _answers(*s.host_port, raw, 4)
        assert [status for status, _, _ in answers] == [200, 200, 200, 200]
        assert json.loads(answers[2][2])["status"] == "ok"  # /health, third, in its place
        assert all(json.loads(answers[i][2])["object"] == "chat.completion" for i in (0, 1, 3))
        assert len({headers["x-request-id"] for _, headers, _ in answers}) == 4
        assert s.fake.hits["POST /v1/chat/completions"] == 3


SIDE_DOORS = {
    "percent-encoded path": chat(b"/v1/chat%2Fcompletions"),
    "percent-encoded letter": chat(b"/v1/chat/c%6Fmpletions"),
    "dot segment": chat(b"/v1/./chat/completions"),
    "dot-dot segment": chat(b"/v1/x/../chat/completions"),
    "empty segment": chat(b"/v1//chat/completions"),
    "trailing slash": chat(b"/v1/chat/completions/"),
    "query": chat(b"/v1/chat/completions?stream=true"),
    "fragment": chat(b"/v1/chat/completions#x"),
    "absolute-form": chat(b"http://x/v1/chat/completions"),
    "HTTP/1.0": chat(version=b"1.0"),
    "expect 100-continue": chat(extra=b"Expect: 100-continue\r\n"),
    "expect something else": chat(extra=b"Expect: teapot\r\n"),
    "upgrade": chat(extra=b"Connection: upgrade\r\nUpgrade: websocket\r\n"),
    "two content-lengths": chat(extra=b"Content-Length: 3\r\n"),
    "negative content-length": chat().replace(b"Content-Length: %d" % len(BODY), b"Content-"
                                              b"Length: -1"),
    "content-length with a leading zero": chat().replace(b"Content-Length: ", b"Content-Length: 0"),
    "space before the colon": chat().replace(b"Content-Length:", b"Content-Length :"),
    "transfer-encoding identity": chat(extra=b"Transfer-Encoding: identity\r\n"),
    "chunked": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: application/json\r\n\r\n%x\r\n" % len(BODY) + BODY
               + b"\r\n0\r\n\r\n",
    "bare LF line endings": chat().replace(b"\r\n", b"\n"),
    "a bare LF in one line": chat().replace(b"Host: x\r\n", b"Host: x\n"),
    "lower-case method": chat().replace(b"POST", b"post", 1),
    "HEAD": b"HEAD /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n",
    "OPTIONS": b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET on a POST route": b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n",
    "too many headers": chat(extra=b"".join(b"X-H%d: 1\r\n" % i for i in range(130))),
    "long header": chat(extra=b"X-Big: " + b"a" * 9000 + b"\r\n"),
    "no host": chat().replace(b"Host: x\r\n", b""),
"two hosts": chat(extra=b"Host: y\r\n"),
    "bad host": chat().replace(b"Host: x", b"Host: a b/c"),
    "space in the target": chat(b"/v1/chat/ completions"),
    "a body longer than the limit": chat().replace(b"Content-Length: %d" % len(BODY),
                                                   b"Content-Length: 99999999"),
}  # fmt: skip


async def _outcome(front_end: str, raw: bytes) -> tuple[int, str | None, int]:
    async with running_stack(http_frontend=front_end) as s:
        [(status, headers, _)] = await _answers(*s.host_port, raw, 1)
        return status, headers.get("x-paygate-error"), sum(s.fake.hits.values())


@pytest.mark.parametrize("case", sorted(SIDE_DOORS))
async def test_side_doors_of_a_request_head_are_answered_as_aiohttp_answers_them(
    case: str,
) -> None:
    """Every other form of a forwarding request: the same status, error code and upstream
    traffic from both front ends (the fast one hands what it does not take to aiohttp)."""
    raw = SIDE_DOORS[case]
    assert await _outcome("fast", raw) == await _outcome("aiohttp", raw)


@pytest.mark.parametrize("padding", [0, 600 * 1024])  # the second: above the read pause
@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_an_answer_before_the_body_drops_the_rest_and_serves_the_next_request(
    front_end: str, padding: int
) -> None:
    """A refusal from the head alone (a malformed request nonce) goes out before the body is
    read; the rest of that body is read and dropped, and the next request on the connection
    is served (never parsed out of the unread body)."""
    async with running_stack(http_frontend=front_end) as s:
        reader, writer = await asyncio.open_connection(*s.host_port)
        try:
            # Inside the refused request's body: must never be served.
            smuggled = chat() + b" " * padding
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Paygate-Request-Nonce: zz\r\n"
                b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled[:10]
            )
            await writer.drain()
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 400"), head
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                body = json.loads(await reader.readexactly(length))
                assert body["error"]["code"] == "invalid_request_nonce"
                writer.write(smuggled[10:] + chat())
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
        finally:
            writer.close()
        assert s.fake.hits["POST /v1/chat/completions"] == 1


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_a_failure_outside_the_error_answering_is_a_json_500(
    front_end: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something failing around the handler (here: the request event) is the same bare 500
    in the caller's shape from both front ends, quoting nothing."""

    def broken(*_: object) -> str:
        raise RuntimeError("Zq9MarkXy")

    monkeypatch.setattr(logs, "request_id_for", broken)
    async with running_stack(http_frontend=front_end) as s:
        [(status, headers, body)] = await _answers(*s.host_port, chat(), 1)
        assert status == 500
        assert headers["x-paygate-error"] == "internal_error"
        assert json.loads(body)["error"]["code"] == "internal_error"
        assert b"Zq9MarkXy" not in body
        assert s.fake.hits["POST /v1/chat/completions"] == 0


async def test_the_keep_alive_clock_counts_from_the_last_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The keep-alive timer is not re-armed per request: when the one armed at a connection's
    first idle moment fires, a connection used since stays open for the full keep-alive time
    after its last answer, and an idle one closes."""
    serve = frontend.FastServer.serve

    def short(self: frontend.FastServer, *args: object) -> None:
        serve(self, *args)  # type: ignore[arg-type]
        self.keepalive = 1.0

    monkeypatch.setattr(frontend.FastServer, "serve", short)
    async with running_stack() as s:
        reader, writer = await asyncio.open_connection(*s.host_port)
        try:
            for pause in (0.0, 0.6, 0.6):  # the third comes 1.2 s after the first answer
                await asyncio.sleep(pause)
                writer.write(chat())
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    assert json.loads(await reader.readexactly(length))["object"] == (
                        "chat.completion"
                    )
            async with asyncio.timeout(10):
                assert await reader.read() == b""  # idle past the keep-alive time: closed
        finally:
            writer.close()
