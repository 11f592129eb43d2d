"""enclave.hmac256 is HMAC-SHA256: the same bytes as the standard library's, any key length."""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from enclave import envelope_v2, hmac256


@given(st.binary(max_size=200), st.binary(max_size=300))
def test_the_same_bytes_as_hmac_digest(key: bytes, msg: bytes) -> None:
    assert hmac256.digest(key, msg) == hmac.digest(key, msg, "sha256")


def test_keys_at_the_block_edges() -> None:
    for size in (0, 1, 31, 32, 63, 64, 65, 128):
        key = bytes(range(size))
        assert hmac256.digest(key, b"m") == hmac.digest(key, b"m", "sha256")


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=65, max_size=65))
def test_the_v2_derivations_are_rfc5869_hkdf(secret: bytes, enc: bytes) -> None:
    """The request nonce and the receipt key: what cryptography's HKDF derives."""
    keys = envelope_v2.ReplyKeys(reply_secret=secret, enc=enc)

    def hkdf(info: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, salt=enc, info=info).derive(secret)

    assert envelope_v2.request_nonce(keys) == hkdf(envelope_v2.REQUEST_NONCE_LABEL)
    nonce = bytes(12)
    sealed = envelope_v2.receipt_cipher(keys).encrypt(nonce, b"token", b"aad")
    assert sealed == AESGCM(hkdf(envelope_v2.RECEIPT_KEY_LABEL)).encrypt(nonce, b"token", b"aad")
    # In the other order, on fresh keys: the extract kept by the first derivation is the one
    # the second needs, whichever comes first; the keys stay equal to keys never used.
    fresh = envelope_v2.ReplyKeys(reply_secret=secret, enc=enc)
    assert envelope_v2.receipt_cipher(fresh).encrypt(nonce, b"token", b"aad") == sealed
    assert envelope_v2.request_nonce(fresh) == hkdf(envelope_v2.REQUEST_NONCE_LABEL)
    unused = envelope_v2.ReplyKeys(reply_secret=secret, enc=enc)
    assert fresh == unused
    assert hash(fresh) == hash(unused)


@given(st.binary(max_size=200), st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_a_key_for_several_messages_gives_the_same_bytes_each_time(
    key: bytes, messages: list[bytes]
) -> None:
    """hmac256.Key hashes the padded key once; each message starts from copies, so a message
    signed after others (or twice) gives the bytes it gives alone."""
    keyed = hmac256.Key(key)
    for msg in [*messages, *messages]:
        assert keyed.digest(msg) == hmac.digest(key, msg, "sha256")


def test_a_key_at_the_block_edges_and_its_repr() -> None:
    for size in (0, 1, 31, 32, 63, 64, 65, 128):
        key = bytes(range(size))
        assert hmac256.Key(key).digest(b"m") == hmac.digest(key, b"m", "sha256")
    assert "00" not in repr(hmac256.Key(b"\x00" * 32))  # the states are as good as the key
