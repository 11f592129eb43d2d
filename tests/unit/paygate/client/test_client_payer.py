"""The paying side of x402, sans-IO: challenges in, a choice within the policy, a signed header.

Challenges are built with the gateway's own offer code, so both ends read one shape.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
from eth_account import Account

from paygate import wire
from paygate.client import InvalidChallenge, SpendPolicy, SpendRefused
from paygate.client.payer import (
    Payer,
    PaymentChallenge,
    parse_assets,
    parse_challenge,
    refusal_reason,
)
from paygate.x402 import codec
from paygate.x402.models import (
    PaymentPayload,
    PaymentPayloadV1,
    ResourceInfo,
    SettleResponse,
)
from paygate.x402.networks import Asset, resolve_network
from paygate.x402.offers import Offer, challenge
from paygate.x402.schemes.exact import verify as exact_verify

BASE = resolve_network("base")
SEPOLIA = resolve_network("base-sepolia")
SELLER = "0x" + "5e" * 20
CUSTOM = Asset(address="0x" + "c0" * 20, name="Custom", version="1", decimals=18)
RESOURCE = ResourceInfo(url="https://appliance.example/v1/chat/completions")
WALLET = Account.from_key(bytes.fromhex("42" * 32))


def _offer(network: Any = SEPOLIA, amount: int = 1000, asset: Asset | None = None) -> Offer:
    return Offer(
        network=network,
        asset=asset or network.usdc,
        pay_to=SELLER,
        amount=amount,
        max_timeout_seconds=120,
    )


def _402(*offers: Offer, error: str = "payment required") -> tuple[dict[str, str], bytes]:
    built = challenge(list(offers), RESOURCE, error=error)
    headers = {wire.PAYMENT_REQUIRED: codec.encode(built.v2)}
    return headers, json.dumps(built.body()).encode()


def _challenge(*offers: Offer, version: Any = None) -> PaymentChallenge:
    headers, body = _402(*offers)
    return parse_challenge(headers, body, version=version)


def _decode(value: str) -> dict[str, Any]:
    return json.loads(base64.b64decode(value))


# --- reading challenges ----------------------------------------------------------------------


def test_v2_header_is_preferred_and_v1_body_is_the_fallback() -> None:
    headers, body = _402(_offer())
    assert parse_challenge(headers, body).version == 2
    assert parse_challenge(headers, body, version=1).version == 1
    assert parse_challenge({}, body).version == 1
    v1 = parse_challenge({}, body).offers[0]
    assert (v1.network, v1.chain_id, v1.amount) == ("base-sepolia", 84532, 1000)


def test_v2_offer_keeps_the_requirement_as_sent() -> None:
    offer = _challenge(_offer()).offers[0]
    assert offer.requirement == _offer().v2().wire()
    assert offer.chain_id == 84532


@pytest.mark.parametrize(
    ("headers", "body", "version"),
    [
        ({}, b"", None),
        ({}, b"{not json", None),
        ({wire.PAYMENT_REQUIRED: "%%%"}, b"", None),
        ({wire.PAYMENT_REQUIRED: base64.b64encode(b'{"x402Version":2}').decode()}, b"", None),
        ({}, json.dumps({"x402Version": 1, "accepts": [{"scheme": 1}]}).encode(), None),
        (_402(_offer())[0], b"", 1),
    ],
)
def test_unreadable_challenges_are_invalid(headers: Any, body: bytes, version: Any) -> None:
    with pytest.raises(InvalidChallenge):
        parse_challenge(headers, body, version=version)


def test_refusal_reason_comes_from_wherever_the_server_put_it() -> None:
    headers, body = _402(_offer(), error="invalid_exact_evm_payload_signature")
    assert refusal_reason(headers, body) == "invalid_exact_evm_payload_signature"
    receipt = SettleResponse(success=False, error_reason="insufficient_funds", network="base")
    assert refusal_reason({wire.PAYMENT_RESPONSE: codec.encode(receipt)}, b"") == (
        "insufficient_funds"
    )
    assert refusal_reason({}, b'{"error": "expired"}') == "expired"
    assert refusal_reason({}, b"") == "no reason given"
    long = refusal_reason({}, json.dumps({"error": "\x1b[31m" + "x" * 500}).encode())
    assert long.isprintable()
    assert len(long) == 200


# --- choosing within the policy --------------------------------------------------------------


def test_the_cheapest_allowed_offer_wins() -> None:
    payer = Payer(WALLET, SpendPolicy(max_per_request="0.01"))
    offer, decimals = payer.choose(_challenge(_offer(BASE, 2000), _offer(SEPOLIA, 1500)))
    assert (offer.network, decimals) == ("eip155:84532", 6)


@pytest.mark.parametrize(
    ("policy", "offers", "reason"),
    [
        (SpendPolicy(max_per_request="0.0009"), [_offer()], "above max per request"),
        (SpendPolicy(max_per_request=1, networks=["base"]), [_offer()], "network not allowed"),
        (SpendPolicy(max_per_request=1), [_offer(asset=CUSTOM)], "asset not allowed"),
        (
            SpendPolicy(max_per_request=1, assets={SEPOLIA.usdc.address: 6}),  # type: ignore[union-attr]
            [_offer(BASE)],
            "asset not allowed",
        ),
    ],
)
def test_offers_outside_the_policy_are_refused_before_signing(
    policy: SpendPolicy, offers: list[Offer], reason: str
) -> None:
    payer = Payer(WALLET, policy)
    with pytest.raises(SpendRefused, match=reason):
        payer.pay(_challenge(*offers), url=RESOURCE.url)
    assert payer.spent == 0


def test_a_listed_custom_asset_is_paid_in_its_own_decimals() -> None:
    policy = SpendPolicy(max_per_request="0.5", assets={CUSTOM.address: 18})
    payer = Payer(WALLET, policy)
    payment = payer.pay(_challenge(_offer(amount=4 * 10**17, asset=CUSTOM)), url=RESOURCE.url)
    assert payment.record.amount == Decimal("0.4")
    assert payer.spent == Decimal("0.4")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"scheme": "upto"}, "metered (upto) payments need max_price_per_million"),
        ({"scheme": "lottery"}, "scheme 'lottery' is not supported"),
        ({"extra": {"assetTransferMethod": "permit2"}}, "permit2"),
        ({"network": "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"}, "not a known EVM network"),
        ({"payTo": "nobody"}, "not an address"),
        ({"maxTimeoutSeconds": 0}, "maxTimeoutSeconds"),
    ],
)
def test_requirements_we_cannot_pay_are_declined_with_a_reason(
    change: dict[str, Any], reason: str
) -> None:
    requirement = {**_offer().v2().wire(), **change}
    required = {"x402Version": 2, "resource": RESOURCE.wire(), "accepts": [requirement]}
    header = base64.b64encode(json.dumps(required).encode()).decode()
    payer = Payer(WALLET, SpendPolicy(max_per_request=1))
    with pytest.raises(SpendRefused, match=re.escape(reason)):
        payer.pay(parse_challenge({wire.PAYMENT_REQUIRED: header}, b""), url=RESOURCE.url)


def test_custom_asset_without_eip712_domain_is_declined() -> None:
    requirement = {**_offer(asset=CUSTOM).v2().wire(), "extra": {}}
    required = {"x402Version": 2, "resource": RESOURCE.wire(), "accepts": [requirement]}
    header = base64.b64encode(json.dumps(required).encode()).decode()
    payer = Payer(WALLET, SpendPolicy(max_per_request=1, assets={CUSTOM.address: 18}))
    with pytest.raises(SpendRefused, match="EIP-712"):
        payer.pay(parse_challenge({wire.PAYMENT_REQUIRED: header}, b""), url=RESOURCE.url)


def test_max_total_holds_under_concurrent_payments() -> None:
    payer = Payer(WALLET, SpendPolicy(max_per_request=1, max_total="0.005"))
    parsed = _challenge(_offer())
    paid: list[str] = []
    refused: list[str] = []

    def pay() -> None:
        try:
            payer.pay(parsed, url=RESOURCE.url)
            paid.append("ok")
        except SpendRefused:
            refused.append("no")

    threads = [threading.Thread(target=pay) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert (len(paid), len(refused)) == (5, 7)
    assert payer.spent == Decimal("0.005")


# --- signing ---------------------------------------------------------------------------------


def test_v2_payment_echoes_the_requirement_and_recovers_to_the_payer() -> None:
    payer = Payer(WALLET, SpendPolicy(max_per_request="0.01"))
    payment = payer.pay(_challenge(_offer()), url=RESOURCE.url)
    assert payment.header == wire.PAYMENT_SIGNATURE
    decoded = _decode(payment.value)
    model = PaymentPayload.model_validate(decoded)
    assert decoded["accepted"] == _offer().v2().wire()
    assert decoded["resource"] == RESOURCE.wire()
    ident = decoded["extensions"]["payment-identifier"]["info"]["id"]
    assert model.payment_identifier == ident
    auth = model.payload.authorization
    assert auth.to.lower() == SELLER
    assert auth.value == "1000"
    assert int(auth.valid_before) - time.time() <= 121
    signer = exact_verify.recover(
        auth,
        model.payload.signature,
        chain_id=84532,
        asset=SEPOLIA.usdc,  # type: ignore[arg-type]
    )
    assert signer == WALLET.address
    assert payment.record.nonce == auth.nonce
    assert payment.record.receipt is None


def test_v1_payment_names_the_network_and_recovers_to_the_payer() -> None:
    payer = Payer(WALLET, SpendPolicy(max_per_request="0.01"))
    payment = payer.pay(_challenge(_offer(), version=1), url=RESOURCE.url)
    assert payment.header == wire.X_PAYMENT
    model = PaymentPayloadV1.model_validate(_decode(payment.value))
    assert (model.scheme, model.network) == ("exact", "base-sepolia")
    signer = exact_verify.recover(
        model.payload.authorization,
        model.payload.signature,
        chain_id=84532,
        asset=SEPOLIA.usdc,  # type: ignore[arg-type]
    )
    assert signer == WALLET.address


def test_every_payment_has_a_fresh_nonce_and_identifier() -> None:
    payer = Payer(WALLET, SpendPolicy(max_per_request=1))
    parsed = _challenge(_offer())
    a, b = (_decode(payer.pay(parsed, url=RESOURCE.url).value) for _ in range(2))
    assert a["payload"]["authorization"]["nonce"] != b["payload"]["authorization"]["nonce"]
    assert a["extensions"] != b["extensions"]


def test_the_wallet_key_is_in_no_repr() -> None:
    payer = Payer(WALLET, SpendPolicy(max_per_request=1))
    payment = payer.pay(_challenge(_offer()), url=RESOURCE.url)
    key_hex = "42" * 32
    for text in (repr(payer), repr(payment), repr(payment.record)):
        assert key_hex not in text
    assert payment.value not in repr(payment)


# --- the policy itself -----------------------------------------------------------------------


def test_policy_from_env_overrides_the_programs_defaults() -> None:
    env = {
        "PAYGATE_SPEND_MAX_PER_REQUEST": "0.02",
        "PAYGATE_SPEND_NETWORKS": "base-sepolia, eip155:8453",
        "PAYGATE_SPEND_ASSETS": f"{CUSTOM.address}:18,{SEPOLIA.usdc.address}",  # type: ignore[union-attr]
    }
    policy = SpendPolicy.from_env(max_per_request="0.01", max_total="1", environ=env)
    assert policy.max_per_request == Decimal("0.02")
    assert policy.max_total == Decimal(1)
    assert policy.chain_ids == {84532, 8453}
    assert policy.assets == {CUSTOM.address: 18, SEPOLIA.usdc.address: 6}  # type: ignore[union-attr]
    assert SpendPolicy.from_env(max_per_request="0.01", environ={}).chain_ids is None


def test_policy_from_env_keeps_a_default_the_environment_leaves_empty_or_cannot_set() -> None:
    env = {"PAYGATE_SPEND_MAX_TOTAL": "  ", "PAYGATE_SPEND_PAY_TO": ""}
    policy = SpendPolicy.from_env(
        max_per_request="0.01", max_total="1", channel_deposit="0.5", environ=env
    )
    assert (policy.max_total, policy.pay_to) == (Decimal(1), None)
    assert policy.channel_deposit == Decimal("0.5")  # no variable sets it: the program's value
    with pytest.raises(TypeError, match="max_per_requst"):
        SpendPolicy.from_env(max_per_requst="0.01", environ={})  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_per_request": "-1"},
        {"max_per_request": "NaN"},
        {"max_per_request": "ten"},
        {"max_per_request": 1, "networks": ["atlantis"]},
        {"max_per_request": 1, "assets": {"0x12": 6}},
        {"max_per_request": 1, "assets": {CUSTOM.address: 99}},
        {"max_per_request": 1, "max_valid_seconds": 0},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        SpendPolicy(**kwargs)


def test_parse_assets_defaults_to_six_decimals() -> None:
    assert parse_assets([CUSTOM.address.lower()]) == {CUSTOM.address: 6}
