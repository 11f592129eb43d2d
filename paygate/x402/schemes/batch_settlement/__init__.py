"""The ``batch-settlement`` scheme (x402, EVM): pay once into a channel, then a voucher a request.

A payer deposits into a channel of the x402BatchSettlement contract once (the first payment
carries the deposit and its first voucher); each request then carries a voucher: the payer's
signature on the cumulative total the seller may claim (what was charged so far plus this
request's price). Per request, nothing touches the network: the voucher is checked locally
(:mod:`.verify`) against the channel's state in the payment ledger (:mod:`.store`), the charge
— the request's price, or on a metered route what it used, up to the price — is committed there
with the voucher, and the seller claims many channels' latest vouchers in one transaction
later (:mod:`.claims`, :mod:`.chain`). A refund request returns what was not charged.

Roles: :mod:`.offer` (the 402's entry), :mod:`.verify` (local checks), :mod:`.store` (channel
state in the ledger), :mod:`.chain` (deposits, claims and refunds with the gas key, and their
proof; server-only), :mod:`.facilitator` (the same through a facilitator, proven on chain),
:mod:`.claims` (the claim loop and refunds), :mod:`.client` (the payer's side, client-safe).

The registry holds :class:`BatchSettlementScheme` (stateless: what the payload is, its replay
code); the processor works with :class:`BoundBatchSettlement`, the same scheme bound to its
ledger and chain (``paygate.server.assembly.channel_schemes``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from paygate.x402.models import (
    AnyPaymentPayload,
    BatchSettlementPayload,
    PaymentPayload,
    ResourceInfo,
    SettleResponse,
    VerifyResponse,
)
from paygate.x402.offers import Offer, PaymentTerms
from paygate.x402.schemes.base import Authorized
from paygate.x402.schemes.batch_settlement import offer as offer_role
from paygate.x402.schemes.batch_settlement.channel import MIN_WITHDRAW_DELAY, SCHEME
from paygate.x402.schemes.batch_settlement.verify import (
    NOT_CUMULATIVE,
    REPLAYED,
    ChannelTerms,
    Checked,
    check_against,
    check_payload,
)
from paygate.x402.verify import PaymentRejected

if TYPE_CHECKING:
    from paygate.x402.results import Refusal
    from paygate.x402.schemes.batch_settlement.claims import Channels
    from paygate.x402.settler import Settler

__all__ = ["SCHEME", "BatchSettlementScheme", "BoundBatchSettlement"]


def _payload(payment: AnyPaymentPayload) -> BatchSettlementPayload:
    if not isinstance(payment, PaymentPayload) or not isinstance(
        payment.payload, BatchSettlementPayload
    ):
        raise PaymentRejected(
            "invalid_batch_settlement_evm_payload_type", "not a batch-settlement payment"
        )
    return payment.payload


class BatchSettlementScheme:
    """The registry's entry: what a batch-settlement payment is. Unbound, it settles nothing
    (see :class:`BoundBatchSettlement`)."""

    name = SCHEME
    # The charge is decided after the reply (a metered route's usage, up to the voucher's
    # increment); a flat route charges its price.
    metered = True
    replay_code = REPLAYED
    payload_type = BatchSettlementPayload

    def valid_before(self, payment: AnyPaymentPayload) -> int:
        return int(time.time()) + MIN_WITHDRAW_DELAY

    def authorized_amount(self, authorized: Authorized, offer: Offer) -> int:
        return offer.amount

    def check(
        self,
        payment: AnyPaymentPayload,
        offer: Offer,
        *,
        now: int,
        skew: int,
        min_remaining: float,
    ) -> Authorized:
        payload = _payload(payment)
        if payload.type == "refund":
            raise PaymentRejected(
                "invalid_batch_settlement_evm_payload_type", "a refund is not a payment"
            )
        checked = check_payload(payload, ChannelTerms.of_offer(offer))
        return Authorized(
            payer=checked.payer,
            nonce=checked.voucher_key,
            maximum=offer.amount,
            valid_before=now + MIN_WITHDRAW_DELAY,
        )

    def requirements(
        self, payment: AnyPaymentPayload, offer: Offer, resource: ResourceInfo
    ) -> dict[str, Any]:
        return offer.v2().wire()

    async def verify(
        self, settler: Settler, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        raise _not_bound()

    async def settle(
        self,
        settler: Settler,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
        amount: int,
    ) -> SettleResponse:
        raise _not_bound()

    async def reconcile(
        self,
        settler: Settler,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
        amount: int,
        transaction: str | None,
    ) -> SettleResponse:
        raise _not_bound()


class BoundBatchSettlement(BatchSettlementScheme):
    """The scheme bound to a processor's ledger and chain: verifies against the channel state,
    commits charges, answers refunds; its :class:`Channels` also claims in the background."""

    def __init__(self, channels: Channels, *, clock: Callable[[], float] = time.time) -> None:
        self.channels = channels
        self._clock = clock

    # --- the 402 ---

    def offers(
        self, terms: PaymentTerms, *, price: Decimal, maximum: Decimal | None
    ) -> tuple[Offer, ...]:
        return offer_role.offers(
            terms,
            price=price,
            maximum=maximum,
            receiver_authorizer=self.channels.receiver_authorizer,
            withdraw_delay=self.channels.withdraw_delay,
        )

    # --- a paid request ---

    def check(
        self,
        payment: AnyPaymentPayload,
        offer: Offer,
        *,
        now: int,
        skew: int,
        min_remaining: float,
    ) -> Authorized:
        authorized = super().check(payment, offer, now=now, skew=skew, min_remaining=min_remaining)
        # The charge must be committed while this request holds the channel.
        return Authorized(
            payer=authorized.payer,
            nonce=authorized.nonce,
            maximum=authorized.maximum,
            valid_before=now + int(self.channels.pending_seconds),
        )

    def _checked(self, payment: AnyPaymentPayload, requirements: dict[str, Any]) -> Checked:
        return check_payload(_payload(payment), ChannelTerms.of_requirements(requirements))

    async def verify(
        self, settler: Settler, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        """A deposit is sent and proven on chain first; then the voucher is checked against
        the channel's state in the ledger and the channel taken for this request."""
        from paygate.x402.ledger import LedgerError

        try:
            checked = self._checked(payment, requirements)
            if checked.payload.type == "deposit":
                await self.channels.deposit(checked, payment.wire(), requirements)
            channel = await self.channels.take(checked)
            try:
                check_against(checked, channel, int(requirements["amount"]), refund=False)
            except PaymentRejected:
                await self.channels.store.release(checked.channel_id, checked.voucher_key)
                raise
        except PaymentRejected as exc:
            return VerifyResponse(
                is_valid=False, invalid_reason=exc.reason, invalid_message=str(exc)
            )
        except LedgerError as exc:
            raise _not_bound(f"the channel ledger is unavailable: {exc.code}") from None
        return VerifyResponse(is_valid=True, payer=checked.payer)

    async def settle(
        self,
        settler: Settler,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
        amount: int,
    ) -> SettleResponse:
        """Commit ``amount`` (at most the price) to the channel under this voucher. No money
        moves here: it moves when the claim loop claims the channel (proven on chain)."""
        from paygate.x402.ledger import LedgerError

        checked = self._checked(payment, requirements)
        try:
            return await self.channels.commit(checked, requirements, amount)
        except LedgerError as exc:  # not committed, or not known to be: committed again later
            raise _not_bound(f"the channel ledger is unavailable: {exc.code}") from None

    async def reconcile(
        self,
        settler: Settler,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
        amount: int,
        transaction: str | None,
    ) -> SettleResponse:
        # Committing is idempotent (a voucher commits once): a charge whose answer was lost is
        # simply committed again.
        return await self.settle(settler, payment, requirements, amount)

    # --- the corrective 402 ---

    async def corrective(self, refusal: Refusal, payment: AnyPaymentPayload) -> Refusal:
        """A stale voucher's 402 (``…_cumulative_amount_mismatch``) carries the channel's state
        and the last voucher it committed (``extra.channelState``/``voucherState``), so the payer
        can check that voucher's signature and resynchronise; other refusals as they are."""
        from paygate.x402.ledger import LedgerError

        if refusal.code != NOT_CUMULATIVE or refusal.challenge is None:
            return refusal
        try:
            payload = _payload(payment)
            channel = await self.channels.store.get(payload.voucher.channel_id)
        except (PaymentRejected, LedgerError):
            return refusal
        if channel is None or channel.config != payload.channel_config:
            return refusal
        state = {
            "channelState": {
                "channelId": channel.channel_id,
                "balance": str(channel.balance),
                "totalClaimed": str(channel.total_claimed),
                "withdrawRequestedAt": 0,
                "refundNonce": "0",
                "chargedCumulativeAmount": str(channel.charged),
            },
            "voucherState": {
                "signedMaxClaimable": str(channel.signed_max),
                "signature": channel.signature,
            },
        }
        challenge = refusal.challenge
        accepts = [
            r.model_copy(update={"extra": {**r.extra, **state}}) if r.scheme == SCHEME else r
            for r in challenge.v2.accepts
        ]
        v2 = challenge.v2.model_copy(update={"accepts": accepts})
        return dataclasses.replace(refusal, challenge=dataclasses.replace(challenge, v2=v2))

    # --- payment operations that are not paid requests ---

    async def operation(self, payment: AnyPaymentPayload, offer: Offer) -> SettleResponse | None:
        """A cooperative refund request (answered without serving the route), else None.
        Raises PaymentRejected when the refund is refused."""
        payload = payment.payload if isinstance(payment, PaymentPayload) else None
        if not isinstance(payload, BatchSettlementPayload) or payload.type != "refund":
            return None
        checked = check_payload(payload, ChannelTerms.of_offer(offer))
        return await self.channels.refund(checked, offer.v2().wire())


def _not_bound(message: str = "batch-settlement is not set up on this gateway") -> Exception:
    from paygate.x402.settler import SettlerUnavailable  # server-only: not loaded by clients

    return SettlerUnavailable(message)
