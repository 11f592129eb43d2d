"""The payment policy of one request, without HTTP: admit (challenge, check, reserve, verify),
settle exactly once, release what was not earned, and recover after a crash.

*When* a payment settles (after the reply, before it, or never: verify-only) is a
:class:`paygate.x402.settlement.Settlement` strategy chosen once at start; *who* verifies and
settles is a :class:`paygate.x402.settler.Settler` (facilitator or chain). Neither is a string
checked at request time.

The server's adapter (``paygate.server.payments``) turns HTTP headers into calls here and
:class:`Refusal` into responses. The order of every step is the point of this module:

1. price → no payment header: a 402 challenge (dual-stack);
2. decode (400 with the reason) → match an offer and check the authorization locally (402 with
   a fresh challenge): a forged payment never costs a network call;
3. reserve ``(network, asset, payer, nonce)`` in the ledger, durably, *before* any network or
   upstream call: a concurrent or later replay of the same authorization is refused;
4. verify with the settler (facilitator or chain); down → 503 + Retry-After, never served;
5. after a successful reply: SERVED, then SETTLING (both durable), then settle. An unknown
   outcome keeps the transaction hash and is reconciled — never re-signed, never re-charged.

Across processes (workers, replicas) the ledger's leases say who works on a payment: this
process holds the lease of every payment it is serving or settling (:meth:`renew_leases`,
called by the app's keeper, keeps them alive), names the lease's epoch in every change it
records (so a change after the lease was taken away is refused: fencing), and lets go of a
pending settlement so that any replica's reconciler may finish it. The reconciler claims what
nobody holds; the claim is exclusive, so one dead replica's work is finished once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Protocol
from urllib.parse import urlsplit

from paygate import wire
from paygate.x402 import codec, siwx
from paygate.x402.idempotency import DEFAULT_TTL_SECONDS, PaymentIdentifiers, fingerprint
from paygate.x402.leases import HeldLeases
from paygate.x402.ledger import (
    AlreadyReserved,
    Budget,
    BudgetExceeded,
    IdempotencyKeyReused,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    PaymentRecord,
    PaymentState,
    ReceiptUsage,
    SignInReused,
    review_error,
)
from paygate.x402.models import (
    USAGE_EXTENSION,
    AnyPaymentPayload,
    ResourceInfo,
    SettleResponse,
)
from paygate.x402.networks import resolve_network, to_atomic
from paygate.x402.offers import EXACT, Offer, PaymentTerms, challenge
from paygate.x402.results import PaymentAdmission, Receipt, Refusal
from paygate.x402.schemes import SCHEMES, Authorized
from paygate.x402.settlement import Settlement
from paygate.x402.settler import ReviewRequired, SettlementUnknown, Settler, SettlerUnavailable
from paygate.x402.smartwallet import WalletVerifier
from paygate.x402.verify import PaymentRejected, match_offer

log = logging.getLogger("paygate.x402")

PENDING = "settlement_pending"
_IN_PROGRESS = (
    PaymentState.RESERVED,
    PaymentState.VERIFIED,
    PaymentState.SERVED,
    PaymentState.SETTLING,
)


#: (route, model, payer) → the 429's headers when the payer is over its rate, else None.
PayerCheck = Callable[[str, str | None, str], Mapping[str, str] | None]


class EconomicsVerdict(Protocol):
    refusal: Refusal | None
    budgets: tuple[Budget, ...]


class EconomicsCheck(Protocol):
    """The economics controls (``paygate.economics.controls.Economics``): token limits and
    budgets shared through the ledger, checked after the local checks, before the reservation."""

    @property
    def needs_model(self) -> bool: ...

    async def admit(
        self, *, payer: str, model: str | None, asset: str, amount: int, decimals: int
    ) -> EconomicsVerdict: ...

    async def budget_reached(
        self, budget: Budget, *, payer: str, model: str | None, enforced: bool
    ) -> Refusal: ...

    async def record(
        self, *, payer: str, model: str | None, tokens_in: int, tokens_out: int
    ) -> None: ...


class PaymentEvents(Protocol):
    """What the processor reports as it works (metrics); each call must be cheap and never
    raise. Labels are codes and the operator's own networks and assets, never caller data."""

    def admission(self, outcome: str, scheme: str) -> None:
        """A paid route's admission: ``admitted`` or the refusal code; scheme or ``none``."""
        ...

    def settlement(self, outcome: str, seconds: float) -> None:
        """One settle call: ``settled``, ``refused``, ``pending`` or ``unavailable``."""
        ...

    def earned(self, network: str, asset: str, amount: int) -> None:
        """A settlement to us succeeded: ``amount`` atomic units of ``asset`` on ``network``."""
        ...

    def settling(self, delta: int) -> None:
        """A settlement started (+1) or ended (-1)."""
        ...


class NoEvents:
    """Reports nowhere."""

    def admission(self, outcome: str, scheme: str) -> None:
        return None

    def settlement(self, outcome: str, seconds: float) -> None:
        return None

    def earned(self, network: str, asset: str, amount: int) -> None:
        return None

    def settling(self, delta: int) -> None:
        return None


_CODE = re.compile(r"[a-z0-9_]{1,64}")
MAX_FREE_ADDRESSES = 100_000  # address keys whose free requests today are counted
_SCHEMES = frozenset({"exact", "upto"})


def _label(code: str) -> str:
    # Refusal codes may come from a facilitator: keep the label set small and printable.
    return code if _CODE.fullmatch(code) else "other"


def _scheme_offered(headers: Mapping[str, str]) -> str:
    """The scheme a refused request's payment named (``none`` without one), for a label."""
    raw, header = _payment_header(headers)
    if raw is None:
        return "none"
    try:
        return codec.decode_payment(raw, header=header).scheme
    except (codec.PaymentHeaderError, ValueError):
        return "other"


class PaymentProcessor:
    """The x402 policy over a ledger and a settler; one per gateway process."""

    def __init__(
        self,
        *,
        terms: PaymentTerms,
        ledger: Ledger,
        settler: Settler,
        settlement: Settlement,
        settle_on_disconnect: bool = True,
        schemes: tuple[str, ...] = (EXACT,),
        payer_check: PayerCheck | None = None,
        daily_budget: Decimal | None = None,
        free_per_day: int = 0,
        free_per_address: int | None = None,
        skew_seconds: int = 5,
        min_remaining_seconds: float = 0.0,
        retry_after_seconds: int = 1,
        clock: Callable[[], float] = time.time,
        events: PaymentEvents | None = None,
        economics: EconomicsCheck | None = None,
        payment_identifier_ttl: float = DEFAULT_TTL_SECONDS,
        wallets: WalletVerifier | None = None,
    ) -> None:
        self.terms = terms
        self._wallets = wallets  # contract-wallet sign-ins: asked on chain (smartwallet)
        self.economics = economics
        self._events: PaymentEvents = events if events is not None else NoEvents()
        self._ledger = ledger
        self._settler = settler
        self._settlement = settlement
        self._settle_on_disconnect = settle_on_disconnect
        self._schemes = {name: SCHEMES[name] for name in schemes}
        self._payer_check = payer_check
        self._daily_budget = daily_budget
        self._free_per_day = free_per_day
        # Free requests per client address key and UTC day (in memory, per process, bounded):
        # fresh wallets from one host share the host's allowance.
        self._free_per_address = free_per_address if free_per_address else free_per_day
        self._free_by_address: OrderedDict[tuple[str, str], int] = OrderedDict()
        # Proves a sign-in nonce was issued here (the ledger's, from load_signin_key).
        self._signin_key: bytes | None = None
        self._skew = skew_seconds
        self._min_remaining = min_remaining_seconds
        self._retry_after = str(retry_after_seconds)
        self._clock = clock
        self._background: set[asyncio.Task[Any]] = set()
        # Payments this process works on right now, and the fenced moves made under them.
        self._leases = HeldLeases(ledger)
        self._identifiers = PaymentIdentifiers(
            ledger,
            receipt=lambda record: Receipt(record.x402_version, _record_receipt(record)),
            settles=settlement.settles_owed,
            ttl=payment_identifier_ttl,
            retry_after=self._retry_after,
            clock=clock,
        )

    async def load_signin_key(self) -> None:
        """At start, with a free quota: the deployment's sign-in key, from the ledger."""
        if self._free_per_day > 0:
            self._signin_key = await self._ledger.signin_key()

    @property
    def signin_key(self) -> bytes:
        if self._signin_key is None:  # not loaded (a processor built without a start)
            self._signin_key = secrets.token_bytes(32)
        return self._signin_key

    # --- admission ---

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(self._schemes)

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    def decimals(self, network: str) -> int:
        """The decimals of the asset accepted on ``network`` (CAIP-2)."""
        for acceptance in self.terms.accepted:
            if acceptance.network.caip2 == network:
                return acceptance.asset.decimals
        raise ValueError(f"network {network!r} is not accepted")

    def offers(
        self,
        price: Decimal,
        maximum: Decimal | None,
        upto_extra: tuple[tuple[str, str], ...] = (),
    ) -> tuple[Offer, ...]:
        """What the 402 offers: ``exact`` at ``price`` (when > 0) and ``upto`` up to
        ``maximum`` (when given and > 0), for each scheme this processor takes."""
        offers: tuple[Offer, ...] = ()
        # A request with no metered price (not a generation route, no token price) is offered
        # `exact` at its flat price even where `exact` is not listed: never free by omission.
        if price > 0 and (EXACT in self._schemes or maximum is None):
            offers += self.terms.offers(price)
        if "upto" in self._schemes and maximum is not None and maximum > 0:
            offers += self.terms.upto_offers(maximum, upto_extra)
        return offers

    async def admit(
        self,
        headers: Mapping[str, str],
        *,
        price: Decimal,
        resource: ResourceInfo,
        route: str,
        maximum: Decimal | None = None,
        model: str | None = None,
        upto_extra: tuple[tuple[str, str], ...] = (),
        request_model: str | None = None,
        items: tuple[tuple[str, str | None], ...] = (),
        client: str = "",
    ) -> PaymentAdmission | Refusal:
        """:meth:`_admit`, reported to the events (outcome and scheme, never caller data).

        ``items``: a batch's items as (route, model), each taking its own payer rate-limit
        token as the single request would; a free sign-in covers one item, not a batch."""
        result = await self._admit(
            headers,
            price=price,
            resource=resource,
            route=route,
            maximum=maximum,
            model=model,
            upto_extra=upto_extra,
            request_model=request_model,
            items=items,
            client=client,
        )
        if isinstance(result, PaymentAdmission):
            outcome, scheme = "admitted", result.scheme.name if result.paid else "none"
        else:
            outcome, scheme = _label(result.code), _scheme_offered(headers)
        self._events.admission(outcome, scheme if scheme in _SCHEMES else "other")
        return result

    async def _admit(
        self,
        headers: Mapping[str, str],
        *,
        price: Decimal,
        resource: ResourceInfo,
        route: str,
        maximum: Decimal | None = None,
        model: str | None = None,
        upto_extra: tuple[tuple[str, str], ...] = (),
        request_model: str | None = None,
        items: tuple[tuple[str, str | None], ...] = (),
        client: str = "",
    ) -> PaymentAdmission | Refusal:
        """Admit a request at ``price`` (exact) or up to ``maximum`` (upto), or refuse it; a
        request with nothing to offer is free and needs no payment."""
        offers = self.offers(price, maximum, upto_extra)
        if not offers:
            return PaymentAdmission(price=price)
        raw, header = _payment_header(headers)
        if raw is None:
            signin = headers.get(wire.SIGN_IN_WITH_X)
            if signin is not None and self._free_per_day > 0:
                if len(items) > 1:
                    return self.challenge(
                        402, "free_quota_one_item", "a free request covers one item: pay for a "
                        "batch", offers, resource,
                    )  # fmt: skip
                return await self._free(
                    signin, price, offers, resource, route, model, items, client
                )
            return self.challenge(402, "payment_required", "payment required", offers, resource)
        try:
            payment = codec.decode_payment(raw, header=header)
            key = payment.payment_identifier
        except codec.PaymentHeaderError as exc:
            return self.challenge(400, "invalid_payment", str(exc), offers, resource)
        except ValueError as exc:
            return self.challenge(400, "invalid_payment", str(exc), offers, resource)
        if key is None and self.terms.require_payment_identifier and payment.x402_version == 2:
            return self.challenge(
                400,
                "invalid_payment",
                "the payment-identifier extension is required",
                offers,
                resource,
            )
        try:
            offer = match_offer(payment, offers)
            scheme = self._schemes[offer.scheme]
            authorized = scheme.check(
                payment,
                offer,
                now=int(self._clock()),
                skew=self._skew,
                min_remaining=self._min_remaining,
            )
        except PaymentRejected as exc:
            return self.challenge(402, exc.reason, str(exc), offers, resource)
        wanted = _fingerprint(route, offer, authorized) if key is not None else ""
        if key is not None:
            # A retry (same identifier): its recorded outcome, never a second charge.
            known = await self._identified(key, wanted)
            if known is not None:
                return known
        limited = self._payer_limited(route, model, items, authorized.payer)
        if limited is not None:  # before the reservation: the authorization stays usable
            return limited
        budgets: tuple[Budget, ...] = ()
        if self.economics is not None:
            verdict = await self.economics.admit(
                payer=authorized.payer,
                model=model or request_model,
                asset=offer.asset.address,
                amount=SCHEMES[offer.scheme].authorized_amount(authorized, offer),
                decimals=offer.asset.decimals,
            )
            if verdict.refusal is not None:  # before the reservation, like the rate limits
                return verdict.refusal
            budgets = verdict.budgets
        requirements = scheme.requirements(payment, offer, resource)
        try:
            record = await self._reserve(
                payment, offer, authorized, requirements, route, key, model=model, budgets=budgets
            )
        except AlreadyReserved as exc:
            return await self._replayed(exc.record, price, offers, resource, requirements)
        except BudgetExceeded as exc:
            if self.economics is not None and exc.budget is not None and exc.budget in budgets:
                return await self.economics.budget_reached(
                    exc.budget, payer=authorized.payer, model=model or request_model, enforced=True
                )
            return Refusal(
                429,
                "budget_exceeded",
                "this payer's daily budget is spent",
                headers={"Retry-After": str(_seconds_to_utc_midnight(self._clock()))},
            )
        except IdempotencyKeyReused:
            assert key is not None
            known = await self._identified(key, wanted)  # a concurrent retry took it first
            return known or Refusal(
                409,
                "idempotency_key_reused",
                "this payment-identifier belongs to another payment",
            )
        except LedgerUnavailable:
            return self.unavailable("ledger_unavailable", "the payment ledger is unavailable")
        except ValueError as exc:  # the ledger's own input checks; the models passed it
            return self.challenge(400, "invalid_payment", str(exc), offers, resource)
        self._leases.hold(record)
        admission = PaymentAdmission(
            price=price,
            record=record,
            payment=payment,
            requirements=requirements,
            scheme=scheme,
            authorized=authorized,
        )
        return await self._verify(admission, offers, resource)

    async def _identified(self, key: str, wanted: str) -> Refusal | None:
        try:
            return await self._identifiers.outcome(key, wanted)
        except LedgerUnavailable:
            return self.unavailable("ledger_unavailable", "the payment ledger is unavailable")

    async def _free(
        self,
        signin: str,
        price: Decimal,
        offers: tuple[Offer, ...],
        resource: ResourceInfo,
        route: str,
        model: str | None,
        items: tuple[tuple[str, str | None], ...] = (),
        client: str = "",
    ) -> PaymentAdmission | Refusal:
        """One of the wallet's free requests today, proven with sign-in-with-x, or a 402;
        the caller's address (key) has its own daily allowance, whatever the wallet."""
        now = self._clock()
        parts = urlsplit(resource.url)
        try:
            proof = siwx.parse(signin)
            payer = await siwx.verify_wallet(
                proof,
                origin=f"{parts.scheme}://{parts.netloc}",
                networks=[a.network.caip2 for a in self.terms.accepted],
                now=now,
                key=self.signin_key,
                wallets=self._wallets,
            )
        except siwx.SiwxRejected as exc:
            return self.challenge(402, exc.reason, str(exc), offers, resource)
        except SettlerUnavailable as exc:
            return self.unavailable("payment_verifier_unavailable", str(exc))
        limited = self._payer_limited(route, model, items, payer)
        if limited is not None:
            return limited
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        if not self._take_free_address(client, day):
            return self.challenge(
                402,
                "free_quota_exhausted",
                "today's free requests from this address are used: pay",
                offers,
                resource,
            )
        try:
            left = await self._ledger.take_free(
                payer=payer, nonce=proof.nonce, day=day, limit=self._free_per_day
            )
        except SignInReused:
            return self.challenge(
                402, "invalid_siwx_nonce", "this sign-in was already used", offers, resource
            )
        except LedgerUnavailable:
            return self.unavailable("ledger_unavailable", "the payment ledger is unavailable")
        if left is None:
            return self.challenge(
                402, "free_quota_exhausted", "today's free requests are used: pay", offers, resource
            )
        return PaymentAdmission(price=price, free_remaining=left)

    def _take_free_address(self, client: str, day: str) -> bool:
        """One of ``client``'s free requests today (False: none left)."""
        key = (client, day)
        used = self._free_by_address.pop(key, 0)
        self._free_by_address[key] = used + (used < self._free_per_address)
        while len(self._free_by_address) > MAX_FREE_ADDRESSES:
            self._free_by_address.popitem(last=False)
        return used < self._free_per_address

    def _payer_limited(
        self,
        route: str,
        model: str | None,
        items: tuple[tuple[str, str | None], ...],
        payer: str,
    ) -> Refusal | None:
        """The payer's rate limits: one token for the request (its model's limit first, every
        scheme), one more per batch item on the item's route; the 429 when one is refused."""
        if self._payer_check is None:
            return None
        for item_route, item_model in ((route, model), *items):
            limited = self._payer_check(item_route, item_model, payer)
            if limited is not None:
                return Refusal(
                    429, "rate_limited", "too many requests from this payer", headers=limited
                )
        return None

    async def _reserve(
        self,
        payment: AnyPaymentPayload,
        offer: Offer,
        authorized: Authorized,
        requirements: dict[str, Any],
        route: str,
        key: str | None,
        *,
        model: str | None,
        budgets: tuple[Budget, ...] = (),
    ) -> PaymentRecord:
        # ``amount`` is what the payer authorized: the price (exact) or the maximum (upto).
        return await self._ledger.reserve(
            network=offer.network.caip2,
            asset=offer.asset.address,
            payer=authorized.payer,
            nonce=authorized.nonce,
            pay_to=offer.pay_to,
            amount=SCHEMES[offer.scheme].authorized_amount(authorized, offer),
            x402_version=payment.x402_version,
            route=route,
            payload=json.dumps(payment.wire(), separators=(",", ":")),
            requirements=json.dumps(requirements, separators=(",", ":")),
            idempotency_key=key,
            scheme=offer.scheme,
            model=model if SCHEMES[offer.scheme].metered else None,
            budget=self._budget(offer),
            budgets=budgets,
        )

    def _budget(self, offer: Offer) -> Budget | None:
        """Today's (UTC) spend limit for one payer, in the offer's asset units."""
        if self._daily_budget is None:
            return None
        now = self._clock()
        return Budget(
            limit=to_atomic(self._daily_budget, offer.asset.decimals),
            since=now - now % 86_400,
        )

    async def _verify(
        self, admission: PaymentAdmission, offers: tuple[Offer, ...], resource: ResourceInfo
    ) -> PaymentAdmission | Refusal:
        record = admission.record
        assert record is not None
        assert admission.payment is not None
        try:
            answer = await admission.scheme.verify(
                self._settler, admission.payment, admission.requirements
            )
        except SettlerUnavailable as exc:
            await self.release(record)
            return self.unavailable("payment_verifier_unavailable", str(exc))
        if not answer.is_valid:
            await self.release(record)
            reason = answer.invalid_reason or "invalid_payload"
            return self.challenge(402, reason, _reason_text(reason), offers, resource)
        try:
            if not self._settlement.verified_when_served:  # else one transaction with SERVED
                admission.record = await self._leases.move(record, PaymentState.VERIFIED)
        except LedgerError:
            await self.release(record)
            return self.unavailable("ledger_unavailable", "the payment ledger is unavailable")
        return await self._settlement.verified(self, admission, offers, resource)

    async def settle_upfront(
        self, admission: PaymentAdmission, offers: tuple[Offer, ...], resource: ResourceInfo
    ) -> PaymentAdmission | Refusal:
        receipt = await self.settle_now(admission)
        if receipt is None or receipt.withhold:
            reason = receipt.response.error_reason if receipt else "unexpected_settle_error"
            reason = reason or "unexpected_settle_error"
            return self.challenge(402, reason, _reason_text(reason), offers, resource)
        if not receipt.response.success:
            # Outcome unknown: do not serve on a maybe. The same authorization, sent again
            # once reconciled, is served then (see _replayed).
            return self.unavailable(PENDING, "the settlement is pending; retry shortly")
        admission.receipt = receipt
        return admission

    async def _replayed(
        self,
        record: PaymentRecord,
        price: Decimal,
        offers: tuple[Offer, ...],
        resource: ResourceInfo,
        requirements: dict[str, Any],
    ) -> PaymentAdmission | Refusal:
        if record.state in _IN_PROGRESS:
            return Refusal(
                409,
                "payment_in_progress",
                "this payment is already being used by another request",
                headers={"Retry-After": self._retry_after},
            )
        if self._settlement.serves_again(record):
            # Upfront settlement whose answer came too late for its own request: the caller
            # paid, so the same authorization sent again is served (once: finish marks it).
            return PaymentAdmission(
                price=price,
                record=record,
                payment=codec.parse_payment(json.loads(record.payload), header="ledger"),
                requirements=requirements,
                receipt=Receipt(record.x402_version, _record_receipt(record)),
                scheme=SCHEMES[record.scheme],
            )
        headers: dict[str, str] = {}
        if record.state is PaymentState.SETTLED:
            receipt = Receipt(record.x402_version, _record_receipt(record))
            headers[receipt.header] = receipt.encoded()
        return self.challenge(
            402,
            SCHEMES[record.scheme].replay_code,
            "this payment authorization was already used",
            offers,
            resource,
            headers=headers,
        )

    # --- settlement ---

    async def settle(self, admission: PaymentAdmission) -> Receipt | None:
        """Settle an admitted request whose reply succeeded; its receipt (None if free).

        Runs as its own task so that a caller who disconnects (which cancels the handler)
        cannot interrupt a settlement between its durable record and its side effect.
        """
        if not admission.paid or admission.receipt is not None:
            return admission.receipt
        return await self._settlement.reply_ready(self, admission)

    async def finish(
        self, admission: PaymentAdmission, *, succeeded: bool, caller_gone: bool
    ) -> None:
        """The request is over: release an unearned reservation, or settle what is owed.

        ``succeeded``: the upstream answered below 400 and the reply was produced.
        ``caller_gone``: the caller disconnected before the end of the reply.
        """
        if admission.finished or not admission.paid:
            return
        admission.finished = True
        earned = succeeded and (not caller_gone or self._settle_on_disconnect)
        await self._settlement.finished(self, admission, earned=earned)
        record = admission.record
        if admission.settle_task is None and record is not None and self._leases.holds(record):
            # Nothing more happens to it in this request (e.g. verify-only leaves it SERVED):
            # give the lease up so that a reconciler, anywhere, owns what is left.
            await self._leases.let_go(record)

    async def record_usage(
        self, admission: PaymentAdmission, *, model: str | None, tokens_in: int, tokens_out: int
    ) -> None:
        """A served paid request's tokens, for the economics controls' token windows."""
        record = admission.record
        if self.economics is None or record is None:
            return
        await self.economics.record(
            payer=record.payer, model=model, tokens_in=tokens_in, tokens_out=tokens_out
        )

    def settle_in_background(self, admission: PaymentAdmission) -> asyncio.Task[Receipt | None]:
        """The admission's settlement task, started once (SERVED → SETTLING → outcome)."""
        if admission.settle_task is None:
            admission.settle_task = self._spawn(self._settle_after(admission))
        return admission.settle_task

    async def _settle_after(self, admission: PaymentAdmission) -> Receipt | None:
        record = admission.record
        assert record is not None
        try:
            # Fenced; a metered request's usage and charge are durable with SERVED, so a
            # restart settles the same amount.
            admission.record = await self._leases.move(
                record, PaymentState.SERVED, meter=admission.meter
            )
        except LedgerError as exc:
            log.error("payment %s: cannot record SERVED: %s", record.id, exc.code)
            if self._leases.holds(record):
                await self._leases.let_go(record)
            return None
        return await self.settle_now(admission)

    async def settle_now(self, admission: PaymentAdmission) -> Receipt | None:
        """SETTLING (durable) → settle → SETTLED | FAILED | still SETTLING (reconcile later)."""
        try:
            return await self._settle_now(admission)
        finally:
            record = admission.record
            if record is not None and self._leases.holds(record) and not record.terminal:
                await self._leases.let_go(record)  # not finished here: whoever reconciles takes it

    async def _settle_now(self, admission: PaymentAdmission) -> Receipt | None:
        record = admission.record
        payment = admission.payment
        assert record is not None
        assert payment is not None
        try:
            # Fenced, and the last word before the settle call: a process that lost its lease
            # (frozen past it, another replica claimed the payment) stops here.
            record = await self._leases.move(record, PaymentState.SETTLING)
        except LedgerError as exc:
            log.error("payment %s: cannot record SETTLING: %s", record.id, exc.code)
            return None
        admission.record = record
        started = time.monotonic()
        self._events.settling(1)
        try:
            answer = await admission.scheme.settle(
                self._settler, payment, admission.requirements, admission.owed
            )
        except ReviewRequired as exc:
            return await self._pending(
                admission, exc.transaction, review=str(exc), withhold=exc.withhold
            )
        except SettlementUnknown as exc:
            self._events.settlement("pending", time.monotonic() - started)
            return await self._pending(admission, exc.transaction)
        except SettlerUnavailable:
            self._events.settlement("unavailable", time.monotonic() - started)
            return await self._pending(admission, None)
        finally:
            self._events.settling(-1)
        outcome = "settled" if answer.success else "refused"
        self._events.settlement(outcome, time.monotonic() - started)
        receipt = await self._record_answer(admission, answer)
        admission.receipt = receipt
        return receipt

    async def _record_answer(self, admission: PaymentAdmission, answer: SettleResponse) -> Receipt:
        record = admission.record
        assert record is not None
        state = PaymentState.SETTLED if answer.success else PaymentState.FAILED
        if answer.success and answer.amount is not None and answer.amount != str(admission.owed):
            # Money moved, but not what we asked: record what moved and say so.
            log.error(
                "payment %s settled %s, not the %s asked", record.id, answer.amount, admission.owed
            )
        try:
            admission.record = await self._leases.move(
                record,
                state,
                transaction=answer.transaction or None,
                error=None if answer.success else (answer.error_reason or "settle_failed"),
                settled_amount=_moved(answer, admission.owed) if answer.success else None,
            )
        except LedgerError as exc:
            log.error("payment %s: cannot record %s: %s", record.id, state, exc.code)
        if answer.success:
            self._events.earned(record.network, record.asset, _moved(answer, admission.owed))
            log.info("payment %s settled", record.id)
        else:
            log.warning("payment %s settlement refused: %s", record.id, answer.error_reason)
        return Receipt(
            record.x402_version, _with_usage(answer, record), withhold=not answer.success
        )

    async def _pending(
        self,
        admission: PaymentAdmission,
        transaction: str | None,
        *,
        review: str | None = None,
        withhold: bool = False,
    ) -> Receipt:
        """Still owed, outcome unknown: SETTLING again, the hash kept; ``review`` flags it for
        an operator (an outcome nobody here can prove), never as paid."""
        record = admission.record
        assert record is not None
        with contextlib.suppress(LedgerError):
            # SETTLING → SETTLING keeps the record owed and stores the hash if we have one;
            # then the lease goes: any replica's reconciler finishes it.
            admission.record = await self._leases.move(
                record,
                PaymentState.SETTLING,
                transaction=transaction,
                error=review_error(review) if review else PENDING,
            )
            await self._leases.let_go(admission.record)
        if review:
            log.warning("payment %s needs review: %s", record.id, review)
        else:
            log.warning("payment %s settlement pending; will reconcile", record.id)
        return Receipt(
            record.x402_version,
            SettleResponse(
                success=False,
                error_reason=PENDING,
                payer=record.payer,
                transaction=transaction or "",
                network=_wire_network(record),
            ),
            withhold=withhold,
        )

    # --- recovery and leases ---

    async def release_abandoned(self, *, own: bool = False) -> int:
        """Release reservations whose owner is gone (its lease ran out; with ``own``, also
        this replica name's, left by its previous run), so their callers can retry."""
        released = await self._ledger.release_abandoned(own=own)
        return len(released)

    async def adopt_own(self) -> list[PaymentRecord]:
        """At start, before serving: claim the settlements this replica name left unfinished
        (its previous run died); :meth:`reconcile_once` finishes them."""
        if not self._settlement.settles_owed:
            return []
        return await self._ledger.claim_unfinished(min_age=0.0, own=True)

    async def reconcile_once(
        self, *, min_age: float, adopted: list[PaymentRecord] | None = None
    ) -> int:
        """One pass: release abandoned reservations, then claim and finish the settlements
        nobody holds (lease ran out, or let go ``min_age`` seconds ago), plus ``adopted``."""
        await self.release_abandoned()
        if not self._settlement.settles_owed:
            return 0
        claimed = [*(adopted or ()), *await self._ledger.claim_unfinished(min_age=min_age)]
        for record in claimed:
            self._leases.hold(record)
            try:
                await self._reconcile(record)
            finally:
                if self._leases.holds(record):  # still owed or in doubt: for a later pass
                    await self._leases.let_go(record)
        return len(claimed)

    async def renew_leases(self) -> int:
        """Renew the lease of every payment this process works on (see ``HeldLeases``)."""
        return await self._leases.renew_all()

    async def _reconcile(self, record: PaymentRecord) -> None:
        try:
            payment = codec.parse_payment(json.loads(record.payload), header="ledger")
        except (codec.PaymentHeaderError, ValueError):
            log.error("payment %s: stored payload unreadable", record.id)
            return
        admission = PaymentAdmission(
            price=Decimal(0),
            record=record,
            payment=payment,
            requirements=json.loads(record.requirements),
            scheme=SCHEMES[record.scheme],
        )
        if record.state is PaymentState.SERVED:
            await self.settle_now(admission)
            return
        try:
            # Re-check the lease right before asking again (fencing, as in settle_now).
            record = admission.record = await self._ledger.renew(record.id, record.lease)
        except LedgerError as exc:
            log.warning("payment %s: not reconciled: %s", record.id, exc.code)
            self._leases.drop(record.id)
            return
        try:
            answer = await admission.scheme.reconcile(
                self._settler, payment, admission.requirements, record.owed, record.transaction
            )
        except ReviewRequired as exc:
            if not record.needs_review:
                await self._pending(admission, exc.transaction, review=str(exc))
            return
        except (SettlementUnknown, SettlerUnavailable) as exc:
            log.warning("payment %s still pending: %s", record.id, exc.code)
            return
        await self._record_answer(admission, answer)

    # --- helpers ---

    async def release(self, record: PaymentRecord) -> None:
        await self._leases.release(record)

    async def mark_served(self, admission: PaymentAdmission) -> None:
        """Record that the reply went out, once. A payment never settled here (verify-only)
        moves (RESERVED →) VERIFIED → SERVED (which marks it served) and its lease goes, all in
        one transaction: nothing more happens to it here."""
        record = admission.record
        assert record is not None
        try:
            if record.state in (PaymentState.RESERVED, PaymentState.VERIFIED):
                admission.record = await self._leases.move(
                    record,
                    PaymentState.SERVED,
                    let_go=not self._settlement.settles_owed,  # verify-only: nothing more here
                    via=PaymentState.VERIFIED if record.state is PaymentState.RESERVED else None,
                )
            elif not record.served:
                admission.record = await self._ledger.mark_served(record.id)
        except LedgerError as exc:
            log.warning("payment %s: cannot mark served: %s", record.id, exc.code)

    async def keep_receipt(
        self, record: PaymentRecord, token: str, usage: Mapping[str, Any] | None
    ) -> None:
        """Keep a paid reply's signed receipt in the ledger with the usage it states (every
        scheme). A failing ledger loses only this copy: the caller holds the receipt."""
        stated = None
        if usage is not None:
            source = str(usage.get("source") or "reported")
            stated = ReceiptUsage(
                int(usage["prompt_tokens"]),
                int(usage["completion_tokens"]),
                "upstream" if source == "reported" else source,
            )
        try:
            await self._ledger.add_receipt(
                record.id, "reply", token, usage=stated, lease=record.lease
            )
        except (LedgerError, ValueError) as exc:
            log.warning("payment %s: cannot keep its receipt: %s", record.id, type(exc).__name__)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for settlements still running; what is left is reconciled at start."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)

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
        extensions = None
        if self._free_per_day > 0:
            parts = urlsplit(resource.url)
            extensions = {
                siwx.EXTENSION: siwx.declaration(
                    domain=parts.netloc,
                    uri=resource.url,
                    networks=[a.network.caip2 for a in self.terms.accepted],
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
                require_payment_identifier=self.terms.require_payment_identifier,
                extensions=extensions,
            ),
            headers or {},
        )

    def unavailable(self, code: str, message: str) -> Refusal:
        return Refusal(503, code, message, headers={"Retry-After": self._retry_after})


def _fingerprint(route: str, offer: Offer, authorized: Authorized) -> str:
    """What this payment buys and who buys it (paygate.x402.idempotency)."""
    return fingerprint(
        route=route,
        payer=authorized.payer,
        network=offer.network.caip2,
        asset=offer.asset.address,
        pay_to=offer.pay_to,
        amount=SCHEMES[offer.scheme].authorized_amount(authorized, offer),
        scheme=offer.scheme,
    )


def _seconds_to_utc_midnight(now: float) -> int:
    return max(1, int(86_400 - now % 86_400))


def _payment_header(headers: Mapping[str, str]) -> tuple[str | None, str]:
    value = headers.get(wire.PAYMENT_SIGNATURE)
    if value is not None:
        return value, wire.PAYMENT_SIGNATURE
    return headers.get(wire.X_PAYMENT), wire.X_PAYMENT


def _with_usage(answer: SettleResponse, record: PaymentRecord) -> SettleResponse:
    """A metered payment's receipt names the usage it was charged for and its maximum."""
    if not SCHEMES[record.scheme].metered or record.tokens_in is None:
        return answer
    usage = {
        "promptTokens": record.tokens_in,
        "completionTokens": record.tokens_out,
        "source": record.usage_source,
        "maximum": str(record.amount),
        "charged": str(record.owed),
    }
    return answer.model_copy(
        update={"extensions": {**(answer.extensions or {}), USAGE_EXTENSION: {"info": usage}}}
    )


def _moved(answer: SettleResponse, owed: int) -> int:
    """The atomic units a successful settlement moved (the answer's amount when it says)."""
    if answer.amount is not None and answer.amount.isdigit():
        return int(answer.amount)
    return owed


def _wire_network(record: PaymentRecord) -> str:
    if record.x402_version == 1:
        return resolve_network(record.network).name
    return record.network


def _record_receipt(record: PaymentRecord) -> SettleResponse:
    return _with_usage(
        SettleResponse(
            success=record.state is PaymentState.SETTLED,
            error_reason=record.error,
            payer=record.payer,
            transaction=record.transaction or "",
            network=_wire_network(record),
            amount=str(record.owed if record.settled_amount is None else record.settled_amount),
        ),
        record,
    )


_REASONS = {
    "insufficient_funds": "the payer's balance is too low",
    "invalid_exact_evm_insufficient_balance": "the payer's balance is too low",
    "invalid_exact_evm_nonce_already_used": "this payment authorization was already used",
    "invalid_upto_evm_nonce_already_used": "this payment authorization was already used",
    "invalid_exact_evm_payload_signature": "the signature is not the payer's",
}


def _reason_text(reason: str) -> str:
    return _REASONS.get(reason, f"payment refused: {reason}")
