"""Envelope v1: Obol's known-answer vector, round trips, and one uniform error for bad blobs."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import enclave
from enclave import DecryptionError, SoftwareKey, open_v1, seal_v1
from enclave.envelope_v1 import OVERHEAD, _seal_v1_deterministic

# The known-answer vector published with Obol's ECIES envelope (the reference gateway's wire format)
RECIPIENT = "616ea970f944bb4dd30c8b0194ac6aa0e16ca4bc53da72a2b2467b64d8dd92dc"
RECIPIENT_PUB = (
    "04705d4061c8f51d5723d672122d401f7fbdc8ac52327b002dd3a0049cb421a874"
    "91237f4f50b9354983abecfbb42eb502ca1089df23e0bd8cac6e328f916f0a33"
)
EPHEMERAL = "80672dd365961a6a5f08e0c1555f83133526d2fcd0c416c8a72f682fc6153234"
SHARED_X = "d541e5ecc14659e7bee2369cdb88930f39be0f3748919edc78842a66efc30b2b"
NONCE = "000102030405060708090a0b"
PLAINTEXT = b'{"model":"m","messages":[]}'
BLOB = (
    "0104cb0fe63c6e4835cd9a524b911ce34534997bcbd7de2555f01dce221978e697"
    "07bd316dea26410b9ae6bb34ba97d96f439574f123fd6f8e0ef993005333a7863c"
    "000102030405060708090a0bc0fc82e31cf36c0705f4e0016f6172f94c61194257"
    "e8bd6653b408c0556129747f433d9e1fdd9582ea2feb"
)


@pytest.fixture
def kat_key() -> SoftwareKey:
    return SoftwareKey.from_private_bytes(bytes.fromhex(RECIPIENT))


def test_known_answer_vector_seals_byte_for_byte(kat_key: SoftwareKey) -> None:
    assert kat_key.public_key.hex() == RECIPIENT_PUB
    ephemeral = ec.derive_private_key(int(EPHEMERAL, 16), ec.SECP256R1())
    blob = _seal_v1_deterministic(kat_key.public_key, PLAINTEXT, ephemeral, bytes.fromhex(NONCE))
    assert blob.hex() == BLOB
    assert len(blob) == 121


def test_known_answer_vector_opens(kat_key: SoftwareKey) -> None:
    assert open_v1(kat_key, bytes.fromhex(BLOB)) == PLAINTEXT


def test_known_answer_shared_secret(kat_key: SoftwareKey) -> None:
    ephemeral_pub = bytes.fromhex(BLOB)[1:66]
    assert kat_key.ecdh(ephemeral_pub).hex() == SHARED_X


@pytest.mark.parametrize("size", [0, 1, 1000, 70_000])
def test_round_trip(size: int) -> None:
    key = SoftwareKey.generate()
    plaintext = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    blob = seal_v1(key.public_key, plaintext)
    assert len(blob) == len(plaintext) + OVERHEAD
    assert blob[0] == 0x01
    assert enclave.envelope_version(blob) == 1
    assert open_v1(key, blob) == plaintext


def test_fresh_ephemeral_and_nonce_each_seal() -> None:
    key = SoftwareKey.generate()
    a, b = seal_v1(key.public_key, b"same"), seal_v1(key.public_key, b"same")
    assert a[1:66] != b[1:66]
    assert a[66:78] != b[66:78]


def _assert_refused(key: SoftwareKey, blob: bytes) -> None:
    with pytest.raises(DecryptionError) as info:
        open_v1(key, blob)
    assert str(info.value) == "decryption failed"
    assert info.value.code == "decryption_failed"


def test_every_bit_flip_is_refused(kat_key: SoftwareKey) -> None:
    blob = bytes.fromhex(BLOB)
    for index in range(len(blob)):
        for bit in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[index] ^= bit
            _assert_refused(kat_key, bytes(tampered))


def test_truncated_blobs_are_refused(kat_key: SoftwareKey) -> None:
    blob = bytes.fromhex(BLOB)
    for length in range(len(blob)):
        _assert_refused(kat_key, blob[:length])


def test_extended_blob_is_refused(kat_key: SoftwareKey) -> None:
    _assert_refused(kat_key, bytes.fromhex(BLOB) + b"\x00")


def test_wrong_version_is_refused(kat_key: SoftwareKey) -> None:
    blob = bytearray(bytes.fromhex(BLOB))
    for version in (0x00, 0x02, 0x04, 0xFF):
        blob[0] = version
        _assert_refused(kat_key, bytes(blob))


def test_wrong_key_is_refused() -> None:
    blob = seal_v1(SoftwareKey.generate().public_key, b"secret prompt")
    _assert_refused(SoftwareKey.generate(), blob)


def test_off_curve_ephemeral_is_refused_uniformly(kat_key: SoftwareKey) -> None:
    blob = bytearray(bytes.fromhex(BLOB))
    blob[1:66] = b"\x04" + b"\x01" * 64
    _assert_refused(kat_key, bytes(blob))


def test_seal_to_invalid_public_key_is_rejected() -> None:
    with pytest.raises(enclave.InvalidPublicKey):
        seal_v1(b"\x04" + b"\x00" * 64, b"x")
    with pytest.raises(enclave.InvalidPublicKey):
        seal_v1(b"\x02" + b"\x11" * 32, b"x")
