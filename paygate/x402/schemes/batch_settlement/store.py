"""Channel state in the payment ledger (both stores): channels, every voucher accepted, claims.

The ledger's ``bs_*`` tables (migration step 8) are reached through two store methods,
``scheme_sql(sql, params)`` (a statement in its own transaction) and ``scheme_sql_all`` (several
in one: a voucher's record with its charge), or as a ``SchemeWrite`` the ledger makes in the
transaction of a payment's reservation (the take) or of its SETTLED record (the charge), so
every change here is a compare-and-set on the row's ``version`` (or a guarded insert), never a
read-modify-write across statements. That is what lets replicas on one PostgreSQL ledger serve
one channel:

* a request takes the channel's *pending* lease (owner: its voucher) with its reservation (or
  at verify, when that found it held: then only while its payment is still reserved, so that
  whoever ends the reservation gives the hold back) and lets it go when its charge is
  committed; another voucher meanwhile is refused ``channel_busy`` (the spec: process a
  channel's requests one at a time). A lease left by a failed or dead request runs out after
  ``pending_seconds``; the same voucher sent again takes it back at once.
* a charge is committed only by a voucher above the one last committed (monotonic), with its
  row in ``bs_vouchers`` marked ``charged`` in the same transaction (ledger step 11): sent
  twice, the second commit finds it marked and changes nothing; a voucher the channel passed
  unmarked (its charge lost) is never taken as committed (:meth:`ChannelStore.commit`).
* one claimer at a time holds the claim lease (the ``bs_claims`` row ``claimer``).
* a channel's balance follows chain order: each chain reading is written with the block it was
  read at (``read_block``, ledger step 14; its hash and time, ``read_hash``/``read_time``, step
  17), and one older than the row's changes nothing of it — unless the row's block was proven
  reorganised away (``orphaned``: readings.py), when the reading replaces it.

Amounts are decimal text (uint128 does not fit SQLite's integer).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from paygate.errors import PaygateError
from paygate.singleton_lease import SingletonLease
from paygate.x402.ledger import LeaseLost, PaymentState, SchemeWrite
from paygate.x402.schemes.base import SchemeSql
from paygate.x402.schemes.batch_settlement.payload import ChannelConfig
from paygate.x402.settler import ReviewRequired

CLAIMER = "claimer"  # the claim lease's row in bs_claims
CLAIM_LEASE = SingletonLease("bs_claims", holder="owner", touched="updated_at")
# A voucher's charge lost and a later voucher committed without it: never chargeable.
CHARGE_LOST = "invalid_batch_settlement_evm_charge_lost"
# bs_vouchers.charged (ledger v11), as read by ``ChannelStore._marked``.
CHARGED = 1  # its charge is in the channel's total
UNKNOWN = -1  # recorded before v11 and not provably charged
NOT_RECORDED = -2  # no row (its charge was never made)
# Owing withdrawing channels read per query by :meth:`ChannelStore.at_risk`.
_RISK_PAGE = 200


@dataclass(frozen=True, slots=True)
class Stamp:
    """The block a chain reading was made at: its number, hash (0x hex; None: not known, a
    row from before ledger v17) and timestamp (0: not known)."""

    block: int
    hash: str | None
    time: int = 0


class ChannelBusy(PaygateError):
    """Another voucher holds the channel (its request is in progress)."""

    code = "channel_busy"
    message = "another request holds this payment channel"


@dataclass(frozen=True, slots=True)
class Channel:
    channel_id: str
    network: str
    payer: str
    config: ChannelConfig
    balance: int  # on chain: deposits minus refunds and withdrawals
    total_claimed: int  # on chain: what claims have proven
    charged: int  # what requests here have been charged in all (chargedCumulativeAmount)
    signed_max: int  # the last committed voucher's ceiling
    signature: str  # ... and its signature
    pending_owner: str | None
    pending_until: float | None
    version: int
    read_block: int = 0  # the chain block its balance was read at (0: none known, pre-v14)
    # The payer's timed withdrawal pending on chain (ledger v16; withdrawals.py): when it was
    # requested (the chain's clock; 0: none), its amount, and when it can finish (this ledger's
    # clock; None: none pending).
    withdraw_requested_at: int = 0
    withdraw_amount: int = 0
    withdraw_due: float | None = None
    # The block of ``read_block`` (ledger v17): its hash (None: not known) and timestamp.
    read_hash: str | None = None
    read_time: int = 0

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.read_block, self.read_hash, self.read_time)

    @property
    def unclaimed(self) -> int:
        return self.charged - self.total_claimed

    @property
    def at_risk(self) -> bool:
        """Its payer's pending withdrawal, finished, would take part of what is owed here
        (the finish takes its amount from what is unclaimed): claim before it is due."""
        return (
            self.withdraw_due is not None
            and self.charged > self.total_claimed
            and self.charged > self.balance - self.withdraw_amount
        )


_COLUMNS = (
    "channel_id, network, payer, config, balance, total_claimed, charged, signed_max, signature,"
    " pending_owner, pending_until, version, read_block, withdraw_requested_at, withdraw_amount,"
    " withdraw_due, read_hash, read_time"
)


@functools.lru_cache(maxsize=4096)
def _config(text: str) -> ChannelConfig:
    """A channel's config as stored (immutable: it is the channel's identity; the model is
    frozen, so one parse serves every read of the channel)."""
    return ChannelConfig.model_validate_json(text)


def _channel(row: tuple[Any, ...]) -> Channel:
    return Channel(
        channel_id=row[0],
        network=row[1],
        payer=row[2],
        config=_config(row[3]),
        balance=int(row[4]),
        total_claimed=int(row[5]),
        charged=int(row[6]),
        signed_max=int(row[7]),
        signature=row[8],
        pending_owner=row[9],
        pending_until=None if row[10] is None else float(row[10]),
        version=int(row[11]),
        read_block=int(row[12]),
        withdraw_requested_at=int(row[13]),
        withdraw_amount=int(row[14]),
        withdraw_due=None if row[15] is None else float(row[15]),
        read_hash=row[16],
        read_time=int(row[17]),
    )


def _larger(column: str, given: str | None = None) -> str:
    """The larger of the row's ``column`` and the upsert's ``given`` (default: the same
    column; ``?``: a parameter) as SQL: amounts are decimal text without leading zeros, so a
    longer one is larger and ones of a length compare as text (digits sort alike in every
    collation)."""
    old = f"bs_channels.{column}"
    new = "CAST(? AS TEXT)" if given == "?" else f"excluded.{given or column}"
    return f"CASE WHEN {_above(new, old)} THEN {new} ELSE {old} END"


def _forget(channel_id: str, orphaned: Stamp | None) -> list[tuple[str, tuple[Any, ...]]]:
    """The statement that forgets the row's reading while it is still ``orphaned``'s (a block
    proven reorganised away), in the transaction of the write after it: that write's reading
    then counts as the first (its balance and its claims, lower too — a claim reorganised
    away is owed again). Nothing when ``orphaned`` is None; a row read again since (another
    stamp) is left alone: that reading stands."""
    if orphaned is None or orphaned.hash is None:
        return []
    return [
        (
            "UPDATE bs_channels SET read_block = 0, read_hash = NULL, read_time = 0,"
            " total_claimed = '0' WHERE channel_id = ? AND read_block = ? AND read_hash = ?",
            (channel_id, orphaned.block, orphaned.hash),
        )
    ]


def _above(column: str, other: str) -> str:
    """``column`` > ``other`` as numbers, in SQL, for amounts stored as decimal text (a text
    comparison alone would have "9" above "10"): see :func:`_larger`."""
    return (
        f"(length({column}) > length({other})"
        f" OR (length({column}) = length({other}) AND {column} > {other}))"
    )


def _fits(taken: Channel, channel_id: str, owner: str, max_claimable: int, charge: int) -> bool:
    """The channel as a request took it can take this voucher's charge (if unchanged since)."""
    return (
        taken.channel_id == channel_id
        and taken.signed_max < max_claimable
        and taken.charged + charge <= max_claimable
        and taken.pending_owner == owner
    )


def taken(write: SchemeWrite) -> Channel | None:
    """The channel a made :meth:`ChannelStore.take_write` took; None when it was not free or
    the write was not made."""
    rows = write.results[0][1] if write.results else []
    return _channel(rows[0]) if rows else None


def charged(write: SchemeWrite) -> Channel:
    """The channel a made :meth:`ChannelStore.charge` write left."""
    return _channel(write.results[1][1][0])


@dataclass(frozen=True, slots=True)
class ClaimEntry:
    """One channel's row in a claim: its latest voucher and the total to claim under it."""

    channel_id: str
    config: ChannelConfig
    max_claimable: int
    signature: str
    total: int

    def wire(self) -> dict[str, Any]:
        return {
            "channelId": self.channel_id,
            "config": self.config.wire(),
            "maxClaimable": str(self.max_claimable),
            "signature": self.signature,
            "total": str(self.total),
        }

    @classmethod
    def parse(cls, data: dict[str, Any]) -> ClaimEntry:
        return cls(
            channel_id=data["channelId"],
            config=ChannelConfig.model_validate(data["config"]),
            max_claimable=int(data["maxClaimable"]),
            signature=data["signature"],
            total=int(data["total"]),
        )


@dataclass(frozen=True, slots=True)
class Claim:
    id: str
    state: str  # pending (maybe sent) | submitted (hash known) | settled (proven)
    entries: tuple[ClaimEntry, ...]
    tx_hash: str | None


class ChannelStore:
    def __init__(self, ledger: SchemeSql, *, clock: Any, pending_seconds: float) -> None:
        self._sql = ledger.scheme_sql
        self._sql_all = ledger.scheme_sql_all
        self._clock = clock
        self._pending_seconds = pending_seconds

    async def get(self, channel_id: str) -> Channel | None:
        _, rows = await self._sql(
            f"SELECT {_COLUMNS} FROM bs_channels WHERE channel_id = ?",  # noqa: S608 - constant
            (channel_id,),
        )
        return _channel(rows[0]) if rows else None

    async def deposited(
        self,
        channel_id: str,
        network: str,
        config: ChannelConfig,
        *,
        balance: int,
        total_claimed: int,
        block: int,
        exact: bool = False,
        block_hash: str | None = None,
        block_time: int = 0,
        orphaned: Stamp | None = None,
    ) -> Channel:
        """Mirror the channel's on-chain state after a proven deposit (a new channel starts
        charged at what was claimed before: the spec's baseline after state loss), as read
        at ``block``.

        One statement, never a compare-and-set that could lose: the deposit has moved on chain
        already, so its mirror must not give up however busy the channel is (another replica's
        take, release or charge between a read and a write). The balance follows chain order:
        a reading from a later block than the row's last (``read_block``) is the contract's
        balance, lower too; one from an earlier block changes nothing (a payer's withdrawal or
        a refund mirrored since from a later reading is never undone). Of one block, each
        amount only ever rises (the larger of the row's and this reading), so readings
        applied in any order agree — but with ``exact`` the balance is this reading's (read
        while the deposit held the channel: no refund between, so it is the contract's, lower
        too after an unmirrored withdrawal). Claims are never lowered. ``block`` is required:
        0 is taken for the oldest reading of all (rows from before ledger v14), so a caller
        that forgot it would have its balance ignored once the row holds a stamped one.

        Of one block number, readings of two blocks (``block_hash`` differs: one was
        reorganised away) are not merged: the row's stands. ``orphaned``: the row's stamp the
        caller proved reorganised away (readings.py) — while the row still holds it, this
        reading replaces the row's balance and claims, older block or not."""
        of_block = "excluded.balance" if exact else _larger("balance")
        newer = "excluded.read_block > bs_channels.read_block"
        same = (
            "excluded.read_block = bs_channels.read_block AND (bs_channels.read_hash IS NULL"
            " OR excluded.read_hash IS NULL OR excluded.read_hash = bs_channels.read_hash)"
        )
        write = (
            "INSERT INTO bs_channels (channel_id, network, payer, config, balance,"  # noqa: S608 - constant
            " total_claimed, charged, signed_max, signature, pending_owner, pending_until,"
            " version, updated_at, read_block, read_hash, read_time)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, '0x', NULL, NULL, 1, ?, ?, ?, ?)"
            f" ON CONFLICT (channel_id) DO UPDATE SET balance = CASE WHEN {newer}"
            f" THEN excluded.balance WHEN {same} THEN {of_block} ELSE bs_channels.balance END,"
            f" read_block = CASE WHEN {newer} THEN excluded.read_block"
            " ELSE bs_channels.read_block END,"
            f" read_hash = CASE WHEN {newer} THEN excluded.read_hash WHEN {same}"
            " THEN COALESCE(bs_channels.read_hash, excluded.read_hash)"
            " ELSE bs_channels.read_hash END,"
            f" read_time = CASE WHEN {newer} THEN excluded.read_time WHEN {same}"
            " AND bs_channels.read_hash IS NULL THEN excluded.read_time"
            " ELSE bs_channels.read_time END,"
            f" total_claimed = {_larger('total_claimed')},"
            f" charged = {_larger('charged', 'total_claimed')},"
            " version = bs_channels.version + 1, updated_at = excluded.updated_at"
            f" RETURNING {_COLUMNS}"
        )
        params = (
            channel_id,
            network,
            config.payer,
            config.model_dump_json(by_alias=True),
            str(balance),
            str(total_claimed),
            str(total_claimed),
            str(total_claimed),
            self._clock(),
            block,
            block_hash,
            block_time,
        )
        results = await self._sql_all([*_forget(channel_id, orphaned), (write, params)])
        return _channel(results[-1][1][0])

    def take_write(self, channel_id: str, owner: str) -> SchemeWrite:
        """:meth:`take`'s usual case, one statement — the lease is free, ours, or run out — as
        a write for the ledger to make with the request's reservation (:func:`taken` reads it;
        not required: a busy or unknown channel is told apart by :meth:`take` after)."""
        return SchemeWrite([self._take(channel_id, owner, None)])

    def _take(
        self, channel_id: str, owner: str, version: int | None, reservation: str | None = None
    ) -> tuple[str, tuple[Any, ...]]:
        """The statement taking the channel for ``owner``: when its lease is free, ours or run
        out (``version`` None), or as read at ``version``; with ``reservation``, only while
        that payment is reserved (:meth:`take`)."""
        now = self._clock()
        params: tuple[Any, ...] = (owner, now + self._pending_seconds, now, channel_id)
        if version is None:
            where = (
                " AND (pending_owner IS NULL OR pending_owner = ? OR pending_until IS NULL OR"
                " pending_until <= ?)"
            )
            params += (owner, now)
        else:
            where = " AND version = ?"
            params += (version,)
        if reservation is not None:
            where += " AND EXISTS (SELECT 1 FROM payments WHERE nonce = ? AND state = ?)"
            params += (reservation, PaymentState.RESERVED.value)
        return (
            "UPDATE bs_channels SET pending_owner = ?, pending_until = ?,"  # noqa: S608 - constant
            f" version = version + 1, updated_at = ? WHERE channel_id = ?{where}"
            f" RETURNING {_COLUMNS}",
            params,
        )

    async def take(self, channel_id: str, owner: str) -> Channel | None:
        """Take the channel's pending lease for ``owner`` (a voucher); None if no channel."""
        return await self._take_held(channel_id, owner, None)

    async def take_reserved(self, channel_id: str, owner: str, nonce: str) -> Channel | None:
        """:meth:`take` for a payment (its ``nonce``), made only while that payment is
        reserved, in the same transaction; LeaseLost when it is not. Whoever ends a
        reservation gives its hold back with it (its request, or the reconciler releasing it
        for a replica taken for dead), so a hold taken under a live reservation is always
        given back; one taken after the release (a replica frozen in its verify, waking up)
        would be nobody's to give back and would refuse the payer busy until it ran out."""
        return await self._take_held(channel_id, owner, nonce)

    async def _take_held(
        self, channel_id: str, owner: str, reservation: str | None
    ) -> Channel | None:
        # The usual case in one statement: the lease is free, ours, or run out.
        channel = await self._taken(self._take(channel_id, owner, None, reservation), reservation)
        if channel is not None:
            return channel
        # No such channel, or held by another request: read it to tell which.
        for _ in range(16):
            current = await self.get(channel_id)
            if current is None:
                return None
            held = (
                current.pending_owner is not None
                and current.pending_owner != owner
                and (current.pending_until or 0) > self._clock()
            )
            if held:
                raise ChannelBusy("another request on this channel is in progress")
            channel = await self._taken(
                self._take(channel_id, owner, current.version, reservation), reservation
            )
            if channel is not None:
                return channel
        raise ChannelBusy("the channel changed too often to take")

    async def _taken(
        self, statement: tuple[str, tuple[Any, ...]], reservation: str | None
    ) -> Channel | None:
        """A take made (the channel it took; None: not free, or no channel). With
        ``reservation``, in one transaction with that payment's row locked first (a no-op
        UPDATE, both stores' SQL: a release of it running meanwhile is waited for, then seen);
        LeaseLost when the payment is not reserved."""
        if reservation is None:
            _, rows = await self._sql(*statement)
            return _channel(rows[0]) if rows else None
        (locked, _), (_, rows) = await self._sql_all(
            [
                (
                    "UPDATE payments SET lease = lease WHERE nonce = ? AND state = ?",
                    (reservation, PaymentState.RESERVED.value),
                ),
                statement,
            ]
        )
        if not locked:
            raise LeaseLost("the payment's reservation was released: the channel is not taken")
        return _channel(rows[0]) if rows else None

    def release_write(self, channel_id: str, owner: str) -> SchemeWrite:
        """:meth:`release` as a write for the ledger to make with the payment's release (its
        RELEASED record): the hold goes with the reservation, all or nothing."""
        return SchemeWrite(
            [
                (
                    "UPDATE bs_channels SET pending_owner = NULL, pending_until = NULL,"
                    " version = version + 1 WHERE channel_id = ? AND pending_owner = ?",
                    (channel_id, owner),
                )
            ]
        )

    async def release(self, channel_id: str, owner: str) -> None:
        """Let the channel go (``owner``'s request ended without a charge to commit)."""
        (statement,) = self.release_write(channel_id, owner).statements
        await self._sql(*statement)

    async def commit(
        self,
        channel_id: str,
        owner: str,
        *,
        max_claimable: int,
        signature: str,
        charge: int,
        payment_id: str,
        taken: Channel | None = None,
    ) -> tuple[Channel, int]:
        """Charge ``charge`` under the voucher ``max_claimable`` (once): (the channel, what was
        charged now — 0 when this voucher's charge was made before). ``taken``: the channel as
        this request took it, tried first (compare-and-set on its version: no read when nothing
        changed it since).

        A voucher is committed when its charge is in the channel's ``charged`` total — the
        total the claim takes under the channel's last voucher — and that is what its row in
        ``bs_vouchers`` says (``charged``, set in the charge's own transaction), not the
        channel's ceiling having passed it. A voucher recorded whose charge was lost (a crash
        or a failed write after a first compare-and-set lost to another writer) is charged
        when committed again (the reconciler, a retry) if it is still above the channel's
        last voucher and its charge fits under its own ceiling: the payer signed that the
        seller may claim up to it in all. Once a later voucher has been committed without it,
        it can never be: that voucher was checked to be exactly the channel's charges (without
        this one) plus its own price, so the payer's signature does not count this charge and
        no claim may take it — ValueError ``CHARGE_LOST``, the payment recorded FAILED, never
        SETTLED. Other ValueError: the charge would pass the voucher's ceiling. ChannelBusy:
        another request holds the channel (not known yet: commit again later). ReviewRequired:
        a row from before ledger v11 whose charge cannot be proven either way."""
        if taken is not None and _fits(taken, channel_id, owner, max_claimable, charge):
            # The usual case, one transaction: the voucher recorded, the channel charged and
            # the voucher marked charged if nothing changed the channel since this request
            # took it (else the record alone commits, unmarked, and the loop below goes on).
            found = await self._sql_all(
                self._charged(taken, charge, max_claimable, signature, payment_id)
            )
            rows = found[1][1]
            if rows:
                return _channel(rows[0]), charge
        for _ in range(16):
            current, mark = await self._marked(channel_id, max_claimable)
            if current is None:
                raise ValueError("invalid_batch_settlement_evm_missing_channel")
            if mark == CHARGED:
                return current, 0  # this voucher's charge is in the channel's total already
            if current.signed_max >= max_claimable:
                if mark == UNKNOWN:
                    raise ReviewRequired(
                        "a voucher recorded before ledger v11, passed by a later one: whether"
                        " its charge was made cannot be proven"
                    )
                raise ValueError(CHARGE_LOST)
            if (
                current.pending_owner not in (None, owner)
                and (current.pending_until or 0) > self._clock()
            ):
                # Not a refusal: once that request ends (committed: this charge is lost; or
                # not), committing again decides.
                raise ChannelBusy("another request holds the channel")
            if current.charged + charge > max_claimable:
                raise ValueError("invalid_batch_settlement_evm_charge_exceeds_signed_cumulative")
            found = await self._sql_all(
                self._charged(current, charge, max_claimable, signature, payment_id)
            )
            rows = found[1][1]
            if rows:
                return _channel(rows[0]), charge
        raise ChannelBusy("the channel changed too often to commit")

    def charge(
        self,
        taken: Channel,
        owner: str,
        *,
        max_claimable: int,
        signature: str,
        charge: int,
        payment_id: str,
    ) -> SchemeWrite | None:
        """:meth:`commit`'s usual case as a write for the ledger to make with the payment's
        SETTLED record (``Ledger.transition``'s ``write``): the voucher's record, the charge
        (compare-and-set on ``taken``'s version: required, else nothing of the transaction is
        made) and its mark, all or nothing with SETTLED. None when ``taken`` cannot take this
        charge; the channel is :func:`charged`'s of the write once made.

        Two statements, where :meth:`commit`'s usual steps take three: the compare-and-set is
        required (not made: the whole transaction rolls back), so the record is written marked
        charged at once (a row already there, unmarked, is marked) — the mark's own statement
        would find exactly that true."""
        if not _fits(taken, taken.channel_id, owner, max_claimable, charge):
            return None
        record = (
            "INSERT INTO bs_vouchers (channel_id, max_claimable, signature, payment_id,"
            " charge, created_at, charged) VALUES (?, ?, ?, ?, ?, ?, 1)"
            " ON CONFLICT (channel_id, max_claimable) DO UPDATE SET charged = 1",
            (
                taken.channel_id,
                str(max_claimable),
                signature,
                payment_id,
                str(charge),
                self._clock(),
            ),
        )
        return SchemeWrite(
            [record, self._charge(taken, charge, max_claimable, signature)], required=1
        )

    async def _marked(self, channel_id: str, max_claimable: int) -> tuple[Channel | None, int]:
        """The channel and its voucher ``max_claimable``'s mark (None: no such row)."""
        _, rows = await self._sql(
            f"SELECT {_COLUMNS}, (SELECT COALESCE(v.charged, -1) FROM bs_vouchers v"  # noqa: S608 - constant
            " WHERE v.channel_id = bs_channels.channel_id AND v.max_claimable = ?)"
            " FROM bs_channels WHERE channel_id = ?",
            (str(max_claimable), channel_id),
        )
        if not rows:
            return None, NOT_RECORDED
        mark = rows[0][len(rows[0]) - 1]
        return _channel(rows[0]), NOT_RECORDED if mark is None else int(mark)

    def _charged(
        self, current: Channel, charge: int, max_claimable: int, signature: str, payment_id: str
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """One transaction: the voucher's record (once), the channel's charge (compare-and-set
        on ``current``'s version) and the voucher marked charged when the channel's last
        committed voucher is now this one — true only after its charge (this one, or another
        replica's commit of the same voucher): a lost compare-and-set leaves it unmarked.

        A record already there is locked by its (no-op) update, as :meth:`charge`'s write
        locks it: both take the voucher's row before the channel's, so a commit and a charge of
        the same voucher on two replicas wait for each other, never deadlock (PostgreSQL)."""
        return [
            (
                "INSERT INTO bs_vouchers (channel_id, max_claimable, signature, payment_id,"
                " charge, created_at, charged) VALUES (?, ?, ?, ?, ?, ?, 0)"
                " ON CONFLICT (channel_id, max_claimable)"
                " DO UPDATE SET charged = bs_vouchers.charged",
                (
                    current.channel_id,
                    str(max_claimable),
                    signature,
                    payment_id,
                    str(charge),
                    self._clock(),
                ),
            ),
            self._charge(current, charge, max_claimable, signature),
            (
                "UPDATE bs_vouchers SET charged = 1 WHERE channel_id = ? AND max_claimable = ?"
                " AND EXISTS (SELECT 1 FROM bs_channels c WHERE c.channel_id = ?"
                " AND c.signed_max = ? AND c.signature = ?)",
                (
                    current.channel_id,
                    str(max_claimable),
                    current.channel_id,
                    str(max_claimable),
                    signature,
                ),
            ),
        ]

    def _charge(
        self, current: Channel, charge: int, max_claimable: int, signature: str
    ) -> tuple[str, tuple[Any, ...]]:
        """The compare-and-set charging ``current`` (by its version) under a voucher."""
        return (
            "UPDATE bs_channels SET charged = ?, signed_max = ?, signature = ?,"  # noqa: S608 - constant
            " pending_owner = NULL, pending_until = NULL, version = version + 1,"
            f" updated_at = ? WHERE channel_id = ? AND version = ? RETURNING {_COLUMNS}",
            (
                str(current.charged + charge),
                str(max_claimable),
                signature,
                self._clock(),
                current.channel_id,
                current.version,
            ),
        )

    async def at_risk(self, limit: int) -> list[Channel]:
        """Channels owing more than their payer's pending withdrawal leaves in them (its
        finish would take part of what was served and not claimed): soonest due first, at
        most ``limit``. One owing no more than that is not at risk — the finish leaves
        ``balance - amount`` at least, so its voucher stays claimable — and waits for the
        claim interval (a payer keeping a small withdrawal pending while spending under it
        must not cost a claim transaction every wake). The arithmetic is Python's (uint128
        amounts are decimal text), over pages of the owing withdrawing channels."""
        found: list[Channel] = []
        where = ""
        params: tuple[Any, ...] = ()
        while len(found) < limit:
            _, rows = await self._sql(
                f"SELECT {_COLUMNS} FROM bs_channels WHERE withdraw_due IS NOT NULL"  # noqa: S608 - constant
                f" AND {_above('charged', 'total_claimed')} AND signed_max <> '0'{where}"
                " ORDER BY withdraw_due, channel_id LIMIT ?",
                (*params, _RISK_PAGE),
            )
            page = [_channel(r) for r in rows]
            found += [c for c in page if c.at_risk][: limit - len(found)]
            if len(page) < _RISK_PAGE:
                break
            last = page[-1]
            where = " AND (withdraw_due > ? OR (withdraw_due = ? AND channel_id > ?))"
            params = (last.withdraw_due, last.withdraw_due, last.channel_id)
        return found

    async def claimable(self, limit: int, *, withdrawing_only: bool = False) -> list[Channel]:
        """Channels charged beyond what was claimed (under a voucher): those whose payer's
        withdrawal is pending first (soonest due first: its unclaimed vouchers are lost once
        it finishes), then oldest change first; at most ``limit``, selected in SQL — the claim
        loop's pass reads the channels that owe something, not every channel there is. With
        ``withdrawing_only``, only the former."""
        only = " AND withdraw_due IS NOT NULL" if withdrawing_only else ""
        _, rows = await self._sql(
            f"SELECT {_COLUMNS} FROM bs_channels WHERE {_above('charged', 'total_claimed')}"  # noqa: S608 - constant
            f" AND signed_max <> '0'{only} ORDER BY CASE WHEN withdraw_due IS NULL THEN 1"
            " ELSE 0 END, withdraw_due, updated_at LIMIT ?",
            (limit,),
        )
        return [c for c in map(_channel, rows) if c.charged > c.total_claimed and c.signed_max]

    # --- withdrawals (withdrawals.py) ---

    async def known(self, channel_ids: list[str]) -> list[Channel]:
        """Those of ``channel_ids`` that are this ledger's channels."""
        if not channel_ids:
            return []
        marks = ", ".join("?" for _ in channel_ids)
        _, rows = await self._sql(
            f"SELECT {_COLUMNS} FROM bs_channels WHERE channel_id IN ({marks})",  # noqa: S608 - constant
            tuple(channel_ids),
        )
        return [_channel(r) for r in rows]

    async def withdrawing(self, limit: int) -> list[Channel]:
        """Channels whose payer's withdrawal is pending, least recently written first (each
        chain reading, :meth:`refunded`, writes ``updated_at``: the scan's re-reads go round
        them all over passes, whichever claimer makes them): at most ``limit``."""
        _, rows = await self._sql(
            f"SELECT {_COLUMNS} FROM bs_channels WHERE withdraw_due IS NOT NULL"  # noqa: S608 - constant
            " ORDER BY updated_at, channel_id LIMIT ?",
            (limit,),
        )
        return [_channel(r) for r in rows]

    async def stamps_between(self, after: int, upto: int, limit: int) -> list[Stamp]:
        """The stamps (hash known) the mirrors were read at from a block above ``after`` up to
        ``upto``, each once, highest first: at most ``limit``."""
        _, rows = await self._sql(
            "SELECT DISTINCT read_block, read_hash, read_time FROM bs_channels"
            " WHERE read_block > ? AND read_block <= ? AND read_hash IS NOT NULL"
            " ORDER BY read_block DESC LIMIT ?",
            (after, upto, limit),
        )
        return [Stamp(int(r[0]), r[1], int(r[2])) for r in rows]

    async def read_at(self, stamp: Stamp, limit: int) -> list[Channel]:
        """Channels whose mirror was read at ``stamp``'s block (its hash): at most ``limit``."""
        _, rows = await self._sql(
            f"SELECT {_COLUMNS} FROM bs_channels WHERE read_block = ? AND read_hash = ?"  # noqa: S608 - constant
            " ORDER BY channel_id LIMIT ?",
            (stamp.block, stamp.hash, limit),
        )
        return [_channel(r) for r in rows]

    async def unspent_after(self, after: str, limit: int) -> list[Channel]:
        """Channels holding more than was claimed, by id after ``after``: at most ``limit``."""
        _, rows = await self._sql(
            f"SELECT {_COLUMNS} FROM bs_channels WHERE channel_id > ?"  # noqa: S608 - constant
            f" AND {_above('balance', 'total_claimed')} ORDER BY channel_id LIMIT ?",
            (after, limit),
        )
        return [_channel(r) for r in rows]

    async def withdrawal(
        self, channel_id: str, *, requested_at: int, amount: int, due: float | None
    ) -> None:
        """The payer's withdrawal pending on chain (``due`` None: none). Not a move of the
        channel's version: a charge in flight keeps its compare-and-set (its voucher was
        taken before; the claim pass claims it first)."""
        await self._sql(
            "UPDATE bs_channels SET withdraw_requested_at = ?, withdraw_amount = ?,"
            " withdraw_due = ? WHERE channel_id = ?",
            (requested_at, str(amount), due, channel_id),
        )

    async def withdrawal_ended(self, channel_id: str, *, requested_at: int, amount: int) -> None:
        """The payer's withdrawal the caller saw pending (``requested_at``, ``amount``) is no
        longer: cleared only while the ledger still holds that one. A reading taken before a
        newer request (a claimer whose lease lapsed, a refund's) must not clear it — the
        scan's events for it are behind it, so it would never be read again."""
        await self._sql(
            "UPDATE bs_channels SET withdraw_requested_at = 0, withdraw_amount = '0',"
            " withdraw_due = NULL WHERE channel_id = ? AND withdraw_requested_at = ?"
            " AND withdraw_amount = ?",
            (channel_id, requested_at, str(amount)),
        )

    async def scan_place(self) -> tuple[Stamp, str | None] | None:
        """Where the withdrawal scan got to: (the last block scanned — its hash None when
        not known —, the first scan's check of the channels: the last read, None when done);
        None before the first scan."""
        _, rows = await self._sql(
            "SELECT scanned_block, checked_after, scanned_hash, scanned_time FROM bs_scan", ()
        )
        if not rows:
            return None
        row = rows[0]
        return Stamp(int(row[0]), row[2], int(row[3])), row[1]

    async def scanned(self, place: Stamp, checked_after: str | None) -> None:
        await self._sql(
            "INSERT INTO bs_scan (id, scanned_block, checked_after, scanned_hash, scanned_time)"
            " VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
            " scanned_block = excluded.scanned_block, checked_after = excluded.checked_after,"
            " scanned_hash = excluded.scanned_hash, scanned_time = excluded.scanned_time",
            (place.block, checked_after, place.hash, place.time),
        )

    async def claimed(self, channel_id: str, total: int) -> None:
        """A claim of ``total`` is proven on chain: mirror it (never lowering it). One
        statement: a compare-and-set here could lose to a busy channel and give up."""
        value = str(total)
        await self._sql(
            f"UPDATE bs_channels SET total_claimed = {_larger('total_claimed', '?')},"  # noqa: S608 - constant
            " version = version + 1 WHERE channel_id = ?",
            (value, value, value, value, channel_id),
        )

    async def refunded(
        self,
        channel_id: str,
        balance: int,
        total_claimed: int,
        *,
        block: int,
        block_hash: str | None = None,
        block_time: int = 0,
        orphaned: Stamp | None = None,
    ) -> Channel | None:
        """A chain reading of the channel (after a proven refund, or the claim loop's: a
        withdrawal), read at ``block``: its balance, unless the row's was read at a later
        block (in chain order: an older reading never undoes a newer one) or at another
        block of that number (``block_hash``: one was reorganised away), and its claims
        (never lowered). One statement, never a compare-and-set that could give up: a
        balance left above the contract's would take vouchers no claim can pay (so ``block``
        is required, as for :meth:`deposited`: a forgotten one would be ignored).
        ``orphaned``: as for :meth:`deposited`. The row after it (None: no channel)."""
        claimed, amount = str(total_claimed), str(balance)
        # Of a block no older than the row's (and the same block, when both hashes are known).
        takes = (
            "(CAST(? AS BIGINT) > read_block OR (CAST(? AS BIGINT) = read_block AND"
            " (read_hash IS NULL OR CAST(? AS TEXT) IS NULL OR read_hash = CAST(? AS TEXT))))"
        )
        stamp = (block, block, block_hash, block_hash)
        newer = "CAST(? AS BIGINT) > read_block"
        # The version (every compare-and-set's) moves only when the balance or the claims do:
        # the claim loop writes each owed channel's reading every pass, mostly agreeing with
        # the row and only its block newer — a request's charge in flight on that channel
        # must not lose its compare-and-set to it (and fall back to the slower commit).
        moved = (
            f"({takes} AND balance <> CAST(? AS TEXT))"
            f" OR {_above('CAST(? AS TEXT)', 'bs_channels.total_claimed')}"
        )
        write = (
            f"UPDATE bs_channels SET balance = CASE WHEN {takes}"  # noqa: S608 - constant
            f" THEN CAST(? AS TEXT) ELSE balance END, read_hash = CASE WHEN {newer}"
            " THEN CAST(? AS TEXT) WHEN read_hash IS NULL AND CAST(? AS BIGINT) = read_block"
            " THEN CAST(? AS TEXT) ELSE read_hash END, read_time = CASE WHEN"
            f" {newer} OR (read_hash IS NULL AND CAST(? AS BIGINT) = read_block)"
            " THEN CAST(? AS BIGINT) ELSE read_time END,"
            f" read_block = CASE WHEN {newer} THEN CAST(? AS BIGINT) ELSE read_block END,"
            f" total_claimed = {_larger('total_claimed', '?')},"
            f" version = version + CASE WHEN {moved} THEN 1 ELSE 0 END,"
            f" updated_at = ? WHERE channel_id = ? RETURNING {_COLUMNS}"
        )
        params = (
            *stamp,
            amount,
            block,
            block_hash,
            block,
            block_hash,
            block,
            block,
            block_time,
            block,
            block,
            claimed,
            claimed,
            claimed,
            claimed,
            *stamp,
            amount,
            claimed,
            claimed,
            claimed,
            self._clock(),
            channel_id,
        )
        results = await self._sql_all([*_forget(channel_id, orphaned), (write, params)])
        rows = results[-1][1]
        return _channel(rows[0]) if rows else None

    # --- claims ---

    async def take_claimer(self, owner: str, seconds: float) -> bool:
        """The claim lease: one claimer among the replicas at a time."""
        now = self._clock()
        await self._sql(
            "INSERT INTO bs_claims (id, state, entries, created_at, updated_at)"
            " VALUES (?, 'lease', '[]', ?, ?) ON CONFLICT (id) DO NOTHING",
            (CLAIMER, now, now),
        )
        changed, _ = await self._sql(*CLAIM_LEASE.take(CLAIMER, owner, now, seconds))
        return changed == 1

    async def let_go_claimer(self, owner: str) -> None:
        await self._sql(*CLAIM_LEASE.let_go(CLAIMER, owner))

    async def new_claim(self, claim_id: str, entries: list[ClaimEntry]) -> Claim:
        now = self._clock()
        await self._sql(
            "INSERT INTO bs_claims (id, state, entries, created_at, updated_at)"
            " VALUES (?, 'pending', ?, ?, ?)",
            (claim_id, json.dumps([e.wire() for e in entries]), now, now),
        )
        return Claim(claim_id, "pending", tuple(entries), None)

    async def claim_moved(self, claim_id: str, state: str, tx_hash: str | None) -> None:
        await self._sql(
            "UPDATE bs_claims SET state = ?, tx_hash = COALESCE(?, tx_hash), updated_at = ?"
            " WHERE id = ?",
            (state, tx_hash, self._clock(), claim_id),
        )

    async def open_claims(self) -> list[Claim]:
        """Claims started and not proven (a claimer died, or the chain had not answered)."""
        _, rows = await self._sql(
            "SELECT id, state, entries, tx_hash FROM bs_claims"
            " WHERE state IN ('pending', 'submitted') ORDER BY created_at",
            (),
        )
        return [
            Claim(r[0], r[1], tuple(ClaimEntry.parse(e) for e in json.loads(r[2])), r[3])
            for r in rows
        ]

    async def claims(self) -> list[Claim]:
        """Every claim (the lease row aside), oldest first: for operators and tests."""
        _, rows = await self._sql(
            "SELECT id, state, entries, tx_hash FROM bs_claims WHERE id <> ? ORDER BY created_at",
            (CLAIMER,),
        )
        return [
            Claim(r[0], r[1], tuple(ClaimEntry.parse(e) for e in json.loads(r[2])), r[3])
            for r in rows
        ]
