"""A channel's cooperative refunds, as the SDK's flow has them: the payer's refund voucher (a
zero-charge voucher for what was charged, an optional amount) answered with one transaction
that claims what was charged and returns the rest (or the amount) to the payer.

The channel is held from its chain reading to the refund's mirror (a top-up's mirror waits for
that hold), read on chain first and its mirror corrected where it differs; a refund whose
outcome is not known, or whose mirror failed, leaves the channel held, so that a voucher under
the old balance is never served meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

from paygate.x402.ledger import LedgerError
from paygate.x402.models import SettleResponse
from paygate.x402.schemes.base import PaymentRejected, PaymentUnconfirmed
from paygate.x402.schemes.batch_settlement import readings
from paygate.x402.schemes.batch_settlement.chain import ChannelChain, Refund
from paygate.x402.schemes.batch_settlement.store import (
    Channel,
    ChannelBusy,
    ChannelStore,
    ClaimEntry,
)
from paygate.x402.schemes.batch_settlement.verify import (
    BUSY,
    NO_CHANNEL,
    CheckedVoucher,
    check_against,
)
from paygate.x402.settler import SettlementUnknown, SettlerUnavailable

log = logging.getLogger("paygate.x402")

REFUND_NO_BALANCE = "invalid_batch_settlement_evm_refund_no_balance"
REFUND_AMOUNT_INVALID = "invalid_batch_settlement_evm_refund_amount_invalid"


class Refunds:
    def __init__(self, store: ChannelStore, chain: ChannelChain) -> None:
        self.store = store
        self.chain = chain

    async def refund(self, checked: CheckedVoucher, requirements: dict[str, Any]) -> SettleResponse:
        """A cooperative refund: claim what was charged and return (part of) the rest, in one
        transaction. PaymentRejected when it cannot be done."""
        payload = checked.payload
        try:  # a refund is no payment: its hold is its own, let go below
            channel = await self.store.take(checked.channel_id, checked.voucher_key)
        except ChannelBusy:
            raise PaymentRejected(BUSY, "another request on this channel is in progress") from None
        if channel is None:
            raise PaymentRejected(NO_CHANNEL, "no deposit is known for this channel")
        release = True
        try:
            channel = await self._as_on_chain(channel)
            check_against(checked, channel, 0, refund=True)
            remainder = channel.balance - channel.charged
            if remainder <= 0:
                raise PaymentRejected(REFUND_NO_BALANCE, "nothing is left to refund")
            amount = remainder
            if payload.amount is not None:
                amount = int(payload.amount)
                if amount <= 0:
                    raise PaymentRejected(REFUND_AMOUNT_INVALID, "the refund amount is invalid")
                if amount > remainder:
                    raise PaymentRejected(REFUND_NO_BALANCE, "less than that is left to refund")
            claim = None
            if channel.charged > channel.total_claimed:
                claim = ClaimEntry(
                    channel.channel_id,
                    channel.config,
                    channel.signed_max,
                    channel.signature,
                    channel.charged,
                )
            try:
                tx_hash, after, returned = await self.chain.refund(
                    Refund(
                        payload.channel_config,
                        checked.channel_id,
                        amount,
                        claim,
                        payload.voucher.wire(),
                        requirements,
                    )
                )
            except ValueError as exc:
                # Refused or reverted: this one moved nothing, but an earlier refund whose
                # outcome was unknown may have been mined since the channel was read (its
                # refund nonce the one this reverted on): the mirror follows the chain before
                # the channel is let go (held still when the chain cannot be read).
                release = False
                await self._as_on_chain(channel)
                release = True
                raise PaymentRejected(str(exc), "the refund was refused on chain") from None
            except (SettlementUnknown, SettlerUnavailable):
                # Sent, maybe, and moved (or read after it, not known): held as for a mirror
                # that failed — a voucher under the old balance is never served meanwhile.
                release = False
                raise PaymentUnconfirmed(
                    "invalid_batch_settlement_evm_refund_transaction_failed",
                    "the refund's outcome is not known yet: ask again",
                ) from None
            try:
                await readings.refunded(self.store, self.chain, checked.channel_id, after)
            except LedgerError:
                # The money moved, its mirror did not: the channel stays held meanwhile (a
                # voucher past the contract's balance is refused busy, never taken), and the
                # refund asked again mirrors the chain first (_as_on_chain).
                release = False
                raise
            if channel.withdraw_due is not None:
                await self._withdrawal_after(channel, after.block)
        finally:
            if release:
                await self.store.release(checked.channel_id, checked.voucher_key)
        log.info("channel refunded: %d returned to the payer", returned)
        return SettleResponse(
            success=True,
            payer=checked.payer,
            transaction=tx_hash,
            network=str(requirements["network"]),
            amount=str(returned),
            extra={
                "channelState": {
                    "channelId": checked.channel_id,
                    "balance": str(after.balance),
                    "totalClaimed": str(after.total_claimed),
                    "withdrawRequestedAt": 0,
                    "refundNonce": "0",
                    "chargedCumulativeAmount": str(channel.charged),
                }
            },
        )

    async def _withdrawal_after(self, channel: Channel, block: int) -> None:
        """The payer's pending withdrawal after this refund (the contract lowers it by what a
        refund returns, and cancels it once the refund covers it): mirrored at once, so a
        channel whose withdrawal was cancelled is served again without waiting for the claim
        loop's scan (which also reads it: left to it when the chain or ledger fails now)."""
        try:
            pending = await self.chain.pending_withdrawal(channel.channel_id, block)
            if pending.amount == 0:
                await self.store.withdrawal_ended(
                    channel.channel_id,
                    requested_at=channel.withdraw_requested_at,
                    amount=channel.withdraw_amount,
                )
            elif pending.amount < channel.withdraw_amount:
                await self.store.withdrawal(
                    channel.channel_id,
                    requested_at=channel.withdraw_requested_at,
                    amount=pending.amount,
                    due=channel.withdraw_due,
                )
        except (SettlementUnknown, SettlerUnavailable, LedgerError):
            return  # the refund is done; the scan mirrors the withdrawal

    async def _as_on_chain(self, channel: Channel) -> Channel:
        """``channel`` as the contract holds it now (a refund is a chain operation: one read
        more), its mirror corrected where it differs (a refund or deposit whose mirror was
        lost): read at no older block than the mirror's own reading (a load-balanced RPC's
        node behind naming the newest block would give a balance before a top-up mirrored
        already, and the refund of "the rest" would return less). PaymentUnconfirmed when
        the chain cannot be read."""
        on_chain = None
        try:
            on_chain = await self.chain.state(channel.channel_id, since=channel.read_block)
        except (SettlementUnknown, SettlerUnavailable):
            # No block that high (yet): a node behind, or a chain that fell back below the
            # mirror's reading — proven so, the chain as it is now is the one to refund on.
            if await readings.gone(self.chain, channel.stamp):
                with contextlib.suppress(SettlementUnknown, SettlerUnavailable):
                    on_chain = await self.chain.state(channel.channel_id)
        if on_chain is None:
            raise PaymentUnconfirmed(
                "invalid_batch_settlement_evm_refund_transaction_failed",
                "the channel cannot be read on chain now: ask again",
            )
        if (on_chain.balance, on_chain.total_claimed) == (channel.balance, channel.total_claimed):
            return channel
        await readings.refunded(self.store, self.chain, channel.channel_id, on_chain)
        return dataclasses.replace(
            channel,
            balance=on_chain.balance,
            total_claimed=max(on_chain.total_claimed, channel.total_claimed),
        )
