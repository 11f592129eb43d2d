"""The gateway's batched claims: every ``claim_interval`` seconds (sooner when ``max_per_claim``
channels are owed), the latest voucher of up to ``max_per_claim`` channels claimed in one
transaction, under the claim lease (one claimer among the replicas).

A claim is recorded ``settled`` only when the chain proves it; a claim left open by a claimer
that died is proven or sent again by the next one (a claim at or below the channel's on-chain
total is a no-op, so nothing is ever claimed twice). Each channel claimed is read on chain
first and its mirror follows that reading (a payer's finished withdrawal).

Each pass also scans the contract's withdrawal events (:mod:`.withdrawals`), and the loop
wakes at least every :func:`scan_every` seconds (a third of the withdraw delay less
:data:`WITHDRAW_MARGIN`, or the claim interval if shorter): a channel whose payer's withdrawal
is pending and would take part of what it owes (:attr:`.Channel.at_risk`) is claimed at the
next wake, before it can finish, however long the claim interval. One owing no more than the
withdrawal leaves waits for the claim interval: the finish cannot take it, and a payer keeping
a small withdrawal pending while spending under it would otherwise cost a claim a wake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from web3.exceptions import Web3Exception

from paygate.x402.schemes.batch_settlement import readings
from paygate.x402.schemes.batch_settlement.chain import ChannelChain
from paygate.x402.schemes.batch_settlement.store import Channel, ChannelStore, Claim, ClaimEntry
from paygate.x402.schemes.batch_settlement.withdrawals import SCAN_SECONDS, WithdrawalScan
from paygate.x402.settler import SettlementUnknown, SettlerUnavailable

log = logging.getLogger("paygate.x402")

# Seconds a channel's voucher must be claimable before its payer's withdrawal can finish:
# the claim's transaction mined, this host's clock against the chain's and the replicas'.
WITHDRAW_MARGIN = 120.0
# Longest a pass renews its claim lease (ClaimLoop._hold): one hung past it lets the lease lapse.
MAX_PASS_SECONDS = 600.0
# Claim transactions one pass sends at most for channels whose withdrawal is pending (each of
# max_per_claim channels; the rest at the next wake, soonest due first).
MAX_WITHDRAWING_BATCHES = 10


def scan_every(claim_interval: float, withdraw_delay: int) -> float:
    """How often the claim loop wakes to scan withdrawals and claim withdrawing channels:
    three wakes within a withdrawal's delay (less the margin), so one learns it and the next
    claims its channel with time to spare."""
    return min(claim_interval, max(1.0, (withdraw_delay - WITHDRAW_MARGIN) / 3))


class ClaimLoop:
    def __init__(
        self,
        store: ChannelStore,
        chain: ChannelChain,
        *,
        replica: str,
        claim_interval: float,
        max_per_claim: int,
        withdraw_delay: int = 900,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.chain = chain
        self.replica = replica
        self.claim_interval = claim_interval
        self.max_per_claim = max_per_claim
        self.scan_every = scan_every(claim_interval, withdraw_delay)
        # The claim lease, renewed while a pass runs (:meth:`_hold`), so a claimer that died
        # holds it this long — half a wake: a withdrawal requested as one claimer dies, and
        # the next to take the lease dies too, is still learnt and claimed by the third at
        # lease + wake + lease + wake = three wakes, the margin left (as with one death).
        self.lease = max(self.scan_every / 2, 30.0)
        self.renew_every = self.lease / 3  # (seconds of the event loop's clock)
        self.withdrawals = WithdrawalScan(store, chain, clock=clock)
        self._owed = asyncio.Event()  # set when a claim is worth sending before the interval
        self._charged_since: set[str] = set()  # channels charged here since the last claim

    def charged(self, channel_id: str) -> None:
        """A charge committed here: with enough channels owed for a full claim, claim now
        rather than at the interval (counted in memory: no ledger read on the request's
        path)."""
        self._charged_since.add(channel_id)
        if len(self._charged_since) >= self.max_per_claim:
            self._owed.set()

    async def claim_once(self, *, withdrawing_only: bool = False) -> int:
        """Under the claim lease: finish claims left open, scan the payers' withdrawals, then
        claim up to ``max_per_claim`` owed channels (those a pending withdrawal would take
        from first; with ``withdrawing_only``, only those) in one transaction and prove it —
        and while such channels fill a claim, more claims of them (at most
        :data:`MAX_WITHDRAWING_BATCHES` in all). Returns the channels claimed."""
        # Let go at the end of the pass; a claimer that died in one holds it this long: scaled
        # to the wakes, not the claim interval (a withdrawal must be learnt within its delay).
        lease = self.lease
        if not await self.store.take_claimer(self.replica, lease):
            return 0
        lost = asyncio.Event()  # set by a renewal that found the lease taken
        holding = asyncio.create_task(self._hold(lease, lost))
        try:
            for claim in await self.store.open_claims():
                await self._finish(claim)
            try:
                # A quarter of the lease: the claims after it must land within the margin
                # (a third claimer after two deaths scans, then claims, three wakes in).
                await self.withdrawals.scan(budget=min(SCAN_SECONDS, lease / 4))
            except (SettlerUnavailable, Web3Exception, OSError, TimeoutError) as exc:
                log.error("withdrawal scan failed: %s", type(exc).__name__)
            # Channels a pending withdrawal would take from first (soonest due), then — at
            # the claim interval — those owing otherwise. A withdrawing channel owing no more
            # than the withdrawal leaves is not claimed at a wake: the finish cannot take it.
            # Lapsed in the pass (frozen past it) and taken: that claimer claims, not this one
            # beside it (renewed here too: a pass just woken may get here before _hold does).
            if lost.is_set() or not await self.store.take_claimer(self.replica, lease):
                log.error("claim lease lost during the pass: its claims left to the holder")
                return 0
            owed = await self.store.at_risk(self.max_per_claim)
            if not withdrawing_only and len(owed) < self.max_per_claim:
                ids = {c.channel_id for c in owed}
                more = await self.store.claimable(self.max_per_claim)
                owed += [c for c in more if c.channel_id not in ids][
                    : self.max_per_claim - len(owed)
                ]
            claimed = await self._claim(owed)
            # More channels at risk than one claim takes (a payer who opened many and
            # withdraws from all at once): each is lost unless claimed before its finish, so
            # this pass claims them all, a transaction per max_per_claim — bounded, and each
            # batch must land (one that claims nothing ends the pass: the next wake retries).
            tried = {c.channel_id for c in owed}
            for _ in range(MAX_WITHDRAWING_BATCHES - 1):
                if not claimed or len(owed) < self.max_per_claim or not owed[-1].at_risk:
                    break
                owed = await self.store.at_risk(self.max_per_claim + len(tried))
                owed = [c for c in owed if c.channel_id not in tried][: self.max_per_claim]
                if not owed:  # (one not proven: next wake)
                    break
                tried.update(c.channel_id for c in owed)
                if not await self.store.take_claimer(self.replica, lease):  # renewed
                    break  # lapsed and taken: that claimer goes on
                done = await self._claim(owed)
                if not done:
                    break
                claimed += done
            return claimed
        finally:
            holding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holding
            await self.store.let_go_claimer(self.replica)

    async def _hold(self, lease: float, lost: asyncio.Event) -> None:
        """Renew the claim lease every third of it while the pass runs (for at most
        :data:`MAX_PASS_SECONDS`): a pass's scan and claims (each transaction waited for) may
        outlast the short lease, which must not lapse to another claimer meanwhile. A claimer
        that dies or freezes stops renewing with it; one found taken on waking sets ``lost``."""
        loop = asyncio.get_running_loop()
        stop = loop.time() + MAX_PASS_SECONDS
        while loop.time() < stop:
            await asyncio.sleep(self.renew_every)
            try:
                if not await self.store.take_claimer(self.replica, lease):
                    lost.set()  # lapsed and taken: that claimer goes on, this pass sends none
                    return
            except Exception as exc:  # the ledger's passing failure: renewed at the next turn
                # (giving up here let a pass that outlived it share the lease with another
                # claimer: the same claims sent twice, the scan's place written by both)
                log.error("claim lease not renewed: %s", type(exc).__name__)

    async def _claim(self, owed: list[Channel]) -> int:
        """Claim ``owed`` in one transaction and prove it: the channels claimed."""
        if not owed:
            return 0
        entries = []
        for c in owed:
            # The chain's word on the channel now: a payer's finished withdrawal lowers the
            # balance under what was charged; claiming more would revert the whole batch.
            # The mirror follows, so later vouchers past it are refused — written with
            # its block even when it agrees, so that a reading older than it (a top-up's,
            # taken before the withdrawal and written after) cannot undo it. One write per
            # owed channel a pass (at most max_per_claim); one that only agrees moves no
            # version, so a request's charge in flight keeps its compare-and-set.
            on_chain = await self.chain.state(c.channel_id)
            # Its claims as read too (never lowered, but by a reading that replaces one of a
            # block reorganised away: a claim mined there is owed again).
            await readings.refunded(self.store, self.chain, c.channel_id, on_chain)
            total = min(c.charged, on_chain.balance)
            if total < c.charged:
                log.warning(
                    "a channel holds less than was charged: %d unclaimable", c.charged - total
                )
            if total > on_chain.total_claimed:
                entries.append(ClaimEntry(c.channel_id, c.config, c.signed_max, c.signature, total))
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

    async def _finish(self, claim: Claim) -> None:
        try:
            proven = await self.chain.proven_claim(claim.tx_hash, claim.entries)
        except (SettlementUnknown, SettlerUnavailable):
            return  # no answer yet: the next pass asks again
        if proven:
            for entry in claim.entries:
                await self.store.claimed(entry.channel_id, entry.total)
            await self.store.claim_moved(claim.id, "settled", None)
            count = len(claim.entries)
            log.info(
                "claim %s settled on chain: %d channel%s",
                claim.tx_hash,
                count,
                "" if count == 1 else "s",
            )
            return
        # Not (or not all) on chain: a reverted or never-sent claim. Drop it; the channels are
        # still owed and the next claim takes them again.
        log.warning("claim not proven on chain; the channels will be claimed again")
        await self.store.claim_moved(claim.id, "failed", None)

    async def claim_forever(self) -> None:
        loop = asyncio.get_running_loop()
        last_claim = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._owed.wait(), self.scan_every)
            # Between claim intervals a wake scans and claims only withdrawing channels.
            full = self._owed.is_set() or loop.time() - last_claim >= self.claim_interval
            if full:
                self._owed.clear()
                self._charged_since.clear()
                last_claim = loop.time()
            try:
                await self.claim_once(withdrawing_only=not full)
            except Exception as exc:  # a loop that must outlive one bad pass
                log.error("claim pass failed: %s", type(exc).__name__)
