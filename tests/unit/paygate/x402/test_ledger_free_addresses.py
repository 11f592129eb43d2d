"""The free requests of a client address, counted in the ledger (schema v9) on both stores, so
that every process on one ledger shares one allowance: taken with the wallet's in one
transaction, refused with nothing recorded, atomic when processes race for the last one, a
fresh allowance each UTC day."""

from __future__ import annotations

import asyncio

import pytest

from paygate.x402.ledger import FreeAddressUsed, SignInReused
from paygate.x402.ledger_base import Ledger
from tests.fixtures.ledgers import Opener

WALLETS = [f"0x{n:040x}" for n in range(1, 41)]
DAY = "2026-12-06"
ADDRESS = "a" * 64  # a digest, as paygate.x402.free keeps an address


async def take(
    ledger: Ledger, n: int, *, day: str = DAY, address: str = ADDRESS, cap: int = 2
) -> int | str | None:
    """Wallet ``n``'s free request with sign-in nonce ``n`` (its own cap: 5)."""
    try:
        return await ledger.take_free(
            payer=WALLETS[n],
            nonce=f"{day}-nonce-{n:04d}",
            day=day,
            limit=5,
            address=address,
            address_limit=cap,
        )
    except FreeAddressUsed:
        return "address used"


async def test_fresh_wallets_from_one_address_share_its_cap(ledger_store: Opener) -> None:
    ledger = await ledger_store()
    taken = [await take(ledger, n) for n in range(4)]
    assert taken == [4, 4, "address used", "address used"]
    # Another address has its own; the refused wallets lost nothing, their sign-ins neither.
    assert await take(ledger, 2, address="b" * 64) == 4
    assert await take(ledger, 3, address="b" * 64) == 4


async def test_a_refusal_records_nothing(ledger_store: Opener) -> None:
    ledger = await ledger_store()
    assert await take(ledger, 0, cap=1) == 4
    assert await take(ledger, 1, cap=1) == "address used"
    # Wallet 1's request and its sign-in nonce were not recorded: from elsewhere they count.
    assert await take(ledger, 1, address="c" * 64, cap=1) == 4
    # A wallet out of its own requests takes nothing from the address.
    for n in range(5):
        await ledger.take_free(payer=WALLETS[9], nonce=f"w9-{n}", day=DAY, limit=5)
    assert await take(ledger, 9, address="d" * 64, cap=1) is None
    assert await take(ledger, 10, address="d" * 64, cap=1) == 4
    # A replayed sign-in neither.
    with pytest.raises(SignInReused):
        await take(ledger, 10, address="e" * 64, cap=1)
    assert await take(ledger, 11, address="e" * 64, cap=1) == 4


async def test_processes_racing_for_the_last_requests_get_exactly_the_cap(
    ledger_store: Opener,
) -> None:
    # Two ledgers on one store: two processes (workers, replicas), each with its own
    # connections; 20 fresh wallets of one address at once, 3 allowed.
    ledgers = [await ledger_store(replica="w1"), await ledger_store(replica="w2")]
    results = await asyncio.gather(
        *(take(ledgers[n % 2], n, cap=3) for n in range(20)), return_exceptions=True
    )
    assert sorted(map(str, results)) == ["4"] * 3 + ["address used"] * 17
    # One left for the last: exactly one of two racers gets it.
    other = "f" * 64
    assert await take(ledgers[0], 20, address=other) == 4
    last = await asyncio.gather(
        take(ledgers[0], 21, address=other), take(ledgers[1], 22, address=other)
    )
    assert sorted(map(str, last)) == ["4", "address used"]


async def test_each_utc_day_has_a_fresh_cap(ledger_store: Opener) -> None:
    ledger = await ledger_store()
    assert [await take(ledger, n, cap=1) for n in (0, 1)] == [4, "address used"]
    assert await take(ledger, 1, day="2026-12-07", cap=1) == 4
    assert await take(ledger, 2, day="2026-12-07", cap=1) == "address used"


async def test_out_of_range_address_arguments_are_refused_before_any_io(
    ledger_store: Opener,
) -> None:
    ledger = await ledger_store()
    with pytest.raises(ValueError, match="address"):
        await take(ledger, 0, address="x" * 129)
    with pytest.raises(ValueError, match="address"):
        await take(ledger, 0, cap=0)
    assert await take(ledger, 0) == 4  # nothing was recorded
