"""HTTP ↔ enclave glue: media types, reply keys, envelope dispatch."""

from __future__ import annotations

import json

import pytest

import enclave
from enclave import SoftwareKey
from paygate import wire
from paygate.server import opening, replies
from paygate.server.errors import DecryptionFailed, InvalidReplyKey, ReplyKeyNotAllowed

KEY = SoftwareKey.generate()
CALLER = SoftwareKey.generate()
BODY = json.dumps({"model": "m"}).encode()


@pytest.mark.parametrize(
    ("value", "sealed"),
    [
        ("application/x-obol-encrypted", True),
        ("Application/X-Obol-Encrypted; charset=utf-8", True),
        (" application/x-obol-encrypted ;x=y", True),
        ("application/json", False),
        ("", False),
        (None, False),
        ("application/x-obol-encrypted-not", False),
    ],
)
def test_media_type(value: str | None, sealed: bool) -> None:
    assert wire.is_sealed(value) is sealed


def test_stream_media_types() -> None:
    assert wire.is_stream("text/event-stream; charset=utf-8")
    assert wire.is_stream("application/x-ndjson")
    assert not wire.is_stream("application/json")


def test_reply_pubkey_parsing() -> None:
    assert opening.parse_reply_pubkey(CALLER.public_key.hex()) == CALLER.public_key
    assert opening.parse_reply_pubkey("0x" + CALLER.public_key.hex().upper()) == CALLER.public_key
    for bad in ("", "zz", "04" + "00" * 64, CALLER.public_key.hex()[:-2], "é" * 130, "a" * 1000):
        with pytest.raises(InvalidReplyKey):
            opening.parse_reply_pubkey(bad)


async def test_plaintext_and_v1_reply_plan() -> None:
    opened = await opening.open_body(
        KEY, method="POST", path="/x", content_type="application/json", body=BODY,
        reply_pubkey=CALLER.public_key.hex(),
    )  # fmt: skip
    assert opened.envelope == 0
    assert opened.body == BODY
    assert opened.reply == opening.V1Reply(CALLER.public_key)


async def test_v1_and_v2_open() -> None:
    opened = await opening.open_body(
        KEY, method="POST", path="/x", content_type=enclave.CONTENT_TYPE,
        body=enclave.seal_v1(KEY.public_key, BODY), reply_pubkey=None,
    )  # fmt: skip
    assert (opened.envelope, opened.body, opened.reply) == (1, BODY, opening.PlainReply())
    sealed = enclave.seal_v2(KEY.public_key, BODY, method="POST", path="/x")
    opened = await opening.open_body(
        KEY, method="POST", path="/x", content_type=enclave.CONTENT_TYPE, body=sealed.blob,
        reply_pubkey=None,
    )  # fmt: skip
    assert opened.envelope == 2
    assert opened.body == BODY
    assert isinstance(opened.reply, opening.V2Reply)
    assert enclave.open_reply(sealed.reply, replies.seal_whole(opened.reply, b"r")) == b"r"


async def test_v2_with_reply_header_is_refused_and_failures_are_uniform() -> None:
    sealed = enclave.seal_v2(KEY.public_key, BODY, method="POST", path="/x")
    with pytest.raises(ReplyKeyNotAllowed):
        await opening.open_body(
            KEY, method="POST", path="/x", content_type=enclave.CONTENT_TYPE, body=sealed.blob,
            reply_pubkey=CALLER.public_key.hex(),
        )  # fmt: skip
    for blob, path in ((sealed.blob, "/y"), (b"\x02", "/x"), (b"\x09abc", "/x"), (b"", "/x")):
        with pytest.raises(DecryptionFailed) as info:
            await opening.open_body(
                KEY, method="POST", path=path, content_type=enclave.CONTENT_TYPE, body=blob,
                reply_pubkey=None,
            )  # fmt: skip
        assert str(info.value) == "decryption failed"


def test_sealed_headers() -> None:
    headers = replies.sealed_headers(opening.V1Reply(CALLER.public_key), "application/json")
    assert headers["Content-Type"] == enclave.CONTENT_TYPE
    assert headers["X-Paygate-Content-Type"] == "application/json"
