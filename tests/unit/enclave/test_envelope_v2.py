"""Envelope v2: route binding, reply secret inside the seal, and the authenticated reply stream."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import enclave
from enclave import (
    DecryptionError,
    ReplyKeys,
    SoftwareKey,
    open_reply,
    open_v2,
    seal_reply,
    seal_v2,
)
from enclave.envelope_v2 import MAX_CHUNK, REPLY_HEADER_LEN, _seal_v2_deterministic

VECTORS = json.loads((Path(__file__).parents[2] / "vectors/envelope_v2.json").read_text())
ROUTE = {"method": "POST", "path": "/v1/chat/completions"}


@pytest.fixture
def key() -> SoftwareKey:
    return SoftwareKey.generate()


def test_known_answer_request() -> None:
    inputs = VECTORS["inputs"]
    recipient = SoftwareKey.from_private_bytes(bytes.fromhex(inputs["recipient_private"]))
    assert recipient.public_key.hex() == VECTORS["recipient_public"]
    ephemeral = ec.derive_private_key(int(inputs["ephemeral_private"], 16), ec.SECP256R1())
    sealed = _seal_v2_deterministic(
        recipient.public_key,
        inputs["body"].encode(),
        inputs["method"],
        inputs["path"],
        bytes.fromhex(inputs["reply_secret"]),
        ephemeral,
    )
    assert sealed.blob.hex() == VECTORS["request_blob"]
    opened = open_v2(
        recipient,
        bytes.fromhex(VECTORS["request_blob"]),
        method=inputs["method"],
        path=inputs["path"],
    )
    assert opened.body == inputs["body"].encode()
    assert opened.reply.reply_secret.hex() == inputs["reply_secret"]
    assert opened.reply.enc.hex() == VECTORS["enc"]


def test_known_answer_reply() -> None:
    inputs = VECTORS["inputs"]
    keys = ReplyKeys(
        reply_secret=bytes.fromhex(inputs["reply_secret"]), enc=bytes.fromhex(VECTORS["enc"])
    )
    sealer = keys.sealer(response_nonce=bytes.fromhex(inputs["response_nonce"]))
    blob = b"".join(sealer.seal(c.encode()) for c in inputs["reply_chunks"]) + sealer.finish()
    assert blob.hex() == VECTORS["reply_blob"]
    opener = keys.opener()
    chunks = opener.feed(bytes.fromhex(VECTORS["reply_blob"]))
    opener.close()
    assert [c.decode() for c in chunks] == inputs["reply_chunks"]


def test_round_trip_and_version_byte(key: SoftwareKey) -> None:
    sealed = seal_v2(key.public_key, b'{"model":"m"}', **ROUTE)
    assert enclave.envelope_version(sealed.blob) == 2
    opened = open_v2(key, sealed.blob, **ROUTE)
    assert opened.body == b'{"model":"m"}'
    assert opened.reply == sealed.reply
    reply = seal_reply(opened.reply, b'{"choices":[]}')
    assert open_reply(sealed.reply, reply) == b'{"choices":[]}'


def test_reply_secret_is_fresh_per_request(key: SoftwareKey) -> None:
    a = seal_v2(key.public_key, b"x", **ROUTE)
    b = seal_v2(key.public_key, b"x", **ROUTE)
    assert a.reply.reply_secret != b.reply.reply_secret
    assert a.reply.reply_secret not in a.blob


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions/"),
    ],
)
def test_request_replayed_to_another_route_does_not_open(
    key: SoftwareKey, method: str, path: str
) -> None:
    sealed = seal_v2(key.public_key, b"prompt", **ROUTE)
    with pytest.raises(DecryptionError):
        open_v2(key, sealed.blob, method=method, path=path)


def test_method_case_is_normalised(key: SoftwareKey) -> None:
    sealed = seal_v2(key.public_key, b"prompt", method="post", path="/v1/chat/completions")
    assert open_v2(key, sealed.blob, **ROUTE).body == b"prompt"


def test_request_tampering_is_refused_uniformly(key: SoftwareKey) -> None:
    blob = seal_v2(key.public_key, b"prompt", **ROUTE).blob
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x40
        with pytest.raises(DecryptionError, match=r"^decryption failed$"):
            open_v2(key, bytes(tampered), **ROUTE)
    for length in range(len(blob)):
        with pytest.raises(DecryptionError):
            open_v2(key, blob[:length], **ROUTE)
    with pytest.raises(DecryptionError):
        open_v2(SoftwareKey.generate(), blob, **ROUTE)


def test_v1_blob_is_not_a_v2_request(key: SoftwareKey) -> None:
    with pytest.raises(DecryptionError):
        open_v2(key, enclave.seal_v1(key.public_key, b"x" * 100), **ROUTE)


def _frames(blob: bytes) -> tuple[bytes, list[bytes]]:
    header, rest, frames = blob[:REPLY_HEADER_LEN], blob[REPLY_HEADER_LEN:], []
    while rest:
        (word,) = struct.unpack(">I", rest[:4])
        length = word & 0x7FFFFFFF
        frames.append(rest[: 4 + length])
        rest = rest[4 + length :]
    return header, frames


@pytest.fixture
def stream() -> tuple[ReplyKeys, bytes]:
    keys = ReplyKeys(reply_secret=b"\x01" * 32, enc=SoftwareKey.generate().public_key)
    sealer = keys.sealer()
    blob = b"".join(sealer.seal(f"chunk {i}\n".encode()) for i in range(4)) + sealer.finish()
    return keys, blob


def _open_all(keys: ReplyKeys, blob: bytes) -> list[bytes]:
    opener = keys.opener()
    out = opener.feed(blob)
    opener.close()
    return out


def test_stream_opens_incrementally_byte_by_byte(stream: tuple[ReplyKeys, bytes]) -> None:
    keys, blob = stream
    opener = keys.opener()
    seen: list[tuple[int, bytes]] = []
    for i in range(len(blob)):
        for chunk in opener.feed(blob[i : i + 1]):
            seen.append((i, chunk))
    opener.close()
    assert [c for _, c in seen] == [f"chunk {i}\n".encode() for i in range(4)]
    # each chunk is released as soon as its frame is complete, not at the end
    assert seen[0][0] < len(blob) // 2


def test_stream_truncation_is_detected(stream: tuple[ReplyKeys, bytes]) -> None:
    keys, blob = stream
    header, frames = _frames(blob)
    for keep in range(len(frames)):
        opener = keys.opener()
        opener.feed(header + b"".join(frames[:keep]))
        with pytest.raises(DecryptionError):
            opener.close()
    for cut in range(1, len(blob)):
        with pytest.raises(DecryptionError):
            _open_all(keys, blob[:-cut])


def test_stream_reorder_duplicate_drop_are_detected(stream: tuple[ReplyKeys, bytes]) -> None:
    keys, blob = stream
    header, frames = _frames(blob)
    variants = [
        [frames[1], frames[0], *frames[2:]],
        [frames[0], frames[0], *frames[1:]],
        [frames[0], *frames[2:]],
        [*frames[:-1], frames[-2], frames[-1]],
        [*frames, frames[-1]],
    ]
    for frames_variant in variants:
        with pytest.raises(DecryptionError):
            _open_all(keys, header + b"".join(frames_variant))


def test_stream_final_flag_is_authenticated(stream: tuple[ReplyKeys, bytes]) -> None:
    keys, blob = stream
    header, frames = _frames(blob)
    forged_final = bytearray(frames[1])
    forged_final[0] |= 0x80
    with pytest.raises(DecryptionError):
        _open_all(keys, header + frames[0] + bytes(forged_final))


def test_stream_splicing_from_another_reply_is_detected(stream: tuple[ReplyKeys, bytes]) -> None:
    keys, blob = stream
    other = keys.sealer()  # same request keys, another response nonce
    other_blob = other.seal(b"chunk 0\n") + other.seal(b"evil\n") + other.finish()
    header, frames = _frames(blob)
    _, other_frames = _frames(other_blob)
    with pytest.raises(DecryptionError):
        _open_all(keys, header + frames[0] + other_frames[1] + frames[2])


def test_stream_bit_flips_are_detected(stream: tuple[ReplyKeys, bytes]) -> None:
    keys, blob = stream
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(DecryptionError):
            _open_all(keys, bytes(tampered))


def test_opener_stays_failed_after_an_error(stream: tuple[ReplyKeys, bytes]) -> None:
    keys, blob = stream
    opener = keys.opener()
    with pytest.raises(DecryptionError):
        opener.feed(b"\x07")
    with pytest.raises(DecryptionError):
        opener.feed(blob)


def test_oversized_frame_length_is_refused_without_buffering() -> None:
    keys = ReplyKeys(reply_secret=b"\x01" * 32, enc=SoftwareKey.generate().public_key)
    header = keys.sealer().seal(b"")[:REPLY_HEADER_LEN]
    opener = keys.opener(max_frame=1024)
    with pytest.raises(DecryptionError):
        opener.feed(header + struct.pack(">I", 4096))


def test_large_chunks_are_split_into_bounded_frames() -> None:
    keys = ReplyKeys(reply_secret=b"\x02" * 32, enc=SoftwareKey.generate().public_key)
    body = b"z" * (2 * MAX_CHUNK + 5)
    blob = seal_reply(keys, body)
    _, frames = _frames(blob)
    assert len(frames) == 3
    assert open_reply(keys, blob) == body


def test_sealer_refuses_use_after_finish() -> None:
    sealer = ReplyKeys(reply_secret=b"\x03" * 32, enc=b"\x04" * 65).sealer()
    sealer.finish()
    with pytest.raises(RuntimeError):
        sealer.seal(b"late")
