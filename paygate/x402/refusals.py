"""How this deployment refuses a payment: the 402/400 challenge (x402's body and header, with
the sign-in-with-x declaration when free requests are offered), the 503 to retry, the payer's
429. Shared by admission, the free quota and upfront settlement.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from paygate.x402 import siwx
from paygate.x402.hooks import PayerCheck
from paygate.x402.models import AnyPaymentPayload, ResourceInfo, SettleResponse
from paygate.x402.offers import Offer, PaymentTerms, challenge
from paygate.x402.refusal import Refusal
from paygate.x402.results import Receipt


class Refusals:
    """Builds the refusals of one deployment (its terms, sign-in key and Retry-After)."""

    def __init__(
        self,
        terms: PaymentTerms,
        *,
        free: bool,
        retry_after_seconds: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._terms = terms
        self._free = free  # a free quota is offered: challenges declare sign-in-with-x
        self.retry_after = str(retry_after_seconds)
        self._clock = clock
        # Proves a sign-in nonce was issued here (the ledger's, set at start).
        self._signin_key: bytes | None = None

    @property
    def signin_key(self) -> bytes:
        if self._signin_key is None:  # not loaded (a processor built without a start)
            self._signin_key = secrets.token_bytes(32)
        return self._signin_key

    @signin_key.setter
    def signin_key(self, key: bytes) -> None:
        self._signin_key = key

    def challenge(
        self,
        status: int,
        code: str,
        message: str,
        offers: tuple[Offer, ...],
        resource: ResourceInfo,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Refusal:
        """A 402 (or 400) with a fresh challenge for ``offers``."""
        extensions = None
        if self._free:
            parts = urlsplit(resource.url)
            extensions = {
                siwx.EXTENSION: siwx.declaration(
                    domain=parts.netloc,
                    uri=resource.url,
                    networks=[a.network.caip2 for a in self._terms.accepted],
                    now=self._clock(),
                    statement="Sign in for today's free requests",
                    key=self.signin_key,
                )
            }
        return Refusal(
            status,
            code,
            message,
            challenge(
                offers,
                resource,
                error=message if status == 400 else code,
                require_payment_identifier=self._terms.require_payment_identifier,
                extensions=extensions,
            ),
            headers or {},
        )

    def unavailable(self, code: str, message: str) -> Refusal:
        """A 503 to retry (a dependency is down; nothing was charged)."""
        return Refusal(503, code, message, headers={"Retry-After": self.retry_after})

    def ledger_unavailable(self) -> Refusal:
        return self.unavailable("ledger_unavailable", "the payment ledger is unavailable")

    def budget_spent(self) -> Refusal:
        """The payer's daily budget is spent: a 429 until the next UTC day."""
        now = self._clock()
        return Refusal(
            429,
            "budget_exceeded",
            "this payer's daily budget is spent",
            headers={"Retry-After": str(max(1, int(86_400 - now % 86_400)))},
        )


def operation_done(payment: AnyPaymentPayload, answer: SettleResponse) -> Refusal:
    """A payment operation's answer in place of the route's (``Scheme.operation``: a channel's
    refund is not served): 200 with the operation's receipt in the PAYMENT-RESPONSE header."""
    receipt = Receipt(payment.x402_version, answer)
    return Refusal(
        200,
        "payment_operation_done",
        "payment operation done",
        headers={receipt.header: receipt.encoded()},
    )


def payer_limited(
    check: PayerCheck | None,
    route: str,
    model: str | None,
    items: tuple[tuple[str, str | None], ...],
    payer: str,
) -> Refusal | None:
    """The payer's rate limits: one token for the request (its model's limit first, every
    scheme), one more per batch item on the item's route; the 429 when one is refused."""
    if check is None:
        return None
    for item_route, item_model in ((route, model), *items):
        limited = check(item_route, item_model, payer)
        if limited is not None:
            return Refusal(
                429, "rate_limited", "too many requests from this payer", headers=limited
            )
    return None
