"""The gateway's side of its channels: :class:`Channels` joins the ledger's channel state
(:mod:`.store`) and who moves the money (:mod:`.chain`), and keeps a request's path — the
channel taken for the request, the charge committed after its reply — with the other concerns
in their own modules: deposits (:mod:`.deposits`), refunds (:mod:`.refunds`) and the batched
claims that run beside the reconciler (:mod:`.claims`).

Requests call :meth:`Channels.deposit`, :meth:`~Channels.take` and :meth:`~Channels.commit`
(or :meth:`~Channels.charge`, the commit made with the payment's SETTLED record); a refund is
:meth:`~Channels.refund`; :meth:`~Channels.claim_forever` is the claim loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from paygate.x402.ledger import SchemeWrite
from paygate.x402.models import SettleResponse
from paygate.x402.schemes.base import PaymentRejected, SchemeSql
from paygate.x402.schemes.batch_settlement.chain import ChannelChain
from paygate.x402.schemes.batch_settlement.claims import ClaimLoop
from paygate.x402.schemes.batch_settlement.deposits import Deposits
from paygate.x402.schemes.batch_settlement.refunds import Refunds
from paygate.x402.schemes.batch_settlement.store import (
    Channel,
    ChannelBusy,
    ChannelStore,
    charged,
    taken,
)
from paygate.x402.schemes.batch_settlement.verify import BUSY, CheckedVoucher

_TAKEN_MAX = 4096  # requests in progress whose taken channel is remembered


class Channels:
    def __init__(
        self,
        ledger: SchemeSql,
        chain: ChannelChain,
        *,
        receiver_authorizer: str,
        replica: str,
        withdraw_delay: int,
        pending_seconds: float,
        claim_interval: float,
        max_per_claim: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = ChannelStore(ledger, clock=clock, pending_seconds=pending_seconds)
        self.chain = chain
        self.receiver_authorizer = receiver_authorizer
        self.replica = replica
        self.withdraw_delay = withdraw_delay
        self.pending_seconds = pending_seconds
        self.claim_interval = claim_interval
        self.max_per_claim = max_per_claim
        self._clock = clock
        self.deposits = Deposits(self.store, chain, pending_seconds=pending_seconds)
        self.refunds = Refunds(self.store, chain)
        self.claims = ClaimLoop(
            self.store,
            chain,
            replica=replica,
            claim_interval=claim_interval,
            max_per_claim=max_per_claim,
            withdraw_delay=withdraw_delay,
            clock=clock,
        )
        # Each request's channel as it took it (by voucher), for its commit's compare-and-set;
        # a hint only: the commit re-reads whenever the channel changed since.
        self._taken: dict[str, Channel] = {}

    # --- requests ---

    async def deposit(
        self, checked: CheckedVoucher, payment: dict[str, Any], requirements: dict[str, Any]
    ) -> Channel:
        """The payment's deposit sent, proven and mirrored (:meth:`.Deposits.deposit`)."""
        return await self.deposits.deposit(checked, payment, requirements)

    async def take(
        self, checked: CheckedVoucher, reserved: SchemeWrite | None = None
    ) -> Channel | None:
        """Take the channel for this request; ``reserved``: its take made with the request's
        reservation (:meth:`ChannelStore.take_write`), used when it found the channel free.
        Else taken only while the request's payment is still reserved
        (:meth:`ChannelStore.take_reserved`; LeaseLost once it was released: a replica frozen
        in its verify and taken for dead takes nothing when it wakes up)."""
        channel = taken(reserved) if reserved is not None else None
        if channel is None:
            key = checked.voucher_key  # the hold's owner, and the payment's nonce
            try:
                channel = await self.store.take_reserved(checked.channel_id, key, key)
            except ChannelBusy:
                raise PaymentRejected(
                    BUSY, "another request on this channel is in progress"
                ) from None
        if channel is not None:  # the commit's first compare-and-set starts from it
            if len(self._taken) >= _TAKEN_MAX:
                self._taken.pop(next(iter(self._taken)))
            self._taken[checked.voucher_key] = channel
        return channel

    def release_write(self, checked: CheckedVoucher) -> SchemeWrite | None:
        """The request's hold on the channel, let go with its payment's release; None while
        its deposit is still finishing (its caller gone): that hold is the deposit's, kept
        from its chain reading to its mirror (a refund between them would be undone by the
        mirror) and let go by the deposit itself."""
        self._taken.pop(checked.voucher_key, None)
        if self.deposits.finishing(checked.voucher_key):
            return None
        return self.store.release_write(checked.channel_id, checked.voucher_key)

    def charge(
        self, checked: CheckedVoucher, requirements: dict[str, Any], amount: int
    ) -> tuple[SchemeWrite, int, Callable[[], SettleResponse]] | None:
        """The request's charge as one write from the channel this request took (its
        compare-and-set), to be made with the payment's SETTLED record: the write, the charge,
        and the answer once the write is made. None when the channel was not taken here, or
        the charge does not fit its voucher (then :meth:`commit`)."""
        took = self._taken.get(checked.voucher_key)
        charge = amount  # exactly what the receipt states, or nothing (not fitting: commit)
        if took is None:
            return None
        write = self.store.charge(
            took,
            checked.voucher_key,
            max_claimable=checked.max_claimable,
            signature=checked.payload.voucher.signature,
            charge=charge,
            payment_id=checked.voucher_key,
        )
        if write is None:
            return None

        def answer() -> SettleResponse:
            self._taken.pop(checked.voucher_key, None)
            return self._committed(checked, requirements, charged(write), charge)

        return write, charge, answer

    async def commit(
        self, checked: CheckedVoucher, requirements: dict[str, Any], amount: int
    ) -> SettleResponse:
        network = str(requirements["network"])
        # Exactly the amount owed — what the reply's signed receipt states — or nothing: a
        # charge past the voucher's increment is refused by the store (its ceiling), never
        # cut to fit under it.
        charge = amount
        try:
            channel, _ = await self.store.commit(
                checked.channel_id,
                checked.voucher_key,
                max_claimable=checked.max_claimable,
                signature=checked.payload.voucher.signature,
                charge=charge,
                payment_id=checked.voucher_key,
                taken=self._taken.pop(checked.voucher_key, None),
            )
        except ValueError as exc:
            return SettleResponse(
                success=False, error_reason=str(exc), payer=checked.payer, network=network
            )
        return self._committed(checked, requirements, channel, charge)

    def _committed(
        self, checked: CheckedVoucher, requirements: dict[str, Any], channel: Channel, charge: int
    ) -> SettleResponse:
        """A committed charge's answer (the receipt's ``chargedAmount`` and channel state)."""
        network = str(requirements["network"])
        self.claims.charged(checked.channel_id)
        return SettleResponse(
            success=True,
            payer=checked.payer,
            transaction="",
            network=network,
            amount=str(charge),
            extra={
                "chargedAmount": str(charge),
                "channelState": channel_state(channel),
            },
        )

    # --- refunds and claims ---

    async def refund(self, checked: CheckedVoucher, requirements: dict[str, Any]) -> SettleResponse:
        """A cooperative refund (:meth:`.Refunds.refund`)."""
        return await self.refunds.refund(checked, requirements)

    async def claim_once(self, *, withdrawing_only: bool = False) -> int:
        """One claim pass (:meth:`.ClaimLoop.claim_once`): the channels claimed."""
        return await self.claims.claim_once(withdrawing_only=withdrawing_only)

    async def claim_forever(self) -> None:
        await self.claims.claim_forever()


def channel_state(channel: Channel) -> dict[str, Any]:
    """The ``channelState`` the seller reports of ``channel`` (a refund's answer, the
    corrective 402)."""
    return {
        "channelId": channel.channel_id,
        "balance": str(channel.balance),
        "totalClaimed": str(channel.total_claimed),
        "withdrawRequestedAt": channel.withdraw_requested_at,
        "refundNonce": "0",
        "chargedCumulativeAmount": str(channel.charged),
    }
