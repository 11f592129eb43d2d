"""A payment in progress is told dead (its replica gone: the refusal of its retry is this
server's failure, ``server_side``) by the ledger's own clock, the one its leases are measured
by — on PostgreSQL the database's, not this host's. A host whose clock runs ahead of the
database's would otherwise take a live request's payment for a dead replica's: its replays,
each after a key operation, would doubt nobody (paygate.server.claims)."""

from __future__ import annotations

import base64
import json
import time
from decimal import Decimal
from typing import Any, cast

import pytest

from paygate import wire
from paygate.x402.ledger_store import LedgerLocation, open_ledger
from paygate.x402.processor import PaymentProcessor
from paygate.x402.refusal import Refusal
from paygate.x402.settlement import VerifyOnly
from tests.fixtures.ledger_support import request
from tests.fixtures.x402_support import RESOURCE, sdk_payment, terms

PRICE = Decimal("0.001")
AHEAD = 40.0  # seconds this host's clock runs ahead of the database's: more than a lease


@pytest.mark.parametrize("dead", [False, True])
async def test_a_payment_is_told_dead_by_the_databases_clock(pg_url: str, dead: bool) -> None:
    """Reserved by a live replica (its lease measured by the database's clock): a replay is
    the caller's doing, whatever this host's clock says. Reserved by one that died an hour
    ago (its lease long run out): the server's failure."""
    location = LedgerLocation(kind="postgresql", conninfo=pg_url)
    owner = await open_ledger(
        location, replica="owner", clock=(lambda: time.time() - 3600.0) if dead else None
    )
    ledger = await open_ledger(location, replica="here")
    payment = sdk_payment(2)
    wired = payment.wire()
    authorization = wired["payload"]["authorization"]
    processor = PaymentProcessor(
        terms=terms(),
        ledger=ledger,
        settler=cast(Any, None),
        settlement=VerifyOnly(),
        clock=lambda: time.time() + AHEAD,
    )
    headers = {wire.PAYMENT_SIGNATURE: base64.b64encode(json.dumps(wired).encode()).decode()}
    try:
        await owner.reserve(
            **request(
                network=wired["accepted"]["network"],
                asset=wired["accepted"]["asset"],
                payer=authorization["from"],
                nonce=authorization["nonce"],
                pay_to=wired["accepted"]["payTo"],
                payload=json.dumps(wired),
                route="chat",
                amount=int(authorization["value"]),
            )
        )
        refused = await processor.admit(headers, price=PRICE, resource=RESOURCE, route="chat")
    finally:
        await owner.close()
        await ledger.close()
    assert isinstance(refused, Refusal), refused
    assert (refused.status, refused.code, refused.server_side) == (
        409,
        "payment_in_progress",
        dead,
    )
