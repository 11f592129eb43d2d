"""A request's voucher is checked once (its signature recovered once) from its admission check
to its commit — and never used against terms or by a payment it was not checked for; a voucher
validly signed for another channel, chain or contract is refused."""

from __future__ import annotations

from decimal import Decimal

import pytest
from eth_account import Account

from paygate.x402.models import PaymentPayload
from paygate.x402.networks import resolve_network
from paygate.x402.offers import Acceptance, PaymentTerms
from paygate.x402.schemes.base import PaymentRejected
from paygate.x402.schemes.batch_settlement import channel as ch
from paygate.x402.schemes.batch_settlement import offer as offer_role
from paygate.x402.schemes.batch_settlement.bound import CheckedPayments
from paygate.x402.schemes.batch_settlement.client import PayerChannel
from paygate.x402.schemes.batch_settlement.verify import (
    FORGED,
    ChannelTerms,
    check_payload,
)

NETWORK = resolve_network("base-sepolia")
SELLER = "0x" + "22" * 20
AUTHORIZER = "0x" + "33" * 20
PAYER = Account.create()


def the_offer(pay_to: str = SELLER):
    assert NETWORK.usdc is not None
    terms = PaymentTerms(pay_to=pay_to, accepted=(Acceptance(network=NETWORK, asset=NETWORK.usdc),))
    (offer,) = offer_role.offers(
        terms, price=Decimal("0.001"), maximum=None, receiver_authorizer=AUTHORIZER,
        withdraw_delay=900,
    )  # fmt: skip
    return offer


def payment(channel: PayerChannel, offer, voucher: dict | None = None) -> PaymentPayload:
    requirement = offer.v2().wire()
    payload = channel.pay(requirement)
    if voucher is not None:
        payload["voucher"] = voucher
    return PaymentPayload.model_validate(
        {
            "x402Version": 2,
            "resource": {"url": "http://gateway/v1/chat/completions"},
            "accepted": requirement,
            "payload": payload,
        }
    )


def test_the_admission_check_serves_verify_and_commit_once(monkeypatch):
    offer = the_offer()
    channel = PayerChannel.open(PAYER, offer.v2().wire(), NETWORK.chain_id)
    paid = payment(channel, offer)
    checks = CheckedPayments()
    # The requirement verify and settle get is the offer's wire form: the same terms.
    terms = ChannelTerms.of_requirements(offer.v2().wire())
    assert terms == ChannelTerms.of_offer(offer)
    first = checks.checked(paid, ChannelTerms.of_offer(offer))
    recovered = []
    real = ch.voucher_signer.__wrapped__

    def counting(*args):
        recovered.append(args)
        return real(*args)

    monkeypatch.setattr(ch, "voucher_signer", counting)
    assert checks.checked(paid, terms) is first  # verify
    assert checks.checked(paid, terms, last=True) is first  # the commit: its last use
    assert recovered == []
    assert len(checks) == 0
    # Once forgotten (or for an equal payment read back from the ledger): checked again.
    again = checks.checked(paid, terms, last=True)
    assert again == first
    assert again is not first
    assert len(recovered) == 1


def test_a_remembered_voucher_is_never_taken_for_other_terms_or_another_payment():
    offer = the_offer()
    channel = PayerChannel.open(PAYER, offer.v2().wire(), NETWORK.chain_id)
    paid = payment(channel, offer)
    checks = CheckedPayments()
    checks.checked(paid, ChannelTerms.of_offer(offer))
    # Another seller's terms: checked against them, and refused, although remembered.
    other = ChannelTerms.of_offer(the_offer(pay_to="0x" + "99" * 20))
    with pytest.raises(PaymentRejected) as caught:
        checks.checked(paid, other)
    assert caught.value.reason == "invalid_batch_settlement_evm_receiver_mismatch"
    # An equal copy of the payment is not the remembered object: checked on its own.
    forger = PayerChannel(Account.create(), channel.config, NETWORK.chain_id)
    forged = payment(channel, offer, forger.voucher(offer.amount))
    with pytest.raises(PaymentRejected) as caught:
        checks.checked(forged, ChannelTerms.of_offer(offer))
    assert caught.value.reason == FORGED


def test_what_is_remembered_is_bounded():
    offer = the_offer()
    terms = ChannelTerms.of_offer(offer)
    checks = CheckedPayments(limit=2)
    channels = [
        PayerChannel.open(PAYER, offer.v2().wire(), NETWORK.chain_id, salt="0x" + f"{n:064x}")
        for n in range(3)
    ]
    paid = [payment(c, offer) for c in channels]
    remembered = [checks.checked(p, terms) for p in paid]
    assert len(checks) == 2
    assert checks.checked(paid[2], terms) is remembered[2]
    assert checks.checked(paid[0], terms) is not remembered[0]  # pushed out: checked again


def test_a_voucher_signed_for_another_channel_chain_or_contract_is_refused():
    offer = the_offer()
    terms = ChannelTerms.of_offer(offer)
    channel = PayerChannel.open(PAYER, offer.v2().wire(), NETWORK.chain_id)
    mine = PayerChannel.open(PAYER, offer.v2().wire(), NETWORK.chain_id, salt="0x" + "01" * 32)
    amount = offer.amount

    def refused(voucher: dict) -> str:
        with pytest.raises(PaymentRejected) as caught:
            check_payload(payment(channel, offer, voucher).payload, terms)
        return caught.value.reason

    # The payer's own valid voucher for its other channel: names that channel, not this one's.
    assert refused(mine.voucher(amount)) == "invalid_batch_settlement_evm_channel_id_mismatch"
    # ... and its signature moved onto this channel's id: not this channel's voucher.
    moved = {**channel.voucher(amount), "signature": mine.voucher(amount)["signature"]}
    assert refused(moved) == FORGED
    # Signed for this channel on another chain (the domain's chainId): forged here.
    other_chain = ch.sign_voucher(PAYER, channel.channel_id, amount, 1)
    assert refused({**channel.voucher(amount), "signature": other_chain}) == FORGED
    # Signed under another verifying contract's domain: forged here.
    digest = ch.td.digest(
        ch.td.domain_separator("x402 Batch Settlement", "1", NETWORK.chain_id, "0x" + "77" * 20),
        ch.td.keccak(
            ch._VOUCHER_TYPE + ch.td.bytes32_word(channel.channel_id) + ch.td.uint_word(amount)
        ),
    )
    other_contract = "0x" + bytes(PAYER.unsafe_sign_hash(digest).signature).hex()
    assert refused({**channel.voucher(amount), "signature": other_contract}) == FORGED
    # The honest one passes.
    assert check_payload(payment(channel, offer).payload, terms).max_claimable == amount


def test_the_terms_of_an_offer_and_its_requirement_are_made_once_and_read_as_before():
    """A request's terms are looked up at its check, reservation, verify and settlement: made
    once per set of values (the same object), equal to what the values say; a requirement
    whose values cannot be a cache key is still read, and a malformed one still refused."""
    offer = the_offer()
    requirement = offer.v2().wire()
    terms = ChannelTerms.of_offer(offer)
    assert ChannelTerms.of_requirements(requirement) is terms
    assert ChannelTerms.of_offer(the_offer()) is terms
    assert terms == ChannelTerms(
        chain_id=NETWORK.chain_id,
        pay_to=offer.pay_to,
        token=offer.asset.address,
        receiver_authorizer=AUTHORIZER,
        withdraw_delay="900",
        min_deposit=int(dict(offer.extra)["minDeposit"]),
    )
    other = ChannelTerms.of_offer(the_offer(pay_to="0x" + "55" * 20))
    assert other.pay_to == "0x" + "55" * 20
    assert other is not terms
    odd = {**requirement, "extra": {**requirement["extra"], "receiverAuthorizer": ["x"]}}
    assert ChannelTerms.of_requirements(odd).receiver_authorizer == "['x']"
    with pytest.raises(ValueError, match="invalid literal"):
        ChannelTerms.of_requirements({**requirement, "network": "eip155:base"})
