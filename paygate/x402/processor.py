"""Admission of a paid request, without HTTP: challenge, check, reserve, verify — and the
wiring of the payment modules of one gateway process.

The order of every admission step is the point of this module:

1. price → no payment header: a 402 challenge (dual-stack); a sign-in: the free quota
   (:mod:`paygate.x402.free`);
2. decode (400 with the reason) → match an offer and check the authorization locally (402 with
   a fresh challenge): a forged payment never costs a network call;
3. reserve ``(network, asset, payer, nonce)`` in the ledger, durably, *before* any network or
   upstream call: a concurrent or later replay of the same authorization is refused;
4. verify with the settler (facilitator or chain); down → 503 + Retry-After, never served;
5. admitted: a :class:`~paygate.x402.session.PaymentSession` owns the request's payment from
   here to its one exit (meter, settle or release: :mod:`paygate.x402.settlements`).

*When* a payment settles is a :class:`paygate.x402.settlement.Settlement` strategy chosen once
at start; *who* verifies and settles is a :class:`paygate.x402.settler.Settler` (facilitator or
chain). Crash recovery, reconciliation and lease renewal are :mod:`paygate.x402.recovery`; every
ledger change after the reservation is a fenced move (:mod:`paygate.x402.leases`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from paygate import jsonsafe, wire
from paygate.x402 import codec
from paygate.x402.free import FreeQuota
from paygate.x402.hooks import EconomicsCheck, NoEvents, PayerCheck, PaymentEvents
from paygate.x402.idempotency import DEFAULT_TTL_SECONDS, PaymentIdentifiers, fingerprint
from paygate.x402.leases import HeldLeases
from paygate.x402.ledger import (
    AlreadyReserved,
    Budget,
    BudgetExceeded,
    IdempotencyKeyReused,
    LeaseLost,
    LedgerError,
    LedgerUnavailable,
    PaymentRecord,
    PaymentState,
)
from paygate.x402.ledger_base import Ledger
from paygate.x402.models import AnyPaymentPayload, ResourceInfo
from paygate.x402.networks import to_atomic
from paygate.x402.offers import EXACT, Offer, PaymentTerms
from paygate.x402.recovery import Recovery
from paygate.x402.refusal import Refusal
from paygate.x402.refusals import Refusals, operation_done, payer_limited
from paygate.x402.responses import reason_text, recorded_receipt
from paygate.x402.results import PaymentAdmission
from paygate.x402.schemes import SCHEMES, Authorized, Scheme
from paygate.x402.schemes.base import CheckTime, PaymentUnconfirmed
from paygate.x402.session import MeteredTerms, PaymentSession
from paygate.x402.settlement import Settlement, release_unearned
from paygate.x402.settlements import Settlements
from paygate.x402.settler import Settler, SettlerUnavailable
from paygate.x402.smartwallet import WalletVerifier
from paygate.x402.verify import PaymentRejected, match_offer

# A verify that woke after its reservation was released (this process stalled past its lease):
# the 503 every lease-lost path answers (paygate.client.withheld sends the payment again).
LEASE_LOST_AT_VERIFY = (
    "this gateway lost the payment's reservation while verifying it: nothing was served or "
    "charged; send the payment again"
)

# A verifier's invalid reasons that are its own failure, not the payment's (x402's
# ``unexpected_verify_error``: the facilitator could not check it): the claim doubts nobody.
_DEPENDENCY_FAILED = frozenset({"unexpected_verify_error"})

_IN_PROGRESS = (
    PaymentState.RESERVED,
    PaymentState.VERIFIED,
    PaymentState.SERVED,
    PaymentState.SETTLING,
)


_CODE = re.compile(r"[a-z0-9_]{1,64}")
# (price, maximum, extra) whose offers are kept (a route's, a model's): past it, all made afresh.
_OFFERS_KEPT = 256


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
    """The x402 admission over a ledger and a settler, and the payment modules it wires (the
    refusals, the free quota, the settlements, recovery); one per gateway process."""

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
        bound: Mapping[str, Scheme] | None = None,
    ) -> None:
        self.terms = terms
        self._offers_made: dict[
            tuple[Decimal, Decimal | None, tuple[tuple[str, str], ...]], tuple[Offer, ...]
        ] = {}
        self.economics = economics
        self._events: PaymentEvents = events if events is not None else NoEvents()
        self._ledger = ledger
        self._settler = settler
        self._settlement = settlement
        # A scheme bound to this gateway at start (``Scheme.bind``) replaces the registry's.
        self._schemes = {name: (bound or {}).get(name, SCHEMES[name]) for name in schemes}
        self._payer_check = payer_check
        self._daily_budget = daily_budget
        self._skew = skew_seconds
        self._min_remaining = min_remaining_seconds
        self._clock = clock
        self._refusals = Refusals(
            terms, free=free_per_day > 0, retry_after_seconds=retry_after_seconds, clock=clock
        )
        self.free = FreeQuota(
            terms=terms,
            ledger=ledger,
            refusals=self._refusals,
            per_day=free_per_day,
            per_address=free_per_address,
            payer_check=payer_check,
            wallets=wallets,
            clock=clock,
        )
        # Payments this process works on right now, and the fenced moves made under them.
        self._leases = HeldLeases(ledger)
        self.settlements = Settlements(
            leases=self._leases,
            settler=settler,
            settlement=settlement,
            refusals=self._refusals,
            events=self._events,
            settle_on_disconnect=settle_on_disconnect,
        )
        self.recovery = Recovery(
            ledger=ledger,
            leases=self._leases,
            settlement=settlement,
            settlements=self.settlements,
            schemes=self.scheme,
        )
        self._identifiers = PaymentIdentifiers(
            ledger,
            receipt=recorded_receipt,
            settles=settlement.settles_owed,
            ttl=payment_identifier_ttl,
            retry_after=self._refusals.retry_after,
            clock=clock,
        )

    async def load_signin_key(self) -> None:
        """At start, with a free quota: the deployment's sign-in key, from the ledger."""
        await self.free.load_signin_key()

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(self._schemes)

    def scheme(self, name: str) -> Scheme:
        """This processor's scheme of that name (bound, where it is), else the registry's."""
        return self._schemes.get(name) or SCHEMES[name]

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    def offers(
        self,
        price: Decimal,
        maximum: Decimal | None,
        upto_extra: tuple[tuple[str, str], ...] = (),
    ) -> tuple[Offer, ...]:
        """What the 402 offers: ``exact`` at ``price`` (when > 0) and ``upto`` up to
        ``maximum`` (when given and > 0), for each scheme this processor takes, and what each
        scheme offers itself (``Scheme.own_offers``). Made once per (price, maximum, extra):
        the terms and the bound schemes are fixed at start and a deployment has a handful of
        prices (bounded all the same: an upto route's extra comes from its token prices)."""
        key = (price, maximum, upto_extra)
        made = self._offers_made.get(key)
        if made is None:
            made = self._make_offers(price, maximum, upto_extra)
            if len(self._offers_made) >= _OFFERS_KEPT:
                self._offers_made.clear()
            self._offers_made[key] = made
        return made

    def _make_offers(
        self, price: Decimal, maximum: Decimal | None, upto_extra: tuple[tuple[str, str], ...]
    ) -> tuple[Offer, ...]:
        offers: tuple[Offer, ...] = ()
        if "upto" in self._schemes and maximum is not None and maximum > 0:
            offers += self.terms.upto_offers(maximum, upto_extra)
        for scheme in self._schemes.values():
            offers += scheme.own_offers(self.terms, price=price, maximum=maximum)
        # A request no listed scheme can price (upto alone on a route with no metered price) is
        # offered `exact` at its flat price even where `exact` is not listed: never free by
        # omission. Where another scheme prices it, only what the operator listed is offered.
        if price > 0 and (EXACT in self._schemes or (maximum is None and not offers)):
            offers = self.terms.offers(price) + offers
        return offers

    async def admit(
        self,
        headers: Mapping[str, str],
        *,
        price: Decimal,
        resource: ResourceInfo,
        route: str,
        metered: MeteredTerms | None = None,
        model: str | None = None,
        request_model: str | None = None,
        items: tuple[tuple[str, str | None], ...] = (),
        client: str = "",
    ) -> PaymentSession | Refusal:
        """Admit a request at ``price`` (exact) or up to ``metered``'s quote (upto), or refuse
        it (reported to the events: outcome and scheme, never caller data); an admitted
        request's payment is a :class:`PaymentSession` from here on.

        ``items``: a batch's items as (route, model), each taking its own payer rate-limit
        token as the single request would; a free sign-in covers one item, not a batch."""
        quote = metered.quote if metered is not None else None
        result = await self._admit(
            headers,
            price=price,
            resource=resource,
            route=route,
            maximum=quote.maximum if quote is not None else None,
            model=model,
            upto_extra=quote.offer_extra() if quote is not None else (),
            request_model=request_model,
            items=items,
            client=client,
        )
        if isinstance(result, PaymentAdmission):
            outcome, scheme = "admitted", result.scheme.name if result.paid else "none"
        else:
            outcome, scheme = _label(result.code), _scheme_offered(headers)
        self._events.admission(outcome, scheme if scheme in SCHEMES else "other")
        if isinstance(result, Refusal):
            return result
        record = result.record
        return PaymentSession(
            result,
            settlements=self.settlements,
            terms=metered,
            decimals=self.terms.decimals(record.network) if record is not None else 0,
            economics=self.economics,
            model=quote.model if quote is not None else model,
        )

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
            if signin is not None and self.free.per_day > 0:
                if len(items) > 1:
                    return self._refusals.challenge(
                        402, "free_quota_one_item", "a free request covers one item: pay for a "
                        "batch", offers, resource,
                    )  # fmt: skip
                return await self.free.admit(
                    signin, price, offers, resource, route, model, items, client
                )
            return self._refusals.challenge(
                402, "payment_required", "payment required", offers, resource
            )
        try:
            payment = codec.decode_payment(raw, header=header)
            key = payment.payment_identifier
        except codec.PaymentHeaderError as exc:
            return self._refusals.challenge(400, "invalid_payment", str(exc), offers, resource)
        except ValueError as exc:
            return self._refusals.challenge(400, "invalid_payment", str(exc), offers, resource)
        if key is None and self.terms.require_payment_identifier and payment.x402_version == 2:
            return self._refusals.challenge(
                400,
                "invalid_payment",
                "the payment-identifier extension is required",
                offers,
                resource,
            )
        scheme: Scheme | None = None
        try:
            offer = match_offer(payment, offers)
            scheme = self.scheme(offer.scheme)
            # A payment operation that is not a paid request (a channel's refund); a scheme
            # without the hook (``Scheme.operation``'s None) is not asked.
            if type(scheme).operation is not Scheme.operation:
                done = await scheme.operation(payment, offer)
                if done is not None:
                    return operation_done(payment, done)
            when = CheckTime(int(self._clock()), self._skew, self._min_remaining)
            authorized = scheme.check(payment, offer, when)
        except PaymentRejected as exc:
            refused = self._refusals.challenge(402, exc.reason, str(exc), offers, resource)
            if isinstance(exc, PaymentUnconfirmed) or (
                scheme is not None and await self._left_by_failure(scheme, exc.reason, payment)
            ):
                refused = dataclasses.replace(refused, server_side=True)
            # Completed by the scheme as a paid request's refusal is (a refund refused on a
            # busy channel says when to ask again).
            return refused if scheme is None else await scheme.corrective(refused, payment)
        except LedgerError:  # an operation's ledger (a channel's refund): asked again later
            return self._refusals.ledger_unavailable()
        wanted = _fingerprint(route, offer, authorized) if key is not None else ""
        if key is not None:
            # A retry (same identifier): its recorded outcome, never a second charge.
            known = await self._identified(key, wanted)
            if known is not None:
                return known
        limited = payer_limited(self._payer_check, route, model, items, authorized.payer)
        if limited is not None:  # before the reservation: the authorization stays usable
            return limited
        budgets: tuple[Budget, ...] = ()
        if self.economics is not None:
            verdict = await self.economics.admit(
                payer=authorized.payer,
                model=model or request_model,
                asset=offer.asset.address,
                amount=scheme.authorized_amount(authorized, offer),
                decimals=offer.asset.decimals,
            )
            if verdict.refusal is not None:  # before the reservation, like the rate limits
                return verdict.refusal
            budgets = verdict.budgets
        requirements = scheme.requirements(payment, offer, resource)
        asked = self._leases.now()  # the lease is counted on from here (HeldLeases.hold)
        try:
            record = await self._reserve(
                payment, offer, authorized, requirements, route, key, model=model, budgets=budgets
            )
        except AlreadyReserved as exc:
            replayed = await self._replayed(exc.record, price, offers, resource, requirements)
            return await _corrected(scheme, payment, replayed)
        except BudgetExceeded as exc:
            if self.economics is not None and exc.budget is not None and exc.budget in budgets:
                return await self.economics.budget_reached(
                    exc.budget, payer=authorized.payer, model=model or request_model, enforced=True
                )
            return self._refusals.budget_spent()
        except IdempotencyKeyReused:
            assert key is not None
            known = await self._identified(key, wanted)  # a concurrent retry took it first
            return known or Refusal(
                409,
                "idempotency_key_reused",
                "this payment-identifier belongs to another payment",
            )
        except LedgerUnavailable:
            return self._refusals.ledger_unavailable()
        except ValueError as exc:  # the ledger's own input checks; the models passed it
            return self._refusals.challenge(400, "invalid_payment", str(exc), offers, resource)
        self._leases.hold(record, asked=asked)
        admission = PaymentAdmission(
            price=price,
            record=record,
            payment=payment,
            requirements=requirements,
            scheme=scheme,
            authorized=authorized,
        )
        verified = await self._verify(admission, offers, resource)
        if isinstance(verified, Refusal):
            return await scheme.corrective(verified, payment)
        return verified

    async def _identified(self, key: str, wanted: str) -> Refusal | None:
        try:
            return await self._identifiers.outcome(key, wanted)
        except LedgerUnavailable:
            return self._refusals.ledger_unavailable()

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
        scheme = self.scheme(offer.scheme)
        return await self._ledger.reserve(
            network=offer.network.caip2,
            asset=offer.asset.address,
            payer=authorized.payer,
            nonce=authorized.nonce,
            pay_to=offer.pay_to,
            amount=scheme.authorized_amount(authorized, offer),
            x402_version=payment.x402_version,
            route=route,
            payload=payment.wire_json().decode(),
            requirements=jsonsafe.dumps_compact(requirements).decode(),
            idempotency_key=key,
            scheme=offer.scheme,
            model=model if scheme.metered else None,
            budget=daily_budget(self._daily_budget, offer, self._clock()),
            budgets=budgets,
            write=scheme.reserve_write(payment, offer),  # a channel's take, in the same transaction
        )

    async def _verify(
        self, admission: PaymentAdmission, offers: tuple[Offer, ...], resource: ResourceInfo
    ) -> PaymentAdmission | Refusal:
        record = admission.record
        assert record is not None
        assert admission.payment is not None
        try:
            try:
                answer = await admission.scheme.verify(
                    self._settler, admission.payment, admission.requirements
                )
            except SettlerUnavailable as exc:
                await release_unearned(self._leases, admission, record)
                return self._refusals.unavailable("payment_verifier_unavailable", str(exc))
            except LeaseLost:
                # Stalled in its verify past its lease, and released by another replica: this
                # process takes nothing (the scheme refused it), and the payer sends it again.
                self._leases.drop(record.id)
                return self._refusals.unavailable(LeaseLost.code, LEASE_LOST_AT_VERIFY)
            if not answer.is_valid:
                await self._leases.release(record)
                reason = answer.invalid_reason or "invalid_payload"
                refused = self._refusals.challenge(
                    402, reason, reason_text(reason), offers, resource
                )
                if reason in _DEPENDENCY_FAILED or await self._left_by_failure(
                    admission.scheme, reason, admission.payment
                ):
                    refused = dataclasses.replace(refused, server_side=True)
                return refused
            try:
                if not self._settlement.verified_when_served:  # else one transaction with SERVED
                    admission.record = await self._leases.move(record, PaymentState.VERIFIED)
            except LedgerError:
                await release_unearned(self._leases, admission, record)
                return self._refusals.ledger_unavailable()
        except BaseException:
            # Cut short while verifying (the caller gone: its handler cancelled) or failed
            # unexpectedly: no session will finish this payment, and a hold kept would have its
            # lease renewed for ever (the payer's retries refused as in progress). Nothing was
            # earned or sent to settle: released, shielded from a second cancellation.
            await asyncio.shield(self._let_down(admission, admission.record or record))
            raise
        return await self._settlement.verified(self.settlements, admission, offers, resource)

    async def _left_by_failure(
        self, scheme: Scheme, reason: str, payment: AnyPaymentPayload
    ) -> bool:
        """Was ``payment`` refused ``reason`` for a hold (a busy channel) that a failed request
        left: its payment still in progress with nobody working on it (its owner's lease ran
        out: a replica died; or let go after its release failed)? That is this server's
        failure, not the caller's doing. A hold a live request keeps (the payer's own
        concurrent request) is not, so a caller cannot have refusals that doubt nobody by
        holding its own channel with a slow call; nor is a hold whose payment ended: a payment
        that ends gives its hold back in the same transaction, so a hold under an ended
        payment's nonce is another live one's under the same key (a refund's, whose voucher
        names what was charged as the last one served did; a deposit finishing after its
        caller left)."""
        try:
            nonce = await scheme.holder(reason, payment)
            if nonce is None:
                return False
            records = await self._ledger.by_nonce(nonce)
            now = await self._ledger.now() if records else 0.0  # its leases' clock
        except (LedgerError, ValueError):  # unreadable, or a hold that is no payment's
            return False
        return any(record.abandoned(now) for record in records) and not any(
            record.state in (PaymentState.RESERVED, PaymentState.VERIFIED)
            and not record.abandoned(now)
            for record in records
        )

    async def _let_down(self, admission: PaymentAdmission, record: PaymentRecord) -> None:
        """Release a reservation no request will finish (the ledger's compare-and-set refuses
        it past verification); a hold left after that is given up for the reconciler."""
        if not self._leases.holds(record):
            return
        await release_unearned(self._leases, admission, record)
        if self._leases.holds(record):  # not released (the ledger unreachable): not ours now
            await self._leases.let_go(record)

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
                headers={"Retry-After": self._refusals.retry_after},
                # Its replica died mid-request: the payer's retry waits for the reconciler.
                server_side=await self._ledger.abandoned(record),
            )
        if self._settlement.serves_again(record):
            # Upfront settlement whose answer came too late for its own request: the caller
            # paid, so the same authorization sent again is served (once: finish marks it).
            return PaymentAdmission(
                price=price,
                record=record,
                payment=codec.parse_payment(json.loads(record.payload), header="ledger"),
                requirements=requirements,
                receipt=recorded_receipt(record),
                scheme=self.scheme(record.scheme),
            )
        headers: dict[str, str] = {}
        if record.state is PaymentState.SETTLED:
            receipt = recorded_receipt(record)
            headers[receipt.header] = receipt.encoded()
        return self._refusals.challenge(
            402,
            self.scheme(record.scheme).replay_code,
            "this payment authorization was already used",
            offers,
            resource,
            headers=headers,
        )


async def _corrected(
    scheme: Scheme, payment: AnyPaymentPayload, result: PaymentAdmission | Refusal
) -> PaymentAdmission | Refusal:
    """A refusal as the payment's scheme completes it (``Scheme.corrective``)."""
    if isinstance(result, Refusal):
        return await scheme.corrective(result, payment)
    return result


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


def _payment_header(headers: Mapping[str, str]) -> tuple[str | None, str]:
    value = headers.get(wire.PAYMENT_SIGNATURE)
    if value is not None:
        return value, wire.PAYMENT_SIGNATURE
    return headers.get(wire.X_PAYMENT), wire.X_PAYMENT


def daily_budget(limit: Decimal | None, offer: Offer, now: float) -> Budget | None:
    """Today's (UTC) spend limit for one payer, in the offer's asset units."""
    if limit is None:
        return None
    return Budget(limit=to_atomic(limit, offer.asset.decimals), since=now - now % 86_400)
