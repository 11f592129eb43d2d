"""The errors that withhold a paid reply whose charge the ledger did not record
(paygate.server.payments): a server-side failure, so it never doubts the caller's address
(paygate.server.claims), and it says so with a stable code, a Retry-After and nothing of the
reply."""

from __future__ import annotations

import json

import pytest

from paygate import wire
from paygate.server.claims import doubts
from paygate.server.payments import (
    ChargeNotRecorded,
    ReplyLeaseLost,
    ReplyServedElsewhere,
    charge_not_recorded,
)


@pytest.mark.parametrize(
    ("why", "kind"), [("lease_lost", ReplyLeaseLost), ("ledger_unavailable", ChargeNotRecorded)]
)
def test_a_withheld_reply_is_a_503_to_retry_that_doubts_nobody(why: str, kind: type) -> None:
    error = charge_not_recorded(why)
    assert type(error) is kind
    assert not doubts(error)
    response = error.render("openai")
    assert response.status == 503
    assert response.headers[wire.ERROR_HEADER] == why
    assert int(response.headers["Retry-After"]) >= 1
    assert wire.PAYMENT_RESPONSE not in response.headers
    assert wire.RECEIPT_HEADER not in response.headers
    assert response.body is not None
    assert json.loads(response.body)["error"]["code"] == why


def test_an_upfront_reply_served_elsewhere_is_not_a_withheld_charge_to_retry() -> None:
    """Settled upfront, its one reply went to another request: charged, so not `lease_lost`
    (nothing charged, send again — paygate's client would, to be refused 402), no Retry-After,
    and no doubt on the caller (an honest payer's retry while a replica was frozen)."""
    error = charge_not_recorded("payment_already_served")
    assert type(error) is ReplyServedElsewhere
    assert not doubts(error)
    response = error.render("openai")
    assert (response.status, response.headers[wire.ERROR_HEADER]) == (409, "payment_already_served")
    assert "Retry-After" not in response.headers
    assert wire.PAYMENT_RESPONSE not in response.headers
    assert response.body is not None
    assert json.loads(response.body)["error"]["code"] == "payment_already_served"
