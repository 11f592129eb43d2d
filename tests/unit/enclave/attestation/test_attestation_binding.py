"""The binding document and signed receipts: canonical bytes, strict parsing, signatures."""

from __future__ import annotations

import hashlib
import json

import pytest

from enclave import SoftwareKey, receipts
from enclave.attestation import binding

TERMS = binding.PaymentTerms(
    pay_to="0x" + "11" * 20,
    accepts=(
        binding.AcceptedAsset("eip155:84532", "0x" + "22" * 20, "USDC", "2", 6, "0x" + "33" * 20),
    ),
    schemes=("exact", "upto"),
    price="0.001",
    route_prices=(("POST /v1/embeddings", "0.0005"),),
    model_prices=(("big", "0.01"),),
    token_prices=(("*", binding.TokenPriceTerms("0.1", "0.4", "0")),),
    max_tokens_cap=512,
)


def _binding(nonce: bytes = b"\x07" * 32) -> binding.Binding:
    key = SoftwareKey.generate()
    return binding.Binding(
        nonce=nonce,
        sealing_key=key.public_key,
        receipt_key=key.receipt_public_key,
        models=(binding.ModelDigest("fake-model", "sha256:" + "ab" * 32),),
        payment=TERMS,
        gateway_version="0.1.0",
        code_digest="sha256:" + "ef" * 32,
        issued_at=1_700_000_000,
    )


def test_canonical_form_is_rfc8785_and_round_trips() -> None:
    original = _binding()
    raw = original.canonical()
    # Keys sorted, no whitespace: the bytes a verifier re-derives from the parsed JSON.
    assert raw == json.dumps(original.document(), sort_keys=True, separators=(",", ":")).encode()
    parsed = binding.parse(json.loads(raw))
    assert parsed == original
    assert parsed.digest() == hashlib.sha256(raw).digest()
    # The configuration digest ignores the nonce and the time, and nothing else.
    assert _binding(b"\x01" * 32).config_digest() != original.config_digest()  # other keys
    same = binding.parse({**original.document(), "nonce": "09" * 32, "issued_at": 5})
    assert same.config_digest() == original.config_digest()
    # The replica that answered is bound (in the digest) but not configuration.
    answered = binding.parse({**original.document(), "replica": "host-a:41"})
    assert answered.replica == "host-a:41"
    assert answered.canonical() == canonical_with(original.document(), replica="host-a:41")
    assert answered.digest() != original.digest()
    assert answered.config_digest() == original.config_digest()
    assert original.replica is None
    assert "replica" not in original.document()


def canonical_with(document: dict[str, object], **extra: object) -> bytes:
    return json.dumps({**document, **extra}, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "change",
    [
        {"nonce": "00" * 31},
        {"sealing_key": "04" + "00" * 64},
        {"models": [{"name": "m", "digest": "sha256:" + "AB" * 32}]},
        {"payment": {"pay_to": "nope", "networks": ["x"], "asset": "a", "price_digest": "x"}},
        {"payment": {**TERMS.document(), "pay_to": "nope"}},
        {"payment": {**TERMS.document(), "accepts": []}},
        {"payment": {**TERMS.document(), "accepts": [TERMS.accepts[0].document()] * 2}},
        {"payment": {**TERMS.document(), "prices": {**TERMS.document()["prices"], "default": 1}}},
        {
            "payment": {
                **TERMS.document(),
                "prices": {**TERMS.document()["prices"], "default": "1e3"},
            }
        },
        {
            "payment": {
                **TERMS.document(),
                "prices": {**TERMS.document()["prices"], "default": "-1"},
            }
        },
        {"payment": {**TERMS.document(), "max_tokens_cap": 0}},
        {"payment": {**TERMS.document(), "token_prices": {"m": {"input": "1"}}}},
        {"payment": {**TERMS.document(), "price_digest": "sha256:" + "00" * 32}},
        {"issued_at": True},
        {"extra": 1},
        {"replica": ""},
        {"replica": 7},
        {"version": 1},
    ],
)
def test_malformed_bindings_are_refused(change: dict[str, object]) -> None:
    document = {**_binding().document(), **change}
    with pytest.raises(binding.BindingInvalid):
        binding.parse(document)


def test_receipt_signs_and_verifies_and_refuses_tampering() -> None:
    key = SoftwareKey.generate()
    claims = {
        "kind": "reply",
        "request_digest": receipts.body_digest(b"sealed"),
        "reply_digest": receipts.body_digest(b"reply"),
        "model": "fake-model",
        "model_digest": "sha256:" + "ab" * 32,
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 5,
            "cached_tokens": None,
            "total_tokens": 8,
            "source": "reported",
        },
        "payment": None,
        "issued_at": 1_700_000_000,
    }
    token = receipts.sign(claims, key)
    verified = receipts.verify(token, key.receipt_public_key)
    assert verified["reply_digest"] == claims["reply_digest"]
    payload, signature = token.split(".")
    forged = json.loads(receipts._unb64(payload))
    forged["reply_digest"] = receipts.body_digest(b"other")
    tampered = receipts._b64(binding.canonical(forged)) + "." + signature
    for bad in (tampered, token[:-2] + "AA", token + ".x", "", "x" * 10_000):
        with pytest.raises(receipts.ReceiptTokenInvalid):
            receipts.verify(bad, key.receipt_public_key)
    with pytest.raises(receipts.ReceiptTokenInvalid):
        receipts.verify(token, SoftwareKey.generate().receipt_public_key)  # another key


def test_running_hash_equals_the_whole_body_digest() -> None:
    running = receipts.RunningHash()
    for chunk in (b"data: 1\n\n", b"data: 2\n\n"):
        running.update(chunk)
    assert running.digest() == receipts.body_digest(b"data: 1\n\ndata: 2\n\n")
