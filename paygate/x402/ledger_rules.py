"""The ledger's rules, computed once for every store: no SQL, no I/O.

Each store (``ledger_sqlite``, ``ledger_postgres``) runs statements; what those statements write
is decided here: a reservation's checked values and budget test, a transition's outcome (the
fence, the table, the metering cap, who owns the lease after it and until when, which counters
move), a renewal's test, the history line each change leaves, and how a row becomes a record.
Values are named (``:name`` for SQLite, ``%(name)s`` for PostgreSQL), so both stores bind the
same mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from paygate.x402.ledger import (
    TRANSITIONS,
    AlreadyReserved,
    Budget,
    BudgetExceeded,
    EventAction,
    IdempotencyKeyReused,
    LeaseLost,
    Meter,
    PaymentEvent,
    PaymentNotFound,
    PaymentRecord,
    PaymentState,
    check_amount,
    check_document,
    check_fence,
    check_idempotency_key,
    check_model,
    check_move,
    check_route,
    check_scheme,
    check_version,
    normalise_address,
    normalise_key,
)

#: A payment row's columns, in the order every store selects and copies them.
RECORD_COLUMNS = (
    "id, network, asset, payer, nonce, pay_to, amount, x402_version, route, state, served, "
    "payload, requirements, idempotency_key, tx_hash, error, attempts, created_at, updated_at, "
    "owner, lease, lease_until, "
    "scheme, model, tokens_in, tokens_out, usage_source, settle_amount, settled_amount"
)
EVENT_COLUMNS = "payment_id, at, replica, action, state, lease, tx_hash, error, detail"
#: ``paygate payments summary --by``: the groupings a store must know.
SUMMARY_GROUPS = ("model", "day", "payer")


@dataclass(frozen=True, slots=True)
class Reservation:
    """:meth:`Ledger.reserve`'s arguments checked and normalised (ValueError before any I/O)."""

    key: tuple[str, str, str, str]  # (network, asset, payer, nonce), canonical
    pay_to: str
    amount: int
    x402_version: int
    route: str
    payload: str
    requirements: str
    idempotency_key: str | None
    scheme: str
    model: str | None
    budgets: tuple[Budget, ...]

    @classmethod
    def check(
        cls,
        *,
        network: str,
        asset: str,
        payer: str,
        nonce: str,
        pay_to: str,
        amount: int,
        x402_version: int,
        route: str,
        payload: str,
        requirements: str,
        idempotency_key: str | None,
        scheme: str,
        model: str | None,
        budget: Budget | None,
        budgets: tuple[Budget, ...] = (),
    ) -> Reservation:
        return cls(
            scheme=check_scheme(scheme),
            model=check_model(model),
            budgets=(*((budget,) if budget is not None else ()), *budgets),
            key=normalise_key(network, asset, payer, nonce),
            pay_to=normalise_address(pay_to, "pay_to"),
            amount=check_amount(amount),
            x402_version=check_version(x402_version),
            route=check_route(route),
            payload=check_document(payload, "payload"),
            requirements=check_document(requirements, "requirements"),
            idempotency_key=check_idempotency_key(idempotency_key),
        )

    @property
    def asset(self) -> str:
        return self.key[1]

    @property
    def payer(self) -> str:
        return self.key[2]

    def check_identifier(self, holder: PaymentRecord | None) -> None:
        """The payment identifier may name only this authorization."""
        if holder is not None and holder.key != self.key:
            raise IdempotencyKeyReused(
                "the payment identifier already names a different authorization"
            )

    def check_budget(self, budget: Budget, spent: int) -> None:
        """``spent`` is what the payer committed in ``budget``'s window, this payment apart."""
        if spent + self.amount > budget.limit:
            raise BudgetExceeded("the payer's budget would be passed", budget)

    def check_existing(self, existing: PaymentRecord | None) -> None:
        """Only a new key or a RELEASED record may be (re)claimed: anything else is a replay."""
        if existing is not None and existing.state is not PaymentState.RELEASED:
            raise AlreadyReserved(existing)

    def values(
        self, *, payment_id: str, now: float, replica: str, lease_seconds: float
    ) -> dict[str, Any]:
        """The named values a store writes: a new RESERVED row, or a RELEASED one claimed again
        (same id and attempts, the new request's details, the lease epoch + 1)."""
        network, asset, payer, nonce = self.key
        return {
            "id": payment_id,
            "network": network,
            "asset": asset,
            "payer": payer,
            "nonce": nonce,
            "pay_to": self.pay_to,
            "amount": str(self.amount),  # a uint256: decimal text in both stores
            "x402_version": self.x402_version,
            "route": self.route,
            "reserved": PaymentState.RESERVED.value,
            "released": PaymentState.RELEASED.value,
            "payload": self.payload,
            "requirements": self.requirements,
            "idempotency_key": self.idempotency_key,
            "now": now,
            "owner": replica,
            "until": now + lease_seconds,
            "scheme": self.scheme,
            "model": self.model,
        }


@dataclass(frozen=True)
class Move:
    """One :meth:`Ledger.transition` call, checked: to ``to``, through ``via`` first if given
    (both moves in one transaction, each checked against the table and fenced, each in the
    history); ``let_go``: the lease goes with the (last) move."""

    to: PaymentState
    transaction: str | None = None
    error: str | None = None
    lease: int | None = None
    meter: Meter | None = None
    settled_amount: int | None = None
    let_go: bool = False
    via: PaymentState | None = None

    def steps(self) -> tuple[Move, ...]:
        """The single moves a store runs, in order."""
        if self.via is None:
            return (self,)
        return (Move(self.via, lease=self.lease), replace(self, via=None))

    def values(
        self, current: PaymentRecord, *, now: float, replica: str, lease_seconds: float
    ) -> dict[str, Any]:
        """This single move's update of ``current`` (:func:`move_values`)."""
        return move_values(
            current,
            self.to,
            transaction=self.transaction,
            error=self.error,
            lease=self.lease,
            meter=self.meter,
            settled_amount=self.settled_amount,
            now=now,
            replica=replica,
            lease_seconds=lease_seconds,
            let_go=self.let_go,
        )


def move_values(
    current: PaymentRecord,
    to: PaymentState,
    *,
    transaction: str | None,
    error: str | None,
    lease: int | None,
    meter: Meter | None,
    settled_amount: int | None,
    now: float,
    replica: str,
    lease_seconds: float,
    let_go: bool = False,
) -> dict[str, Any]:
    """The rules of :meth:`Ledger.transition` applied to the record as read under its lock: the
    fence and the table (:func:`check_move`), the metering cap, and the named values of the
    compare-and-set update (matched on the state and epoch read)."""
    check_move(current, to, lease)
    if meter is not None and meter.settle_amount > current.amount:
        raise ValueError("a metered charge cannot exceed the authorized amount")
    if not TRANSITIONS[to] or let_go:  # terminal, or given up: nobody here works on it
        owner, until = None, None
    elif lease is not None:  # the owner moves it on: its lease is renewed
        owner, until = replica, now + lease_seconds
    else:  # an operator's or a test's unfenced move leaves the lease as it is
        owner, until = current.owner, current.lease_until
    return {
        "state": to.value,
        "attempt": 1 if to is PaymentState.SETTLING else 0,  # every move into SETTLING counts
        "served": to is PaymentState.SERVED,
        "tx_hash": transaction,
        "error": error,
        "now": now,
        "owner": owner,
        "until": until,
        "tokens_in": meter.tokens_in if meter else None,
        "tokens_out": meter.tokens_out if meter else None,
        "usage_source": meter.source if meter else None,
        "settle_amount": str(meter.settle_amount) if meter else None,
        "settled_amount": None if settled_amount is None else str(settled_amount),
        "counted": to is PaymentState.SETTLED,  # a budget counts a payment when it settles
        "id": current.id,
        "from_state": current.state.value,
        "lease": current.lease,
    }


def check_renewal(current: PaymentRecord, lease: int, replica: str) -> None:
    """Only the live owner of epoch ``lease`` may extend it."""
    check_fence(current, lease)
    if current.terminal or current.owner != replica:
        raise LeaseLost(f"payment {current.id}: no lease of ours to renew")


def check_let_go(current: PaymentRecord, lease: int) -> None:
    """Only the holder of epoch ``lease`` may give it up."""
    check_fence(current, lease)


def event_values(
    record: PaymentRecord,
    action: EventAction,
    at: float,
    replica: str,
    *,
    transaction: str | None = None,
    error: str | None = None,
    detail: str | None = None,
) -> tuple[Any, ...]:
    """One history line, in :data:`EVENT_COLUMNS` order: the record as the change left it."""
    return (
        record.id,
        at,
        replica,
        action.value,
        record.state.value,
        record.lease,
        transaction,
        error,
        detail,
    )


def record_from_row(row: Mapping[str, Any]) -> PaymentRecord:
    """A payment row (selected as :data:`RECORD_COLUMNS`) as a record."""
    return PaymentRecord(
        id=row["id"],
        network=row["network"],
        asset=row["asset"],
        payer=row["payer"],
        nonce=row["nonce"],
        pay_to=row["pay_to"],
        amount=int(row["amount"]),
        x402_version=row["x402_version"],
        route=row["route"],
        state=PaymentState(row["state"]),
        served=bool(row["served"]),
        payload=row["payload"],
        requirements=row["requirements"],
        idempotency_key=row["idempotency_key"],
        transaction=row["tx_hash"],
        error=row["error"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        owner=row["owner"],
        lease=row["lease"],
        lease_until=row["lease_until"],
        scheme=row["scheme"],
        model=row["model"],
        tokens_in=row["tokens_in"],
        tokens_out=row["tokens_out"],
        usage_source=row["usage_source"],
        settle_amount=None if row["settle_amount"] is None else int(row["settle_amount"]),
        settled_amount=None if row["settled_amount"] is None else int(row["settled_amount"]),
    )


def event_from_row(row: Mapping[str, Any]) -> PaymentEvent:
    return PaymentEvent(
        payment_id=row["payment_id"],
        at=row["at"],
        replica=row["replica"],
        action=EventAction(row["action"]),
        state=PaymentState(row["state"]),
        lease=row["lease"],
        transaction=row["tx_hash"],
        error=row["error"],
        detail=row["detail"],
    )


def not_found(payment_id: str) -> PaymentNotFound:
    # Ids come from operators and callers: echo one back only if it looks like ours.
    text = str(payment_id)
    shown = text if len(text) == 32 and all(c in "0123456789abcdef" for c in text) else "(invalid)"
    return PaymentNotFound(f"no payment {shown}")


def check_min_age(value: float, what: str = "min_age") -> float:
    if not value >= 0:
        raise ValueError(f"{what} must be a number of seconds >= 0")
    return value


def check_free_request(payer: str, nonce: str, day: str, limit: int) -> str:
    """:meth:`Ledger.take_free`'s arguments; the payer checksummed."""
    checked = normalise_address(payer, "payer")
    if not 0 < len(nonce) <= 128 or not 0 < len(day) <= 16 or limit < 0:
        raise ValueError("nonce, day or limit out of range")
    return checked


def check_group(by: str) -> str:
    if by not in SUMMARY_GROUPS:
        raise ValueError(f"by must be one of {', '.join(SUMMARY_GROUPS)}")
    return by
