"""batch-settlement's local checks (sans-IO): a voucher for another seller's channel, one whose
config does not hash to its channel, one signed by anyone but the payer authorizer, and the
channel-state rules — each refused with its own code before anything touches a network."""

from __future__ import annotations

from decimal import Decimal

import pytest
from eth_account import Account

from paygate.x402.networks import resolve_network
from paygate.x402.offers import Acceptance, PaymentTerms
from paygate.x402.schemes.base import PaymentRejected
from paygate.x402.schemes.batch_settlement import offer as offer_role
from paygate.x402.schemes.batch_settlement.client import PayerChannel
from paygate.x402.schemes.batch_settlement.payload import BatchSettlementPayload
from paygate.x402.schemes.batch_settlement.store import Channel
from paygate.x402.schemes.batch_settlement.verify import (
    FORGED,
    NO_CHANNEL,
    NOT_CUMULATIVE,
    OVER_DEPOSIT,
    WITHDRAWING,
    ChannelTerms,
    check_against,
    check_payload,
)

NETWORK = resolve_network("base-sepolia")
SELLER = "0x" + "22" * 20
AUTHORIZER = "0x" + "33" * 20
PAYER = Account.create()


def the_offer():
    assert NETWORK.usdc is not None
    terms = PaymentTerms(pay_to=SELLER, accepted=(Acceptance(network=NETWORK, asset=NETWORK.usdc),))
    (offer,) = offer_role.offers(
        terms,
        price=Decimal("0.001"),
        maximum=None,
        receiver_authorizer=AUTHORIZER,
        withdraw_delay=900,
    )
    return offer


def requirement(offer) -> dict:
    return offer.v2().wire()


def payload(channel: PayerChannel, offer, **change) -> BatchSettlementPayload:
    data = channel.pay(requirement(offer))
    data.update(change)
    return BatchSettlementPayload.model_validate(data)


def rejected(reason: str, call) -> None:
    with pytest.raises(PaymentRejected) as caught:
        call()
    assert caught.value.reason == reason


def test_an_honest_voucher_passes_and_names_its_payer_and_replay_key():
    offer = the_offer()
    channel = PayerChannel.open(PAYER, requirement(offer), NETWORK.chain_id)
    checked = check_payload(payload(channel, offer), ChannelTerms.of_offer(offer))
    assert checked.payer == PAYER.address
    assert checked.max_claimable == offer.amount
    assert checked.channel_id == channel.channel_id
    again = check_payload(payload(channel, offer), ChannelTerms.of_requirements(requirement(offer)))
    assert again.voucher_key == checked.voucher_key  # one key per (channel, ceiling)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("receiver", "0x" + "99" * 20, "invalid_batch_settlement_evm_receiver_mismatch"),
        ("token", "0x" + "99" * 20, "invalid_batch_settlement_evm_token_mismatch"),
        (
            "receiverAuthorizer",
            "0x" + "99" * 20,
            "invalid_batch_settlement_evm_receiver_authorizer_mismatch",
        ),
        ("withdrawDelay", 901, "invalid_batch_settlement_evm_withdraw_delay_mismatch"),
    ],
)
def test_a_channel_for_other_terms_is_refused(field, value, reason):
    offer = the_offer()
    channel = PayerChannel.open(PAYER, requirement(offer), NETWORK.chain_id)
    data = channel.pay(requirement(offer))
    data["channelConfig"] = {**data["channelConfig"], field: value}
    rejected(
        reason,
        lambda: check_payload(
            BatchSettlementPayload.model_validate(data), ChannelTerms.of_offer(offer)
        ),
    )


def test_a_config_that_does_not_hash_to_the_channel_id_is_refused():
    offer = the_offer()
    channel = PayerChannel.open(PAYER, requirement(offer), NETWORK.chain_id)
    data = channel.pay(requirement(offer))
    data["channelConfig"] = {**data["channelConfig"], "salt": "0x" + "01" * 32}
    rejected(
        "invalid_batch_settlement_evm_channel_id_mismatch",
        lambda: check_payload(
            BatchSettlementPayload.model_validate(data), ChannelTerms.of_offer(offer)
        ),
    )


def test_a_voucher_signed_by_anyone_else_or_for_another_amount_is_forged():
    offer = the_offer()
    channel = PayerChannel.open(PAYER, requirement(offer), NETWORK.chain_id)
    other = PayerChannel(Account.create(), channel.config, NETWORK.chain_id)
    terms = ChannelTerms.of_offer(offer)
    rejected(
        FORGED, lambda: check_payload(payload(channel, offer, voucher=other.voucher(1000)), terms)
    )
    moved = {**channel.voucher(1000), "maxClaimableAmount": "5000"}  # the amount changed after
    rejected(FORGED, lambda: check_payload(payload(channel, offer, voucher=moved), terms))
    # A channel whose vouchers are EIP-1271 (payerAuthorizer zero) is not taken.
    data = channel.pay(requirement(offer))
    data["channelConfig"] = {**data["channelConfig"], "payerAuthorizer": "0x" + "00" * 20}
    zero = PayerChannel(
        PAYER, BatchSettlementPayload.model_validate(data).channel_config, NETWORK.chain_id
    )
    data["voucher"] = zero.voucher(1000)
    rejected(FORGED, lambda: check_payload(BatchSettlementPayload.model_validate(data), terms))


def test_the_channel_state_rules():
    offer = the_offer()
    channel = PayerChannel.open(PAYER, requirement(offer), NETWORK.chain_id)
    checked = check_payload(payload(channel, offer), ChannelTerms.of_offer(offer))

    def state(charged: int, balance: int) -> Channel:
        return Channel(
            checked.channel_id, NETWORK.caip2, PAYER.address, channel.config,
            balance, 0, charged, charged, "0x", None, None, 1,
        )  # fmt: skip

    rejected(NO_CHANNEL, lambda: check_against(checked, None, 1000, refund=False))
    check_against(checked, state(0, 1000), 1000, refund=False)
    rejected(NOT_CUMULATIVE, lambda: check_against(checked, state(1, 10_000), 1000, refund=False))
    rejected(OVER_DEPOSIT, lambda: check_against(checked, state(0, 999), 1000, refund=False))
    check_against(checked, state(1000, 1000), 0, refund=True)  # a refund's zero-charge voucher


def test_a_voucher_above_what_a_known_pending_withdrawal_leaves_is_refused_however_far_due():
    """From the moment a withdrawal is known (not only near its due time: a claim before it
    can be missed — a claimer that died, a slow endpoint, more withdrawing channels than one
    claim takes) a voucher is refused unless it fits under balance - withdrawal (what the
    withdrawal leaves pays it, finished or not); no withdrawal, or a refund: as before."""
    offer = the_offer()
    channel = PayerChannel.open(PAYER, requirement(offer), NETWORK.chain_id)
    checked = check_payload(payload(channel, offer), ChannelTerms.of_offer(offer))

    def state(balance: int, amount: int, due: float | None, charged: int = 0) -> Channel:
        return Channel(
            checked.channel_id, NETWORK.caip2, PAYER.address, channel.config,
            balance, 0, charged, 0, "0x", None, None, 1,
            withdraw_requested_at=0 if due is None else 1, withdraw_amount=amount,
            withdraw_due=due,
        )  # fmt: skip

    for due in (0.0, 5_000.0, 10.0**12):  # past, soon, a month's delay away
        rejected(
            WITHDRAWING,
            lambda due=due: check_against(checked, state(1000, 1, due), 1000, refund=False),
        )
        check_against(checked, state(1999, 999, due), 1000, refund=False)
    rejected(
        WITHDRAWING, lambda: check_against(checked, state(1999, 1000, 0.0), 1000, refund=False)
    )
    check_against(checked, state(1000, 0, None), 1000, refund=False)
    check_against(checked, state(1000, 1000, 5_000.0, charged=1000), 0, refund=True)
