"""A payer's timed withdrawal, learnt from the settlement contract's events (server-only).

The contract's escape hatch: the payer requests a withdrawal (``initiateWithdraw``) and after
the channel's ``withdrawDelay`` finishes it (``finalizeWithdraw``), taking what the seller has
not claimed by then. Vouchers served and not claimed by that time are lost, and vouchers served
after it are never claimable. So the claimer, on each pass, scans the contract's events that
start, end or change a withdrawal (``WithdrawInitiated``, ``Withdrawn``, ``Refunded``,
``Deposited``) from the last block it scanned, in bounded block ranges (resumable: the place
is kept in the ledger, ``bs_scan``), and for each of this ledger's channels they name reads
the contract's views (``pendingWithdrawals``, ``channels``) at the newest block and mirrors
them: the withdrawal pending (``withdraw_requested_at``, its amount, and when it can finish
by this host's clock) and the balance (lowered once it finished). Events only say which
channels to read; the views are the truth, so readings are idempotent and order-free. The
channels whose withdrawal is pending are read again, least recently read first, in pages while
the pass's budget lasts (the next pass goes on with the rest), and so are those mirrored from a
block above the newest (a chain that fell back: readings.py).

A range the endpoint refuses is asked again smaller; a block it refuses on its own is never
skipped unread (:meth:`WithdrawalScan._refused`).

The place is stamped with its block's hash (ledger v17): one reorganised away is taken as no
place at all (a first scan, below), since the blocks that replaced the scanned ones start from
a fork point the scan cannot know.

The first scan of a ledger starts at the newest block and reads the channels already there
(those holding more than was claimed), so a withdrawal requested before the
scan existed is learnt too (as many pages a pass as its time budget allows).

The chain's clock is its newest block's timestamp; a chain running ahead of this host's clock
(a block producer's skew, or a test chain whose time was moved) brings a withdrawal's due time
earlier by as much; one behind (an idle chain's last block is old) is never taken to delay it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from paygate.x402.schemes.batch_settlement import readings
from paygate.x402.schemes.batch_settlement.chain import (
    WITHDRAW_REQUESTED,
    WITHDRAWN,
    ChannelChain,
    Head,
    LogsBehind,
)
from paygate.x402.schemes.batch_settlement.store import Channel, ChannelStore, Stamp
from paygate.x402.settler import SettlerUnavailable

log = logging.getLogger("paygate.x402")

# Blocks asked for in one eth_getLogs (public RPC endpoints cap a range near this), and the
# ranges one pass scans at most: as many as its time budget allows (a claimer far behind —
# the gateway down for a week is 300,000 of Base's 2-second blocks — must catch up within a
# withdrawal's delay: a request in the newest blocks is learnt only once the scan gets there;
# ten ranges a pass took over an hour), a claimer further behind catching up over passes.
RANGE_BLOCKS = 2_000
MAX_RANGES = 1_000  # (a range refused by the endpoint is asked again a quarter the size)
SCAN_SECONDS = 60.0  # a pass's budget for the ranges (the claim loop's lease bounds it lower)
# Channel ids looked up in the ledger in one query (the events name any receiver's channels).
KNOWN_BATCH = 500
# Blocks scanned again each pass: an event in a block reorganised away and mined again in a
# later block at or below the last one scanned is still seen.
REORG_BLOCKS = 8
# Channels read per page by the first scan's check of the channels already in the ledger, and
# by the re-read of those whose withdrawal is pending (pages while the pass's budget lasts).
CHECK_PAGE = 100
WITHDRAWING_PAGE = 100
# Blocks above the newest (a chain that fell back), and blocks after the place, whose
# mirrors a pass checks (and channels read again of each block proven gone).
READ_ABOVE = 500
_NO_BLOCK = 2**63 - 1  # above every block (a BIGINT's largest)
# Passes in a row one block's events may be refused (the range split down to that block alone)
# before the scan passes over it and reads every channel's withdrawal instead (the first
# scan's check): see WithdrawalScan._refused.
REFUSED_PASSES = 3


@runtime_checkable
class WithdrawalEvents(Protocol):
    """What the scan reports (metrics: paygate.server.metrics). A scan that fails serves
    vouchers on (it fails open), so its failures and its lag must be seen elsewhere than in a
    log line. Each call must be cheap and never raise."""

    def withdrawal_scanned(self, behind: int, pending: int) -> None:
        """A pass scanned: ``behind`` blocks between the chain's newest block and the last
        one it scanned, ``pending`` channels whose payer's withdrawal is pending (as read)."""
        ...

    def withdrawal_scan_failed(self) -> None:
        """A pass's scan failed (the RPC or the ledger down): retried at the next wake."""
        ...

    def withdrawal_block_refused(self) -> None:
        """The endpoint refused the events of one block (its scan stops before it this pass:
        asked again next pass, and after :data:`REFUSED_PASSES` passes replaced by reading
        every channel's withdrawal)."""
        ...


class NoWithdrawalEvents:
    """Reports nowhere."""

    def withdrawal_scanned(self, behind: int, pending: int) -> None:
        return None

    def withdrawal_scan_failed(self) -> None:
        return None

    def withdrawal_block_refused(self) -> None:
        return None


class WithdrawalScan:
    def __init__(
        self,
        store: ChannelStore,
        chain: ChannelChain,
        *,
        clock: Callable[[], float],
        events: WithdrawalEvents | None = None,
    ) -> None:
        self.store = store
        self.chain = chain
        self._clock = clock
        self.events: WithdrawalEvents = events or NoWithdrawalEvents()  # where it reports
        self._refusals: tuple[int, int] | None = None  # (a block refused, passes in a row)

    async def scan(self, budget: float = SCAN_SECONDS) -> int:
        """One pass (the claim lease held): the channels whose withdrawal state was read.
        Ranges are scanned for ``budget`` seconds at most (at least one range). Reported to
        :attr:`events` when it ends, or fails."""
        try:
            return await self._scan(budget)
        except Exception:
            self.events.withdrawal_scan_failed()
            raise

    async def _scan(self, budget: float) -> int:
        give_up = time.monotonic() + budget
        head = await self.chain.head()
        place = await self.store.scan_place()
        if place is not None and await readings.gone(self.chain, place[0]):
            # The chain fell back or forked below the place: the events of the blocks that
            # replaced the scanned ones are unread, from a fork point unknown. Taken as a
            # first scan: from the newest block on, every channel there is read at it.
            log.warning("the withdrawal scan's place was reorganised away: channels re-read")
            place = None
        if place is None:  # the first scan: from here on, and the channels there are checked
            place = (head.stamp, "")
            await self.store.scanned(head.stamp, "")
        place_at, checked_after = place
        scanned = place_at.block
        ids: set[str] = set()
        last = scanned
        first = max(0, scanned + 1 - REORG_BLOCKS)
        size = RANGE_BLOCKS
        stuck: int | None = None  # a block refused on its own, not passed over
        for _ in range(MAX_RANGES):
            if first > head.block or (last > scanned and time.monotonic() > give_up):
                break
            end = min(first + size - 1, head.block)
            try:
                moves = await self.chain.withdrawal_moves(first, end)
            except LogsBehind:
                # A node behind answered (its events stop short of the range's end): neither
                # a refusal to split nor a block to pass over. The place stays before it.
                log.warning("the RPC node answering the withdrawal events is behind block %d", end)
                break
            except SettlerUnavailable:
                if end > first:
                    # An endpoint refusing the range (too many logs, too many blocks): smaller.
                    size = max(1, (end - first + 1) // 4)
                    continue
                if not await self._refused(first, last, scanned, place_at, head):
                    stuck = first  # the place stays before it: asked again next pass
                    break
                checked_after = ""  # (persisted by _refused with the place past it)
                last = max(last, first)
                first += 1
                continue
            if self._refusals is not None and first <= self._refusals[0] <= end:
                self._refusals = None  # answered after all
            size = min(RANGE_BLOCKS, size * 2)  # back up after a refused range's split
            last = end
            starts = {cid for cid, topic in moves if topic in (WITHDRAW_REQUESTED, WITHDRAWN)}
            named = sorted({cid for cid, _ in moves})
            for at in range(0, len(named), KNOWN_BATCH):
                for channel in await self.store.known(named[at : at + KNOWN_BATCH]):
                    # A refund's or deposit's event matters only to a withdrawal already known.
                    if channel.channel_id in starts or channel.withdraw_due is not None:
                        ids.add(channel.channel_id)
            first = last + 1
        # Mirrors read above the newest block: a chain that fell back below a deposit's block
        # (reorganised away) is read again here, at each wake — an owed channel waits for the
        # claim interval's pass, and one that owes nothing for no pass at all. Once the chain
        # proves their block gone (readings.gone), one proof a block: a node behind names
        # such a "newest" too, and its readings of them all, older, would change nothing.
        for stamp in await self.store.stamps_between(head.block, _NO_BLOCK, READ_ABOVE):
            if await readings.gone(self.chain, stamp):
                ids.update(c.channel_id for c in await self.store.read_at(stamp, READ_ABOVE))
        # Mirrors read since the place, at a block the chain has since replaced (the usual
        # reorganisation: the newest blocks replaced by as many or more, a top-up's among
        # them): neither the place (still on the chain) nor the newest block tells it, and
        # a wake would leave the top-up served on until the claim interval read the channel.
        # One header a block read at; a node that lacks the block (behind) has them read
        # too: the next pass's window starts past them, and a reading at the newest block
        # replaces the row's only when newer or the row's block proven gone (readings.py).
        # Below the place, a block replaced means the place was too: the first scan's check
        # above reads them all.
        for stamp in await self.store.stamps_between(scanned, head.block, READ_ABOVE):
            now = await self.chain.stamp(stamp.block)
            if now is None or now.hash != stamp.hash:
                log.warning("channels mirrored from a block no longer on the chain: read again")
                replaced = await self.store.read_at(stamp, READ_ABOVE)
                ids.update(c.channel_id for c in replaced)
        read = 0
        pending: set[str] = set()  # channels read with a withdrawal pending
        wanted = sorted(ids)
        for at in range(0, len(wanted), KNOWN_BATCH):
            for channel in await self.store.known(wanted[at : at + KNOWN_BATCH]):
                if await self._read(channel, head):
                    pending.add(channel.channel_id)
                read += 1
        # The withdrawals known are read again: their due time follows the chain's clock, and
        # a finish whose event a lagging node had not returned yet is still seen. Least
        # recently read first, pages while the budget lasts (one at least): thousands pending
        # would hold the lease past its time; the next pass goes on with the rest (each
        # reading moves the channel to the back). The events' channels above are read
        # whatever the budget: the place moves past their events.
        done = set(wanted)
        while True:
            page = [
                c
                for c in await self.store.withdrawing(WITHDRAWING_PAGE + len(done))
                if c.channel_id not in done
            ][:WITHDRAWING_PAGE]
            for channel in page:
                if await self._read(channel, head):
                    pending.add(channel.channel_id)
                done.add(channel.channel_id)
            read += len(page)
            if len(page) < WITHDRAWING_PAGE or time.monotonic() > give_up:
                break
        # The first scan's check, pages while the budget lasts (one at least): a ledger of
        # thousands of channels checked a page a wake took longer than a withdrawal's delay.
        while checked_after is not None:
            page = await self.store.unspent_after(checked_after, CHECK_PAGE)
            for channel in page:
                if await self._read(channel, head):
                    pending.add(channel.channel_id)
            read += len(page)
            checked_after = page[-1].channel_id if len(page) == CHECK_PAGE else None
            if checked_after is not None and time.monotonic() > give_up:
                break
            if checked_after is not None:  # its place kept, should this claimer die
                await self.store.scanned(
                    await self._stamp(max(last, scanned), place_at, head), checked_after
                )
        await self.store.scanned(
            await self._stamp(max(last, scanned), place_at, head), checked_after
        )
        if stuck is not None:  # the rest of the pass done, but a failed scan (its metrics)
            raise SettlerUnavailable(f"the RPC refuses the withdrawal events of block {stuck}")
        self.events.withdrawal_scanned(max(0, head.block - max(last, scanned)), len(pending))
        return read

    async def _refused(
        self, block: int, last: int, scanned: int, place_at: Stamp, head: Head
    ) -> bool:
        """The endpoint refused ``block``'s events alone: whether to pass over it.

        Its events cannot be skipped: a withdrawal requested in it and never learnt lets
        vouchers be served that its finish takes. Nor may it stop the scan for good (every
        withdrawal after it unlearnt). So it is asked again for :data:`REFUSED_PASSES`
        passes in a row (a node's passing fault; the pass goes on with the re-reads, then
        fails as a scan: a withdrawal after that block is not learnt yet), each logged and
        counted; then the scan passes over
        it and reads every channel holding unclaimed money instead (the first scan's check:
        the contract's views at the newest block hold whatever that block's events would
        have named), the place past it and the check persisted in one write. The count is
        this claimer's (in memory): another, or a restart, counts again — a few passes more,
        never a block passed over unchecked."""
        passes = self._refusals[1] + 1 if self._refusals and self._refusals[0] == block else 1
        self.events.withdrawal_block_refused()
        if passes < REFUSED_PASSES:
            self._refusals = (block, passes)
            log.error(
                "the RPC refuses the withdrawal events of block %d (%d of %d passes):"
                " scanned up to it, asked again next pass",
                block,
                passes,
                REFUSED_PASSES,
            )
            return False
        self._refusals = None
        log.error(
            "the RPC refuses the withdrawal events of block %d %d passes in a row: passed"
            " over, every channel's withdrawal read instead",
            block,
            passes,
        )
        await self.store.scanned(await self._stamp(max(last, scanned, block), place_at, head), "")
        return True

    async def _stamp(self, block: int, place: Stamp, head: Head) -> Stamp:
        """Block ``block`` (the place the scan got to) stamped: as the place or the newest block
        it is, else as the chain holds it (hash not known when the node lacks it: a place that
        is then never taken for reorganised away)."""
        for known in (head.stamp, place):
            if known.block == block:
                return known
        return await self.chain.stamp(block) or Stamp(block, None)

    async def _read(self, channel: Channel, head: Head) -> bool:
        """Mirror the channel's withdrawal and balance as the contract holds them at ``head``:
        whether a withdrawal is pending."""
        on_chain = await self.chain.state(channel.channel_id, since=head.block)
        await readings.refunded(self.store, self.chain, channel.channel_id, on_chain)
        return await mirror_withdrawal(self.store, self.chain, channel, head, self._clock)


async def mirror_withdrawal(
    store: ChannelStore,
    chain: ChannelChain,
    channel: Channel,
    head: Head | None,
    clock: Callable[[], float],
) -> bool:
    """Mirror the payer's withdrawal pending on ``channel`` as the contract holds it at
    ``head`` (None: the newest block): whether one is pending."""
    head = head or await chain.head()
    if channel.withdraw_due is not None and head.timestamp <= channel.withdraw_requested_at:
        # Read at a block no later than the request known (a load-balanced RPC's node behind
        # named it the newest): it shows none pending, or an older one — neither ends nor
        # replaces that request (cleared, its vouchers' cap would go, and its events are
        # behind the scan's place). A block of the request's second may be before it too.
        return True
    pending = await chain.pending_withdrawal(channel.channel_id, head.block)
    if pending.amount == 0:
        if channel.withdraw_due is not None:  # the one known ended (unless a newer one since)
            await store.withdrawal_ended(
                channel.channel_id,
                requested_at=channel.withdraw_requested_at,
                amount=channel.withdraw_amount,
            )
        return False
    ahead = max(0.0, head.timestamp - clock())
    if channel.withdraw_due is None:
        log.warning("a payer requested a withdrawal from a channel: claimed first")
    await store.withdrawal(
        channel.channel_id,
        requested_at=pending.requested_at,
        amount=pending.amount,
        due=pending.requested_at + channel.config.withdraw_delay - ahead,
    )
    return True
