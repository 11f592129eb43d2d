"""The admission stage: limits and payment, in the order that keeps unpaid callers from
starving paid ones. One entry: ``async with admission.admit(request, route) as admitted``.

1. A paid route that needs a sealed body refuses plaintext (415) from the headers.
2. When the price does not depend on the body (the usual case), the payment step runs on the
   headers alone: no payment header → the 402 challenge at once, without reading a byte of
   the body; a payment → local checks, reservation, verification. Only then is the body read,
   in the *admitted* pool.
3. When the price depends on the body (model prices, metered ``upto`` maxima), the body is
   read first and, if sealed, opened; then payment. Decided on the headers: a request that
   carries a payment reads its body in the *admitted* pool, one that does not in the tight
   *unverified* pool (``unpaid_body_slots`` in all, the first bytes within
   ``body_first_byte_timeout``), so an unpaid flood cannot fill the paid callers' pool. Each
   kind opens through its own :class:`~paygate.server.opengate.OpenGate` (``unpaid_open_slots``
   at once, ``per_ip_open_slots`` per address, and in all ``unpaid_opens_per_second`` for the
   unpaid, ``claimed_opens_per_second`` for those with a payment): no flood, from however many
   addresses, takes more than a bounded share of the TPM/HSM. A payment header is only a
   claim until verified, and costs nothing to forge: an address whose claim is refused after
   its open (any 4xx of the sender's: a body or a payment that is no good, an outcome sent
   again, a rate spent; :func:`paygate.server.claims.doubts`; or its payment verified and its
   caller gone, never charged) is admitted as unpaid for a while
   (:mod:`paygate.server.claims`; IPv6 doubts add up to their /48 and /32), so forged claims
   cannot take the claimed gate's rate from real payers; a payer whose payment verified from
   the address is still believed there (from the host it paid from).
4. Every body read holds a per-address slot too (``per_ip_body_slots``, never more than a
   pool): one address cannot exhaust another's share.
5. A batch is N requests: once its body is read, every item takes its own token of the item
   route's per-address limit (after the batch's own), so a batch cannot skip the rate limits.

Per-address means per :func:`~paygate.server.forwarded.address_key`: IPv4-mapped IPv6 as its
IPv4, IPv6 by its /``ipv6_prefix`` network.

The upstream concurrency slot is taken by the gateway only after admission. Refusals from a
full pool are immediate (429 per address, 503 in all), never a queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from paygate import jsonsafe, wire
from paygate.server.claims import DoubtedClaims, doubts
from paygate.server.errors import (
    EncryptionRequired,
    GatewayError,
    TooManyUploads,
    UploadsBusy,
)
from paygate.server.forwarded import DEFAULT_IPV6_PREFIX, Network, address_key, client_address
from paygate.server.limits import PerAddressSlots, Slots, read_body
from paygate.server.opengate import OpenGate
from paygate.server.opening import OpenedBody, Opener
from paygate.server.payments import PaymentStep, Ticket, carries_payment
from paygate.server.ratelimit import RateLimits
from paygate.server.routes import Route
from paygate.x402.batch import ITEM_PATH as BATCH_ITEM_PATH


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """The admission settings, fixed at start."""

    max_body_bytes: int
    body_read_timeout: float
    body_first_byte_timeout: float
    body_slots: int
    unpaid_body_slots: int
    per_ip_body_slots: int
    unpaid_open_slots: int
    require_encryption: bool
    retry_after_seconds: int
    trusted_proxies: tuple[Network, ...] = ()
    per_ip_open_slots: int = 1
    unpaid_opens_per_second: float = 10.0
    claimed_opens_per_second: float = 50.0
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX


@dataclass(frozen=True, slots=True)
class Admitted:
    """What admission produced: the payment ticket and the body, opened if pricing needed it."""

    ticket: Ticket
    body: bytes = field(repr=False)
    client: str
    opened: OpenedBody | None = None
    client_key: str = ""  # what per-address limits count under (forwarded.address_key)
    claim: bool = False  # a payment header admission opened the body on (body-priced route)


class Admission:
    """Limits and payment for one request (see the module docstring for the order)."""

    def __init__(
        self,
        limits: AdmissionLimits,
        payments: PaymentStep,
        opener: Opener,
        *,
        rate_limits: RateLimits | None = None,
    ) -> None:
        retry = {"Retry-After": str(limits.retry_after_seconds)}
        self._limits = limits
        self._rate_limits = rate_limits
        self._payments = payments
        self._opener = opener
        self._admitted_bodies = Slots(limits.body_slots, lambda: UploadsBusy(headers=retry))
        self._unverified_bodies = Slots(
            limits.unpaid_body_slots, lambda: UploadsBusy(headers=retry)
        )
        self._per_address = PerAddressSlots(
            limits.per_ip_body_slots, lambda: TooManyUploads(headers=retry)
        )

        def open_gate(per_second: float) -> OpenGate:
            return OpenGate(
                slots=limits.unpaid_open_slots,
                per_address=limits.per_ip_open_slots,
                # A rate for keys in hardware only (paygate.server.opengate).
                per_second=None if opener.inline else per_second,
                busy=lambda: UploadsBusy(headers=retry),
                too_many=lambda: TooManyUploads(headers=retry),
            )

        # Separate gates: callers without a payment cannot use up those with one, and those
        # whose claims were refused are admitted as the former (paygate.server.claims).
        self._unverified_opens = open_gate(limits.unpaid_opens_per_second)
        self._claimed_opens = open_gate(limits.claimed_opens_per_second)
        self._claims = DoubtedClaims()

    def admit(self, request: web.Request, route: Route) -> Admitting:
        return Admitting(self, request, route)

    def _ended(self, admitted: Admitted, request: web.Request) -> None:
        """A claim's request is over (its payment finished). Verified, then its caller gone
        and its payment released, never charged: its open and its model work were done on a
        verified payment's word — and that verification cleared its address's doubt. Doubted
        as a refused claim is (its own vouch spent), else a funded wallet that pays and leaves
        before each reply (or, ``settle_on_disconnect`` off, mid-stream) has its claims
        believed, opened through the claimed gate, for nothing. Charged (settled upfront, a
        reply under way with ``settle_on_disconnect``), it paid and doubts nobody; nor does
        an upstream's failure (a status of 400 or more)."""
        session = admitted.ticket.session
        if (
            admitted.claim
            and session.paid
            and session.caller_gone
            and session.admission.released
            and session.status < 400
        ):
            self._claims.refused(admitted.client_key, request.headers, admitted.client)

    async def _enter(self, request: web.Request, route: Route) -> tuple[Admitted, Any]:
        """Admit ``request``: what the block gets, and the payment step's context to exit."""
        limits = self._limits
        client = client_address(
            request.remote,
            request.headers.getall("X-Forwarded-For", []),
            limits.trusted_proxies,
        )
        key = address_key(client, limits.ipv6_prefix)
        if route.paid and self._rate_limits is not None:
            # Before anything else, unpaid challenges included: a flood costs one bucket.
            self._rate_limits.check_address(route.name, key)
        if (
            limits.require_encryption
            and route.paid
            and request.body_exists
            and not wire.is_sealed(request.headers.get("Content-Type"))
        ):
            raise EncryptionRequired
        if route.paid and (self._payments.needs_body or route.target == "batch"):
            # The price needs the body (its model, its tokens): read and open it before
            # payment, tightly bounded.
            paying = carries_payment(request.headers)
            claimed = paying and self._claims.believed(key, request.headers, client)
            pool = self._admitted_bodies if claimed else self._unverified_bodies
            body = await self._read(request, key, pool)
            # Believed again once the body is in: a claim refused while this body was read
            # doubts it too (else each address opens as many as it reads bodies at once).
            claimed = claimed and self._claims.believed(key, request.headers, client)
            try:
                opened, payment, ticket = await self._open_and_pay(
                    request, route, body, key, claimed
                )
            except GatewayError as refusal:
                # The sender's doing (a body that does not open or parse, a payment that is no
                # payment, or never verified again), after a key operation on a claim's word:
                # doubt its next claims.
                if paying and doubts(refusal):
                    self._claims.refused(key, request.headers, client)
                raise
            except BaseException:
                # Cut short once its open began (the caller gone before the verdict: its
                # handler cancelled) or failed unexpectedly: a key operation on a claim's word
                # that never verified. Doubted too, else disconnecting before each verdict
                # keeps an address's (or a vouched payer's) claims believed for ever.
                if paying:
                    self._claims.refused(key, request.headers, client)
                raise
            if paying and ticket.session.paid:
                # A payment verified, not merely admitted: a request priced at nothing is
                # admitted without its header being looked at, and clears nothing. Its payer
                # is believed here from now on, whoever else shares the address.
                self._claims.verified(key, ticket.session.admission.payer, client)
            return Admitted(ticket, body, client, opened, key, claim=paying), payment
        payment = self._payments.admit(request, route, client=key)
        ticket = await payment.__aenter__()
        try:
            body = await self._read(request, key, self._admitted_bodies)
        except BaseException as exc:
            await payment.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return Admitted(ticket, body, client, client_key=key), payment

    async def _open_and_pay(
        self, request: web.Request, route: Route, body: bytes, key: str, claimed: bool
    ) -> tuple[OpenedBody, Any, Ticket]:
        """A body-priced request, its body read: opened (sealed: through its kind's gate),
        then the payment step entered (its context, to exit with the caller's block)."""
        if wire.is_sealed(request.headers.get("Content-Type")):
            gate = self._claimed_opens if claimed else self._unverified_opens
            with gate.slot(key):
                opened = await self._opener.open(request, body)
        else:  # plaintext: nothing to open, no key operation
            opened = await self._opener.open(request, body)
        if route.target == "batch" and self._rate_limits is not None:
            for _ in range(_items(opened.body)):
                self._rate_limits.check_address(f"POST {BATCH_ITEM_PATH}", key)
        payment = self._payments.admit(request, route, body=opened.body, client=key)
        return opened, payment, await payment.__aenter__()

    async def _read(self, request: web.Request, key: str, pool: Slots) -> bytes:
        if not request.body_exists:
            return b""
        limits = self._limits
        with self._per_address.slot(key), pool.slot():
            return await read_body(
                request,
                limit=limits.max_body_bytes,
                timeout=limits.body_read_timeout,
                first_byte=limits.body_first_byte_timeout,
            )


class Admitting:
    """``async with admission.admit(request, route) as admitted``: the payment step's block
    spans the caller's (a class rather than a generator: every request enters one)."""

    __slots__ = ("_admission", "_admitted", "_payment", "_request", "_route")

    def __init__(self, admission: Admission, request: web.Request, route: Route) -> None:
        self._admission = admission
        self._request = request
        self._route = route
        self._payment: Any = None
        self._admitted: Admitted | None = None

    async def __aenter__(self) -> Admitted:
        admitted, self._payment = await self._admission._enter(self._request, self._route)
        self._admitted = admitted
        return admitted

    async def __aexit__(self, *exc: object) -> bool | None:
        try:
            return await self._payment.__aexit__(*exc)  # the payment's block ends as the caller's
        finally:
            if self._admitted is not None and self._admitted.claim:
                self._admission._ended(self._admitted, self._request)


def _items(body: bytes) -> int:
    """How many items a batch body holds (0 when it is not a JSON array: refused later)."""
    try:
        data = jsonsafe.loads(body, max_bytes=max(len(body), 1))
    except jsonsafe.UntrustedJSONError:
        return 0
    return len(data) if isinstance(data, list) else 0
