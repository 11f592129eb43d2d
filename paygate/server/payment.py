"""The payment step of the pipeline: its interface, the no-op gate, and the x402 gate.

The pipeline calls ``begin`` after routing and the limits (and after opening the body only
when prices depend on the request's model), ``settle`` once the reply is known to be good and
before its end is sent (so the receipt can ride with it), and ``complete`` exactly once when
the request is over, with what happened, so that nothing unearned is settled and nothing
earned is lost. The x402 policy itself lives in :mod:`paygate.x402.gate`, free of HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from paygate.config import ConfigError, Settings
from paygate.server.errors import ERROR_HEADER, GatewayError, error_response
from paygate.server.routes import Route
from paygate.x402 import codec
from paygate.x402.chain import ChainSettler
from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.gate import Admission, PaymentProcessor, Receipt, Refusal
from paygate.x402.ledger import Ledger
from paygate.x402.models import ResourceInfo
from paygate.x402.networks import Asset, UnknownNetwork, resolve_network
from paygate.x402.offers import Acceptance, PaymentTerms
from paygate.x402.pricing import PricePolicy
from paygate.x402.settler import Settler

PAID_CACHE_CONTROL = "private, no-store"
RESOURCE_MIME_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class PaymentTicket:
    """What ``begin`` admitted: enough for ``settle`` and ``complete``."""

    route: Route
    price: Decimal | None = None
    admission: Admission | None = field(default=None, repr=False)

    @property
    def paid(self) -> bool:
        return self.admission is not None and self.admission.paid


@dataclass(frozen=True, slots=True)
class ReplyOutcome:
    """How the request ended.

    ``status``: the upstream's status (0 if there was no reply). ``delivered``: the whole reply
    reached the caller. ``caller_gone``: the caller disconnected before the end.
    """

    status: int
    delivered: bool
    caller_gone: bool = False


class PaymentGate(Protocol):
    """The payment step. Implementations must not log payment headers or signatures."""

    @property
    def needs_model(self) -> bool:
        """True when the price depends on the request body's ``model`` (open before paying)."""
        ...

    async def begin(
        self, request: web.Request, route: Route, *, model: str | None = None
    ) -> PaymentTicket | web.StreamResponse:
        """Admit the request (a ticket) or answer it now (e.g. a 402 challenge)."""
        ...

    async def settle(self, ticket: PaymentTicket) -> Receipt | None:
        """Settle an admitted request whose reply is good; the receipt to send, if any."""
        ...

    async def complete(self, ticket: PaymentTicket, outcome: ReplyOutcome) -> None:
        """Release, or settle what is owed and was not settled yet; once per admitted request."""
        ...

    async def close(self, timeout: float) -> None:
        """Wait (bounded) for settlements still running."""
        ...


class NoPaymentGate:
    """``payment_mode = "off"``: every request is admitted and nothing is settled."""

    needs_model = False

    async def begin(
        self, request: web.Request, route: Route, *, model: str | None = None
    ) -> PaymentTicket | web.StreamResponse:
        return PaymentTicket(route=route)

    async def settle(self, ticket: PaymentTicket) -> Receipt | None:
        return None

    async def complete(self, ticket: PaymentTicket, outcome: ReplyOutcome) -> None:
        return None

    async def close(self, timeout: float) -> None:
        return None


class X402Gate:
    """x402 over HTTP: headers in, challenges and receipts out; policy in the processor."""

    def __init__(
        self,
        processor: PaymentProcessor,
        prices: PricePolicy,
        *,
        public_url: str | None = None,
        description: str = "paygate inference",
    ) -> None:
        self._processor = processor
        self._prices = prices
        self._public_url = public_url
        self._description = description

    @property
    def needs_model(self) -> bool:
        return self._prices.needs_model

    @property
    def processor(self) -> PaymentProcessor:
        return self._processor

    async def begin(
        self, request: web.Request, route: Route, *, model: str | None = None
    ) -> PaymentTicket | web.StreamResponse:
        if not route.paid:
            return PaymentTicket(route=route)
        price = self._prices.price(method=route.method, path=route.path, model=model)
        admitted = await self._processor.admit(
            request.headers,
            price=price,
            resource=ResourceInfo(
                url=self._resource_url(request),
                description=self._description,
                mime_type=RESOURCE_MIME_TYPE,
            ),
            route=route.name,
        )
        if isinstance(admitted, Refusal):
            return refusal_response(admitted, route)
        return PaymentTicket(route=route, price=price, admission=admitted)

    async def settle(self, ticket: PaymentTicket) -> Receipt | None:
        if ticket.admission is None:
            return None
        return await self._processor.settle(ticket.admission)

    async def complete(self, ticket: PaymentTicket, outcome: ReplyOutcome) -> None:
        if ticket.admission is None:
            return
        await self._processor.finish(
            ticket.admission,
            succeeded=0 < outcome.status < 400,
            caller_gone=outcome.caller_gone,
        )

    async def close(self, timeout: float) -> None:
        await self._processor.drain(timeout)

    def _resource_url(self, request: web.Request) -> str:
        # The configured public URL, when set, instead of trusting the Host header.
        if self._public_url:
            return self._public_url + request.path
        return str(request.url.with_query(None))


class _PaymentError(GatewayError):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message, headers=dict(refusal.headers))
        self.status = refusal.status
        self.code = refusal.code


def refusal_response(refusal: Refusal, route: Route) -> web.Response:
    """A refusal as HTTP: challenges in x402's shape (v1 body + v2 header), others in the
    route's own error shape."""
    if refusal.challenge is None:
        return error_response(_PaymentError(refusal), route.api)
    headers = {
        codec.PAYMENT_REQUIRED: codec.encode(refusal.challenge.v2),
        ERROR_HEADER: refusal.code,
        "Cache-Control": "no-store",
        **refusal.headers,
    }
    return web.json_response(refusal.challenge.body(), status=refusal.status, headers=headers)


def settlement_failed_response(receipt: Receipt, route: Route) -> web.Response:
    """A reply withheld because its settlement was refused for good, with that receipt."""
    reason = receipt.response.error_reason or "settle_failed"
    error = _PaymentError(
        Refusal(402, "settlement_failed", f"the payment could not be settled: {reason}")
    )
    response = error_response(error, route.api)
    response.headers[receipt.header] = receipt.encoded()
    response.headers["Cache-Control"] = "no-store"
    return response


def receipt_headers(receipt: Receipt | None) -> dict[str, Any]:
    """Headers of a paid reply: its receipt (when settled already) and no caching."""
    headers: dict[str, Any] = {"Cache-Control": PAID_CACHE_CONTROL}
    if receipt is not None:
        headers[receipt.header] = receipt.encoded()
    return headers


def payment_terms(settings: Settings) -> PaymentTerms:
    """The seller's terms from the settings; ConfigError names what is missing."""
    if not settings.pay_to:
        raise ConfigError("payments need pay_to (PAYGATE_PAY_TO): the wallet that is paid")
    accepted = []
    for name in settings.network:
        try:
            network = resolve_network(name)
        except UnknownNetwork as exc:
            raise ConfigError(str(exc)) from None
        if settings.asset_address:
            asset = Asset(
                address=settings.asset_address,
                name=settings.asset_name or "",
                version=settings.asset_version or "",
                decimals=settings.asset_decimals,
            )
        elif network.usdc is not None:
            asset = network.usdc
        else:
            raise ConfigError(f"network {name!r} has no USDC in the table: set asset_address")
        accepted.append(Acceptance(network=network, asset=asset))
    if not accepted:
        raise ConfigError("payments need at least one network (PAYGATE_NETWORK)")
    return PaymentTerms(
        pay_to=settings.pay_to,
        accepted=tuple(accepted),
        max_timeout_seconds=settings.max_timeout_seconds,
        description=settings.payment_description,
        require_payment_identifier=settings.require_payment_identifier,
    )


def price_policy(settings: Settings) -> PricePolicy:
    return PricePolicy(
        default=settings.price,
        routes=dict(settings.route_prices),
        models=dict(settings.model_prices),
        per_million_tokens=settings.price_per_million_tokens,
        token_estimate=settings.token_estimate,
    )


def check_payment_settings(settings: Settings) -> None:
    """Refuse at startup, before anything listens, a payment mode that cannot work."""
    if settings.payment_mode == "off":
        return
    payment_terms(settings)
    if settings.payment_mode in ("facilitator", "verify-only") and not settings.facilitator_url:
        raise ConfigError(
            f"payment_mode {settings.payment_mode} needs facilitator_url (PAYGATE_FACILITATOR_URL)"
        )
    if settings.payment_mode == "chain":
        if not settings.chain_rpc_url:
            raise ConfigError("payment_mode chain needs chain_rpc_url (PAYGATE_CHAIN_RPC_URL)")
        if settings.secret("gas_key") is None:
            raise ConfigError("payment_mode chain needs gas_key or gas_key_file (PAYGATE_GAS_KEY)")


def settler_for(settings: Settings, session: aiohttp.ClientSession) -> Settler:
    if settings.payment_mode == "chain":
        gas_key = settings.secret("gas_key")
        assert gas_key is not None  # check_payment_settings ran first
        assert settings.chain_rpc_url is not None
        try:
            return ChainSettler(
                settings.chain_rpc_url,
                gas_key,
                timeout=settings.facilitator_timeout,
                settle_timeout=settings.settle_timeout,
            )
        except ValueError:
            raise ConfigError("gas_key is not a valid private key") from None
    assert settings.facilitator_url is not None
    return FacilitatorSettler(
        session,
        settings.facilitator_url,
        timeout=settings.facilitator_timeout,
        settle_timeout=settings.settle_timeout,
    )


def x402_gate(
    settings: Settings, *, ledger: Ledger, settler: Settler, retry_after_seconds: int
) -> X402Gate:
    mode = settings.payment_mode
    assert mode != "off"
    processor = PaymentProcessor(
        terms=payment_terms(settings),
        ledger=ledger,
        settler=settler,
        mode=mode,
        settle_timing=settings.settle_timing,
        settle_on_disconnect=settings.settle_on_disconnect,
        skew_seconds=settings.clock_skew_seconds,
        retry_after_seconds=retry_after_seconds,
    )
    return X402Gate(
        processor,
        price_policy(settings),
        public_url=settings.public_url,
        description=settings.payment_description,
    )
