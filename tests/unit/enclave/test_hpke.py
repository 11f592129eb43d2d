"""RFC 9180 vectors for our suite, and interop with cryptography's own HPKE both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hpke as c_hpke
from cryptography.hazmat.primitives.asymmetric import ec

from enclave import DecryptionError, SoftwareKey, hpke, open_v2, seal_v2
from enclave.envelope_v2 import REPLY_SECRET_LEN, request_info

VECTOR = json.loads(
    (Path(__file__).parents[2] / "vectors/rfc9180_p256_sha256_aes256gcm.json").read_text()
)
SUITE = c_hpke.Suite(c_hpke.KEM.P256, c_hpke.KDF.HKDF_SHA256, c_hpke.AEAD.AES_256_GCM)


def _h(name: str) -> bytes:
    return bytes.fromhex(VECTOR[name])


def test_vector_is_the_base_mode_of_our_suite() -> None:
    assert (VECTOR["mode"], VECTOR["kem_id"], VECTOR["kdf_id"], VECTOR["aead_id"]) == (0, 16, 1, 2)


def test_sender_setup_matches_rfc_vector() -> None:
    ephemeral = ec.derive_private_key(int(VECTOR["skEm"], 16), ec.SECP256R1())
    enc, ctx = hpke.setup_base_s(_h("pkRm"), _h("info"), ephemeral=ephemeral)
    assert enc == _h("enc")
    assert ctx.key == _h("key")
    assert ctx.base_nonce == _h("base_nonce")
    assert ctx.exporter_secret == _h("exporter_secret")
    for item in VECTOR["encryptions"]:
        assert ctx.seal(bytes.fromhex(item["aad"]), bytes.fromhex(item["pt"])).hex() == item["ct"]


def test_receiver_setup_over_a_key_backend_matches_rfc_vector() -> None:
    recipient = SoftwareKey.from_private_bytes(_h("skRm"))
    assert recipient.public_key == _h("pkRm")
    ctx = hpke.setup_base_r(_h("enc"), recipient, _h("info"))
    assert ctx.key == _h("key")
    assert ctx.base_nonce == _h("base_nonce")
    # All 257 messages in order: exercises sequence numbers past one byte.
    for item in VECTOR["encryptions"]:
        assert ctx.open(bytes.fromhex(item["aad"]), bytes.fromhex(item["ct"])).hex() == item["pt"]
    for item in VECTOR["exports"]:
        got = ctx.export(bytes.fromhex(item["exporter_context"]), item["L"])
        assert got.hex() == item["exported_value"]


def test_single_shot_open_matches_rfc_vector_and_refuses_later_messages() -> None:
    """``open_base`` (the v2 request's open: no exporter secret derived) opens the vector's
    first message, at sequence 0, and no other: a later message's nonce is not the base."""
    recipient = SoftwareKey.from_private_bytes(_h("skRm"))
    first, second = VECTOR["encryptions"][:2]
    opened = hpke.open_base(
        _h("enc"), recipient, _h("info"), bytes.fromhex(first["aad"]), bytes.fromhex(first["ct"])
    )
    assert opened.hex() == first["pt"]
    with pytest.raises(DecryptionError):
        hpke.open_base(
            _h("enc"),
            recipient,
            _h("info"),
            bytes.fromhex(second["aad"]),
            bytes.fromhex(second["ct"]),
        )
    with pytest.raises(DecryptionError):  # another info: another key
        hpke.open_base(
            _h("enc"), recipient, b"other", bytes.fromhex(first["aad"]), bytes.fromhex(first["ct"])
        )


def test_receiver_refuses_out_of_order_message() -> None:
    ctx = hpke.setup_base_r(_h("enc"), SoftwareKey.from_private_bytes(_h("skRm")), _h("info"))
    second = VECTOR["encryptions"][1]
    with pytest.raises(DecryptionError):
        ctx.open(bytes.fromhex(second["aad"]), bytes.fromhex(second["ct"]))


def test_cryptography_seals_and_we_open() -> None:
    key = SoftwareKey.generate()
    info = request_info("POST", "/v1/embeddings")
    secret = b"\x07" * REPLY_SECRET_LEN
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key.public_key)
    blob = b"\x02" + SUITE.encrypt(secret + b'{"input":"x"}', public, info=info)
    opened = open_v2(key, blob, method="POST", path="/v1/embeddings")
    assert opened.body == b'{"input":"x"}'
    assert opened.reply.reply_secret == secret


def test_we_seal_and_cryptography_opens() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    key = SoftwareKey(private)
    sealed = seal_v2(key.public_key, b"prompt", method="POST", path="/api/chat")
    plaintext = SUITE.decrypt(sealed.blob[1:], private, info=request_info("POST", "/api/chat"))
    assert plaintext == sealed.reply.reply_secret + b"prompt"
