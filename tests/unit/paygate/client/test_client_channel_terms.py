"""batch-settlement offers held against the attested channel terms (paygate.client.terms), and
the channel terms in the binding document (enclave.attestation.binding) and as the gateway
builds them (paygate.server.attestation), without sockets: every field that decides where a
deposit goes, who may claim or refund it and how long it stays locked; the side doors (another
spelling of the delay, a missing field, contracts this client does not deposit into, a free
request); an older appliance that lists the scheme without channel terms."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from typing import Any

import pytest

from enclave.attestation import binding
from paygate.client.errors import OfferNotAttested
from paygate.client.payer import ChallengeOffer, PaymentChallenge
from paygate.client.terms import check_challenge
from paygate.server.attestation import channel_terms, payment_document
from paygate.x402.metering import TokenPrice, TokenPricing
from paygate.x402.networks import Asset, resolve_network
from paygate.x402.offers import Acceptance
from paygate.x402.offers import PaymentTerms as SellerTerms
from paygate.x402.pricing import PricePolicy
from paygate.x402.schemes.batch_settlement import channel as ch
from paygate.x402.schemes.batch_settlement import offer as offer_role
from tests.fixtures.terms_support import AUTHORIZER, SELLER, USDC, challenge_offer

ATTACKER = "0x" + "a7" * 20
BASE_USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
BASE_NAME = {"name": "USD Coin"}
CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CHANNEL = binding.ChannelTerms(
    network="eip155:84532",
    contract=ch.SETTLEMENT_ADDRESS,
    deposit_collector=ch.ERC3009_COLLECTOR_ADDRESS,
    receiver=SELLER,
    receiver_authorizer=AUTHORIZER,
    token=USDC,
    withdraw_delay=900,
)
TERMS = binding.PaymentTerms(
    pay_to=SELLER,
    accepts=(
        binding.AcceptedAsset("eip155:84532", USDC, "USDC", "2", 6),
        binding.AcceptedAsset("eip155:8453", BASE_USDC, "USD Coin", "2", 6),
    ),
    schemes=("exact", "batch-settlement"),
    price="0.001",
    channels=(CHANNEL,),
)


def offer(
    amount: int = 1000, *, scheme: str = "batch-settlement", **changes: Any
) -> ChallengeOffer:
    extra = changes.pop("extra", {})
    return challenge_offer(scheme, amount, extra=extra, drop=changes.pop("drop", ()), **changes)


def check(
    *offers: ChallengeOffer, terms: binding.PaymentTerms = TERMS, body: Any = BODY
) -> PaymentChallenge:
    return check_challenge(
        PaymentChallenge(2, offers, None),
        terms,
        method="POST",
        path=CHAT,
        body=json.dumps(body).encode(),
    )


def code_of(*offers: ChallengeOffer, **options: Any) -> str:
    with pytest.raises(OfferNotAttested) as caught:
        check(*offers, **options)
    return caught.value.code


def test_a_channel_offer_as_attested_is_paid_as_sent() -> None:
    challenge = check(offer(), offer(scheme="exact"))
    assert [o.scheme for o in challenge.offers] == ["batch-settlement", "exact"]
    # Addresses compare by value; the delay may be a number; the method defaults to eip3009.
    check(offer(pay_to=SELLER.lower(), asset=USDC.lower(), extra={"withdrawDelay": 900}))
    check(offer(extra={"receiverAuthorizer": AUTHORIZER.upper().replace("0X", "0x")}))
    check(offer(drop=("assetTransferMethod",)))


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        # Where the money goes: the channel's receiver (payTo) and token.
        ({"pay_to": ATTACKER}, "offer_pay_to_mismatch"),
        ({"asset": "0x" + "77" * 20}, "offer_asset_mismatch"),
        ({"extra": {"name": "Fake USD"}}, "offer_asset_mismatch"),
        # The chain the channel id is bound to: not accepted, or accepted without a channel.
        ({"network": "eip155:1", "chain_id": 1}, "offer_network_mismatch"),
        (
            {"network": "eip155:8453", "chain_id": 8453, "asset": BASE_USDC, "extra": BASE_NAME},
            "offer_network_mismatch",
        ),
        # Who signs claims and refunds.
        ({"extra": {"receiverAuthorizer": ATTACKER}}, "offer_receiver_authorizer_mismatch"),
        ({"extra": {"receiverAuthorizer": "0x" + "00" * 20}}, "offer_receiver_authorizer_mismatch"),
        ({"extra": {"receiverAuthorizer": "not an address"}}, "offer_receiver_authorizer_mismatch"),
        ({"extra": {"receiverAuthorizer": 7}}, "offer_receiver_authorizer_mismatch"),
        ({"drop": ("receiverAuthorizer",)}, "offer_receiver_authorizer_mismatch"),
        # How long the deposit stays locked: other values and other spellings of the knob.
        ({"extra": {"withdrawDelay": "2592000"}}, "offer_withdraw_delay_mismatch"),
        ({"extra": {"withdrawDelay": "901"}}, "offer_withdraw_delay_mismatch"),
        ({"extra": {"withdrawDelay": "0"}}, "offer_withdraw_delay_mismatch"),
        ({"extra": {"withdrawDelay": "-900"}}, "offer_withdraw_delay_mismatch"),
        ({"extra": {"withdrawDelay": "900.0"}}, "offer_withdraw_delay_mismatch"),
        ({"extra": {"withdrawDelay": "\uff19\uff10\uff10"}}, "offer_withdraw_delay_mismatch"),
        ({"extra": {"withdrawDelay": True}}, "offer_withdraw_delay_mismatch"),
        ({"drop": ("withdrawDelay",)}, "offer_withdraw_delay_mismatch"),
        # How the deposit moves (Permit2 would go to another collector).
        ({"extra": {"assetTransferMethod": "permit2"}}, "offer_channel_contract_mismatch"),
        # What one request may take from the channel.
        ({"amount": 2000}, "offer_price_mismatch"),
        ({"amount": 999}, "offer_price_mismatch"),
        ({"amount": 0}, "offer_price_mismatch"),
        ({"max_timeout_seconds": 86_400}, "offer_timeout_exceeded"),
    ],
)
def test_each_channel_field_outside_the_attested_terms_is_refused(
    changes: dict[str, Any], code: str
) -> None:
    assert code_of(offer(**changes)) == code
    # Beside a good exact offer the whole 402 is still refused: it is not the appliance's.
    assert code_of(offer(scheme="exact"), offer(**changes)) == code


def test_attested_contracts_this_client_does_not_deposit_into_are_refused() -> None:
    """The offer does not name the contracts: the client deposits into and signs vouchers for
    the canonical ones, so terms attesting others cannot be paid by it."""
    for change in (
        {"contract": "0x" + "c0" * 20},
        {"deposit_collector": "0x" + "c1" * 20},
        {"asset_transfer_method": "permit2"},
    ):
        terms = dataclasses.replace(TERMS, channels=(dataclasses.replace(CHANNEL, **change),))
        assert code_of(offer(), terms=terms) == "offer_channel_contract_mismatch", change


def test_a_channel_offer_on_a_metered_route_is_held_to_the_attested_maximum() -> None:
    metered = dataclasses.replace(
        TERMS,
        token_prices=(("*", binding.TokenPriceTerms("100", "400", "0")),),
        max_tokens_cap=64,
    )
    check(offer(1000), terms=metered)  # the flat price is always within the terms
    check(offer(30), terms=metered)  # a maximum below the cap's bound
    assert code_of(offer(10**6), terms=metered) == "offer_price_mismatch"


def test_terms_without_the_scheme_refuse_a_channel_offer_as_injected() -> None:
    exact_only = dataclasses.replace(TERMS, schemes=("exact",), channels=())
    assert code_of(offer(), terms=exact_only) == "offer_scheme_mismatch"
    assert code_of(offer(scheme="exact"), offer(), terms=exact_only) == "offer_scheme_mismatch"


def test_an_older_appliance_without_channel_terms_is_paid_by_its_other_offers() -> None:
    """It lists batch-settlement but attests no channel terms (a release before them): its
    channel offers cannot be checked, so they are left out and the exact offer is paid; with
    nothing else offered, a clean refusal. Fields the terms do cover are still checked."""
    older = dataclasses.replace(TERMS, channels=())
    kept = check(offer(), offer(scheme="exact"), terms=older)
    assert [o.scheme for o in kept.offers] == ["exact"]
    assert code_of(offer(), terms=older) == "offer_channel_not_attested"
    assert code_of(offer(pay_to=ATTACKER), offer(scheme="exact"), terms=older) == (
        "offer_pay_to_mismatch"
    )


def test_the_channel_terms_in_the_binding_document_round_trip_and_parse_strictly() -> None:
    document = TERMS.document()
    assert document["channels"] == [
        {
            "network": "eip155:84532",
            "contract": ch.SETTLEMENT_ADDRESS,
            "deposit_collector": ch.ERC3009_COLLECTOR_ADDRESS,
            "receiver": SELLER,
            "receiver_authorizer": AUTHORIZER,
            "token": USDC,
            "withdraw_delay": 900,
            "asset_transfer_method": "eip3009",
        }
    ]
    assert binding._payment(document) == TERMS
    # Without channels the document is as before (older verifiers parse it, digests unchanged).
    plain = dataclasses.replace(TERMS, channels=())
    assert "channels" not in plain.document()
    assert binding._payment(plain.document()) == plain
    entry = document["channels"][0]
    for bad in (
        [],
        "eip155:84532",
        [{**entry, "extra": 1}],
        [{k: v for k, v in entry.items() if k != "receiver_authorizer"}],
        [{**entry, "receiver_authorizer": "0x12"}],
        [{**entry, "withdraw_delay": True}],
        [{**entry, "withdraw_delay": 0}],
        [{**entry, "withdraw_delay": 2**40}],
        [{**entry, "withdraw_delay": "900"}],
        [{**entry, "network": "eip155:1"}],  # a channel on a network the terms do not accept
        [entry, entry],
    ):
        with pytest.raises(binding.BindingInvalid):
            binding._payment({**document, "channels": bad})


def test_the_gateway_attests_the_channel_terms_its_offers_state() -> None:
    network = resolve_network("base-sepolia")
    assert network.usdc is not None
    seller = SellerTerms(pay_to=SELLER, accepted=(Acceptance(network=network, asset=network.usdc),))
    (made,) = offer_role.offers(
        seller,
        price=Decimal("0.001"),
        maximum=None,
        receiver_authorizer=AUTHORIZER,
        withdraw_delay=900,
    )
    (attested,) = channel_terms(seller, receiver_authorizer=AUTHORIZER, withdraw_delay=900)
    extra = dict(made.extra)
    assert attested.receiver == made.pay_to
    assert attested.token == made.asset.address
    assert attested.network == made.network.caip2
    assert attested.receiver_authorizer == extra["receiverAuthorizer"]
    assert str(attested.withdraw_delay) == extra["withdrawDelay"]
    assert attested.asset_transfer_method == extra["assetTransferMethod"]
    assert (attested.contract, attested.deposit_collector) == (
        ch.SETTLEMENT_ADDRESS,
        ch.ERC3009_COLLECTOR_ADDRESS,
    )
    # batch-settlement alone is metered: its token prices and cap are attested too (a channel
    # offer on a metered route states a maximum the client must hold to them).
    pricing = TokenPricing(prices={"*": TokenPrice(Decimal(100), Decimal(400))})
    document = payment_document(
        seller,
        PricePolicy(default=Decimal("0.001")),
        pricing,
        ["batch-settlement"],
        64,
        channels=(attested,),
    )
    assert document.token_prices
    assert document.max_tokens_cap == 64
    assert document.channels == (attested,)
    assert all(a.upto_facilitator is None for a in document.accepts)
    exact = payment_document(seller, PricePolicy(default=Decimal("0.001")), pricing, ["exact"], 64)
    assert exact.token_prices == ()
    assert exact.max_tokens_cap is None
    assert exact.channels == ()


def test_an_asset_outside_the_table_is_attested_as_configured() -> None:
    network = resolve_network("base-sepolia")
    token = Asset(address="0x" + "42" * 20, name="Token", version="1", decimals=18)
    seller = SellerTerms(pay_to=SELLER, accepted=(Acceptance(network=network, asset=token),))
    (attested,) = channel_terms(seller, receiver_authorizer=AUTHORIZER, withdraw_delay=3600)
    assert (attested.token, attested.withdraw_delay) == (token.address, 3600)


def test_the_channel_terms_are_in_the_quoted_digest_and_the_configuration_digest() -> None:
    """What the TPM quotes (the binding digest) and what PCR 23 measures (the configuration
    digest) both change with any channel field: a quote over one set of terms cannot vouch
    for another."""

    def bound(terms: binding.PaymentTerms) -> binding.Binding:
        point = bytes.fromhex(
            "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
            "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
        )  # the P-256 generator: any valid point
        return binding.Binding(
            nonce=b"\x07" * 32,
            sealing_key=point,
            receipt_key=point,
            models=(),
            payment=terms,
            gateway_version="0.1.0",
            code_digest="sha256:" + "ef" * 32,
            issued_at=1_700_000_000,
        )

    original = bound(TERMS)
    for change in (
        {"receiver_authorizer": ATTACKER},
        {"withdraw_delay": 901},
        {"contract": "0x" + "c0" * 20},
        {"receiver": ATTACKER},
    ):
        other = bound(
            dataclasses.replace(TERMS, channels=(dataclasses.replace(CHANNEL, **change),))
        )
        assert other.digest() != original.digest(), change
        assert other.config_digest() != original.config_digest(), change
    assert binding.parse(json.loads(original.canonical())) == original
