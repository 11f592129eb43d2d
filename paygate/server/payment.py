"""The payment step of the pipeline: its interface, and the no-op gate of ``payment_mode=off``.

The payments issue fills this in (x402 challenge, verify, reserve, settle). The pipeline calls
``begin`` after routing and the limits and before anything costly (opening, forwarding), and
``complete`` exactly once when the reply is over, with what was actually delivered, so that
settlement can depend on a successful, complete reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from aiohttp import web

from paygate.config import ConfigError, Settings
from paygate.server.routes import Route


@dataclass(frozen=True, slots=True)
class PaymentTicket:
    """What ``begin`` admitted: enough for ``complete`` to settle or release it."""

    route: Route
    price: Decimal | None = None
    payer: str | None = None
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReplyOutcome:
    """How the reply ended. ``delivered`` is True only if the whole reply reached the caller."""

    status: int
    delivered: bool


class PaymentGate(Protocol):
    """The payment step. Implementations must not log payment headers or signatures."""

    async def begin(self, request: web.Request, route: Route) -> PaymentTicket | web.StreamResponse:
        """Admit the request (a ticket) or answer it now (e.g. a 402 challenge)."""
        ...

    async def complete(self, ticket: PaymentTicket, outcome: ReplyOutcome) -> None:
        """Settle or release the ticket; called exactly once per admitted request."""
        ...


class NoPaymentGate:
    """``payment_mode = "off"``: every request is admitted and nothing is settled."""

    async def begin(self, request: web.Request, route: Route) -> PaymentTicket | web.StreamResponse:
        return PaymentTicket(route=route, price=route.price(route) if route.price else None)

    async def complete(self, ticket: PaymentTicket, outcome: ReplyOutcome) -> None:
        return None


def payment_gate_for(settings: Settings) -> PaymentGate:
    """The gate for the configured payment mode; modes not built yet refuse to start."""
    if settings.payment_mode == "off":
        return NoPaymentGate()
    # Never fall back to serving unpaid: an operator who asked for payments must not get a
    # free gateway by accident.
    raise ConfigError(
        f"payment_mode {settings.payment_mode!r} is not implemented yet; "
        "set PAYGATE_PAYMENT_MODE=off to run the gateway without payments"
    )
