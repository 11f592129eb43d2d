"""Signed receipts, sans-IO: the request digest and its nonce, the claims' form, the sealed
receipt header, and the client's check that holds a reply's end until its receipt verifies."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from enclave import DecryptionError, SoftwareKey, p256, receipts, seal_v2, sealed_receipt
from enclave.attestation import binding
from enclave.envelope_v2 import request_nonce
from paygate.client.attestation import Attested
from paygate.client.errors import (
    ContentAfterReceipt,
    PaymentRefused,
    ReceiptInvalid,
    ReceiptMismatch,
    ReceiptMissing,
    RefusalUnauthenticated,
)
from paygate.client.payer import SentPayment
from paygate.client.receipts import CheckedDecoder, ReceiptCheck, SignedReceipt, check_payment
from paygate.client.streams import PlainDecoder, ReceiptScanner
from paygate.server.receipts import payment_claims
from paygate.x402.ledger import PaymentRecord as LedgerRecord
from paygate.x402.ledger import PaymentState
from paygate.x402.metering import TokenPrice
from paygate.x402.pricing import token_charge

KEY = SoftwareKey.generate()
REQUEST = "sha256:" + "00" * 32
USAGE = {
    "prompt_tokens": 2,
    "completion_tokens": 4,
    "cached_tokens": None,
    "total_tokens": 6,
    "source": "reported",
}
PAYER = "0x" + "aa" * 20
PAY_TO = "0x" + "bb" * 20
ASSET = "0x" + "cc" * 20
NONCE = "0x" + "dd" * 32


def _attested() -> Attested:
    bound = binding.Binding(
        nonce=b"\x07" * 32,
        sealing_key=KEY.public_key,
        receipt_key=KEY.receipt_public_key,
        models=(),
        payment=None,
        gateway_version="0.1.0",
        code_digest="sha256:" + "ef" * 32,
        issued_at=1_700_000_000,
    )
    return Attested("http://appliance", "none", bound, ())


def _token(reply_digest: str, **changes: Any) -> str:
    claims = {
        "kind": "reply",
        "request_digest": REQUEST,
        "reply_digest": reply_digest,
        "model": None,
        "model_digest": None,
        "usage": USAGE,
        "payment": None,
        "issued_at": 1_700_000_000,
        **changes,
    }
    return receipts.sign(claims, KEY)


def _check(content_type: str, record: SentPayment | None = None, **kw: Any) -> ReceiptCheck:
    return ReceiptCheck(
        _attested(),
        request_digest=REQUEST,
        header_token=kw.pop("header", None),
        content_type=content_type,
        payment=record,
        result=SignedReceipt(),
        **kw,
    )


# --- the request digest --------------------------------------------------------------------


def test_the_request_digest_binds_the_nonce_the_body_the_route_and_v1s_reply_key() -> None:
    base = {"method": "POST", "path": "/v1/chat/completions", "body": b"{}"}
    one = receipts.request_digest(**base, nonce=b"\x01" * 32)
    assert one == receipts.request_digest(**base, nonce=b"\x01" * 32)
    others = {
        receipts.request_digest(**base, nonce=b"\x02" * 32),  # the same prompt, again
        receipts.request_digest(**base, nonce=None),  # an Obol v1 caller sends none
        receipts.request_digest(**{**base, "body": b"{ }"}, nonce=b"\x01" * 32),
        receipts.request_digest(**{**base, "path": "/v1/completions"}, nonce=b"\x01" * 32),
        receipts.request_digest(**base, nonce=b"\x01" * 32, reply_key=KEY.public_key),
    }
    assert one not in others
    assert len(others) == 5
    with pytest.raises(ValueError, match="32 bytes"):
        receipts.request_digest(**base, nonce=b"\x01" * 31)


def test_v2s_nonce_comes_from_the_reply_secret_inside_the_seal() -> None:
    first = seal_v2(KEY.public_key, b"{}", method="POST", path="/v1/x").reply
    second = seal_v2(KEY.public_key, b"{}", method="POST", path="/v1/x").reply
    assert request_nonce(first) == request_nonce(first)
    assert request_nonce(first) != request_nonce(second)
    assert len(request_nonce(first)) == 32


# --- the claims -----------------------------------------------------------------------------


def _payment(**changes: Any) -> dict[str, Any]:
    return {
        "id": NONCE,
        "scheme": "exact",
        "network": "eip155:84532",
        "asset": ASSET,
        "pay_to": PAY_TO,
        "payer": PAYER,
        "authorized": "1000",
        "charged": "1000",
        "prices": None,
        "transaction": "pending",
        **changes,
    }


def test_signed_bytes_are_what_the_signature_covers() -> None:
    token = _token(receipts.body_digest(b"x"), payment=_payment())
    raw = receipts.signed_bytes(token)
    assert raw == binding.canonical(json.loads(raw))
    assert receipts.verify(token, KEY.receipt_public_key) == json.loads(raw)


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "other"},
        {"payment": _payment(charged="1001")},  # more than authorized
        {"payment": _payment(charged="-1")},
        {"payment": _payment(charged="01")},
        {"payment": {**_payment(), "extra": 1}},
        {"usage": {**USAGE, "completion_tokens": -1}},
        {"usage": {**USAGE, "cached_tokens": True}},
    ],
)
def test_malformed_claims_are_neither_signed_nor_accepted(change: dict[str, Any]) -> None:
    with pytest.raises(receipts.ReceiptTokenInvalid):
        _token(receipts.body_digest(b"x"), **{"payment": _payment(), **change})


def test_a_settlement_receipt_names_its_payment() -> None:
    claims = {"kind": "settlement", "request_digest": None, "payment": None, "issued_at": 1}
    with pytest.raises(receipts.ReceiptTokenInvalid):
        receipts.sign(claims, KEY)
    token = receipts.sign({**claims, "payment": _payment(transaction="0x" + "12" * 32)}, KEY)
    assert receipts.verify(token, KEY.receipt_public_key)["kind"] == "settlement"


def _refusal(**changes: Any) -> dict[str, Any]:
    return {
        "kind": "refusal", "request_digest": REQUEST, "reply_digest": receipts.body_digest(b"x"),
        "model": None, "model_digest": None, "issued_at": 1, "reason": "settle_failed",
        "payment": _payment(charged="0", transaction="none"), **changes,
    }  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"payment": None},
        {"payment": _payment(charged="1", transaction="none")},  # a refusal charges nothing
        {"payment": _payment(charged="0", transaction="0x" + "12" * 32)},
        {"reason": ""},
        {"reason": "x" * (receipts.MAX_REASON + 1)},
        {"reason": None},
        {"usage": USAGE},  # not a refusal's claim
    ],
)
def test_a_refusal_receipt_names_its_payment_charges_nothing_and_says_why(
    change: dict[str, Any],
) -> None:
    with pytest.raises(receipts.ReceiptTokenInvalid):
        receipts.sign(_refusal(**change), KEY)
    claims = receipts.verify(receipts.sign(_refusal(), KEY), KEY.receipt_public_key)
    assert (claims["kind"], claims["reason"]) == ("refusal", "settle_failed")


def test_an_upto_receipt_says_upto_and_what_was_charged() -> None:
    record = LedgerRecord(
        id="a" * 32, network="eip155:84532", asset=ASSET, payer=PAYER, nonce=NONCE,
        pay_to=PAY_TO, amount=40_000, x402_version=2, route="chat", state=PaymentState.SETTLED,
        served=True, payload="{}", requirements="{}", idempotency_key=None,
        transaction="0x" + "12" * 32, error=None, attempts=1, created_at=0.0, updated_at=0.0,
        scheme="upto", settle_amount=1800,
    )  # fmt: skip
    claims = payment_claims(
        record, charged=1800, price=TokenPrice(Decimal(100), Decimal(400)), receipt=None
    )
    assert claims is not None
    assert (claims["scheme"], claims["authorized"], claims["charged"]) == ("upto", "40000", "1800")
    assert claims["prices"] == {"input_per_million": "100", "output_per_million": "400",
                                "minimum": "0"}  # fmt: skip
    assert claims["transaction"] == "0x" + "12" * 32


# --- the sealed receipt header --------------------------------------------------------------


def test_the_sealed_header_opens_only_for_its_request_and_hides_the_length() -> None:
    keys = seal_v2(KEY.public_key, b"{}", method="POST", path="/v1/x").reply
    other = seal_v2(KEY.public_key, b"{}", method="POST", path="/v1/x").reply
    token = _token(receipts.body_digest(b"x"))
    sealed = sealed_receipt.seal_v2(keys, token)
    assert sealed_receipt.open_v2(keys, sealed) == token
    assert len(sealed_receipt.seal_v2(keys, token + "A" * 50)) == len(sealed)  # padded
    for bad in (other,):
        with pytest.raises(DecryptionError):
            sealed_receipt.open_v2(bad, sealed)
    with pytest.raises(DecryptionError):
        sealed_receipt.open_v2(keys, sealed[:-4] + "AAAA")
    caller = SoftwareKey.generate()
    assert sealed_receipt.open_v1(caller, sealed_receipt.seal_v1(caller.public_key, token)) == token
    with pytest.raises(DecryptionError):
        sealed_receipt.open_v1(
            SoftwareKey.generate(), sealed_receipt.seal_v1(caller.public_key, token)
        )


# --- the client's check ---------------------------------------------------------------------

CONTENT = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
TAIL = b"data: [DONE]\n\n: x402-payment-response e30\n\n"


def _sse(content: bytes = CONTENT, tail: bytes = TAIL, **claims: Any) -> bytes:
    before = content + tail
    token = _token(receipts.body_digest(before), **claims)
    return before + b": paygate-receipt " + token.encode() + b"\n\n"


def _run(check: ReceiptCheck, body: bytes, step: int = 7) -> bytes:
    out = b""
    for at in range(0, len(body), step):
        out += check.feed(body[at : at + step])
    return out


def _run_to_end(check: ReceiptCheck, body: bytes, out: list[bytes]) -> None:
    out.append(_run(check, body))
    out.append(check.end())


def test_the_end_of_a_stream_comes_out_only_once_its_receipt_verified() -> None:
    body = _sse()
    check = _check("text/event-stream")
    passed = _run(check, body)
    assert passed == CONTENT  # the content as it came; [DONE] and after held
    assert check.in_tail
    assert passed + check.end() == body


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (_sse() + b'data: {"choices":[]}\n\n', ContentAfterReceipt),
        (CONTENT + TAIL, ReceiptMissing),  # stripped
        (CONTENT + b"data: [DONE]\n\n" + b": " + b"p" * 70_000 + b"\n" + TAIL, ReceiptMissing),
        (CONTENT.replace(b"hi", b"HI") + _sse()[len(CONTENT) :], ReceiptMismatch),  # flipped
    ],
)
def test_a_bad_tail_raises_before_the_end_comes_out(body: bytes, error: type[Exception]) -> None:
    check = _check("text/event-stream")
    out: list[bytes] = []
    with pytest.raises(error):
        _run_to_end(check, body, out)
    assert b"[DONE]" not in b"".join(out)


def test_padding_past_the_bound_raises_even_before_the_body_ends() -> None:
    check = _check("text/event-stream")
    check.feed(CONTENT + b"data: [DONE]\n\n")
    with pytest.raises(ReceiptMissing, match="bytes after"):
        _run(check, (b": " + b"p" * 1000 + b"\n") * 100, step=1000)


def test_ndjson_receipt_joined_to_the_final_object_covers_that_object() -> None:
    lines = b'{"message":{"content":"hi"},"done":false}\n'
    final = b'{"done":true,"eval_count":4}'
    token = _token(receipts.body_digest(lines + final + b"\n"))
    joined = final[:-1] + b',"paygate_receipt":"' + token.encode() + b'"}\n'
    check = _check("application/x-ndjson")
    assert _run(check, lines + joined) == lines
    assert check.end() == joined
    # The final object changed by a middlebox (the receipt moved with it): refused.
    forged = joined.replace(b'"eval_count":4', b'"eval_count":1')
    with pytest.raises(ReceiptMismatch):
        _run(_check("application/x-ndjson"), lines + forged)


def test_a_whole_reply_holds_its_last_chunk_until_the_header_verifies() -> None:
    body = b'{"choices":[{"message":{"content":"hi"}}]}'
    check = _check("application/json", header=_token(receipts.body_digest(body)))
    assert check.feed(body[:10]) == b""
    assert check.feed(body[10:]) == body[:10]
    assert check.end() == body[10:]
    wrong = _check("application/json", header=_token(receipts.body_digest(b"other")))
    wrong.feed(body)
    with pytest.raises(ReceiptMismatch):
        wrong.end()


def _record(**changes: Any) -> SentPayment:
    values: dict[str, Any] = {
        "url": "http://appliance/v1/chat/completions", "x402_version": 2,
        "network": "eip155:84532", "chain_id": 84532, "asset": ASSET, "amount": Decimal("0.04"),
        "amount_atomic": 40_000, "pay_to": PAY_TO, "payer": PAYER, "nonce": NONCE,
        "valid_before": 0, "scheme": "upto",
        "prices": (Decimal(100), Decimal(400), Decimal(0)), "decimals": 6,
        **changes,
    }  # fmt: skip
    return SentPayment(**values)


def _upto(**changes: Any) -> dict[str, Any]:
    charged = token_charge(
        input_price=Decimal(100), output_price=Decimal(400), minimum=Decimal(0),
        tokens_in=2, tokens_out=4, decimals=6, maximum=40_000,
    )  # fmt: skip
    return _payment(
        **{
            "scheme": "upto",
            "authorized": "40000",
            "charged": str(charged),
            "prices": {"input_per_million": "100", "output_per_million": "400", "minimum": "0"},
            **changes,
        }
    )


def test_the_payment_must_be_the_one_signed_and_charged_what_its_usage_costs() -> None:
    check_payment({"usage": USAGE, "payment": _upto()}, _record())
    for payment, match in (
        (_upto(id="0x" + "ee" * 32), "payment id"),  # another authorization's receipt
        (_upto(pay_to="0x" + "99" * 20), "pay to"),
        (_upto(authorized="50000"), "authorized"),
        (_upto(charged="1801"), "charges 1801"),  # more than the usage at the prices
        (
            _upto(prices={"input_per_million": "1", "output_per_million": "400", "minimum": "0"}),
            "prices",
        ),
        (_upto(scheme="exact"), "scheme"),
    ):
        with pytest.raises(ReceiptMismatch, match=match):
            check_payment({"usage": USAGE, "payment": payment}, _record())
    with pytest.raises(ReceiptMismatch, match="no usage"):
        check_payment({"usage": None, "payment": _upto()}, _record())
    with pytest.raises(ReceiptMismatch, match="did not make"):
        check_payment({"usage": USAGE, "payment": _upto()}, None)
    with pytest.raises(ReceiptMismatch, match="names no payment"):
        check_payment({"usage": USAGE, "payment": None}, _record())


# --- fixed vectors: the bytes a receipt is made of never change -----------------------------

# Computed before the signing path was made cheaper (session 23): a verifier built against
# any release must keep reading the same digests and the same signed bytes.
_VECTOR_SIGNED = (
    b'{"issued_at":1700000000,"kind":"reply","model":"m\xc3\xa9","model_digest":"sha256:'
    + b"ef" * 32
    + b'","payment":{"asset":"0x'
    + b"cc" * 20
    + b'","authorized":"1000","charged":"1000","id":"0x'
    + b"dd" * 32
    + b'","network":"eip155:84532","pay_to":"0x'
    + b"bb" * 20
    + b'","payer":"0x'
    + b"aa" * 20
    + b'","prices":null,"scheme":"exact","transaction":"pending"},"receipt_key":'
    b'"152900cb883513826e21639d69839bd12e34163be34f8cc2b53c1e254bd381aa","reply_digest":'
    b'"sha256:d4a534e3d5ab43de5b09ee16dedc6eec035cf179b072195f128d15ac87be79f0",'
    b'"request_digest":"sha256:5d09be6bf27d9f551fcd022b6b86426dcfb073b6e180c0c94e957c11cf4f920b"'
    b',"usage":{"cached_tokens":null,"completion_tokens":4,"prompt_tokens":2,"source":'
    b'"reported","total_tokens":6},"version":2}'
)


def test_a_receipt_has_the_digests_and_signed_bytes_it_always_had() -> None:
    key = SoftwareKey(
        ec.derive_private_key(0x44, p256.CURVE), receipt_key=ec.derive_private_key(0x55, p256.CURVE)
    )
    request = receipts.request_digest(
        method="post", path="/v1/chat/completions", body=b'{"model":"m"}', nonce=b"\x01" * 32
    )
    assert request == "sha256:5d09be6bf27d9f551fcd022b6b86426dcfb073b6e180c0c94e957c11cf4f920b"
    assert receipts.request_digest(
        method="POST", path="/v1/x", body=b"", nonce=None, reply_key=key.public_key
    ) == ("sha256:2382267bfaacd665a34a3ebb813349a4d7d25a7769ee768076d8d184286fa5ca")
    reply = receipts.body_digest(b'{"choices":[]}')
    assert reply == "sha256:d4a534e3d5ab43de5b09ee16dedc6eec035cf179b072195f128d15ac87be79f0"
    claims = {
        "kind": "reply",
        "request_digest": request,
        "reply_digest": reply,
        "model": "m\u00e9",
        "model_digest": "sha256:" + "ef" * 32,
        "usage": USAGE,
        "payment": _payment(),
        "issued_at": 1_700_000_000,
    }
    for _ in range(2):  # the second time through whatever was kept from the first
        token = receipts.sign(claims, key)
        assert receipts.signed_bytes(token) == _VECTOR_SIGNED
        assert token.split(".")[0] == receipts._b64(_VECTOR_SIGNED)
        assert receipts.verify(token, key.receipt_public_key) == json.loads(_VECTOR_SIGNED)
    assert "version" not in claims  # the caller's dict is not changed


# --- a refusal at a stream's end: believed only once signed -----------------------------------

_X402_REFUSAL = base64.b64encode(
    json.dumps(
        {"success": False, "errorReason": "insufficient_funds", "transaction": "",
         "network": "eip155:84532"}
    ).encode()
)  # fmt: skip
REFUSED_TAIL = b"data: [DONE]\n\n: x402-payment-response " + _X402_REFUSAL + b"\n\n"
_X402_PENDING = base64.b64encode(
    json.dumps(
        {"success": False, "errorReason": "settlement_pending", "transaction": "0x" + "ab" * 32,
         "network": "eip155:84532"}
    ).encode()
)  # fmt: skip
PENDING_TAIL = b"data: [DONE]\n\n: x402-payment-response " + _X402_PENDING + b"\n\n"
_REFUSED_PAYMENT = _upto(charged="0", transaction="none")


def _refused_stream(
    *, signed: dict[str, Any] | None, after: bytes = b"", tail: bytes = REFUSED_TAIL
) -> bytes:
    before = CONTENT + tail
    if signed is None:
        return before + after
    claims = {"reply_digest": receipts.body_digest(before), **signed}
    if claims.pop("reply", False):
        token = _token(**claims)  # a reply's receipt
    else:
        token = receipts.sign({**_refusal(), **claims}, KEY)
    return before + b": paygate-receipt " + token.encode() + b"\n\n" + after


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (_refused_stream(signed={"payment": _REFUSED_PAYMENT}), PaymentRefused),
        (_refused_stream(signed=None), RefusalUnauthenticated),  # forged, or stripped
        (  # another request's refusal
            _refused_stream(
                signed={"payment": _REFUSED_PAYMENT, "request_digest": "sha256:" + "01" * 32}
            ),
            RefusalUnauthenticated,
        ),
        (  # another payment's
            _refused_stream(signed={"payment": {**_REFUSED_PAYMENT, "id": "0x" + "ee" * 32}}),
            RefusalUnauthenticated,
        ),
        (  # over other bytes
            _refused_stream(
                signed={"payment": _REFUSED_PAYMENT, "reply_digest": receipts.body_digest(b"")}
            ),
            RefusalUnauthenticated,
        ),
        (  # the appliance signed a charge over this very x402 refusal: not a refusal
            _refused_stream(signed={"reply": True, "usage": USAGE, "payment": _upto()}),
            RefusalUnauthenticated,
        ),
        (
            _refused_stream(signed={"payment": _REFUSED_PAYMENT}, after=CONTENT),
            ContentAfterReceipt,
        ),
        (  # a signed refusal where the x402 receipt says the settlement is only in doubt (an
            # appliance that signed one for a payment flagged for review, which may be charged)
            _refused_stream(signed={"payment": _REFUSED_PAYMENT}, tail=PENDING_TAIL),
            RefusalUnauthenticated,
        ),
    ],
    ids=["signed", "unsigned", "other-request", "other-payment", "other-reply", "charged",
         "appended", "pending"],
)  # fmt: skip
def test_a_streams_refusal_is_raised_only_once_signed_for_it(
    body: bytes, error: type[Exception]
) -> None:
    record = _record()
    scanner = ReceiptScanner("text/event-stream", lambda _receipt, _error: None)
    decoder = CheckedDecoder(PlainDecoder(scanner), _check("text/event-stream", record))
    out: list[bytes] = []

    def read() -> None:
        for at in range(0, len(body), 7):
            out.extend(decoder.feed(body[at : at + 7]))
        out.extend(decoder.end())

    with pytest.raises(error) as raised:
        read()
    assert b"[DONE]" not in b"".join(out)  # the end never came out as a clean one
    if error is PaymentRefused:
        assert raised.value.reason == "settle_failed"  # the signed reason
        assert record.receipt_error is None
    elif error is RefusalUnauthenticated:
        assert record.receipt_error is not None


# A token a hostile path writes: under the size bound, a JSON integer past Python's 4300 digits
# (json.loads raises a bare ValueError for it).
_HUGE = base64.urlsafe_b64encode(b'{"version": 1' + b"0" * 5000 + b"}").decode().rstrip("=")
HUGE_TOKEN = _HUGE + ".AA"


def test_a_token_holding_a_huge_integer_is_invalid_not_a_crash() -> None:
    assert len(HUGE_TOKEN) <= receipts.MAX_TOKEN
    with pytest.raises(receipts.ReceiptTokenInvalid):
        receipts.unverified_claims(HUGE_TOKEN)
    with pytest.raises(receipts.ReceiptTokenInvalid):
        receipts.verify(HUGE_TOKEN, KEY.receipt_public_key)


@pytest.mark.parametrize("tail", [TAIL, REFUSED_TAIL], ids=["charged", "refused"])
def test_a_streams_end_with_a_hostile_token_is_a_receipt_error(tail: bytes) -> None:
    """The client looks at the token's kind (is it a refusal?) after its check failed: that
    look must not crash on what a path wrote there."""
    record = _record()
    scanner = ReceiptScanner("text/event-stream", lambda _receipt, _error: None)
    decoder = CheckedDecoder(PlainDecoder(scanner), _check("text/event-stream", record))
    body = CONTENT + tail + b": paygate-receipt " + HUGE_TOKEN.encode() + b"\n\n"

    def read() -> None:
        for at in range(0, len(body), 7):
            decoder.feed(body[at : at + 7])
        decoder.end()

    with pytest.raises(ReceiptInvalid):
        read()
