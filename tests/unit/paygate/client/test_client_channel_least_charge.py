"""paygate's client checks a channel's metered signed receipt: a request whose usage rounds to
nothing is charged one unit (the gateway's least charge on a channel, so each voucher raises the
cumulative), never more; other schemes are held to the usage exactly."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from paygate.client.payer import SentPayment
from paygate.client.receipts import ReceiptMismatch, check_payment
from paygate.x402.schemes.batch_settlement import channel as ch

CHANNEL = "0x" + "ab" * 32
PAYER = "0x" + "11" * 20
PAY_TO = "0x" + "22" * 20
ASSET = "0x" + "44" * 20
TINY = {"input_per_million": "0.01", "output_per_million": "0.01", "minimum": "0"}


def _sent(scheme: str, nonce: str) -> SentPayment:
    return SentPayment(
        url="http://127.0.0.1/v1/chat/completions",
        x402_version=2,
        network="base-sepolia",
        chain_id=84532,
        asset=ASSET,
        amount=Decimal("0.000064"),
        amount_atomic=64,
        pay_to=PAY_TO,
        payer=PAYER,
        nonce=nonce,
        valid_before=2**31,
        scheme=scheme,
        prices=(Decimal("0.01"), Decimal("0.01"), Decimal(0)),
    )


def _claims(payment_id: str, scheme: str, charged: int) -> dict[str, Any]:
    return {
        "payment": {
            "id": payment_id,
            "scheme": scheme,
            "network": "eip155:84532",
            "asset": ASSET,
            "pay_to": PAY_TO,
            "payer": PAYER,
            "authorized": "64",
            "charged": str(charged),
            "prices": TINY,
            "transaction": "pending",
        },
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "source": "upstream"},
    }


def test_a_channel_request_whose_usage_rounds_to_nothing_is_charged_one_unit_no_more() -> None:
    ceiling = 1_064
    record = _sent(ch.NAME, f"{CHANNEL}:{ceiling}")
    voucher = ch.voucher_id(CHANNEL, ceiling)
    check_payment(_claims(voucher, ch.NAME, 1), record)
    for charged in (0, 2):
        with pytest.raises(ReceiptMismatch):
            check_payment(_claims(voucher, ch.NAME, charged), record)


def test_upto_is_held_to_its_usage_exactly_even_when_it_rounds_to_nothing() -> None:
    nonce = "0x" + "99" * 32
    record = _sent("upto", nonce)
    check_payment(_claims(nonce, "upto", 0), record)
    with pytest.raises(ReceiptMismatch):
        check_payment(_claims(nonce, "upto", 1), record)
