"""A hostile middlebox against signed receipts: the client raises a receipt error before the
application sees a clean end of the reply — sync, async and through the OpenAI SDK.

The gateway is real and paid (anvil, the x402 SDK facilitator), in plaintext so the middlebox
can change what passes (sealed replies cannot be changed at all: test_client_tamper.py). The
client attests it (a software key: kind ``none``, accepted by the policy here; the receipt
checks are the same whatever vouches for the key). The middlebox, an aiohttp proxy on
127.0.0.1, relays to the gateway and then:

- ``flip_reset``: flips a content byte and resets the connection right after ``data: [DONE]``;
- ``pad``: puts 70 KiB of SSE comments between ``[DONE]`` and the receipts;
- ``append``: adds content after the receipt (an SSE event, an NDJSON line);
- ``strip``: removes the signed receipt (the SSE comment, the NDJSON entry, the header);
- ``replay``: answers a request (which it forwards, so it is paid) with an earlier reply to
  the same prompt, receipts and all;
- ``stall``: drips comment bytes after ``[DONE]`` and never ends (the tail's time bound).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from aiohttp import web

from paygate.client import (
    AsyncPaygateTransport,
    AttestationPolicy,
    ContentAfterReceipt,
    PaygateTransport,
    ReceiptInvalid,
    ReceiptMismatch,
    ReceiptMissing,
    SpendPolicy,
)
from tests.fixtures.gateway_support import Stack, ThreadedServer, ThreadedStack
from tests.fixtures.payment_support import paid_settings

MODEL = "fake-llama:latest"
MESSAGES = [{"role": "user", "content": "receipts please"}]
SSE_BODY = {"model": MODEL, "messages": MESSAGES, "stream": True}
NDJSON_BODY = {"model": MODEL, "messages": MESSAGES, "stream": True}
WHOLE_BODY = {"model": MODEL, "messages": MESSAGES}
CHAT = "/v1/chat/completions"
SPEND = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])
POLICY = AttestationPolicy(allow_unattested=True)
_HOP = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
)
_TIMEOUT = 30.0
_SIGNED = re.compile(rb": paygate-receipt [A-Za-z0-9_.-]+\n\n")
_ENTRY = re.compile(rb',"paygate_receipt":"[A-Za-z0-9_.-]+"')
DONE = b"data: [DONE]\n\n"


@dataclass
class Mode:
    name: str = "none"
    # The last clean reply per path, for "replay": (status, headers, body).
    captured: dict[str, tuple[int, dict[str, str], bytes]] | None = None


class Middlebox:
    """Relays to the gateway, reads the whole reply, then sends it on changed by the mode."""

    def __init__(self, target: str, mode: Mode) -> None:
        self.target = target
        self.mode = mode
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT)) as session,
            session.request(
                request.method, self.target + request.path_qs, headers=headers, data=body
            ) as upstream,
        ):
            status = upstream.status
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            reply = await upstream.read()
        mode = self.mode.name
        captured = self.mode.captured if self.mode.captured is not None else {}
        if status == 200 and mode == "none":
            captured[request.path] = (status, out, reply)
            self.mode.captured = captured
        if status != 200 or mode == "none" or request.path not in (CHAT, "/api/chat"):
            return web.Response(status=status, body=reply, headers=out)
        if mode == "replay":
            status, out, reply = captured[request.path]
        if mode == "strip":
            out = {k: v for k, v in out.items() if k.lower() != "x-paygate-receipt"}
            reply = _ENTRY.sub(b"", _SIGNED.sub(b"", reply))
        if mode == "append":
            extra = (
                b'{"model":"x","message":{"role":"assistant","content":"more"},"done":false}\n'
                if b'"done":' in reply and not reply.startswith(b"data:")
                else b'data: {"choices":[{"index":0,"delta":{"content":"more"}}]}\n\n'
            )
            reply += extra
        response = web.StreamResponse(status=status, headers=out)
        await response.prepare(request)
        if mode in ("flip_reset", "pad", "stall") and DONE in reply:
            head, _, tail = reply.partition(DONE)
            if mode == "flip_reset":
                found = re.search(rb'"content": ?" ?[a-z]', head)
                assert found is not None
                at = found.end() - 1
                head = head[:at] + bytes([head[at] ^ 0x20]) + head[at + 1 :]
                await response.write(head + DONE)
                await asyncio.sleep(0.2)  # the [DONE] reaches the client, then the reset
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(head + DONE)
            if mode == "pad":
                for _ in range(70):  # 70 KiB of comments, each line within any line bound
                    await response.write(b": " + b"p" * 1021 + b"\n")
            else:
                for _ in range(100):  # at most 10 s: every wait here ends
                    await response.write(b":\n")
                    await asyncio.sleep(0.1)
            reply = tail
        await response.write(reply)
        await response.write_eof()
        return response


def _read_into(seen: bytearray, reply: httpx.Response) -> None:
    for chunk in reply.iter_bytes():
        seen += chunk


async def _aread_into(seen: bytearray, reply: httpx.Response) -> None:
    async for chunk in reply.aiter_bytes():
        seen += chunk


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


@dataclass
class Path_:
    stack: Stack
    url: str  # the middlebox
    mode: Mode


@pytest.fixture(scope="module")
def path(facilitator_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path_]:
    from paygate_dev.chain.accounts import new_account

    settings = paid_settings(
        seller=new_account().address,
        facilitator_url=facilitator_server.url,
        ledger=tmp_path_factory.mktemp("receipts") / "ledger.db",
        require_encryption=False,
        attestation_rate_per_minute=100_000,  # every test's client attests through the box
        attestation_global_rate_per_minute=100_000,
    )
    mode = Mode()
    with ThreadedStack(**settings) as stack:
        box = Middlebox(stack.url, mode)
        with ThreadedServer(box.app) as server:
            yield Path_(stack, server.url, mode)


def _transport(payer: Any) -> PaygateTransport:
    return PaygateTransport(envelope="plain", wallet=payer, spend=SPEND, attestation=POLICY)


def _clean(path: Path_, payer: Any, route: str, body: dict[str, Any]) -> bytes:
    """One genuine paid reply (captured by the middlebox for replays)."""
    path.mode.name = "none"
    with (
        httpx.Client(transport=_transport(payer), base_url=path.url, timeout=_TIMEOUT) as client,
        client.stream("POST", route, json=body) as reply,
    ):
        data = reply.read()
        assert reply.extensions["paygate_receipt"].claims is not None
    return data


STREAM_CASES = [
    ("flip_reset", ReceiptMissing),
    ("pad", ReceiptMissing),
    ("append", ContentAfterReceipt),
    ("strip", ReceiptMissing),
    ("replay", ReceiptMismatch),
]


@pytest.mark.parametrize(("mode", "error"), STREAM_CASES)
def test_sync_stream_never_ends_cleanly(
    path: Path_, payer: Any, mode: str, error: type[ReceiptInvalid]
) -> None:
    _clean(path, payer, CHAT, SSE_BODY)
    path.mode.name = mode
    seen = bytearray()
    with (
        httpx.Client(transport=_transport(payer), base_url=path.url, timeout=_TIMEOUT) as client,
        client.stream("POST", CHAT, json=SSE_BODY) as reply,
        pytest.raises(error),
    ):
        _read_into(seen, reply)
    assert b"[DONE]" not in seen  # the application never saw the end


@pytest.mark.parametrize(("mode", "error"), STREAM_CASES)
async def test_async_stream_never_ends_cleanly(
    path: Path_, payer: Any, mode: str, error: type[ReceiptInvalid]
) -> None:
    await asyncio.to_thread(_clean, path, payer, CHAT, SSE_BODY)
    path.mode.name = mode
    transport = AsyncPaygateTransport(
        envelope="plain", wallet=payer, spend=SPEND, attestation=POLICY
    )
    seen = bytearray()
    async with (
        httpx.AsyncClient(transport=transport, base_url=path.url, timeout=_TIMEOUT) as client,
        client.stream("POST", CHAT, json=SSE_BODY) as reply,
    ):
        with pytest.raises(error):
            await _aread_into(seen, reply)
    assert b"[DONE]" not in seen


@pytest.mark.parametrize(("mode", "error"), STREAM_CASES)
def test_openai_sdk_stream_raises_before_its_end(
    path: Path_, payer: Any, mode: str, error: type[ReceiptInvalid]
) -> None:
    """The SDK stops reading at [DONE]: it only gets there once the receipt is verified."""
    _clean(path, payer, CHAT, SSE_BODY)
    path.mode.name = mode
    client = openai.OpenAI(
        base_url=path.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=_transport(payer), timeout=_TIMEOUT),
    )
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    with pytest.raises(error):
        list(stream)  # the iteration ends in the error, never in a clean stop


async def test_async_openai_sdk_stream_raises_before_its_end(path: Path_, payer: Any) -> None:
    await asyncio.to_thread(_clean, path, payer, CHAT, SSE_BODY)
    path.mode.name = "replay"
    transport = AsyncPaygateTransport(
        envelope="plain", wallet=payer, spend=SPEND, attestation=POLICY
    )
    client = openai.AsyncOpenAI(
        base_url=path.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=transport, timeout=_TIMEOUT),
    )
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
    )
    with pytest.raises(ReceiptMismatch, match="another request"):
        await _drain(stream)


@pytest.mark.parametrize(
    ("mode", "error"),
    [("append", ContentAfterReceipt), ("strip", ReceiptMissing), ("replay", ReceiptMismatch)],
)
def test_ndjson_stream_never_ends_cleanly(
    path: Path_, payer: Any, mode: str, error: type[ReceiptInvalid]
) -> None:
    _clean(path, payer, "/api/chat", NDJSON_BODY)
    path.mode.name = mode
    lines: list[dict[str, Any]] = []
    with (
        httpx.Client(transport=_transport(payer), base_url=path.url, timeout=_TIMEOUT) as client,
        client.stream("POST", "/api/chat", json=NDJSON_BODY) as reply,
        pytest.raises(error),
    ):
        lines.extend(json.loads(line) for line in reply.iter_lines() if line)
    assert not any(line.get("done") for line in lines)  # the final object never came out


@pytest.mark.parametrize(
    ("mode", "error"), [("strip", ReceiptMissing), ("replay", ReceiptMismatch)]
)
def test_whole_reply_is_refused(
    path: Path_, payer: Any, mode: str, error: type[ReceiptInvalid]
) -> None:
    _clean(path, payer, CHAT, WHOLE_BODY)
    path.mode.name = mode
    client = openai.OpenAI(
        base_url=path.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=_transport(payer), timeout=_TIMEOUT),
    )
    with pytest.raises(error):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]


def test_a_tail_that_never_ends_is_cut_by_its_time_bound(
    path: Path_, payer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Comment bytes dripped after [DONE] (each well within the read timeout) forever."""
    monkeypatch.setattr("paygate.client.transport.MAX_TAIL_SECONDS", 1.0)
    path.mode.name = "stall"
    seen = bytearray()
    with (
        httpx.Client(transport=_transport(payer), base_url=path.url, timeout=_TIMEOUT) as client,
        client.stream("POST", CHAT, json=SSE_BODY) as reply,
        pytest.raises(ReceiptMissing, match="did not arrive within"),
    ):
        _read_into(seen, reply)
    assert b"[DONE]" not in seen


def test_a_genuine_stream_ends_with_its_receipt_verified(path: Path_, payer: Any) -> None:
    """The control: through the same middlebox, untouched, everything comes out."""
    data = _clean(path, payer, CHAT, SSE_BODY)
    assert data.endswith(b"\n\n")
    assert DONE in data
    assert b": paygate-receipt " in data
