"""Every parser of untrusted input, fuzzed: only its documented error, never another exception.

The default profile runs a few hundred examples each (fast, part of the main suite); the
``fuzz`` profile (``HYPOTHESIS_PROFILE=fuzz``, run by ``scripts/test.sh`` after the main suite)
runs 10,000 per parser. Profiles are registered in tests/conftest.py.
"""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from enclave import SoftwareKey
from enclave.envelope_v1 import open_v1
from enclave.envelope_v2 import ReplyKeys, open_v2
from enclave.errors import DecryptionError
from paygate import jsonsafe
from paygate.client.errors import InvalidChallenge, PubkeyUnavailable, ReplyOpenFailed
from paygate.client.payer import parse_challenge, refusal_reason
from paygate.client.pubkey import parse_pubkey_document
from paygate.client.streams import ReceiptScanner, SealedDecoder
from paygate.config import Settings, load_settings
from paygate.x402 import codec
from paygate.x402.inband import InbandReceiptWriter
from paygate.x402.pricing import model_of

KEY = SoftwareKey.generate()
FAST = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _doc(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


ADDRESS = "0x" + "ab" * 20
AUTHORIZATION = {
    "from": ADDRESS,
    "to": "0x" + "cd" * 20,
    "value": "1000",
    "validAfter": "0",
    "validBefore": "9999999999",
    "nonce": "0x" + "11" * 32,
}
REQUIREMENT = {
    "scheme": "exact",
    "network": "eip155:84532",
    "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    "amount": "1000",
    "payTo": "0x" + "cd" * 20,
    "maxTimeoutSeconds": 300,
    "extra": {"name": "USDC", "version": "2"},
}
# Valid documents of every kind the parsers read; the fuzzer mutates them (cheap, and close
# to the real shapes, so the deep paths are reached), next to raw bytes and hostile extremes.
SEEDS = (
    _doc({"x402Version": 2, "accepted": REQUIREMENT, "resource": {"url": "http://x/"},
          "payload": {"signature": "0x" + "12" * 65, "authorization": AUTHORIZATION},
          "extensions": {"payment-identifier": {"info": {"id": "a" * 20}}}}),
    _doc({"x402Version": 1, "scheme": "exact", "network": "base-sepolia",
          "payload": {"signature": "0x" + "12" * 65, "authorization": AUTHORIZATION}}),
    _doc({"success": True, "transaction": "0x" + "22" * 32, "network": "eip155:84532",
          "payer": ADDRESS, "amount": "1000"}),
    _doc({"x402Version": 2, "error": "payment required", "resource": {"url": "http://x/"},
          "accepts": [REQUIREMENT]}),
    _doc({"x402Version": 1, "error": "payment required",
          "accepts": [{**REQUIREMENT, "network": "base-sepolia", "maxAmountRequired": "1000",
                       "resource": "http://x/", "description": "", "mimeType": ""}]}),
    _doc({"pubkey": KEY.public_key.hex(), "fingerprint": "ab" * 32, "backend": "software"}),
    _doc({"model": "fake-big", "messages": [{"role": "user", "content": "hi"}]}),
    _doc({"model": "m", "done": True, "x402PaymentResponse": "eyJ4IjoxfQ=="}),
    b"[" * 1100 + b"]" * 1100,  # past orjson's 1,024 levels
    b'{"model":"m","n":' + b"9" * 4400 + b"}",  # past int()'s 4,300 digits
    b'{"a":' * 40 + b"1" + b"}" * 40,
)  # fmt: skip


def _mutate(parts: tuple[bytes, int, bytes, int]) -> bytes:
    seed, at, junk, cut = parts
    at %= len(seed) + 1
    return seed[:at] + junk + seed[at + cut :]


documents = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(SEEDS),
    st.tuples(
        st.sampled_from(SEEDS), st.integers(0, 1 << 16), st.binary(max_size=6), st.integers(0, 4)
    ).map(_mutate),
)


def _b64(data: bytes, urlsafe: bool) -> str:
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()


# Parsers that read the same kind of input share one generated example (each still sees every
# example: 10,000 apiece in the fuzz profile), which halves hypothesis' own overhead.


@FAST
@given(documents, st.booleans())
def test_payment_headers_receipts_and_request_json(raw: bytes, urlsafe: bool) -> None:
    encoded = _b64(raw, urlsafe)
    for header in ("PAYMENT-SIGNATURE", "X-PAYMENT"):  # v2 and v1, base64 of anything
        with contextlib.suppress(codec.PaymentHeaderError, ValueError):
            codec.decode_payment(encoded, header=header)
    # The header's raw text too (not base64 at all).
    with contextlib.suppress(codec.PaymentHeaderError, ValueError):
        codec.decode_payment(raw.decode("latin-1"), header="PAYMENT-SIGNATURE")
    with contextlib.suppress(codec.PaymentHeaderError):
        codec.decode_settle_response(encoded)
    with contextlib.suppress(jsonsafe.UntrustedJSONError):
        jsonsafe.loads(raw, max_bytes=1 << 16)
    try:
        model = model_of(raw)
    except jsonsafe.UntrustedJSONError:
        return
    assert model is None or isinstance(model, str)


@FAST
@given(st.binary(max_size=400))
def test_sealed_envelopes_v1_and_v2(blob: bytes) -> None:
    with pytest.raises(DecryptionError):
        open_v1(KEY, b"\x01" + blob)
    with pytest.raises(DecryptionError):
        open_v2(KEY, b"\x02" + blob, method="POST", path="/v1/chat/completions")


@FAST
@given(st.lists(st.binary(max_size=120), max_size=6))
def test_sealed_stream_frames(chunks: list[bytes]) -> None:
    decoder = SealedDecoder(ReplyKeys(reply_secret=b"k" * 32, enc=b"e" * 65), None)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
        decoder.end()
    except ReplyOpenFailed:
        return
    raise AssertionError("frames under an unknown key opened")


@FAST
@given(st.integers(100, 600), documents, st.one_of(st.none(), documents))
def test_key_document_and_402(status: int, body: bytes, header: bytes | None) -> None:
    # The key document the client reads from /v1/enclave/pubkey.
    with contextlib.suppress(PubkeyUnavailable):
        parse_pubkey_document("http://127.0.0.1:1", status, body)
    # The 402: the v2 PAYMENT-REQUIRED header (base64 JSON) and the v1 JSON body.
    headers = {"PAYMENT-REQUIRED": _b64(header, False)} if header is not None else {}
    with contextlib.suppress(InvalidChallenge):
        parse_challenge(headers, body)
    assert isinstance(refusal_reason(headers, body), str)


stream_bytes = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"data: {}\n\n", b"data: [DONE]\n\n", b'{"done":true}\n', b"\n",
                         b": x402-payment-response ", b"data: x", b"\r\n"]),
        st.tuples(st.sampled_from([b"data: ", b""]), documents).map(lambda p: p[0] + p[1] + b"\n"),
    ),
    max_size=3,
)  # fmt: skip


@FAST
@given(st.sampled_from(["text/event-stream", "application/x-ndjson", "text/plain"]), stream_bytes)
def test_stream_parsing_with_inband_receipts(content_type: str, chunks: list[bytes]) -> None:
    found: list[object] = []
    scanner = ReceiptScanner(content_type, lambda receipt, error: found.append((receipt, error)))
    for chunk in chunks:
        scanner.feed(chunk)
    scanner.finish()
    writer = InbandReceiptWriter(content_type)
    for chunk in chunks:
        writer.feed(chunk)
    writer.close("eyJ4IjoxfQ==")


config_values = st.one_of(st.text(max_size=30), documents.map(lambda r: r.decode("latin-1")))
BASE_SETTINGS = load_settings(None)


@FAST
@given(
    st.sampled_from(["max_body_bytes", "price", "model_prices", "route_prices", "network",
                     "pay_to", "listen", "chain_rpc_url", "facilitator_url", "trusted_proxies",
                     "log_level", "settle_margin_seconds", "payment_mode", "asset_address"]),
    config_values,
)  # fmt: skip
def test_config_values(name: str, value: str) -> None:
    # Field and model validators of one value (what load_settings runs, which maps the
    # ValidationError to ConfigError; tests/unit covers that mapping), without re-reading the
    # environment 10,000 times.
    with contextlib.suppress(ValidationError):
        Settings.__pydantic_validator__.validate_assignment(BASE_SETTINGS.model_copy(), name, value)
