"""Local checks of a `batch-settlement` payment (sans-IO: no network, no ledger).

Two stages, both without a network call:

* :func:`check_payload` — the payment alone against the offer: the channel config is this
  seller's (receiver, token, receiver authorizer, withdraw delay), the channel id is the hash of
  that config, and the voucher is signed by the channel's payer authorizer (ECDSA; a channel
  whose vouchers are EIP-1271 — payerAuthorizer zero — is refused here: checking it needs a
  chain call on every request, which this scheme exists to avoid).
* :func:`check_against` — the voucher against the channel's state in the ledger: cumulative
  (exactly what was charged so far plus this request's price: anything else is stale or out of
  order) and within the deposit.

The refusal codes are the x402 specification's ``invalid_batch_settlement_evm_*``.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

from paygate.x402.models import AnyPaymentPayload, PaymentPayload
from paygate.x402.offers import Offer
from paygate.x402.schemes.base import Authorized, CheckTime, PaymentRejected, same_address
from paygate.x402.schemes.batch_settlement import channel as ch
from paygate.x402.schemes.batch_settlement.payload import BatchSettlementPayload
from paygate.x402.schemes.batch_settlement.store import Channel
from paygate.x402.typed_digest import checksum

FORGED = "invalid_batch_settlement_evm_voucher_signature"
NOT_CUMULATIVE = "invalid_batch_settlement_evm_cumulative_amount_mismatch"
OVER_DEPOSIT = "invalid_batch_settlement_evm_cumulative_exceeds_balance"
# A voucher sent again after it paid is a stale cumulative amount to the spec (and to the SDK's
# client, which resynchronises from the corrective 402 on this code only — a caller whose reply
# was lost would otherwise be stuck): the ledger's replay guard answers it with the same code.
REPLAYED = NOT_CUMULATIVE
NO_CHANNEL = "invalid_batch_settlement_evm_channel_not_found"
BUSY = "invalid_batch_settlement_evm_channel_busy"
# The payer's timed withdrawal could finish before this voucher is claimed (withdrawals.py).
WITHDRAWING = "invalid_batch_settlement_evm_withdrawal_pending"
PAYLOAD_TYPE = "invalid_batch_settlement_evm_payload_type"


@dataclass(frozen=True, slots=True)
class CheckedVoucher:
    """A payload that passed :func:`check_payload`."""

    payload: BatchSettlementPayload
    channel_id: str  # lowercase 0x + 64 hex
    payer: str  # checksummed
    max_claimable: int
    #: The voucher's replay key, its pending-lease owner and its payment id: one per
    #: (channel, ceiling), hashed once here.
    voucher_key: str


@dataclass(frozen=True, slots=True)
class ChannelTerms:
    """What a channel must name to pay this seller: from an offer, or from the requirement
    recorded with a payment (the gateway's own)."""

    chain_id: int
    pay_to: str
    token: str
    receiver_authorizer: str
    withdraw_delay: str
    min_deposit: int = 0

    @classmethod
    def of_offer(cls, offer: Offer) -> ChannelTerms:
        extra = dict(offer.extra)
        return _made(
            offer.network.caip2,  # as its requirement names it: one key for both
            offer.pay_to,
            offer.asset.address,
            extra.get("receiverAuthorizer", ""),
            extra.get("withdrawDelay", ""),
            extra.get("minDeposit", "0"),
        )

    @classmethod
    def of_requirements(cls, requirements: dict[str, Any]) -> ChannelTerms:
        extra = requirements.get("extra") or {}
        return _made(
            requirements["network"],
            requirements["payTo"],
            requirements["asset"],
            extra.get("receiverAuthorizer", ""),
            extra.get("withdrawDelay", ""),
            extra.get("minDeposit", "0"),
        )


def _made(*values: Any) -> ChannelTerms:
    try:
        return _terms(*values)
    except TypeError:  # a value that cannot be a key (not one of the gateway's requirements)
        return _terms.__wrapped__(*values)


@functools.lru_cache(maxsize=256, typed=True)
def _terms(
    network: object,
    pay_to: str,
    token: str,
    receiver_authorizer: object,
    withdraw_delay: object,
    min_deposit: object,
) -> ChannelTerms:
    """The terms of these values (a gateway has a handful: made once each, and the request's
    checked voucher is found by the same object at each step). ``network``: its CAIP-2 name."""
    return ChannelTerms(
        chain_id=int(str(network).removeprefix("eip155:")),
        pay_to=pay_to,
        token=token,
        receiver_authorizer=str(receiver_authorizer),
        withdraw_delay=str(withdraw_delay),
        min_deposit=int(str(min_deposit)),
    )


def check_payload(payload: object, offer: ChannelTerms) -> CheckedVoucher:
    """The payment's own checks against the seller's terms; raises PaymentRejected."""
    if not isinstance(payload, BatchSettlementPayload):
        raise PaymentRejected(PAYLOAD_TYPE, "the payload is not a batch-settlement payload")
    config = payload.channel_config
    if not same_address(config.receiver, offer.pay_to):
        raise PaymentRejected(
            "invalid_batch_settlement_evm_receiver_mismatch", "the channel pays someone else"
        )
    if not same_address(config.token, offer.token):
        raise PaymentRejected(
            "invalid_batch_settlement_evm_token_mismatch", "the channel holds another token"
        )
    if not same_address(config.receiver_authorizer, offer.receiver_authorizer):
        raise PaymentRejected(
            "invalid_batch_settlement_evm_receiver_authorizer_mismatch",
            "the channel names another receiver authorizer",
        )
    if str(config.withdraw_delay) != offer.withdraw_delay:
        raise PaymentRejected(
            "invalid_batch_settlement_evm_withdraw_delay_mismatch",
            "the channel's withdraw delay is not the one offered",
        )
    channel_id = ch.channel_id(config, offer.chain_id)
    if payload.voucher.channel_id != channel_id:
        raise PaymentRejected(
            "invalid_batch_settlement_evm_channel_id_mismatch",
            "the voucher's channel is not the config's",
        )
    if ch.is_zero(config.payer_authorizer):
        raise PaymentRejected(
            FORGED, "vouchers must be signed by a payer authorizer key (EIP-1271 vouchers are not"
            " accepted)",
        )  # fmt: skip
    maximum = int(payload.voucher.max_claimable_amount)
    signer = ch.voucher_signer(channel_id, maximum, payload.voucher.signature, offer.chain_id)
    if signer is None or signer != checksum(config.payer_authorizer):
        raise PaymentRejected(FORGED, "the voucher is not signed by the channel's payer")
    if payload.type == "deposit":
        deposit = payload.deposit
        if deposit is None or deposit.authorization.erc3009_authorization is None:
            raise PaymentRejected(
                "invalid_batch_settlement_evm_erc3009_authorization_required",
                "a deposit needs its EIP-3009 authorization (Permit2 deposits are not taken)",
            )
        if int(deposit.amount) <= 0 or int(deposit.amount) > ch.UINT128_MAX:
            raise PaymentRejected(
                "invalid_batch_settlement_evm_deposit_payload", "the deposit amount is invalid"
            )
        # Each deposit is a transaction the gateway pays gas for: not for crumbs.
        if int(deposit.amount) < offer.min_deposit:
            raise PaymentRejected(
                "invalid_batch_settlement_evm_deposit_below_min_deposit",
                "the deposit is below the announced minDeposit",
            )
    key = ch.voucher_id(channel_id, maximum)
    return CheckedVoucher(payload, channel_id, checksum(config.payer), maximum, key)


def check_against(
    checked: CheckedVoucher,
    channel: Channel | None,
    price: int,
    *,
    refund: bool,
) -> None:
    """The voucher against the channel's state: raises PaymentRejected. While the payer's
    withdrawal is pending a voucher must fit under what it leaves in the channel (finished or
    not, such a voucher stays claimable): from the moment the withdrawal is known, not only
    near its due time — a voucher allowed above it would rely on a claim landing before the
    finish, which a claimer that died, a slow endpoint or more withdrawing channels than one
    claim takes can all miss."""
    if channel is None:
        raise PaymentRejected(NO_CHANNEL, "no deposit is known for this channel")
    expected = channel.charged if refund else channel.charged + price
    if checked.max_claimable != expected:
        raise PaymentRejected(
            NOT_CUMULATIVE, "the voucher's cumulative amount does not follow the channel's charges"
        )
    if checked.max_claimable > channel.balance:
        raise PaymentRejected(OVER_DEPOSIT, "the voucher asks for more than the channel holds")
    if (
        not refund
        and channel.withdraw_due is not None
        and checked.max_claimable > channel.balance - channel.withdraw_amount
    ):
        raise PaymentRejected(
            WITHDRAWING,
            "the channel's payer is withdrawing its deposit: a voucher above what the"
            " withdrawal leaves might never be claimed (open another channel, or top this one up)",
        )


def payload_of(payment: AnyPaymentPayload) -> BatchSettlementPayload:
    if not isinstance(payment, PaymentPayload) or not isinstance(
        payment.payload, BatchSettlementPayload
    ):
        raise PaymentRejected(PAYLOAD_TYPE, "not a batch-settlement payment")
    return payment.payload


def authorized(checked: CheckedVoucher, offer: Offer, valid_before: int) -> Authorized:
    """What a checked voucher authorizes: at most the offer's amount, keyed by the voucher."""
    return Authorized(
        payer=checked.payer,
        nonce=checked.voucher_key,
        maximum=offer.amount,
        valid_before=valid_before,
    )


class BatchSettlementVerify:
    """A voucher's own checks (:func:`check_payload`); the channel's state is checked when the
    bound scheme verifies (``bound``)."""

    payload_type = BatchSettlementPayload
    replay_code = REPLAYED

    def check(self, payment: AnyPaymentPayload, offer: Offer, when: CheckTime) -> Authorized:
        checked = self.checked(payment, ChannelTerms.of_offer(offer))
        return authorized(checked, offer, when.now + ch.MIN_WITHDRAW_DELAY)

    def checked(self, payment: AnyPaymentPayload, terms: ChannelTerms) -> CheckedVoucher:
        """A paid request's voucher checked against ``terms`` (a refund is not a payment)."""
        payload = payload_of(payment)
        if payload.type == "refund":
            raise PaymentRejected(PAYLOAD_TYPE, "a refund is not a payment")
        return check_payload(payload, terms)

    def valid_before(self, payment: AnyPaymentPayload) -> int:
        # A voucher has no expiry of its own: the channel holds the money until its payer's
        # withdrawal, which takes at least the minimum withdraw delay.
        return int(time.time()) + ch.MIN_WITHDRAW_DELAY


ROLE = BatchSettlementVerify()
