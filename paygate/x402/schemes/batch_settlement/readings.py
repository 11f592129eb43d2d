"""A channel's chain readings written to the ledger across a reorganisation (server-only).

Each reading is stamped with its block (number, hash, time: ``store.Stamp``) and the ledger
keeps the newest by number: an older reading never undoes a newer one (readings land out of
order; a load-balanced RPC's node behind answers some). But a chain can fall back — a
reorganisation to a shorter chain, a test chain reset — and a newer number then names a block
the chain no longer holds: every later reading, of a lower number, would be ignored until the
chain passed it again, and a deposit reorganised away would stay mirrored meanwhile (vouchers
served on money no longer deposited). So a reading that the row's stamp outranks is written
again in place of the row's when the chain proves the row's block gone
(:meth:`~.chain.BatchChain.orphaned`: another block at its number, or a newest block below it
and later in time; a node that merely lacks the block proves nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from paygate.x402.schemes.batch_settlement.chain import ChannelChain, OnChain
from paygate.x402.schemes.batch_settlement.store import Channel, ChannelStore, Stamp
from paygate.x402.settler import SettlementUnknown, SettlerUnavailable

log = logging.getLogger("paygate.x402")

_Row = TypeVar("_Row", bound=Channel | None)


def outranked(reading: Stamp, row: Stamp) -> bool:
    """The row's stamp keeps ``reading`` out: a later block, or another block of its number."""
    if reading.block != row.block:
        return reading.block < row.block
    return None not in (reading.hash, row.hash) and reading.hash != row.hash


async def gone(chain: ChannelChain, stamp: Stamp) -> bool:
    """The chain proves ``stamp``'s block reorganised away; False when it cannot be asked
    (not proven: the row's reading stands, as it would without the check)."""
    if stamp.hash is None:
        return False
    try:
        return await chain.orphaned(stamp)
    except (SettlerUnavailable, SettlementUnknown):
        return False


async def mirror(
    chain: ChannelChain, reading: OnChain, write: Callable[[Stamp | None], Awaitable[_Row]]
) -> _Row:
    """``write`` (a store write of ``reading``, given the row's stamp proven orphaned or
    None) made; made again with the row's stamp when that stamp kept the reading out and its
    block is proven gone. The row after it (None: no channel)."""
    row = await write(None)
    if row is None or not outranked(reading.stamp, row.stamp) or not await gone(chain, row.stamp):
        return row
    log.warning("a channel's mirrored chain reading was of a block reorganised away: replaced")
    return await write(row.stamp)


async def refunded(
    store: ChannelStore,
    chain: ChannelChain,
    channel_id: str,
    reading: OnChain,
) -> Channel | None:
    """:meth:`ChannelStore.refunded` of ``reading`` through :func:`mirror`."""

    def write(orphaned: Stamp | None) -> Awaitable[Channel | None]:
        return store.refunded(
            channel_id,
            reading.balance,
            reading.total_claimed,
            block=reading.block,
            block_hash=reading.block_hash,
            block_time=reading.block_time,
            orphaned=orphaned,
        )

    return await mirror(chain, reading, write)
