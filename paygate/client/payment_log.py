"""What one transport has paid and what came back: the payment log and its receipts.

The flow (:mod:`paygate.client.core`) appends a :class:`SentPayment` when it pays and reports
each receipt as it arrives (a header, or in-band at the end of a stream); the transports read
the log. Threads share one transport, so every access holds the lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Literal

import httpx

from enclave import receipts
from paygate import wire
from paygate.client.payer import Payer, SentPayment
from paygate.client.receipts import SignedReceipt
from paygate.client.streams import ReceiptScanner
from paygate.x402 import codec
from paygate.x402.models import USAGE_EXTENSION, SettleResponse

PAYMENT_LOG_SIZE = 1000

ReceiptCallback = Callable[[SentPayment], None]


class PaymentLog:
    """The last :data:`PAYMENT_LOG_SIZE` payments and signed receipts of one transport."""

    def __init__(self, payer: Payer | None, on_receipt: ReceiptCallback | None) -> None:
        self.payer = payer
        self.on_receipt = on_receipt
        self._payments: deque[SentPayment] = deque(maxlen=PAYMENT_LOG_SIZE)
        self._signed: deque[SignedReceipt] = deque(maxlen=PAYMENT_LOG_SIZE)
        self._lock = threading.Lock()

    def append(self, record: SentPayment) -> None:
        with self._lock:
            self._payments.append(record)

    def keep_signed(self, signed: SignedReceipt) -> None:
        with self._lock:
            self._signed.append(signed)

    def log(self) -> list[SentPayment]:
        """The payment log, oldest first (a copy: other threads may be paying)."""
        with self._lock:
            return list(self._payments)

    @property
    def last_payment(self) -> SentPayment | None:
        log = self.log()
        return log[-1] if log else None

    @property
    def last_receipt(self) -> SettleResponse | None:
        for record in reversed(self.log()):
            if record.receipt is not None:
                return record.receipt
        return None

    @property
    def last_signed_receipt(self) -> dict[str, Any] | None:
        """The claims of the most recent verified signed receipt."""
        with self._lock:
            for signed in reversed(self._signed):
                if signed.claims is not None:
                    return signed.claims
        return None

    @property
    def spent(self) -> Decimal:
        return self.payer.spent if self.payer is not None else Decimal(0)

    def got_receipt(
        self,
        record: SentPayment,
        receipt: SettleResponse | None,
        source: Literal["header", "stream"],
        error: str | None,
    ) -> None:
        if receipt is None:
            record.receipt_error = error
            return
        record.receipt = receipt
        record.receipt_source = source
        if self.payer is not None:
            self.payer.receipt_arrived(record)  # a metered receipt is checked and counted
            self.payer.channel_receipt(record)  # a channel's charge is counted
        if self.on_receipt is not None:
            self.on_receipt(record)

    def header_receipt(
        self, record: SentPayment, headers: httpx.Headers, sealed_token: str | None = None
    ) -> None:
        """The payment receipt a reply's headers carry, if any."""
        for name in (wire.PAYMENT_RESPONSE, wire.X_PAYMENT_RESPONSE):
            value = headers.get(name)
            if value:
                try:
                    receipt = codec.decode_settle_response(value, header=name)
                except codec.PaymentHeaderError as exc:
                    self.got_receipt(record, None, "header", str(exc))
                else:
                    receipt = _with_sealed_usage(receipt, sealed_token)
                    self.got_receipt(record, receipt, "header", None)
                return

    def scanner(
        self, content_type: str | None, record: SentPayment | None
    ) -> ReceiptScanner | None:
        """A scanner for the in-band receipt at the end of a paid stream, or None."""
        if record is None:
            return None

        def sink(receipt: SettleResponse | None, error: str | None) -> None:
            self.got_receipt(record, receipt, "stream", error)

        scanner = ReceiptScanner(content_type, sink)
        return scanner if scanner.active else None


def _with_sealed_usage(receipt: SettleResponse, token: str | None) -> SettleResponse:
    """A sealed reply's clear payment receipt states no usage (it would show beside a sealed
    body); the sealed signed receipt does. Its usage (unverified here: the signed receipt's
    own check verifies it when the origin is attested) joins the payment receipt, in the
    x402 receipt's own words, for the metered payment's check."""
    extensions = receipt.extensions or {}
    if token is None or USAGE_EXTENSION in extensions:
        return receipt
    try:
        claims = receipts.unverified_claims(token)
    except receipts.ReceiptTokenInvalid:
        return receipt
    usage, payment = claims.get("usage"), claims.get("payment")
    if not isinstance(usage, dict) or not isinstance(payment, dict):
        return receipt
    info = {
        "promptTokens": usage["prompt_tokens"],
        "completionTokens": usage["completion_tokens"],
        "source": usage["source"],
        "maximum": payment["authorized"],
        "charged": payment["charged"],
    }
    extended = {**extensions, USAGE_EXTENSION: {"info": info}}
    return receipt.model_copy(update={"extensions": extended})
