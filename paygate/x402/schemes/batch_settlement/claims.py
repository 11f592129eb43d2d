"""The gateway's side of its channels: deposits, charges, batched claims and refunds.

:class:`Channels` joins the ledger's channel state (:mod:`.store`) and the chain
(:mod:`.chain`). Requests call :meth:`Channels.deposit`, :meth:`~Channels.take` and
:meth:`~Channels.commit`; :meth:`~Channels.claim_forever` runs beside the reconciler and, every
``claim_interval`` seconds (sooner when ``max_per_claim`` channels are owed), claims the latest
voucher of up to ``max_per_claim`` channels in one transaction, under the claim lease (one
claimer among the replicas). A claim is recorded ``settled`` only when the chain proves it; a
claim left open by a claimer that died is proven or sent again by the next one (a claim at or
below the channel's on-chain total is a no-op, so nothing is ever claimed twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from paygate.x402.ledger import LedgerError, SchemeWrite
from paygate.x402.models import SettleResponse
from paygate.x402.schemes.base import PaymentRejected, SchemeSql
from paygate.x402.schemes.batch_settlement.chain import ChannelChain, Deposit, Refund
from paygate.x402.schemes.batch_settlement.store import (
    Channel,
    ChannelBusy,
    ChannelStore,
    Claim,
    ClaimEntry,
    charged,
    taken,
)
from paygate.x402.schemes.batch_settlement.verify import (
    BUSY,
    NO_CHANNEL,
    CheckedVoucher,
    check_against,
)
from paygate.x402.settler import SettlementUnknown, SettlerUnavailable

log = logging.getLogger("paygate.x402")

_TAKEN_MAX = 4096  # requests in progress whose taken channel is remembered
REFUND_NO_BALANCE = "invalid_batch_settlement_evm_refund_no_balance"
REFUND_AMOUNT_INVALID = "invalid_batch_settlement_evm_refund_amount_invalid"


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
        self._owed = asyncio.Event()  # set when a claim is worth sending before the interval
        self._charged_since: set[str] = set()  # channels charged here since the last claim
        # Each request's channel as it took it (by voucher), for its commit's compare-and-set;
        # a hint only: the commit re-reads whenever the channel changed since.
        self._taken: dict[str, Channel] = {}
        self._deposits: set[asyncio.Task[Channel]] = set()  # deposits finishing (shielded)
        # The vouchers whose deposit is finishing, by voucher key (how many at once): their
        # hold on the channel is the deposit's own, let go by it once the mirror is written.
        self._depositing: dict[str, int] = {}

    # --- requests ---

    async def deposit(
        self, checked: CheckedVoucher, payment: dict[str, Any], requirements: dict[str, Any]
    ) -> Channel:
        """Send and prove the payment's deposit, then mirror the channel (PaymentRejected when
        the chain refuses it; SettlerUnavailable/SettlementUnknown when it cannot be asked).

        Shielded: once sent, the deposit's money moves whether or not the caller waits, so a
        request cut short (the caller gone) still finishes its proof and its mirror — the
        channel's balance in the ledger never misses money that is in the contract."""
        key = checked.voucher_key
        task = asyncio.ensure_future(self._deposit(checked, payment, requirements))
        self._deposits.add(task)
        self._depositing[key] = self._depositing.get(key, 0) + 1
        task.add_done_callback(functools.partial(self._deposit_done, key))
        return await asyncio.shield(task)

    def _deposit_done(self, key: str, task: asyncio.Task[Channel]) -> None:
        self._deposits.discard(task)
        left = self._depositing.pop(key, 1) - 1
        if left:
            self._depositing[key] = left
        if not task.cancelled() and task.exception() is not None:
            # Its request's answer, when it still waits; logged for a request gone.
            log.debug("deposit ended: %s", type(task.exception()).__name__)

    async def _deposit(
        self, checked: CheckedVoucher, payment: dict[str, Any], requirements: dict[str, Any]
    ) -> Channel:
        try:
            state = await self.chain.deposit(
                Deposit(payment, requirements, checked.payload, checked.channel_id)
            )
        except ValueError as exc:
            raise PaymentRejected(str(exc), "the deposit was refused on chain") from None
        except SettlementUnknown as exc:
            raise SettlerUnavailable(f"the deposit's outcome is unknown: {exc}") from None
        exists, held = await self._hold_for_mirror(checked)
        try:
            if exists:
                # The deposit's own reading may predate a refund made since (mirrored before
                # this write): raised to, it would put back money the contract no longer holds
                # — vouchers served that no claim can pay. Read under the hold instead: no
                # refund runs meanwhile (it holds the channel from its chain read to its
                # mirror) and any before it is on chain already, so the balance is set to this
                # reading (lower too: a withdrawal not mirrored yet). No channel yet: no refund
                # can have been made; the proof's reading stands.
                try:
                    state = await self.chain.state(checked.channel_id)
                except SettlementUnknown as exc:
                    raise SettlerUnavailable(f"the channel cannot be read: {exc}") from None
            return await self.store.deposited(
                checked.channel_id,
                str(requirements["network"]),
                checked.payload.channel_config,
                balance=state.balance,
                total_claimed=state.total_claimed,
                exact=held,
                block=state.block,
            )
        finally:
            if held:  # its request takes it again at verify; a caller gone leaves it free
                try:
                    await self.store.release(checked.channel_id, checked.voucher_key)
                except LedgerError as exc:  # the request's own take finds it its own
                    log.warning("a deposit's hold not let go: %s", exc.code)

    async def _hold_for_mirror(self, checked: CheckedVoucher) -> tuple[bool, bool]:
        """(the channel exists, it is held for this deposit's mirror), waiting while another
        request holds it — at most until such a hold runs out (``pending_seconds``); past
        that, written unheld from a fresh reading all the same (logged)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pending_seconds + 1.0
        pause = 0.05
        while True:
            try:
                channel = await self.store.take(checked.channel_id, checked.voucher_key)
                return channel is not None, channel is not None
            except ChannelBusy:
                if loop.time() >= deadline:
                    log.warning("a deposit's mirror found its channel held past its lease")
                    return True, False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

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
            channel = await _unless_busy(self.store.take_reserved(checked.channel_id, key, key))
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
        if checked.voucher_key in self._depositing:
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
        # Enough channels owed for a full claim: claim now rather than at the interval (counted
        # in memory: no ledger read on the request's path).
        self._charged_since.add(checked.channel_id)
        if len(self._charged_since) >= self.max_per_claim:
            self._owed.set()
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

    # --- refunds ---

    async def refund(self, checked: CheckedVoucher, requirements: dict[str, Any]) -> SettleResponse:
        """A cooperative refund: claim what was charged and return (part of) the rest, in one
        transaction. PaymentRejected when it cannot be done."""
        payload = checked.payload
        # A refund is no payment: its hold is its own, let go below.
        channel = await _unless_busy(self.store.take(checked.channel_id, checked.voucher_key))
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
                raise PaymentRejected(
                    "invalid_batch_settlement_evm_refund_transaction_failed",
                    "the refund's outcome is not known yet: ask again",
                ) from None
            try:
                await self.store.refunded(
                    checked.channel_id, after.balance, after.total_claimed, block=after.block
                )
            except LedgerError:
                # The money moved, its mirror did not: the channel stays held meanwhile (a
                # voucher past the contract's balance is refused busy, never taken), and the
                # refund asked again mirrors the chain first (_as_on_chain).
                release = False
                raise
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

    async def _as_on_chain(self, channel: Channel) -> Channel:
        """``channel`` as the contract holds it now (a refund is a chain operation: one read
        more), its mirror corrected where it differs (a refund or deposit whose mirror was
        lost). PaymentRejected when the chain cannot be read."""
        try:
            on_chain = await self.chain.state(channel.channel_id)
        except (SettlementUnknown, SettlerUnavailable):
            raise PaymentRejected(
                "invalid_batch_settlement_evm_refund_transaction_failed",
                "the channel cannot be read on chain now: ask again",
            ) from None
        if (on_chain.balance, on_chain.total_claimed) == (channel.balance, channel.total_claimed):
            return channel
        await self.store.refunded(
            channel.channel_id, on_chain.balance, on_chain.total_claimed, block=on_chain.block
        )
        return dataclasses.replace(
            channel,
            balance=on_chain.balance,
            total_claimed=max(on_chain.total_claimed, channel.total_claimed),
        )

    # --- claims ---

    async def claim_once(self) -> int:
        """Under the claim lease: finish claims left open, then claim up to ``max_per_claim``
        owed channels in one transaction and prove it. Returns the channels claimed."""
        lease = max(self.claim_interval, 30.0) * 2
        if not await self.store.take_claimer(self.replica, lease):
            return 0
        try:
            for claim in await self.store.open_claims():
                await self._finish(claim)
            owed = await self.store.claimable(self.max_per_claim)
            if not owed:
                return 0
            entries = []
            for c in owed:
                # The chain's word on the channel now: a payer's finished withdrawal lowers the
                # balance under what was charged; claiming more would revert the whole batch.
                # The mirror follows, so later vouchers past it are refused — written with
                # its block even when it agrees, so that a reading older than it (a top-up's,
                # taken before the withdrawal and written after) cannot undo it.
                on_chain = await self.chain.state(c.channel_id)
                await self.store.refunded(
                    c.channel_id, on_chain.balance, c.total_claimed, block=on_chain.block
                )
                total = min(c.charged, on_chain.balance)
                if total < c.charged:
                    log.warning(
                        "a channel holds less than was charged: %d unclaimable", c.charged - total
                    )
                if total > on_chain.total_claimed:
                    entries.append(
                        ClaimEntry(c.channel_id, c.config, c.signed_max, c.signature, total)
                    )
                elif on_chain.total_claimed > c.total_claimed:
                    await self.store.claimed(c.channel_id, on_chain.total_claimed)
            if not entries:
                return 0
            claim = await self.store.new_claim(uuid.uuid4().hex, entries)
            try:
                tx_hash = await self.chain.send_claim(entries)
            except SettlementUnknown as exc:  # sent or not: the next pass proves it by state
                await self.store.claim_moved(claim.id, "pending", exc.transaction)
                return 0
            except ValueError as exc:
                log.error("claim refused before sending: %s: %s", exc, exc.__cause__)
                await self.store.claim_moved(claim.id, "failed", None)
                return 0
            await self.store.claim_moved(claim.id, "submitted", tx_hash)
            await self._finish(Claim(claim.id, "submitted", claim.entries, tx_hash))
            return len(entries)
        finally:
            await self.store.let_go_claimer(self.replica)

    async def _finish(self, claim: Claim) -> None:
        try:
            proven = await self.chain.proven_claim(claim.tx_hash, claim.entries)
        except (SettlementUnknown, SettlerUnavailable):
            return  # no answer yet: the next pass asks again
        if proven:
            for entry in claim.entries:
                await self.store.claimed(entry.channel_id, entry.total)
            await self.store.claim_moved(claim.id, "settled", None)
            log.info("claim settled: %d channels", len(claim.entries))
            return
        # Not (or not all) on chain: a reverted or never-sent claim. Drop it; the channels are
        # still owed and the next claim takes them again.
        log.warning("claim not proven on chain; the channels will be claimed again")
        await self.store.claim_moved(claim.id, "failed", None)

    async def claim_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._owed.wait(), self.claim_interval)
            self._owed.clear()
            self._charged_since.clear()
            try:
                await self.claim_once()
            except Exception as exc:  # a loop that must outlive one bad pass
                log.error("claim pass failed: %s", type(exc).__name__)


async def _unless_busy(taking: Awaitable[Channel | None]) -> Channel | None:
    """A take's channel; PaymentRejected ``…_channel_busy`` when another request holds it."""
    try:
        return await taking
    except ChannelBusy:
        raise PaymentRejected(BUSY, "another request on this channel is in progress") from None


def channel_state(channel: Channel) -> dict[str, Any]:
    """The ``channelState`` the seller reports of ``channel`` (a refund's answer, the
    corrective 402)."""
    return {
        "channelId": channel.channel_id,
        "balance": str(channel.balance),
        "totalClaimed": str(channel.total_claimed),
        "withdrawRequestedAt": 0,
        "refundNonce": "0",
        "chargedCumulativeAmount": str(channel.charged),
    }
