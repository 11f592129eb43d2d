"""When a withheld paid reply is sent again, after how long, and with which payment header
(paygate.client.withheld); the flow around it runs against the gateway in
tests/integration/paygate/client/test_client_withheld.py."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from paygate import wire
from paygate.client import AsyncPaygateTransport, PaygateTransport
from paygate.client.withheld import Withheld, resend_value, retry_after


def answer(status: int, code: str | None, retry: str | None = "1") -> httpx.Response:
    headers = {}
    if code is not None:
        headers[wire.ERROR_HEADER] = code
    if retry is not None:
        headers["Retry-After"] = retry
    return httpx.Response(status, headers=headers)


@pytest.mark.parametrize("code", ["lease_lost", "ledger_unavailable"])
def test_a_withheld_reply_is_retried_after_its_retry_after(code: str) -> None:
    assert Withheld().delay(answer(503, code), 0) == 1.0
    assert Withheld().delay(answer(503, code, "0"), 0) == 0.0


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (503, "overloaded"),
        (503, "payment_verifier_unavailable"),
        (503, "upstream_down"),
        (503, None),  # an upstream's own 503, relayed
        (502, "lease_lost"),
        (500, "ledger_unavailable"),
        (402, "lease_lost"),
        (409, "payment_in_progress"),
        (200, "lease_lost"),
    ],
)
def test_nothing_else_is_retried(status: int, code: str | None) -> None:
    assert Withheld(retries=5).delay(answer(status, code), 0) is None


def test_the_retries_are_bounded() -> None:
    withheld = answer(503, "lease_lost")
    assert Withheld().delay(withheld, 1) is None  # one by default
    assert Withheld(retries=0).delay(withheld, 0) is None
    assert Withheld(retries=2).delay(withheld, 1) == 1.0
    assert Withheld(retries=2).delay(withheld, 2) is None


@pytest.mark.parametrize("retry", ["6", "3600", "9" * 400])
def test_a_retry_after_above_the_bound_is_not_waited_for(retry: str) -> None:
    assert Withheld(max_wait=5).delay(answer(503, "lease_lost", retry), 0) is None


@pytest.mark.parametrize(
    "value", [None, "", "-1", "1.5", "soon", "Wed, 21 Oct 2026 07:28:00 GMT", "\u0663"]
)
def test_an_unreadable_retry_after_is_the_gateways_default(value: str | None) -> None:
    assert retry_after(value) == 1.0


@pytest.mark.parametrize("cls", [PaygateTransport, AsyncPaygateTransport])
@pytest.mark.parametrize(
    "options",
    [
        {"withheld_retries": -1},
        {"withheld_retries": 6},
        {"withheld_retries": True},
        {"withheld_retries": "1"},
        {"withheld_retries": 1.0},
        {"withheld_max_wait": -1},
        {"withheld_max_wait": float("nan")},
        {"withheld_max_wait": float("inf")},
        {"withheld_max_wait": 61},
        {"withheld_max_wait": "5"},
    ],
)
def test_out_of_range_settings_are_refused(cls: Any, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="withheld_"):
        cls(**options)


@pytest.mark.parametrize("cls", [PaygateTransport, AsyncPaygateTransport])
def test_the_settings_reach_the_core(cls: Any) -> None:
    assert cls()._core.withheld == Withheld(1, 5.0)
    assert cls(withheld_retries=0, withheld_max_wait=0)._core.withheld == Withheld(0, 0)


def _header(document: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


VOUCHER = {"channelId": "0x" + "11" * 32, "maxClaimableAmount": "2000", "signature": "0xab"}
CONFIG = {"payer": "0x" + "22" * 20}


def test_an_authorization_is_sent_again_as_it_is() -> None:
    header = _header({"x402Version": 2, "payload": {"authorization": {"nonce": "0x01"}}})
    assert resend_value(header, "exact") == header
    assert resend_value(header, "upto") == header


def test_a_voucher_is_sent_again_as_it_is_and_a_deposit_as_its_voucher_alone() -> None:
    voucher = {"type": "voucher", "channelConfig": CONFIG, "voucher": VOUCHER}
    header = _header({"x402Version": 2, "payload": voucher})
    assert resend_value(header, "batch-settlement") == header
    extensions = {"payment-identifier": {"info": {"id": "pg_" + "0" * 32}}}
    deposit = {**voucher, "type": "deposit", "deposit": {"amount": "20000"}}
    document = {"x402Version": 2, "payload": deposit, "extensions": extensions}
    again = json.loads(base64.b64decode(resend_value(_header(document), "batch-settlement")))
    assert again == {"x402Version": 2, "payload": voucher, "extensions": extensions}
