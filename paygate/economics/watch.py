"""What raises alerts without a request to hang them on: payments flagged for review (by any
replica: read from the shared ledger), and this replica's model server going down. Attestation
failures are raised where they are answered (:func:`attestation_alert`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from paygate.economics.alerts import Alert, AlertSink
from paygate.economics.store import EconomicsStore, PaymentFilter
from paygate.x402.ledger import REVIEW_PREFIX, LedgerError

log = logging.getLogger("paygate.alerts")
DOWN_STATES = ("down", "restarting")
ATTESTATION_CODES = frozenset({"attestation_unavailable", "activation_failed"})
ATTESTATION_PERIOD = 600  # seconds: one attestation alert per code, replica and period


async def watch_once(
    alerts: AlertSink,
    *,
    store: EconomicsStore | None,
    upstream: Callable[[], Mapping[str, Any]] | None,
    replica: str,
) -> None:
    if store is not None:
        try:
            flagged = await store.search(PaymentFilter(review=True), limit=100)
        except LedgerError as exc:
            log.warning("review queue not read: %s", exc.code)
            flagged = []
        for record in flagged:
            alerts.notify(
                Alert(
                    kind="payment_review",
                    key=f"review:{record.id}",
                    summary="a payment needs an operator's review",
                    facts={
                        "payment_id": record.id,
                        "payer": record.payer,
                        "network": record.network,
                        "reason": (record.error or "").removeprefix(REVIEW_PREFIX)[:200],
                        "transaction": record.transaction,
                    },
                )
            )
    if upstream is not None:
        status = upstream()
        if status.get("state") in DOWN_STATES:
            alerts.notify(
                Alert(
                    kind="upstream_down",
                    key=f"upstream_down:{replica}:{status.get('since')}",
                    summary="the model server is down",
                    facts={
                        "replica": replica,
                        "state": str(status.get("state")),
                        "since": str(status.get("since")),
                        "last_probe": str(status.get("last_probe"))[:200],
                    },
                )
            )


async def watch_forever(
    alerts: AlertSink,
    *,
    store: Callable[[], EconomicsStore | None],
    upstream: Callable[[], Mapping[str, Any]] | None,
    replica: str,
    interval: float,
) -> None:
    while True:
        try:
            await watch_once(alerts, store=store(), upstream=upstream, replica=replica)
        except Exception as exc:  # keep watching: one bad round must not end it
            log.error("alert watch failed: %s", type(exc).__name__)
        await asyncio.sleep(interval)


def attestation_alert(
    alerts: AlertSink, replica: str, clock: Callable[[], float] = time.time
) -> Callable[[str], None]:
    """A callback for every error code answered: attestation failures become alerts."""

    def on_error(code: str) -> None:
        if code in ATTESTATION_CODES:
            period = int(clock() // ATTESTATION_PERIOD)
            alerts.notify(
                Alert(
                    kind="attestation_failed",
                    key=f"attestation:{code}:{replica}:{period}",
                    summary="attestation evidence could not be produced",
                    facts={"replica": replica, "code": code},
                )
            )

    return on_error
