"""Sealed requests and replies through the gateway: v1 (Obol-exact) and v2."""

from __future__ import annotations

import json

import pytest

import enclave
from enclave import SoftwareKey, receipts, sealed_receipt
from tests.fixtures.gateway_support import running_stack, without_signed_receipt

SEALED = {"Content-Type": enclave.CONTENT_TYPE}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "secret prompt"}], "stream": False}


async def _direct(s, path: str, body: dict) -> bytes:
    resp = await s.client.post(s.fake_url + path, json=body)
    return await resp.read()


async def test_v1_request_and_v1_reply_like_obol() -> None:
    async with running_stack() as s:
        caller = SoftwareKey.generate()
        plain = json.dumps(CHAT).encode()
        resp = await s.client.post(
            s.url + "/v1/chat/completions",
            data=enclave.seal_v1(s.key.public_key, plain),
            headers={
                "Content-Type": "application/x-obol-encrypted; charset=utf-8",
                "X-Obol-Reply-Pubkey": caller.public_key.hex(),
            },
        )
        assert resp.status == 200
        assert resp.headers["Content-Type"] == enclave.CONTENT_TYPE
        blob = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(blob)
        assert "ETag" not in resp.headers
        assert "Content-Encoding" not in resp.headers
        assert enclave.open_v1(caller, blob) == await _direct(s, "/v1/chat/completions", CHAT)
        # The upstream got the plaintext as JSON, and never the reply key header.
        received = s.fake.received[-2]
        assert received.body == plain
        assert received.headers["Content-Type"] == "application/json"
        assert "X-Obol-Reply-Pubkey" not in received.headers


async def test_v1_request_with_plaintext_reply_and_plain_request_with_v1_reply() -> None:
    async with running_stack() as s:
        plain = json.dumps(CHAT).encode()
        resp = await s.client.post(
            s.url + "/api/chat", data=enclave.seal_v1(s.key.public_key, plain), headers=SEALED
        )
        assert resp.status == 200
        assert (await resp.json())["done"] is True
        caller = SoftwareKey.generate()
        resp = await s.client.post(
            s.url + "/api/chat", json=CHAT, headers={"X-Obol-Reply-Pubkey": caller.public_key.hex()}
        )
        assert json.loads(enclave.open_v1(caller, await resp.read()))["done"] is True


async def test_v1_reply_of_a_stream_and_of_gzip_is_sealed_from_the_decoded_body() -> None:
    async with running_stack() as s:
        caller = SoftwareKey.generate()
        hdr = {"X-Obol-Reply-Pubkey": caller.public_key.hex()}
        resp = await s.client.post(s.url + "/api/generate", json={"model": "m"}, headers=hdr)
        lines = enclave.open_v1(caller, await resp.read()).splitlines()
        assert json.loads(lines[-1])["done"] is True
        body = {"model": "fake-gzip", "prompt": "x", "stream": False}
        resp = await s.client.post(s.url + "/api/generate", json=body, headers=hdr)
        assert json.loads(enclave.open_v1(caller, await resp.read()))["done"] is True


async def test_v1_reply_over_the_buffer_limit_is_502() -> None:
    async with running_stack(max_sealed_reply_bytes=64) as s:
        caller = SoftwareKey.generate()
        resp = await s.client.post(
            s.url + "/v1/chat/completions",
            json=CHAT,
            headers={"X-Obol-Reply-Pubkey": caller.public_key.hex()},
        )
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "reply_too_large"


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/embeddings", "/api/chat", "/api/embed"]
)
async def test_v2_non_streaming_reply_is_one_sealed_message(path: str) -> None:
    async with running_stack() as s:
        body = {**CHAT, "input": "x"}
        sealed = enclave.seal_v2(
            s.key.public_key, json.dumps(body).encode(), method="POST", path=path
        )
        resp = await s.client.post(s.url + path, data=sealed.blob, headers=SEALED)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == enclave.CONTENT_TYPE
        assert resp.headers["X-Paygate-Content-Type"].startswith("application/json")
        assert resp.headers["X-Paygate-Envelope"] == "v2"
        reply = enclave.open_reply(sealed.reply, await resp.read())
        assert reply == await _direct(s, path, body)


async def test_v2_streamed_ndjson_opens_frame_by_frame() -> None:
    async with running_stack() as s:
        body = {"model": "m", "prompt": "p", "fake": {"chunks": 10, "pace": 0.01}}
        sealed = enclave.seal_v2(
            s.key.public_key, json.dumps(body).encode(), method="POST", path="/api/generate"
        )
        resp = await s.client.post(s.url + "/api/generate", data=sealed.blob, headers=SEALED)
        assert resp.headers["X-Paygate-Content-Type"] == "application/x-ndjson"
        opener = sealed.reply.opener()
        chunks: list[bytes] = []
        while data := await resp.content.readany():
            chunks += opener.feed(data)
        opener.close()
        assert len(chunks) > 1
        received = without_signed_receipt(b"".join(chunks))
        assert received == await _direct(s, "/api/generate", body)


async def test_v2_gzip_reply_is_sealed_from_the_decoded_body() -> None:
    async with running_stack() as s:
        body = {"model": "fake-gzip", "prompt": "x", "stream": False}
        sealed = enclave.seal_v2(
            s.key.public_key, json.dumps(body).encode(), method="POST", path="/api/generate"
        )
        resp = await s.client.post(s.url + "/api/generate", data=sealed.blob, headers=SEALED)
        assert json.loads(enclave.open_reply(sealed.reply, await resp.read()))["done"] is True


async def test_v2_sealed_for_another_route_does_not_open() -> None:
    async with running_stack() as s:
        sealed = enclave.seal_v2(
            s.key.public_key, json.dumps(CHAT).encode(), method="POST", path="/v1/completions"
        )
        resp = await s.client.post(s.url + "/v1/chat/completions", data=sealed.blob, headers=SEALED)
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == "decryption failed"
        assert sum(s.fake.hits.values()) == 0


async def test_every_bad_sealed_body_is_the_same_400() -> None:
    async with running_stack() as s:
        plain = json.dumps(CHAT).encode()
        v1 = bytearray(enclave.seal_v1(s.key.public_key, plain))
        v1[-1] ^= 1
        v2 = bytearray(
            enclave.seal_v2(s.key.public_key, plain, method="POST", path="/api/chat").blob
        )
        v2[70] ^= 1
        other_key = enclave.seal_v1(SoftwareKey.generate().public_key, plain)
        for blob in (bytes(v1), bytes(v2), other_key, b"", b"\x01", b"\x03" + plain, plain):
            resp = await s.client.post(s.url + "/api/chat", data=blob, headers=SEALED)
            assert resp.status == 400
            assert await resp.json() == {"error": "decryption failed"}
            assert resp.headers["X-Paygate-Error"] == "decryption_failed"
        assert sum(s.fake.hits.values()) == 0


async def test_reply_key_header_rules() -> None:
    async with running_stack() as s:
        for bad in ("zz", "04" + "00" * 64, "ab" * 65, "x" * 5000):
            resp = await s.client.post(
                s.url + "/v1/chat/completions", json=CHAT, headers={"X-Obol-Reply-Pubkey": bad}
            )
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_reply_key"
        sealed = enclave.seal_v2(
            s.key.public_key, json.dumps(CHAT).encode(), method="POST", path="/api/chat"
        )
        resp = await s.client.post(
            s.url + "/api/chat",
            data=sealed.blob,
            headers={**SEALED, "X-Obol-Reply-Pubkey": SoftwareKey.generate().public_key.hex()},
        )
        assert resp.status == 400
        assert resp.headers["X-Paygate-Error"] == "reply_key_not_allowed"
        assert sum(s.fake.hits.values()) == 0


async def test_require_encryption_refuses_plaintext_bodies_on_paid_routes() -> None:
    async with running_stack(require_encryption=True) as s:
        resp = await s.client.post(s.url + "/api/chat", json=CHAT)
        assert resp.status == 415
        assert "sealed request bodies" in (await resp.json())["error"]
        assert (await s.client.get(s.url + "/api/tags")).status == 200  # no body, nothing to seal
        sealed = enclave.seal_v2(
            s.key.public_key, json.dumps(CHAT).encode(), method="POST", path="/api/chat"
        )
        resp = await s.client.post(s.url + "/api/chat", data=sealed.blob, headers=SEALED)
        assert resp.status == 200
        assert s.fake.hits["POST /api/chat"] == 1


async def test_v2_whole_reply_receipt_names_its_plaintext_and_stated_usage() -> None:
    """A small whole reply arrives with its head and is taken in one piece: its sealed receipt
    header still names the digest of the plaintext and the usage the model server stated."""
    async with running_stack() as s:
        sealed = enclave.seal_v2(
            s.key.public_key, json.dumps(CHAT).encode(), method="POST", path="/v1/chat/completions"
        )
        resp = await s.client.post(s.url + "/v1/chat/completions", data=sealed.blob, headers=SEALED)
        assert resp.status == 200
        reply = enclave.open_reply(sealed.reply, await resp.read())
        token = sealed_receipt.open_v2(sealed.reply, resp.headers["X-Paygate-Receipt"])
        claims = receipts.unverified_claims(token)
        assert claims["reply_digest"] == receipts.body_digest(reply)
        stated = json.loads(reply)["usage"]
        assert claims["usage"]["prompt_tokens"] == stated["prompt_tokens"]
        assert claims["usage"]["completion_tokens"] == stated["completion_tokens"]
        assert claims["usage"]["source"] == "reported"
