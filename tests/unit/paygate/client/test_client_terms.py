"""Offers held against the attested payment terms (paygate.client.terms), without sockets:
prices per route, model and batch; upto maxima from the prompt bound and the cap; the side
doors (an offer the terms allow beside one they do not, a zero price, case-changed addresses)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from eth_utils import to_checksum_address

from enclave.attestation.binding import PaymentTerms
from paygate.client.errors import OfferNotAttested, PaymentNotAttested
from paygate.client.payer import ChallengeOffer, PaymentChallenge, SpendPolicy
from paygate.client.terms import check_challenge
from paygate.server.shaping import metered_quote
from paygate.upstream.engines import profile_for
from paygate.upstream.shaping import RequestShaper
from paygate.x402.metering import TokenPrice, TokenPricing
from paygate.x402.networks import to_atomic_ceiling
from tests.fixtures.terms_support import FACILITATOR, SELLER, TERMS, USDC, challenge_offer

CHAT = "/v1/chat/completions"


def offer(scheme: str = "exact", amount: int = 1000, **changes: Any) -> ChallengeOffer:
    return challenge_offer(scheme, amount, extra=changes.pop("extra", {}), **changes)


def check(
    *offers: ChallengeOffer, path: str = CHAT, body: Any = None, method: str = "POST"
) -> None:
    raw = json.dumps(body if body is not None else {"model": "m", "messages": []}).encode()
    check_challenge(PaymentChallenge(2, offers, None), TERMS, method=method, path=path, body=raw)


def code_of(*offers: ChallengeOffer, **options: Any) -> str:
    with pytest.raises(OfferNotAttested) as caught:
        check(*offers, **options)
    return caught.value.code


def test_exact_prices_by_route_model_and_batch() -> None:
    check(offer(amount=1000))  # the default price, 0.001 USDC
    check(offer(amount=10_000), body={"model": "big"})  # the model's price
    check(offer(amount=200), path="/v1/embeddings", body={"model": "big"})  # route wins
    # A batch: the sum of its items' prices (one default, one "big").
    batch = [{"model": "m"}, {"model": "big"}]
    check(offer(amount=11_000), path="/v1/batch/chat/completions", body=batch)
    assert code_of(offer(amount=1000), body={"model": "big"}) == "offer_price_mismatch"
    assert code_of(offer(amount=999)) == "offer_price_mismatch"  # less is not "within" either
    # A free route has no price to pay: any exact offer for it is not the appliance's.
    assert code_of(offer(amount=1), method="GET", path="/api/tags") == "offer_price_mismatch"


def _server_maximum(body: dict[str, Any]) -> int:
    """The maximum the gateway's own metering quotes for ``body`` (shaped as it forwards it)."""
    pricing = TokenPricing(
        prices={
            "*": TokenPrice(Decimal(100), Decimal(400)),
            "big": TokenPrice(Decimal(1000), Decimal(4000), Decimal("0.01")),
        },
    )
    shaper = RequestShaper(profile_for("openai"), cap=64)
    raw = json.dumps(body).encode()
    shaped = shaper.shape(CHAT, raw)
    assert shaped is not None
    quote = metered_quote(pricing, shaper, raw, shaped)
    assert quote is not None
    return to_atomic_ceiling(quote.maximum, 6)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        {"model": "m", "messages": [], "max_tokens": 10_000},
        {"model": "big", "prompt": "x" * 300, "stream": True},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3},
    ],
)
def test_the_gateways_own_upto_maximum_is_within_the_attested_bound(body: dict[str, Any]) -> None:
    """What the gateway's metering quotes is always accepted; a unit more than the cap allows
    is not."""
    maximum = _server_maximum(body)
    big = {
        "inputPricePerMillionTokens": "1000",
        "outputPricePerMillionTokens": "4000",
        "minimumPrice": "0.01",
    }
    prices = {"extra": big} if body["model"] == "big" else {}
    check(offer("upto", maximum, **prices), body=body)
    raw = json.dumps(body).encode()
    price_in, price_out = (1000, 4000) if body["model"] == "big" else (100, 400)
    messages = body.get("messages")
    prompt = len(raw) + 16 + 8 * max(len(messages) if isinstance(messages, list) else 1, 1)
    choices = body.get("n", 1)  # the output cap is priced once per sequence asked for
    ceiling = price_in * prompt + price_out * 64 * choices  # atomic: N per million = N per token
    assert code_of(offer("upto", ceiling + 1, **prices), body=body) == "offer_maximum_exceeded"


def test_upto_token_prices_facilitator_and_scheme() -> None:
    body = {"model": "m", "messages": []}
    ok = _server_maximum(body)
    for extra, code in [
        ({"inputPricePerMillionTokens": "99"}, "offer_token_price_mismatch"),
        ({"outputPricePerMillionTokens": "400.5"}, "offer_token_price_mismatch"),
        ({"minimumPrice": "0.5"}, "offer_token_price_mismatch"),
        ({"facilitatorAddress": "0x" + "00" * 20}, "offer_facilitator_mismatch"),
        ({"facilitatorAddress": "not an address"}, "offer_facilitator_mismatch"),
    ]:
        assert code_of(offer("upto", ok, extra=extra), body=body) == code, extra
    check(offer("upto", ok, extra={"inputPricePerMillionTokens": "100.00"}), body=body)
    assert code_of(offer("stream", 1)) == "offer_scheme_mismatch"
    exact_only = PaymentTerms(pay_to=SELLER, accepts=(TERMS.accepts[0],), price="0.001")
    with pytest.raises(OfferNotAttested) as caught:
        check_challenge(
            PaymentChallenge(2, (offer("upto", ok),), None),
            exact_only,
            method="POST",
            path=CHAT,
            body=json.dumps(body).encode(),
        )
    assert caught.value.code == "offer_scheme_mismatch"


def test_one_bad_offer_refuses_the_whole_challenge_and_addresses_compare_by_value() -> None:
    good = offer(amount=1000)
    assert code_of(good, offer(amount=1000, pay_to="0x" + "a7" * 20)) == "offer_pay_to_mismatch"
    # The same addresses in another case are the same addresses.
    check(offer(amount=1000, pay_to=SELLER.upper().replace("0X", "0x"), asset=USDC.lower()))
    check(offer(amount=1000, network="base-sepolia", version=1))  # the v1 name of the network
    assert code_of(offer(amount=1000, network="base")) == "offer_network_mismatch"
    assert code_of(offer(amount=1000, network="solana:mainnet")) == "offer_network_mismatch"
    assert code_of(offer(amount=1000, max_timeout_seconds=301)) == "offer_timeout_exceeded"
    assert code_of(offer(amount=1000, extra={"version": "1"})) == "offer_asset_mismatch"
    check(offer(amount=1000, extra={"name": None, "version": None}))  # absent: the payer's table


def test_an_appliance_attested_as_free_is_never_paid() -> None:
    with pytest.raises(PaymentNotAttested):
        check_challenge(
            PaymentChallenge(2, (offer(),), None), None, method="POST", path=CHAT, body=b""
        )


def test_spend_policy_pay_to_is_an_address_list() -> None:
    policy = SpendPolicy(max_per_request="1", pay_to=[SELLER.lower()])
    assert policy.pay_to == frozenset({to_checksum_address(SELLER)})
    for bad in ([], ["nope"], SELLER):
        with pytest.raises(ValueError, match="pay_to"):
            SpendPolicy(max_per_request="1", pay_to=bad)  # type: ignore[arg-type]
    env = SpendPolicy.from_env(
        max_per_request="1", environ={"PAYGATE_SPEND_PAY_TO": f"{SELLER}, {FACILITATOR}"}
    )
    assert env.pay_to == frozenset(map(to_checksum_address, (SELLER, FACILITATOR)))
