"""A channel's deposits as the gateway takes them: sent (or handed to the facilitator), proven
on chain and mirrored into the ledger, shielded from the request's cancellation.

A top-up's mirror is read on chain again while the deposit holds the channel (a refund holds it
from its chain reading to its mirror: a reading taken before one would put back money the
contract no longer holds); the hold is the deposit's own until its mirror is written
(:meth:`Deposits.finishing`), then let go for its request to take.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable
from typing import Any

from paygate.x402.ledger import LedgerError
from paygate.x402.schemes.base import PaymentRejected
from paygate.x402.schemes.batch_settlement import readings
from paygate.x402.schemes.batch_settlement.chain import ChannelChain, Deposit, Head
from paygate.x402.schemes.batch_settlement.store import Channel, ChannelBusy, ChannelStore, Stamp
from paygate.x402.schemes.batch_settlement.verify import CheckedVoucher
from paygate.x402.schemes.batch_settlement.withdrawals import mirror_withdrawal
from paygate.x402.settler import SettlementUnknown, SettlerUnavailable

log = logging.getLogger("paygate.x402")


class Deposits:
    def __init__(self, store: ChannelStore, chain: ChannelChain, *, pending_seconds: float) -> None:
        self.store = store
        self.chain = chain
        self.pending_seconds = pending_seconds
        self._tasks: set[asyncio.Task[Channel]] = set()  # deposits finishing (shielded)
        # The vouchers whose deposit is finishing, by voucher key (how many at once): their
        # hold on the channel is the deposit's own, let go by it once the mirror is written.
        self._depositing: dict[str, int] = {}

    def finishing(self, voucher_key: str) -> bool:
        """A deposit of this voucher is still finishing: the channel's hold is its own."""
        return voucher_key in self._depositing

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
        self._tasks.add(task)
        self._depositing[key] = self._depositing.get(key, 0) + 1
        task.add_done_callback(functools.partial(self._deposit_done, key))
        return await asyncio.shield(task)

    def _deposit_done(self, key: str, task: asyncio.Task[Channel]) -> None:
        self._tasks.discard(task)
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
                try:  # never older than the proof's reading (a node behind answering)
                    state = await self.chain.state(checked.channel_id, since=state.block)
                except SettlementUnknown as exc:
                    raise SettlerUnavailable(f"the channel cannot be read: {exc}") from None

            def write(orphaned: Stamp | None) -> Awaitable[Channel]:
                return self.store.deposited(
                    checked.channel_id,
                    str(requirements["network"]),
                    checked.payload.channel_config,
                    balance=state.balance,
                    total_claimed=state.total_claimed,
                    exact=held,
                    block=state.block,
                    block_hash=state.block_hash,
                    block_time=state.block_time,
                    orphaned=orphaned,
                )

            mirrored = await readings.mirror(self.chain, state, write)
            if not exists:
                # New to this ledger: a withdrawal its payer requested before (a channel
                # funded on chain first) is in blocks the claimer's scan may have passed
                # before the channel was this ledger's — read it now (withdrawals.py).
                # Read at the deposit's own reading's block (at or after the deposit's), not
                # at the newest as a node behind may name it — before the request, none seen.
                at = Head(state.block, state.block_time, state.block_hash)
                try:
                    await mirror_withdrawal(self.store, self.chain, mirrored, at, time.time)
                except (SettlerUnavailable, SettlementUnknown):
                    # Not read: marked withdrawing (nothing withheld: amount 0, so no voucher
                    # is refused for it) so that the next scan reads it — the scan re-reads
                    # withdrawing channels, and its events for this request may be behind it.
                    log.warning("a new channel's pending withdrawal not read: left to the scan")
                    await self.store.withdrawal(
                        checked.channel_id, requested_at=0, amount=0, due=time.time()
                    )
            return mirrored
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
