"""The sans-IO x402 core: codec, offers and challenge, local checks, pricing, in-band receipts.

Payments here are made by the official x402 SDK's own client (``x402ClientSync`` with an
eth-account signer), so the local checks are proven against what real payers send.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from x402.schemas import PaymentRequired as SdkPaymentRequired
from x402.schemas import PaymentRequiredV1 as SdkPaymentRequiredV1

from paygate.jsonsafe import UntrustedJSONError
from paygate.wire import NDJSON, SSE
from paygate.x402 import codec
from paygate.x402.inband import NDJSON_KEY, InbandReceiptWriter
from paygate.x402.models import PaymentPayload, PaymentPayloadV1
from paygate.x402.networks import (
    NETWORKS,
    Network,
    UnknownNetwork,
    from_atomic,
    resolve_network,
    to_atomic,
)
from paygate.x402.offers import MAX_CHALLENGE_HEADER, challenge
from paygate.x402.pricing import PricePolicy, model_of
from paygate.x402.processor import PaymentProcessor
from paygate.x402.schemes.base import PaymentRejected
from paygate.x402.schemes.exact.client import new_authorization, sign_authorization
from paygate.x402.schemes.exact.verify import check_authorization, recover
from paygate.x402.settlement import VerifyOnly
from paygate.x402.verify import match_offer
from tests.fixtures.x402_support import PAYER, RESOURCE, SELLER, sdk_payment, terms

SEPOLIA = resolve_network("base-sepolia")
BASE = resolve_network("base")


# --- networks and amounts ---


def test_usdc_table_and_names() -> None:
    assert resolve_network("eip155:84532") is SEPOLIA
    assert resolve_network("Base-Sepolia") is SEPOLIA
    assert SEPOLIA.usdc is not None
    assert SEPOLIA.usdc.address == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    assert SEPOLIA.usdc.name == "USDC"
    assert BASE.usdc is not None
    assert BASE.usdc.name == "USD Coin"
    assert resolve_network("eip155:31337").usdc is None


def test_every_table_network_by_either_name_in_any_spelling_and_chains_outside_it() -> None:
    for network in NETWORKS:
        assert network.caip2 == f"eip155:{network.chain_id}"
        for name in (network.name, network.caip2):
            assert resolve_network(f"  {name.upper()} ") is network
    custom = resolve_network("EIP155:31337")
    assert (custom.name, custom.chain_id, custom.caip2) == ("eip155-31337", 31337, "eip155:31337")
    assert custom == Network("eip155-31337", 31337, None)
    assert hash(custom) == hash(Network("eip155-31337", 31337, None))
    assert "caip2" not in repr(custom)
    unknowns = ("eip155:0", "eip155:-1", "eip155:", "eip155:1x", "base-mainnet", "")
    # Another spelling of a table chain's id is not a custom chain without its asset.
    unknowns += ("eip155:08453", "eip155:+8453", "eip155:\u0668453", "eip155:8453.0")
    for unknown in unknowns:
        with pytest.raises(UnknownNetwork):
            resolve_network(unknown)


@pytest.mark.parametrize(
    ("price", "atomic"),
    [("0.001", 1000), ("1", 1_000_000), ("0.0000005", 1), ("0.00000049", 0), ("0.0000015", 2)],
)
def test_price_to_atomic_rounds_half_up(price: str, atomic: int) -> None:
    assert to_atomic(price, 6) == atomic


def test_atomic_round_trip() -> None:
    assert from_atomic(1000, 6) == Decimal("0.001")
    with pytest.raises(ValueError, match="non-negative"):
        to_atomic("-1", 6)


# --- challenge ---


def test_challenge_is_dual_stack_with_one_requirement_per_network() -> None:
    ch = challenge(
        terms("base-sepolia", "base").offers(Decimal("0.001")), RESOURCE, error="payment_required"
    )
    v2 = json.loads(base64.b64decode(codec.encode(ch.v2)))
    assert v2["x402Version"] == 2
    assert v2["resource"] == {
        "url": RESOURCE.url,
        "description": "d",
        "mimeType": "application/json",
    }
    assert [(a["network"], a["amount"]) for a in v2["accepts"]] == [
        ("eip155:84532", "1000"),
        ("eip155:8453", "1000"),
    ]
    assert v2["accepts"][0]["extra"] == {"name": "USDC", "version": "2"}
    assert "payment-identifier" in v2["extensions"]
    v1 = ch.body()
    assert v1["x402Version"] == 1
    assert v1["error"] == "payment_required"
    assert [(a["network"], a["maxAmountRequired"]) for a in v1["accepts"]] == [
        ("base-sepolia", "1000"),
        ("base", "1000"),
    ]
    assert v1["accepts"][0]["resource"] == RESOURCE.url
    assert v1["accepts"][0]["mimeType"] == "application/json"
    # The official SDK reads both faces.
    SdkPaymentRequired.model_validate(v2)
    SdkPaymentRequiredV1.model_validate(v1)


def test_an_offers_v2_requirement_is_built_once_and_each_caller_gets_its_own_copy() -> None:
    everything = ("base", "base-sepolia", "polygon")
    offers = terms(*everything).offers(Decimal("0.001")) + terms(*everything).upto_offers(
        Decimal("0.5"), (("inputPerMillion", "3"),)
    )
    for offer in offers:
        first = offer.v2_wire()
        assert first == offer.v2().wire()
        assert list(first) == list(offer.v2().wire())  # the same order: stored and sent as JSON
        first["amount"] = "1"
        first["extra"]["name"] = "changed"
        assert offer.v2_wire() == offer.v2().wire()  # one caller's change is not the next's
    cheaper = terms("base").offers(Decimal("0.0001"))[0]
    assert (
        cheaper.v2_wire()["amount"] != terms("base").offers(Decimal("0.001"))[0].v2_wire()["amount"]
    )


def test_challenge_header_stays_small_with_every_network() -> None:
    everything = ("base", "base-sepolia", "ethereum", "polygon", "polygon-amoy", "avalanche")
    ch = challenge(terms(*everything).offers(Decimal("0.001")), RESOURCE, error="x" * 100)
    assert len(codec.encode(ch.v2)) < MAX_CHALLENGE_HEADER


# --- codec ---


@pytest.mark.parametrize("version", [1, 2])
def test_sdk_payment_decodes(version: int) -> None:
    payment = sdk_payment(version)
    assert isinstance(payment, PaymentPayload if version == 2 else PaymentPayloadV1)
    assert payment.payload.authorization.from_ == PAYER.address


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("!!!", "not base64"),
        (base64.b64encode(b"not json").decode(), "not base64-encoded JSON"),
        (base64.b64encode(b"[1]").decode(), "JSON object"),
        (base64.b64encode(b'{"x402Version": 3}').decode(), "x402Version must be 1 or 2"),
        (base64.b64encode(b'{"x402Version": 2}').decode(), "accepted"),
        ("A" * (codec.MAX_HEADER_CHARS + 4), "longer than"),
    ],
)
def test_malformed_payment_headers_have_reasons(value: str, reason: str) -> None:
    with pytest.raises(codec.PaymentHeaderError, match=reason):
        codec.decode_payment(value, header="PAYMENT-SIGNATURE")


def test_reason_never_echoes_the_header() -> None:
    payment = sdk_payment(2).wire()
    payment["payload"]["signature"] = "0xnothex-SECRETISH"
    value = base64.b64encode(json.dumps(payment).encode()).decode()
    with pytest.raises(codec.PaymentHeaderError) as info:
        codec.decode_payment(value, header="PAYMENT-SIGNATURE")
    assert "SECRETISH" not in str(info.value)
    assert "signature" in str(info.value)


def test_url_safe_unpadded_base64_is_accepted() -> None:
    payment = sdk_payment(2)
    raw = json.dumps(payment.wire()).encode()
    value = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert codec.decode_payment(value, header="X-PAYMENT") == payment


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300), st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
    )
)
def test_decoder_raises_only_header_errors(value: str) -> None:
    with contextlib.suppress(codec.PaymentHeaderError):
        codec.decode_payment(value, header="X-PAYMENT")


# --- local checks ---


@pytest.mark.parametrize("version", [1, 2])
def test_sdk_payment_passes_local_checks(version: int) -> None:
    payment = sdk_payment(version)
    offers = terms().offers(Decimal("0.001"))
    offer = match_offer(payment, offers)
    assert check_authorization(payment, offer, now=int(time.time()), skew=5) == PAYER.address


def _tampered(version: int, **auth_changes: str):
    payment = sdk_payment(version)
    wire = payment.wire()
    wire["payload"]["authorization"].update(auth_changes)
    return type(payment).model_validate(wire)


@pytest.mark.parametrize("version", [1, 2])
def test_forged_or_mismatched_payments_are_rejected_locally(version: int) -> None:
    offers = terms().offers(Decimal("0.001"))
    now = int(time.time())
    cases = {
        "invalid_exact_evm_payload_signature": _tampered(
            version, value="1000", nonce="0x" + "11" * 32
        ),
        "invalid_exact_evm_payload_recipient_mismatch": _tampered(version, to=PAYER.address),
        "invalid_exact_evm_payload_authorization_value_mismatch": _tampered(version, value="999"),
        "invalid_exact_evm_payload_authorization_valid_after": _tampered(
            version, validAfter=str(now + 3600)
        ),
        "invalid_exact_evm_payload_authorization_valid_before": _tampered(
            version, validBefore=str(now + 2)
        ),
    }
    for reason, payment in cases.items():
        with pytest.raises(PaymentRejected) as info:
            check_authorization(payment, match_offer(payment, offers), now=now, skew=5)
        assert info.value.reason == reason


def test_skew_allowance_on_valid_after() -> None:
    now = int(time.time())
    payment = sdk_payment(2)
    offer = match_offer(payment, terms().offers(Decimal("0.001")))
    auth = payment.payload.authorization
    # A payer whose clock runs 4 s ahead signs validAfter in our future: allowed within skew.
    ahead = int(auth.valid_after) - 4
    assert check_authorization(payment, offer, now=ahead, skew=5) == PAYER.address
    with pytest.raises(PaymentRejected):
        check_authorization(payment, offer, now=ahead - 10, skew=5)
    assert now  # the real clock is past validAfter for SDK payments


def test_a_payment_for_another_price_or_network_does_not_match() -> None:
    payment = sdk_payment(2, price="0.001")
    with pytest.raises(PaymentRejected) as info:
        match_offer(payment, terms().offers(Decimal("0.002")))
    assert info.value.reason == "invalid_exact_evm_payload_authorization_value_mismatch"
    with pytest.raises(PaymentRejected) as info:
        match_offer(payment, terms("base").offers(Decimal("0.001")))
    assert info.value.reason == "invalid_network"
    v1 = sdk_payment(1)
    with pytest.raises(PaymentRejected) as info:
        match_offer(v1, terms("base").offers(Decimal("0.001")))
    assert info.value.reason == "invalid_network"


def test_our_signature_matches_the_sdk_domain() -> None:
    # Sign with our code, check with recovery against the same domain the SDK uses.
    auth = new_authorization(payer=PAYER.address, pay_to=SELLER, value=1000, valid_for=60)
    assert SEPOLIA.usdc is not None
    signature = sign_authorization(PAYER, auth, chain_id=SEPOLIA.chain_id, asset=SEPOLIA.usdc)
    assert recover(auth, signature, chain_id=SEPOLIA.chain_id, asset=SEPOLIA.usdc) == PAYER.address
    assert BASE.usdc is not None
    assert recover(auth, signature, chain_id=BASE.chain_id, asset=BASE.usdc) != PAYER.address


# --- pricing ---


def test_price_precedence() -> None:
    policy = PricePolicy(
        default=Decimal("0.001"),
        routes={"GET /api/tags": Decimal(0), "/v1/embeddings": Decimal("0.0001")},
        models={"big": Decimal("0.01")},
        per_million_tokens=Decimal("2"),
        token_estimate=500,
    )
    assert policy.price(method="GET", path="/api/tags") == 0
    assert policy.price(method="POST", path="/v1/embeddings", model="big") == Decimal("0.0001")
    assert policy.price(method="POST", path="/v1/chat/completions", model="big") == Decimal("0.01")
    assert policy.price(method="POST", path="/v1/chat/completions", model="small") == Decimal(
        "0.001"
    )
    assert policy.needs_model
    assert PricePolicy(default=Decimal("0.5")).price(method="POST", path="/x") == Decimal("0.5")
    assert not PricePolicy(default=Decimal("0.5")).needs_model


def test_model_of_body() -> None:
    assert model_of(b'{"model": "llama3", "messages": []}') == "llama3"
    assert model_of(b'{"model": 5}') is None
    assert model_of(b"[]") is None
    assert model_of(b"") is None
    # The price depends on the body: one that is not JSON within the bounds is refused (400).
    for body in (b"not json", b"[" * 100_000 + b"]" * 100_000, b'{"n": ' + b"9" * 5000 + b"}"):
        with pytest.raises(UntrustedJSONError):
            model_of(body)


# --- in-band receipts ---


def test_sse_receipt_is_a_comment_after_the_last_event() -> None:
    writer = InbandReceiptWriter(SSE)
    assert writer.feed(b"data: {}\n\n") == b"data: {}\n\n"
    tail = writer.close("UkVDRUlQVA==")
    assert tail == b": x402-payment-response UkVDRUlQVA==\n\n"


def test_ndjson_receipt_rides_in_the_done_line_split_anywhere() -> None:
    stream = b'{"message":"a","done":false}\n{"message":"b","done":false}\n{"done":true,"n":1}\n'
    for cut in range(1, len(stream)):
        writer = InbandReceiptWriter(NDJSON)
        out = writer.feed(stream[:cut]) + writer.feed(stream[cut:])
        out += writer.close("UkVD")
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line.get("message") for line in lines[:2]] == ["a", "b"]
        assert lines[2] == {"done": True, "n": 1, NDJSON_KEY: "UkVD"}


def test_ndjson_lines_before_done_are_not_delayed() -> None:
    writer = InbandReceiptWriter(NDJSON)
    assert writer.feed(b'{"done":false,"t":"x"}\n') == b'{"done":false,"t":"x"}\n'
    assert writer.feed(b'{"done":true}\n') == b""
    assert writer.close(None) == b'{"done":true}\n'


def test_a_processors_offers_are_each_prices_own_whatever_came_before() -> None:
    # Offers are kept per price (a bounded map): a price never gets another price's offers,
    # also past the bound, and the kept ones are the terms' own.
    fixed = terms("base-sepolia", "base")
    processor = PaymentProcessor(
        terms=fixed,
        ledger=None,  # type: ignore[arg-type]  # offers touch neither ledger nor settler
        settler=None,  # type: ignore[arg-type]
        settlement=VerifyOnly(),
    )
    for round_ in range(2):
        for micro in range(1, 600, 7):  # more prices than the map keeps
            price = Decimal(micro) / 1_000_000
            offers = processor.offers(price, None)
            assert offers == fixed.offers(price), (round_, price)
            assert [o.amount for o in offers] == [micro, micro]
    assert processor.offers(Decimal("0.0010"), None) == fixed.offers(Decimal("0.001"))
    assert processor.offers(Decimal(0), None) == ()
