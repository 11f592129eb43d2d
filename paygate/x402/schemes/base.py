"""A payment scheme: one small protocol per role, and :class:`Scheme`, the object that holds them.

A scheme package (``schemes/<name>/``) has one module per role:

- ``offer``: the requirement a payment of this kind is verified and settled against (and the
  amount the ledger counts for it).
- ``verify``: the local checks of a payment against the matched offer (sans-IO: a forged
  payment never costs a network call).
- ``chain``: chain mode's verification, settlement and proof of payment (web3; server-only).
- ``facilitator``: how a facilitator's settle answer is judged and a lost one reconciled.
- ``client``: the paying side: which offers it takes and the signing (eth-account only).

A scheme whose payments live in this gateway's own state (``batch-settlement``: a channel in the
ledger, claimed in the background) adds an optional server-only role, ``binding``: at start it
binds the scheme to the gateway's ledger, settler and settings (:class:`Binding`) and returns
the bound :class:`Scheme`, which may answer the hooks every scheme has (:meth:`Scheme.own_offers`,
:meth:`Scheme.operation`, :meth:`Scheme.corrective`, :meth:`Scheme.tasks`; no-ops by default)
and verify/settle/reconcile itself instead of through the settler.

The server-only roles (``chain``, ``facilitator``, ``binding``) are named by module path and
imported on first use, so the registry stays importable by the client without web3 or the x402 SDK.
Nothing here decides *when* to settle (``x402.settlement``) or *who* settles (``x402.settler``).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from paygate.x402.models import (
    AnyPaymentPayload,
    ResourceInfo,
    SettleResponse,
    VerifyResponse,
    X402Model,
)
from paygate.x402.offers import Offer, PaymentTerms
from paygate.x402.refusal import ProofRejected, Refusal
from paygate.x402.settler import SETTLEMENT_PENDING

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from paygate.x402.chain_reader import ChainReader
    from paygate.x402.ledger import SchemeWrite
    from paygate.x402.settler import SettlementSubject, Settler

# The settler needs time to get the transfer mined before the authorization expires (x402.md).
MIN_REMAINING_SECONDS = 6


class PaymentRejected(ProofRejected):
    """A payment that does not pay what was asked; ``reason`` is x402's code for why."""

    code = "payment_rejected"
    message = "the payment does not pay what was asked"


class PaymentUnconfirmed(PaymentRejected):
    """Refused because a dependency could not be asked (the chain unreadable, an outcome not
    known yet), not for anything the payment holds: x402 answers it as a refusal to ask again,
    and it counts against nobody (:attr:`Refusal.server_side`)."""

    code = "payment_unconfirmed"
    message = "the payment cannot be confirmed now: ask again"


@dataclass(frozen=True, slots=True)
class Authorized:
    """What a payment that passed its scheme's local checks authorizes."""

    payer: str  # checksummed
    nonce: str  # the replay key's nonce, 0x + 64 lowercase hex
    maximum: int  # atomic units the payer signed for (exact: the price; upto: the cap)
    valid_before: int  # unix seconds: the payment cannot settle after this


@dataclass(frozen=True, slots=True)
class CheckTime:
    """The clock terms a payment is checked under: ``now`` (unix seconds), the ``skew``
    allowed on its start, and the seconds it must still be valid for (``min_remaining``, never
    less than MIN_REMAINING_SECONDS) so that what it buys can be served and settled."""

    now: int
    skew: int
    min_remaining: float = MIN_REMAINING_SECONDS


# --- offer ---


class OfferRole(Protocol):
    #: Offered in x402 v1's body too (v1 knows ``exact`` only).
    v1: bool

    def accepts_amount(self, accepted: str, offer: Offer) -> bool:
        """Does a v2 payment's echoed ``accepted.amount`` fit ``offer``?"""
        ...

    def requirements(
        self, payment: AnyPaymentPayload, offer: Offer, resource: ResourceInfo
    ) -> dict[str, Any]:
        """The requirement (wire dict, in the payment's version) the settler verifies against."""
        ...

    def for_amount(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any], amount: int
    ) -> dict[str, Any] | SettleResponse:
        """The requirement to settle ``amount`` against, or the receipt when there is nothing
        to settle (a metered request that cost 0)."""
        ...

    def authorized_amount(self, authorized: Authorized, offer: Offer) -> int:
        """What the payer authorized, as the ledger and the budgets count it."""
        ...


# --- verify ---


class VerifyRole(Protocol):
    #: The payload model of this scheme's payments: how the registry tells a payment's scheme.
    payload_type: type[Any]
    #: The refusal code of an authorization of this scheme that was already used here.
    replay_code: str

    def check(self, payment: AnyPaymentPayload, offer: Offer, when: CheckTime) -> Authorized:
        """Local checks of ``payment`` against the matched ``offer``; raises PaymentRejected."""
        ...

    def valid_before(self, payment: AnyPaymentPayload) -> int:
        """The authorization's expiry (unix seconds): it cannot settle after it."""
        ...


# --- chain (server-only) ---


@dataclass(frozen=True, slots=True)
class Batching:
    """Chain mode's leave to send settlements due together in one transaction: at most
    ``max`` payments, the first waiting at most ``window`` seconds for others (``max`` 1: one
    transaction each). Whether and how a scheme batches is the scheme's own business."""

    max: int = 1
    window: float = 0.0


class Closable(Protocol):
    async def close(self) -> None: ...


_Kept = TypeVar("_Kept", bound=Closable)


class ChainAccess(Protocol):
    """What chain mode's settler lends a scheme: the reader, its gas account, sending, the
    batching options, and a place to keep per-settler state (a batch being filled)."""

    reader: ChainReader
    factories: frozenset[str]  # ERC-6492 factories allowed to deploy a payer's wallet
    batching: Batching

    @property
    def address(self) -> str:
        """The gas account: the sender of every settlement."""
        ...

    async def send(self, call: Any, *, gas: int | None = None) -> str:
        """Sign and send a web3 contract call from the gas account (one at a time); its
        transaction hash. ``gas``: the limit to use instead of an estimate."""
        ...

    async def mined(self, transaction: str) -> Any:
        """``transaction``'s receipt, waited for; SettlementUnknown when none comes in time."""
        ...

    def kept(self, key: str, make: Callable[[], _Kept]) -> _Kept:
        """The object a scheme keeps with this settler under ``key``: made on first use,
        closed (bounded) when the settler closes."""
        ...


class ChainRole(Protocol):
    async def verify(
        self, chain: ChainAccess, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse: ...

    async def settle(
        self, chain: ChainAccess, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        """Settle ``requirements``' amount; a proven outcome, or SettlementUnknown."""
        ...

    async def prove(self, reader: ChainReader, subject: SettlementSubject) -> SettleResponse:
        """The outcome as the chain proves it (``subject.transaction``'s, or the one that used
        the authorization): SETTLED only on a receipt showing the money
        moved; SettlementUnknown while nothing happened yet; ReviewRequired when nobody can
        tell."""
        ...


# --- facilitator (server-only) ---


class FacilitatorAccess(Protocol):
    """What the facilitator settler lends a scheme: the chain (to prove) and re-sending."""

    chain: ChainReader | None

    async def send(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        """POST /settle; the answer, or SettlementUnknown/SettlerUnavailable."""
        ...


class FacilitatorRole(Protocol):
    async def judge(
        self, facilitator: FacilitatorAccess, answer: SettleResponse, subject: SettlementSubject
    ) -> SettleResponse:
        """A settle answer to ``subject`` → paid (proven where the chain can be read), refused,
        or unknown (raised); ``subject.transaction``: the hash known from an earlier attempt."""
        ...

    async def reconcile(
        self, facilitator: FacilitatorAccess, subject: SettlementSubject
    ) -> SettleResponse:
        """The outcome of an earlier settlement whose answer was lost; never a second payment."""
        ...


# --- client ---


class OfferedTerms(Protocol):
    """One requirement of a 402 as the client read it (``paygate.client.payer.ChallengeOffer``)."""

    @property
    def version(self) -> int: ...
    @property
    def network(self) -> str: ...
    @property
    def chain_id(self) -> int | None: ...
    @property
    def asset(self) -> str: ...
    @property
    def amount(self) -> int: ...
    @property
    def pay_to(self) -> str: ...
    @property
    def extra(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Signed:
    """A client's signed payload and what identifies it."""

    payload: X402Model  # the scheme's payload model
    nonce: str  # as the server's ledger keys it
    valid_before: int
    asset: str  # checksummed
    # A metered offer's token prices (input, output per million; minimum per request).
    prices: tuple[Decimal, Decimal, Decimal] | None = None


class ClientRole(Protocol):
    def decline(self, offer: OfferedTerms, *, max_price_per_million: Decimal | None) -> str | None:
        """Why the client will not pay ``offer`` (before amounts and policy), or None."""
        ...

    def cannot_sign(self, offer: OfferedTerms) -> str | None:
        """Why ``offer``, otherwise acceptable, cannot be signed (the token's EIP-712 domain
        is unknown), or None; asked last."""
        ...

    def sign(
        self, account: LocalAccount, offer: OfferedTerms, *, decimals: int, valid_for: int
    ) -> Signed: ...


# --- binding (optional, server-only) ---


class SchemeSql(Protocol):
    """What a ledger store lends a scheme package: its own tables, through SQL the scheme writes
    for both stores (ledger_sqlite / ledger_postgres)."""

    async def scheme_sql(
        self, sql: str, params: tuple[Any, ...]
    ) -> tuple[int, list[tuple[Any, ...]]]: ...

    async def scheme_sql_all(
        self, statements: list[tuple[str, tuple[Any, ...]]]
    ) -> list[tuple[int, list[tuple[Any, ...]]]]:
        """Several statements in one transaction, all or nothing."""
        ...


@dataclass(frozen=True)
class LedgerSettlement:
    """A settle that is only a write to the gateway's ledger (a channel's charge), to be made
    in the one transaction that records the payment SETTLED: the write, what it settles, and
    the settler's answer once it is made (called then, once)."""

    write: SchemeWrite
    amount: int
    answer: Callable[[], SettleResponse]


@dataclass(frozen=True)
class Binding:
    """What the gateway lends a scheme at start: its ledger, who settles, and the settings."""

    ledger: SchemeSql
    settler: Settler
    replica: str  # this process's replica name (leases, the claimer)
    network: str  # CAIP-2 of the first accepted network
    #: ``paygate.config.Settings`` (x402 does not import the configuration): a scheme reads
    #: its own settings from it.
    settings: Any
    #: Where a scheme reports its background work (the gateway's metrics): each scheme
    #: reports through its own small protocol, used when ``events`` implements it.
    events: object = None


class BindingRole(Protocol):
    async def bind(self, scheme: Scheme, binding: Binding) -> Scheme:
        """``scheme`` bound to this gateway (its own state, background work); raises
        SettlerUnavailable when what it needs at start cannot be reached."""
        ...


# --- the scheme ---


@dataclass(frozen=True)
class Scheme:
    """One x402 payment scheme on EVM, assembled from its roles (see the module docstring)."""

    name: str
    #: True when the settled amount is decided after the reply (metered), not at admission.
    metered: bool
    offer: OfferRole
    verifier: VerifyRole
    client: ClientRole
    chain_module: str  # a module whose ``ROLE`` is the ChainRole (imported on first use)
    facilitator_module: str  # likewise the FacilitatorRole
    binding_module: str | None = None  # likewise an optional BindingRole
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: Its ``settle`` is a write to this gateway's own ledger, idempotent (a channel's charge,
    #: committed once), not a payment sent out: a served payment needs no durable SETTLING
    #: before it (``paygate.x402.settlements``). Its answers name no transaction (nothing is
    #: sent), so a reply's signed receipt states the same payment before the charge as after
    #: it and is signed first, to be kept in the charge's transaction (``session.reply_ended``).
    settles_in_ledger: ClassVar[bool] = False
    #: The least a metered request is charged (atomic units) when its usage rounds below it.
    least_charge: ClassVar[int] = 0

    @property
    def payload_type(self) -> type[Any]:
        return self.verifier.payload_type

    @property
    def replay_code(self) -> str:
        return self.verifier.replay_code

    @property
    def chain(self) -> ChainRole:
        """The chain-mode role (server-only: loads web3)."""
        return self._role(self.chain_module)  # type: ignore[no-any-return]

    @property
    def facilitator(self) -> FacilitatorRole:
        """The facilitator role (server-only)."""
        return self._role(self.facilitator_module)  # type: ignore[no-any-return]

    async def bind(self, binding: Binding) -> Scheme:
        """This scheme bound to the gateway (its binding role's), or itself when it has none."""
        if self.binding_module is None:
            return self
        role: BindingRole = self._role(self.binding_module)
        return await role.bind(self, binding)

    def _role(self, module: str) -> Any:
        role = self._loaded.get(module)
        if role is None:
            role = self._loaded[module] = importlib.import_module(module).ROLE
        return role

    # What the processor, the settlement and the ticket call: each goes to its role.

    def valid_before(self, payment: AnyPaymentPayload) -> int:
        return self.verifier.valid_before(payment)

    def authorized_amount(self, authorized: Authorized, offer: Offer) -> int:
        return self.offer.authorized_amount(authorized, offer)

    def check(self, payment: AnyPaymentPayload, offer: Offer, when: CheckTime) -> Authorized:
        return self.verifier.check(payment, offer, when)

    def requirements(
        self, payment: AnyPaymentPayload, offer: Offer, resource: ResourceInfo
    ) -> dict[str, Any]:
        return self.offer.requirements(payment, offer, resource)

    async def verify(
        self, settler: Settler, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        return await settler.verify(payment, requirements)

    async def settle(
        self, settler: Settler, subject: SettlementSubject, amount: int
    ) -> SettleResponse:
        """Settle ``amount`` atomic units (exact: always the price)."""
        return await _asked(
            self.offer.for_amount(subject.payment, subject.requirements, amount),
            lambda asked: settler.settle(subject.payment, asked),
        )

    def reserve_write(self, payment: AnyPaymentPayload, offer: Offer) -> SchemeWrite | None:
        """A write on the scheme's own tables to make with the payment's reservation (a
        channel's take), after :meth:`check`; None: nothing."""
        return None

    def release_write(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SchemeWrite | None:
        """A write on the scheme's own tables to make with the payment's release (a request
        that ends without earning it gives back what :meth:`reserve_write` or its verify
        took: a channel's hold); None: nothing."""
        return None

    def ledger_settlement(self, subject: SettlementSubject, amount: int) -> LedgerSettlement | None:
        """A request's settle of ``amount`` as a write made with its SETTLED record (schemes
        that ``settles_in_ledger``), or None: then :meth:`settle`, as usual."""
        return None

    async def reconcile(
        self, settler: Settler, subject: SettlementSubject, amount: int
    ) -> SettleResponse:
        """The outcome of an earlier settlement of ``amount`` whose answer was lost."""
        return await _asked(
            self.offer.for_amount(subject.payment, subject.requirements, amount),
            lambda asked: settler.reconcile(replace(subject, requirements=asked)),
        )

    # Hooks the processor and the assembly call on every scheme; a bound scheme (see
    # ``binding``) overrides the ones it needs. The defaults do nothing.

    def own_offers(
        self, terms: PaymentTerms, *, price: Decimal, maximum: Decimal | None
    ) -> tuple[Offer, ...]:
        """Offers this scheme makes itself (their terms are the bound gateway's), beside the
        ones ``PaymentTerms`` builds."""
        return ()

    async def operation(self, payment: AnyPaymentPayload, offer: Offer) -> SettleResponse | None:
        """A payment operation that is not a paid request (a channel's refund), answered
        without serving the route: its receipt; None for a paid request. Raises
        PaymentRejected when the operation is refused."""
        return None

    async def corrective(self, refusal: Refusal, payment: AnyPaymentPayload) -> Refusal:
        """``refusal`` of ``payment`` with what the payer needs to resynchronise (a channel's
        state in the 402), or as it is."""
        return refusal

    async def holder(self, reason: str, payment: AnyPaymentPayload) -> str | None:
        """When ``reason`` refused ``payment`` because another request holds what it needs (a
        channel held busy): the nonce of that request's payment, by which the processor tells
        a live request's hold from one a failed request left behind. None otherwise."""
        return None

    def tasks(self) -> tuple[Callable[[], Awaitable[None]], ...]:
        """Background work the gateway runs for this scheme while it serves (a claim loop);
        each is cancelled at shutdown, after the drain."""
        return ()


def scheme_package(package: str, name: str, *, metered: bool, binding: bool = False) -> Scheme:
    """The :class:`Scheme` of ``package`` (a ``schemes/<name>/`` package, by its ``__name__``),
    found by the role modules' names: ``payload`` (which registers the scheme's payload model
    with :func:`~paygate.x402.models.register_payload`), ``offer``, ``verify`` and ``client``
    imported now (they are client-safe), ``chain``, ``facilitator`` and, with ``binding``,
    ``bound`` named for :class:`Scheme` to import on first use."""

    def role(module: str) -> Any:
        return importlib.import_module(f"{package}.{module}").ROLE

    importlib.import_module(f"{package}.payload")
    return Scheme(
        name=name,
        metered=metered,
        offer=role("offer"),
        verifier=role("verify"),
        client=role("client"),
        chain_module=f"{package}.chain",
        facilitator_module=f"{package}.facilitator",
        binding_module=f"{package}.bound" if binding else None,
    )


async def _asked(
    asked: dict[str, Any] | SettleResponse,
    call: Callable[[dict[str, Any]], Awaitable[SettleResponse]],
) -> SettleResponse:
    return asked if isinstance(asked, SettleResponse) else await call(asked)


def with_amount(requirements: dict[str, Any], amount: int) -> dict[str, Any]:
    """``requirements`` asking for ``amount`` (the field is ``maxAmountRequired`` in v1)."""
    key = "amount" if "amount" in requirements else "maxAmountRequired"
    return {**requirements, key: str(amount)}


def invalid(reason: str, payer: str) -> VerifyResponse:
    """A verification's refusal for ``reason`` (x402's code)."""
    return VerifyResponse(is_valid=False, invalid_reason=reason, payer=payer)


def verdict(reason: str | None, payer: str) -> VerifyResponse:
    """A verification's answer once its last check is done: refused for ``reason``, else valid."""
    return (
        invalid(reason, payer) if reason is not None else VerifyResponse(is_valid=True, payer=payer)
    )


def refused(answer: SettleResponse, *unsure: str) -> bool:
    """A facilitator's settle answer that refuses for good: nothing moved. Not a success, and
    not pending, nor one of the scheme's ``unsure`` reasons (a refusal that leaves open whether
    the money moved: the chain decides)."""
    return not answer.success and answer.error_reason not in (SETTLEMENT_PENDING, *unsure)


def same_address(a: str, b: str) -> bool:
    return a.lower() == b.lower()


_Payload = TypeVar("_Payload")


def payload_as(payment: AnyPaymentPayload, kind: type[_Payload]) -> _Payload:
    """``payment``'s scheme payload, which the caller knows is a ``kind`` (ValueError if not)."""
    if not isinstance(payment.payload, kind):
        raise ValueError(f"not a {kind.__name__}")
    return payment.payload
