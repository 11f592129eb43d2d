"""The client's batch-settlement channels (paygate.client.channels, through the Payer), without
sockets: the opt-in and its limits, the deposit counted once, and the seller's word checked
against our own record — a corrective 402 above what we signed, not signed by us, or older than
the receipts we hold; a receipt charging more than the price; the attested terms."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import pytest
from eth_account import Account

from paygate.client.channels import MAX_CHANNELS
from paygate.client.errors import ChannelStateRejected, OfferNotAttested, SpendRefused
from paygate.client.payer import Payer, SpendPolicy
from paygate.client.terms import check_challenge
from tests.fixtures.channels_support import (
    URL,
    challenge,
    channel_policy,
    corrective,
    offer,
    paid,
    receipt,
)
from tests.fixtures.terms_support import TERMS


def payer(**policy: Any) -> Payer:
    return Payer(Account.create(), channel_policy(**policy))


def test_channels_are_opt_in_and_the_deposit_counts_once() -> None:
    without = Payer(Account.create(), SpendPolicy(max_per_request="0.01"))
    with pytest.raises(SpendRefused, match="batch-settlement needs a channel"):
        without.pay(challenge(), url=URL)
    p = payer()
    records = paid(p, 3)
    assert [r.deposit for r in records] == [Decimal("0.02"), 0, 0]
    assert p.spent == Decimal("0.02")
    (channel,) = p.channels.channels()
    assert (channel.payer.charged, channel.signed, channel.rest) == (3000, 3000, 17000)


def test_a_deposit_above_the_policy_is_never_signed() -> None:
    p = payer(channel_deposit="0.005")  # paygate asks ten requests' worth: 0.01
    with pytest.raises(SpendRefused, match=r"minDeposit 0\.010000 is above"):
        p.pay(challenge(), url=URL)
    assert p.spent == 0
    # A deposit that would pass max_total is refused before signing, a top-up too.
    tight = payer(max_total="0.02")
    paid(tight, 20)
    with pytest.raises(SpendRefused, match="max total"):
        tight.pay(challenge(), url=URL)
    assert tight.spent == Decimal("0.02")
    with pytest.raises(ValueError, match="channel_deposit"):
        SpendPolicy(max_per_request="1", max_total="0.01", channel_deposit="0.02")
    for bad in ("0", "-1"):
        with pytest.raises(ValueError, match="channel_deposit"):
            SpendPolicy(max_per_request="1", channel_deposit=bad)


def test_offers_without_the_channel_terms_are_declined() -> None:
    p = payer()
    for extra in (
        {"receiverAuthorizer": "0x" + "00" * 20},
        {"receiverAuthorizer": "nope"},
        {"assetTransferMethod": "permit2"},
        {"withdrawDelay": "1"},
        {"minDeposit": "-5"},
    ):
        with pytest.raises(SpendRefused):
            p.pay(challenge(offer(**extra)), url=URL)
    assert p.spent == 0


def test_a_corrective_402_above_what_we_signed_is_refused() -> None:
    p = payer()
    records = paid(p, 2)
    pending = p.pay(challenge(), url=URL).record  # a third voucher: 3000 signed
    with pytest.raises(ChannelStateRejected, match="above any we signed"):
        corrective(p, pending, 9000, 9000)
    with pytest.raises(ChannelStateRejected, match="more than its voucher"):
        corrective(p, pending, 3500, 3000)
    with pytest.raises(ChannelStateRejected, match="not signed by us"):
        corrective(p, pending, 3000, 3000, signer=Account.create())
    (channel,) = p.channels.channels()
    assert (channel.payer.charged, channel.signed) == (2000, 3000)
    assert records[-1].receipt_error is None


def test_a_replayed_old_voucher_state_is_refused() -> None:
    p = payer()
    paid(p, 3)
    pending = p.pay(challenge(), url=URL).record
    with pytest.raises(ChannelStateRejected, match="an old state"):
        corrective(p, pending, 1000, 1000)  # our own, older voucher
    (channel,) = p.channels.channels()
    assert channel.payer.charged == 3000


def test_a_lost_receipt_is_resynced_within_what_we_signed() -> None:
    p = payer()
    paid(p, 2)
    lost = p.pay(challenge(), url=URL).record  # served, but its receipt never came
    p.channel_ended(lost)
    stale = p.pay(challenge(), url=URL).record  # voucher 3000: the seller says 3000 is charged
    again = corrective(p, stale, 3000, 3000)
    assert again is not None
    assert again.record.nonce.endswith(":4000")
    assert p.spent == Decimal("0.02")


def test_a_receipt_charging_more_than_the_price_is_flagged_and_not_counted() -> None:
    p = payer()
    record = p.pay(challenge(), url=URL).record
    record.receipt = receipt(5000)
    p.channel_receipt(record)
    assert record.receipt_error == "the receipt charges more than the price"
    record2 = p.pay(challenge(), url=URL).record
    record2.receipt = receipt(1000, cumulative=9000)
    p.channel_receipt(record2)
    assert record2.receipt_error == "the receipt's channel state charges more than our own count"
    (channel,) = p.channels.channels()
    assert channel.payer.charged == 1000


def test_one_request_per_channel_and_a_bounded_number_of_channels() -> None:
    p = payer(max_total="10")
    p.pay(challenge(), url=URL)
    with pytest.raises(SpendRefused, match="in use"):
        p.pay(challenge(), url=URL)
    for n in range(MAX_CHANNELS - 1):
        p.pay(challenge(), url=f"http://127.0.0.{n + 10}:9/")
    with pytest.raises(SpendRefused, match="channels are open"):
        p.pay(challenge(), url="http://127.0.1.1:9/")


def test_attested_terms_hold_batch_settlement_offers() -> None:
    """Attested terms that do not list batch-settlement: a channel offer is refused as not the
    appliance's, and one with another payee or token says so first (the channel terms
    themselves: test_client_channel_terms.py)."""
    body = b'{"model": "m", "messages": []}'
    for bad, code in (
        (offer(), "offer_scheme_mismatch"),
        (dataclasses.replace(offer(), pay_to="0x" + "66" * 20), "offer_pay_to_mismatch"),
        (dataclasses.replace(offer(), asset="0x" + "77" * 20), "offer_asset_mismatch"),
    ):
        with pytest.raises(OfferNotAttested) as caught:
            check_challenge(
                challenge(bad), TERMS, method="POST", path="/v1/chat/completions", body=body
            )
        assert caught.value.code == code
