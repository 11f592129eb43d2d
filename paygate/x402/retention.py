"""Retention of the ledger's day-keyed tables: free quotas, address allowances and used sign-in
nonces get a row per key per UTC day, which an unpaid caller can grow with every fresh wallet,
and batch settlement records a row per voucher accepted; the app's keeper deletes the days
nobody can use any more.

Which days: everything before yesterday (UTC). Today's counts are live and yesterday's may
still be written by a request admitted just before midnight, or by a worker whose clock lags.
A sign-in nonce must stay refused as long as its proof could still be accepted: siwx takes a
nonce only while it was issued at most ``MAX_AGE_SECONDS`` ago and at most a minute ahead of
the verifier's clock, so a nonce used at time t is accepted nowhere after t + MAX_AGE_SECONDS
+ 60 (give or take the clock skew between replicas). Nonces used since yesterday began are
kept: at least 24 hours, far past that window, so a replay of a pruned nonce is refused as
expired before the ledger is asked. A voucher's row (``bs_vouchers``: its charge's mark) goes
by the same day once its payment is finished; one whose payment may still be committed (not
SETTLED, FAILED or RELEASED) stays, however old, since the reconciler reads its mark. A
voucher without its row is never taken as charged (never SETTLED, never charged twice).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from paygate.x402.ledger_base import Ledger

log = logging.getLogger(__name__)

DAY = 86_400
# Kept days: today and yesterday; (KEPT_DAYS - 1) days must exceed a sign-in's validity,
# siwx.MAX_AGE_SECONDS + 60 (tests/unit/paygate/x402/test_retention.py checks it).
KEPT_DAYS = 2


def cutoff(now: float) -> str:
    """The first UTC day kept at ``now``: yesterday (rows of days before it may go)."""
    return time.strftime("%Y-%m-%d", time.gmtime(now - (KEPT_DAYS - 1) * DAY))


async def prune_once(ledger: Ledger, now: float) -> int:
    return await ledger.prune_days(before=cutoff(now))


async def prune_forever(
    ledger: Ledger, *, interval: float, clock: Callable[[], float] = time.time
) -> None:
    """The keeper's loop: prune, then wait ``interval`` seconds; a failed pass is logged."""
    while True:
        try:
            pruned = await prune_once(ledger, clock())
            if pruned:
                log.info("pruned %d day-keyed ledger rows", pruned)
        except Exception as exc:  # keep pruning: a passing ledger failure must not end it
            log.error("ledger prune failed: %s", type(exc).__name__)
        await asyncio.sleep(interval)
