"""A hostile proxy between the client and the real gateway: the client raises, and never hands
back plaintext that the appliance did not send.

The proxy (aiohttp, 127.0.0.1, its own thread and loop) relays requests to the gateway and
tampers with what passes: reply-key and envelope headers, the v2 reply's frames (reorder, drop,
duplicate, flip bits in the ciphertext, the length word or the response nonce), truncation
(clean end of body, or a cut connection), a replayed reply from another request, a forged
plaintext reply. Chunks handed out before the tampered frame are allowed: they must be a prefix
of the genuine reply, which a clean run of the same (deterministic) request gives.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from aiohttp import web

import enclave
from enclave import SoftwareKey
from paygate.client import (
    AsyncPaygateTransport,
    ClientError,
    PaygateTransport,
    ReplyNotSealed,
    ReplyOpenFailed,
)
from tests.fixtures.gateway_support import (
    Stack,
    ThreadedServer,
    ThreadedStack,
    without_signed_receipt,
)

MODEL = "fake-llama:latest"
# Paced so that every SSE event leaves the gateway as its own sealed frame.
STREAM_BODY = {
    "model": MODEL,
    "stream": True,
    "messages": [{"role": "user", "content": "tamper"}],
    "fake": {"pace": 0.01, "chunks": 6},
}
WHOLE_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "tamper"}]}
CHAT = "/v1/chat/completions"
_HOP = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
)
_FINAL = 1 << 31
_TIMEOUT = 15.0


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


class FrameSplitter:
    """Cuts a v2 reply into its 33-byte header and its frames (word + sealed part)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header_done = False

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self._buf += data
        out: list[tuple[str, bytes]] = []
        if not self._header_done:
            if len(self._buf) < 33:
                return out
            out.append(("header", bytes(self._buf[:33])))
            del self._buf[:33]
            self._header_done = True
        while len(self._buf) >= 4:
            (word,) = struct.unpack(">I", self._buf[:4])
            size = 4 + (word & ~_FINAL)
            if len(self._buf) < size:
                break
            out.append(("frame", bytes(self._buf[:size])))
            del self._buf[:size]
        return out

    def rest(self) -> bytes:
        return bytes(self._buf)


@dataclass
class Tamper:
    """What the proxy does to the next request and reply."""

    mode: str = "none"
    index: int = 2
    proxy_key: SoftwareKey = field(default_factory=SoftwareKey.generate)
    captured: bytes = b""  # the last clean reply body relayed (for "replay")
    stolen: list[bytes] = field(default_factory=list)  # what the proxy could read


class FrameTamper:
    """Applies a frame-level ``mode`` to a v2 reply as it streams through."""

    def __init__(self, tamper: Tamper) -> None:
        self._t = tamper
        self._split = FrameSplitter()
        self._count = 0
        self._held: bytes | None = None
        self.stopped = False
        self.abort = False

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        for kind, item in self._split.feed(data):
            out += self._one(kind, item)
        return out

    def _one(self, kind: str, item: bytes) -> list[bytes]:
        mode, index = self._t.mode, self._t.index
        if self.stopped:
            return []
        if kind == "header":
            return [_flip(item, 10)] if mode == "flip_response_nonce" else [item]
        i, self._count = self._count, self._count + 1
        final = bool(struct.unpack(">I", item[:4])[0] & _FINAL)
        if i == index and mode == "drop":
            return []
        if i == index and mode == "duplicate":
            return [item, item]
        if i == index and mode == "flip_ciphertext":
            return [_flip(item, 4 + 3)]
        if i == index and mode == "flip_final_bit":
            return [bytes([item[0] ^ 0x80]) + item[1:]]
        if i == index and mode == "flip_length":
            # A longer length: the opener waits for bytes that belong to the next frame.
            return [struct.pack(">I", struct.unpack(">I", item[:4])[0] + 1) + item[4:]]
        if i == index and mode == "huge_length":
            # A length past any frame's bound: refused before anything is buffered.
            return [struct.pack(">I", 0x7FFFFFFF) + item[4:]]
        if mode == "reorder" and i == index:
            self._held = item
            return []
        if mode == "reorder" and i == index + 1 and self._held is not None:
            return [item, self._held]
        if mode == "truncate" and final:
            self.stopped = True
            return []
        if mode == "cut" and i == index:
            self.stopped = self.abort = True
            return []
        return [item]


class HostileProxy:
    """The proxy's handler; served by :class:`ThreadedServer`."""

    def __init__(self, target: str, tamper: Tamper) -> None:
        self.target = target
        self.tamper = tamper
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # The key document passes untouched: pinning covers it (test_client_gateway.py).
        tamper = self.tamper if request.path != "/v1/enclave/pubkey" else Tamper()
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        if tamper.mode == "swap_reply_key" and "X-Obol-Reply-Pubkey" in headers:
            headers["X-Obol-Reply-Pubkey"] = tamper.proxy_key.public_key.hex()
        if tamper.mode == "inject_reply_key":
            headers["X-Obol-Reply-Pubkey"] = tamper.proxy_key.public_key.hex()
        timeout = aiohttp.ClientTimeout(total=_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session,
            session.request(
                request.method, self.target + request.path_qs, headers=headers, data=body
            ) as upstream,
        ):
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            sealed_v2 = upstream.headers.get("X-Paygate-Envelope") == "v2"
            if tamper.mode == "envelope_header" and sealed_v2:
                out_headers["X-Paygate-Envelope"] = "v1"
            if tamper.mode == "forge_plaintext":
                forged = b'{"choices":[{"message":{"role":"assistant","content":"forged"}}]}'
                return web.Response(body=forged, content_type="application/json")
            if tamper.mode == "replay" and sealed_v2 and tamper.captured:
                await upstream.read()
                return web.Response(body=tamper.captured, headers=out_headers)
            if not sealed_v2:
                return await self._whole(tamper, upstream, out_headers)
            return await self._frames(tamper, request, upstream, out_headers)

    async def _whole(
        self, tamper: Tamper, upstream: aiohttp.ClientResponse, headers: dict[str, str]
    ) -> web.Response:
        body = await upstream.read()
        if tamper.mode == "swap_reply_key":
            # Envelope v1's weakness: whoever rewrites that header reads the reply.
            tamper.stolen.append(enclave.open_v1(tamper.proxy_key, body))
        elif tamper.mode == "flip_ciphertext" and body[:1] == b"\x01":
            body = _flip(body, len(body) - 20)
        elif tamper.mode == "truncate" and body[:1] == b"\x01":
            body = body[:-1]
        return web.Response(status=upstream.status, body=body, headers=headers)

    async def _frames(
        self,
        tamper: Tamper,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        frames = FrameTamper(tamper)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        relayed = bytearray()
        async for data in upstream.content.iter_any():
            relayed += data
            for piece in frames.feed(data):
                await response.write(piece)
            if frames.abort and request.transport is not None:
                request.transport.close()  # a cut connection: no chunked terminator
                return response
        if tamper.mode == "none":
            tamper.captured = bytes(relayed)
        await response.write_eof()
        return response


@dataclass
class Path_:
    stack: Stack
    proxy_url: str
    tamper: Tamper


@pytest.fixture(scope="module")
def path() -> Iterator[Path_]:
    """The gateway (payments off) with the hostile proxy in front of it."""
    tamper = Tamper()
    with ThreadedStack() as stack:
        proxy = HostileProxy(stack.url, tamper)
        with ThreadedServer(proxy.app) as server:
            yield Path_(stack, server.url, tamper)


def _client(path: Path_, envelope: Any = "v2") -> httpx.Client:
    transport = PaygateTransport(envelope=envelope)
    return httpx.Client(transport=transport, base_url=path.proxy_url, timeout=_TIMEOUT)


def _stream(path: Path_, mode: str, index: int, body: dict[str, Any]) -> bytes:
    """The genuine reply (mode "none"); then the same request tampered: it must raise, having
    handed out only a prefix of the genuine reply."""
    path.tamper.mode = "none"
    with _client(path) as client:
        with client.stream("POST", CHAT, json=body) as clean:
            # Each reply's signed receipt differs (its request digest and time): compare content.
            genuine = without_signed_receipt(b"".join(clean.iter_bytes()))
        path.tamper.mode, path.tamper.index = mode, index
        got: list[bytes] = []
        with (
            pytest.raises((ReplyOpenFailed, httpx.RemoteProtocolError)),
            client.stream("POST", CHAT, json=body) as tampered,
        ):
            got.extend(tampered.iter_bytes())
    assert genuine.startswith(b"data: ")
    assert genuine.endswith(b"data: [DONE]\n\n")
    assert genuine.startswith(b"".join(got))
    return b"".join(got)


FRAME_MODES = [
    "reorder",
    "drop",
    "duplicate",
    "flip_ciphertext",
    "flip_final_bit",
    "flip_length",
    "huge_length",
    "truncate",
    "cut",
]


@pytest.mark.parametrize("mode", FRAME_MODES)
def test_tampered_v2_stream_raises_after_an_authentic_prefix(path: Path_, mode: str) -> None:
    prefix = _stream(path, mode, 2, STREAM_BODY)
    if mode != "truncate":
        # Frames 0 and 1 were authentic and may have been handed out, and so was the first copy
        # of a duplicated frame 2; nothing after the tampering point.
        assert prefix.count(b"data: ") <= (3 if mode == "duplicate" else 2)


@pytest.mark.parametrize(
    "mode", ["flip_ciphertext", "flip_final_bit", "drop", "duplicate", "truncate"]
)
def test_tampered_whole_v2_reply_raises_and_hands_out_nothing(path: Path_, mode: str) -> None:
    path.tamper.mode, path.tamper.index = mode, 0
    with _client(path) as client, pytest.raises(ReplyOpenFailed):
        client.post(CHAT, json=WHOLE_BODY)


@pytest.mark.parametrize("mode", ["flip_response_nonce", "replay"])
def test_foreign_reply_key_material_hands_out_nothing(path: Path_, mode: str) -> None:
    assert _stream(path, mode, 0, STREAM_BODY) == b""


def test_forged_plaintext_reply_to_a_sealed_request_is_refused(path: Path_) -> None:
    path.tamper.mode = "forge_plaintext"
    with _client(path) as client, pytest.raises(ReplyNotSealed):
        client.post(CHAT, json=WHOLE_BODY)


def test_envelope_header_swap_is_refused(path: Path_) -> None:
    path.tamper.mode = "envelope_header"
    with _client(path) as client, pytest.raises(ReplyOpenFailed, match="claims envelope"):
        client.post(CHAT, json=WHOLE_BODY)


def test_v1_reply_key_swap_is_detected_but_v1_cannot_hide_the_reply(path: Path_) -> None:
    path.tamper.mode, path.tamper.stolen = "swap_reply_key", []
    with _client(path, "v1") as client, pytest.raises(ReplyOpenFailed):
        client.post(CHAT, json=WHOLE_BODY)
    # Why v2 exists: the proxy that swapped the clear reply-key header read the reply.
    assert b"chat.completion" in path.tamper.stolen[0]


def test_reply_key_header_injected_into_a_v2_request_is_refused_by_the_gateway(
    path: Path_,
) -> None:
    path.tamper.mode = "inject_reply_key"
    with _client(path) as client:
        reply = client.post(CHAT, json=WHOLE_BODY)
    assert reply.status_code == 400
    assert reply.headers["X-Paygate-Error"] == "reply_key_not_allowed"
    assert reply.extensions["paygate"].envelope == "plain"


@pytest.mark.parametrize("mode", ["flip_ciphertext", "truncate"])
def test_tampered_v1_blob_raises(path: Path_, mode: str) -> None:
    path.tamper.mode = mode
    with _client(path, "v1") as client, pytest.raises(ReplyOpenFailed):
        client.post(CHAT, json=WHOLE_BODY)


def test_openai_sdk_stream_raises_the_client_error(path: Path_) -> None:
    path.tamper.mode, path.tamper.index = "flip_ciphertext", 3
    client = openai.OpenAI(
        base_url=path.proxy_url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=PaygateTransport(), timeout=_TIMEOUT),
    )
    deltas: list[str | None] = []
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "tamper"}],
        stream=True,
        extra_body={"fake": {"pace": 0.01, "chunks": 6}},
    )
    with pytest.raises(ReplyOpenFailed):
        deltas.extend(chunk.choices[0].delta.content for chunk in stream)
    assert len(deltas) <= 3


@pytest.mark.parametrize("mode", ["reorder", "truncate"])
async def test_async_transport_raises_too(path: Path_, mode: str) -> None:
    path.tamper.mode, path.tamper.index = mode, 2
    transport = AsyncPaygateTransport()
    async with (
        httpx.AsyncClient(transport=transport, base_url=path.proxy_url, timeout=_TIMEOUT) as client,
        client.stream("POST", CHAT, json=STREAM_BODY) as reply,
    ):
        with pytest.raises(ClientError):
            await reply.aread()
