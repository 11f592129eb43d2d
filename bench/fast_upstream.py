"""A fast fake model server for the comparison benchmark: raw asyncio protocol, canned replies.

Not the FAKE model server of the tests (paygate_dev.fake_model, aiohttp, too slow to be the
ceiling). It answers any request on a keep-alive HTTP/1.1 connection with a ~340-byte OpenAI
chat completion, or, when the body asks ``"stream": true``, with an SSE stream of
``bench_chunks`` events spaced ``bench_interval_ms`` apart (chunked transfer encoding).
``POST /verify`` is a facilitator
that finds every payment valid.
Only what the benchmark's clients and proxies send is parsed: a head and a Content-Length body.

    python -m bench.fast_upstream --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import cast

REPLY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1767225600,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The quick brown fox jumps."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    },
    separators=(",", ":"),
).encode()
WHOLE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(REPLY)).encode()
    + b"\r\n\r\n"
    + REPLY
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
EVENT = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"token "}}]}\n\n'  # noqa: E501
DONE = b"data: [DONE]\n\n"
# A facilitator that finds every payment valid at once (the bench's verify-only mode).
VERIFY = b'{"isValid":true}'
VERIFIED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(VERIFY)).encode()
    + b"\r\n\r\n"
    + VERIFY
)
MAX_HEAD = 16 * 1024


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while not self._streaming and self._transport is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._transport.close()
                return
            head = bytes(self._buffer[:end]).lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop > 0 else None])
            if len(self._buffer) < end + 4 + length:
                return
            body = bytes(self._buffer[end + 4 : end + 4 + length])
            del self._buffer[: end + 4 + length]
            if head.startswith(b"post /verify "):
                self._transport.write(VERIFIED)
            elif b'"stream":true' in body.replace(b" ", b""):
                self._streaming = True
                asyncio.get_running_loop().create_task(self._stream(body))
            else:
                self._transport.write(WHOLE)

    async def _stream(self, body: bytes) -> None:
        request = json.loads(body)
        chunks = int(request.get("bench_chunks", 8))
        interval = float(request.get("bench_interval_ms", 5)) / 1000
        transport = self._transport
        if transport is None:
            return
        transport.write(STREAM_HEAD)
        for i in range(chunks):
            if i and interval:
                await asyncio.sleep(interval)
            if self._transport is None:
                return
            transport.write(_chunk(EVENT))
        transport.write(_chunk(DONE) + b"0\r\n\r\n")
        self._streaming = False
        if self._buffer:
            self.data_received(b"")


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Connection, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop  # optional speed-up for the ceiling

        uvloop.run(serve(args.port))
    except ImportError:
        asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
