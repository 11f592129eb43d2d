"""The ledger's rules, computed once for every store: no SQL, no I/O.

Each store (``ledger_sqlite``, ``ledger_postgres``) runs statements; what those statements write
is decided here: a reservation's checked values and budget test, a transition's outcome (the
fence, the table, the metering cap, who owns the lease after it and until when, which counters
move), a renewal's test, the history line each change leaves, and how a row becomes a record.
Values are named (``:name`` for SQLite, ``%(name)s`` for PostgreSQL), so both stores bind the
same mapping.
"""

from __future__ import annotations

import calendar
import operator
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import orjson

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
    ReceiptUsage,
    SchemeWrite,
    WriteNotMade,
    check_fence,
    check_move,
    normalise_address,
)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True, slots=True)
class _Rows:
    """How a stored row becomes a record or an event: one column per field, in the fields'
    order (a transaction hash is stored as ``tx_hash``), some converted on the way."""

    make: Callable[..., Any]
    columns: tuple[str, ...]
    convert: tuple[tuple[int, Callable[[Any], Any]], ...]

    @classmethod
    def of(cls, make: type, **convert: Callable[[Any], Any]) -> _Rows:
        names = [f.name for f in fields(make)]
        columns = tuple("tx_hash" if name == "transaction" else name for name in names)
        return cls(make, columns, tuple((names.index(n), to) for n, to in convert.items()))

    def read(self, row: Mapping[str, Any]) -> Any:
        columns = self.columns
        if isinstance(row, dict):  # PostgreSQL's rows: by name
            values = [row[column] for column in columns]
        elif tuple(row.keys()[: len(columns)]) == columns:  # selected in order: by position
            values = list(row)[: len(columns)]  # (sqlite3.Row finds a name by a linear search)
        else:
            values = [row[column] for column in columns]
        for at, to in self.convert:
            values[at] = to(values[at])
        return self.make(*values)


_STATES = {state.value: state for state in PaymentState}


def _state(value: str) -> PaymentState:
    """``PaymentState(value)`` by a dict look-up (an Enum's call is several frames; this is on
    every record read); an unknown value still fails as the Enum's call does."""
    state = _STATES.get(value)
    return state if state is not None else PaymentState(value)


_RECORDS = _Rows.of(
    PaymentRecord,
    amount=int,
    state=_state,
    served=bool,
    settle_amount=_optional_int,
    settled_amount=_optional_int,
)
_EVENTS = _Rows.of(PaymentEvent, action=EventAction, state=PaymentState)
#: A payment row's columns, in the order every store selects and copies them.
RECORD_COLUMNS = ", ".join(_RECORDS.columns)
EVENT_COLUMNS = ", ".join(_EVENTS.columns)
#: What a change may add to its history line (the last three of :data:`EVENT_COLUMNS`).
EVENT_DETAILS = ("transaction", "error", "detail")
_EVENT_DETAILS = frozenset(EVENT_DETAILS)
#: ``paygate payments summary --by``: the groupings a store must know.
SUMMARY_GROUPS = ("model", "day", "payer")


def new_payment_id() -> str:
    """A new payment's id: 32 hex digits, the creation time in milliseconds (48 bits) then 80
    random bits. Ids in creation order put each new payment at the right edge of every index
    keyed by it (the primary key, the history's and the receipts' by payment): the pages a
    request dirties there are the pages its neighbours in time dirty too, shared by one COMMIT,
    where a random id dirties a page of its own in each (an id is no secret: operators see it;
    callers find a payment by its nonce)."""
    millis = (time.time_ns() // 1_000_000) & 0xFFFF_FFFF_FFFF
    return f"{millis:012x}{os.urandom(10).hex()}"


@dataclass(frozen=True, slots=True)
class Reservation:
    """:meth:`Ledger.reserve`'s arguments, checked and normalised there (before any I/O)."""

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
    write: SchemeWrite | None = None  # a scheme's statements, made with the reservation

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
            # A new row's history: its reservation (a RELEASED row claimed again keeps its own,
            # in payment_events: see kept_history).
            "history": _inline_text(((now, replica, _RESERVED_LINE, _RESERVED_LINE, 1),)),
        }


def reserved_record(values: Mapping[str, Any], reservation: Reservation) -> PaymentRecord:
    """The record a new reservation's row holds (``values``: :meth:`Reservation.values`, as
    written), without reading it back."""
    network, asset, payer, nonce = reservation.key
    now = values["now"]
    return PaymentRecord(
        values["id"],
        network,
        asset,
        payer,
        nonce,
        reservation.pay_to,
        reservation.amount,
        reservation.x402_version,
        reservation.route,
        PaymentState.RESERVED,
        False,
        reservation.payload,
        reservation.requirements,
        reservation.idempotency_key,
        None,  # no transaction
        None,  # no error
        0,  # no attempt
        now,
        now,
        values["owner"],
        1,  # the first lease epoch
        values["until"],
        reservation.scheme,
        reservation.model,
    )


@dataclass(frozen=True)
class Move:
    """One :meth:`Ledger.transition` call, checked: to ``to``, through the states of ``via``
    first, in order (every move in one transaction, each checked against the table and fenced,
    each in the history); ``let_go``: the lease goes with the (last) move; ``reply_receipt``:
    the reply's signed receipt, kept with the (last) move, and the usage it states
    (``receipt_usage``) recorded where none is (as :meth:`Ledger.add_receipt` would, in the
    same transaction)."""

    to: PaymentState
    transaction: str | None = None
    error: str | None = None
    lease: int | None = None
    meter: Meter | None = None
    settled_amount: int | None = None
    let_go: bool = False
    via: tuple[PaymentState, ...] = ()
    reply_receipt: str | None = None
    receipt_usage: ReceiptUsage | None = None
    write: SchemeWrite | None = None  # a scheme's statements, made with the move (all or none)

    def change(
        self, current: PaymentRecord, *, now: float, replica: str, lease_seconds: float
    ) -> tuple[dict[str, Any], PaymentRecord, tuple[Step, ...]]:
        """The whole call as one compare-and-set update of ``current``, the record as read
        under its lock (matched on the state and epoch read): its named values, each move
        checked on the record as the moves before it left it (the fence and the table:
        :func:`check_move`; the metering cap); the record as the update leaves it (no
        read-back); and the moves, for their history lines."""
        last = (self.to, self.transaction, self.error)
        values, state = None, current.state
        steps: list[Step] = []
        for to in self.via:
            step = self._values(current, state, to, values, False, now, replica, lease_seconds)
            values = step if values is None else _then(values, step)
            state = to  # the next move's rules read the record as this one left it
            steps.append((to, None, None))
        final = self._values(current, state, self.to, values, True, now, replica, lease_seconds)
        return (
            *_applied(current, final if values is None else _then(values, final)),
            (*steps, last),
        )

    def _values(
        self,
        current: PaymentRecord,
        state: PaymentState,
        to: PaymentState,
        before: dict[str, Any] | None,
        last: bool,
        now: float,
        replica: str,
        lease_seconds: float,
    ) -> dict[str, Any]:
        """One move from ``state`` to ``to`` (``before``: the values of the moves that led
        there); the ``last`` carries the call's details."""
        meter = self.meter if last else None
        check_move(current, to, self.lease, state)
        if meter is not None and meter.settle_amount > current.amount:
            raise ValueError("a metered charge cannot exceed the authorized amount")
        if not TRANSITIONS[to] or (last and self.let_go):  # terminal, or given up
            owner, until = None, None
        elif self.lease is not None:  # the owner moves it on: its lease is renewed
            owner, until = replica, now + lease_seconds
        elif before is not None:  # an unfenced move leaves the lease as the one before left it
            owner, until = before["owner"], before["until"]
        else:  # an operator's or a test's unfenced move leaves the lease as it is
            owner, until = current.owner, current.lease_until
        settled = self.settled_amount if last else None
        # A receipt's usage is kept once: not over a meter, nor over usage recorded before.
        usage = self.receipt_usage if last and meter is None and current.tokens_in is None else None
        return {
            "state": to.value,
            "attempt": 1 if to is PaymentState.SETTLING else 0,  # every move into SETTLING counts
            "served": to is PaymentState.SERVED,
            "tx_hash": self.transaction if last else None,
            "error": self.error if last else None,
            "now": now,
            "owner": owner,
            "until": until,
            "tokens_in": meter.tokens_in if meter else usage.tokens_in if usage else None,
            "tokens_out": meter.tokens_out if meter else usage.tokens_out if usage else None,
            "usage_source": meter.source if meter else usage.source if usage else None,
            "settle_amount": str(meter.settle_amount) if meter else None,
            "settled_amount": None if settled is None else str(settled),
            "counted": to is PaymentState.SETTLED,  # a budget counts a payment when it settles
            "id": current.id,
            "from_state": state.value,
            "lease": current.lease,
        }

    @staticmethod
    def events(
        record: PaymentRecord, steps: tuple[Step, ...], at: float, replica: str
    ) -> list[tuple[Any, ...]]:
        """The history lines of ``steps`` (from :meth:`change`), one a move, oldest first;
        ``record``: the record as the update left it (the epoch does not move)."""
        return [
            _event_row(
                record.id, record.lease, to, EventAction.MOVED, at, replica, (tx, error, None)
            )
            for to, tx, error in steps
        ]


#: One move of a :class:`Move`, for its history line: the state it went to, its details.
Step = tuple[PaymentState, str | None, str | None]


# A step's values overwrite the ones before it, but for what the update adds up (``attempts``,
# ``served``, ``counted_at``), what it keeps unless given (COALESCE), and what it matches on.
_COALESCED = (
    "tx_hash",
    "error",
    "tokens_in",
    "tokens_out",
    "usage_source",
    "settle_amount",
    "settled_amount",
)


def _then(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The values of one update that does what ``before``'s then ``after``'s would."""
    values = dict(after)
    values["attempt"] = before["attempt"] + after["attempt"]
    values["served"] = before["served"] or after["served"]
    values["counted"] = before["counted"] or after["counted"]
    values["from_state"], values["lease"] = before["from_state"], before["lease"]
    for name in _COALESCED:
        if values[name] is None:
            values[name] = before[name]
    return values


# A record's fields in order, read in one call: a changed copy without dataclasses.replace's
# walk of the fields (half the cost of a move's record).
_RECORD_FIELDS = tuple(f.name for f in fields(PaymentRecord))
_RECORD_VALUES = operator.attrgetter(*_RECORD_FIELDS)
_RECORD_AT = {name: at for at, name in enumerate(_RECORD_FIELDS)}


def _replaced(record: PaymentRecord, **changes: Any) -> PaymentRecord:
    """``dataclasses.replace(record, **changes)`` (every field not named is kept)."""
    values = list(_RECORD_VALUES(record))
    for name, value in changes.items():
        values[_RECORD_AT[name]] = value
    return PaymentRecord(*values)


def _applied(current: PaymentRecord, move: dict[str, Any]) -> tuple[dict[str, Any], PaymentRecord]:
    """``move``'s values applied to ``current``: what adds up (attempts), what is kept unless
    given, the rest overwritten. The update's named values (every column it sets, as it sets
    it; ``counted``: a budget counts the payment from ``now``) and the record it leaves."""

    def kept(name: str, old: Any) -> Any:
        new = move[name]
        return old if new is None else new

    settle, settled = move["settle_amount"], move["settled_amount"]
    # Only what a move changes is named: every other field (a column added later too) is
    # the current record's.
    record = _replaced(
        current,
        state=_state(move["state"]),
        served=current.served or move["served"],
        transaction=kept("tx_hash", current.transaction),
        error=kept("error", current.error),
        attempts=current.attempts + move["attempt"],
        updated_at=move["now"],
        owner=move["owner"],
        lease_until=move["until"],
        tokens_in=kept("tokens_in", current.tokens_in),
        tokens_out=kept("tokens_out", current.tokens_out),
        usage_source=kept("usage_source", current.usage_source),
        settle_amount=current.settle_amount if settle is None else int(settle),
        settled_amount=current.settled_amount if settled is None else int(settled),
    )
    values = {
        "state": move["state"],
        "attempts": record.attempts,
        "served": record.served,
        "tx_hash": record.transaction,
        "error": record.error,
        "now": move["now"],
        "owner": record.owner,
        "until": record.lease_until,
        "tokens_in": record.tokens_in,
        "tokens_out": record.tokens_out,
        "usage_source": record.usage_source,
        "settle_amount": _text(record.settle_amount),
        "settled_amount": _text(record.settled_amount),
        "counted": move["counted"],
        "id": current.id,
        "from_state": move["from_state"],
        "lease": move["lease"],
    }
    return values, record


def _text(amount: int | None) -> str | None:
    return None if amount is None else str(amount)  # a uint256: decimal text in both stores


def check_renewal(current: PaymentRecord, lease: int, replica: str) -> None:
    """Only the live owner of epoch ``lease`` may extend it."""
    check_fence(current, lease)
    if current.terminal or current.owner != replica:
        raise LeaseLost(f"payment {current.id}: no lease of ours to renew")


def renewed_meter(current: PaymentRecord, meter: Meter | None) -> Meter | None:
    """The progress a renewal keeps: only over a SERVED stream's, within the authorization."""
    if meter is None or current.state is not PaymentState.SERVED:
        return None
    if meter.settle_amount > current.amount:
        raise ValueError("a metered charge cannot exceed the authorized amount")
    return meter


def check_first_served(current: PaymentRecord, first: bool) -> None:
    """With ``first``, a payment whose reply another request claimed already is not ours to
    serve (a settled-upfront payment buys one reply)."""
    if first and current.served:
        raise LeaseLost(f"payment {current.id}: its reply was served by another request")


def check_let_go(current: PaymentRecord, lease: int) -> None:
    """Only the holder of epoch ``lease`` may give it up."""
    check_fence(current, lease)


def event_values(
    record: PaymentRecord, action: EventAction, at: float, replica: str, **details: str | None
) -> tuple[Any, ...]:
    """One history line, in :data:`EVENT_COLUMNS` order: the record as the change left it, and
    the ``details`` given (``transaction``, ``error``, ``detail``; the others NULL)."""
    if not _EVENT_DETAILS.issuperset(details):
        raise TypeError(f"a history line's details are {', '.join(EVENT_DETAILS)}")
    listed = tuple(map(details.get, EVENT_DETAILS))
    return _event_row(record.id, record.lease, record.state, action, at, replica, listed)


def _event_row(
    payment_id: str,
    lease: int,
    state: PaymentState,
    action: EventAction,
    at: float,
    replica: str,
    details: tuple[str | None, ...],
) -> tuple[Any, ...]:
    return (payment_id, at, replica, action.value, state.value, lease, *details)


# --- a payment's history in its own row ---------------------------------------------------------
#
# The lines a paid request's ordinary course leaves (reserved; moved to VERIFIED, to SERVED) are
# kept in the payment's own row (``payments.history``, a JSON list), not as a payment_events row
# each: no row and no index entry per move on the hot path; the row is written by those moves
# anyway. A payment's history is either all in its row (the column set) or all in payment_events
# (NULL; every row from before schema v12): a line of any other kind moves the row's lines to
# payment_events first, in order, and goes there after them. So a history is one ordered list
# wherever it is, and what reads payment_events itself (the console's settlement latencies:
# SETTLING and SETTLED lines) finds every line it reads there. A settlement made in the ledger
# itself (a batch-settlement voucher's charge: SETTLING and SETTLED in the one transaction of
# SERVED, nothing moved outside the ledger between them) is its scheme's ordinary course and
# stays in the row too: it has no settlement latency to read (the money moves at the channel's
# claim), and it saves five payment_events rows and their index entries per voucher request.

_RESERVED_LINE = EventAction.RESERVED.value
_INLINE = frozenset(
    {
        (EventAction.RESERVED.value, PaymentState.RESERVED.value),
        (EventAction.MOVED.value, PaymentState.VERIFIED.value),
        (EventAction.MOVED.value, PaymentState.SERVED.value),
    }
)
# A settlement made within one change: its last two lines, neither with details.
_SETTLED_HERE = (
    (EventAction.MOVED.value, PaymentState.SETTLING.value),
    (EventAction.MOVED.value, PaymentState.SETTLED.value),
)
#: Lines at most in a row (the ordinary course leaves three, a settlement in the ledger five);
#: past it, payment_events.
MAX_INLINE_LINES = 5


def _inline_text(lines: tuple[tuple[Any, ...], ...] | list[tuple[Any, ...]]) -> str:
    """Lines as the row keeps them: ``[at, replica, action, state, lease]`` each."""
    return orjson.dumps(lines).decode()


def _inline(line: tuple[Any, ...]) -> bool:
    """May this history line (:data:`EVENT_COLUMNS` order) be kept in the row?"""
    _, _, _, action, state, _, *details = line
    return (action, state) in _INLINE and not any(details)


def _ordinary(lines: list[tuple[Any, ...]]) -> bool:
    """May a change's ``lines`` be kept in the row: each an ordinary course's line, but for a
    settlement made in the change itself (SETTLING then SETTLED, its last two lines)."""
    if len(lines) >= 2 and all(
        (line[3], line[4]) == kind and not any(line[6:])
        for line, kind in zip(lines[-2:], _SETTLED_HERE, strict=True)
    ):
        lines = lines[:-2]
    return all(map(_inline, lines))


def kept_history(
    payment_id: str, history: str | None, lines: list[tuple[Any, ...]]
) -> tuple[str | None, list[tuple[Any, ...]]]:
    """Where a change's history ``lines`` (:data:`EVENT_COLUMNS` order, oldest first) go, given
    the row's ``history`` as read under its lock: the row's history after the change, and the
    lines to insert into payment_events, in order (the row's own first when they move there)."""
    if history is not None:
        kept = orjson.loads(history)
        if len(kept) + len(lines) <= MAX_INLINE_LINES and _ordinary(lines):
            kept.extend([line[1], line[2], line[3], line[4], line[5]] for line in lines)
            return _inline_text(kept), []
        moved = [(payment_id, *line, None, None, None) for line in kept]
        return None, [*moved, *lines]
    return None, lines


def inline_events(payment_id: str, history: str) -> list[PaymentEvent]:
    """A row's own history (``history`` set) as events, oldest first."""
    return [
        PaymentEvent(
            payment_id, float(at), replica, EventAction(action), PaymentState(state), lease
        )
        for at, replica, action, state, lease in orjson.loads(history)
    ]


def record_from_row(row: Mapping[str, Any]) -> PaymentRecord:
    """A payment row (selected as :data:`RECORD_COLUMNS`) as a record."""
    record: PaymentRecord = _RECORDS.read(row)
    return record


def event_from_row(row: Mapping[str, Any]) -> PaymentEvent:
    """A history row (selected as :data:`EVENT_COLUMNS`) as an event."""
    event: PaymentEvent = _EVENTS.read(row)
    return event


def not_found(payment_id: str) -> PaymentNotFound:
    # Ids come from operators and callers: echo one back only if it looks like ours.
    text = str(payment_id)
    shown = text if len(text) == 32 and all(c in "0123456789abcdef" for c in text) else "(invalid)"
    return PaymentNotFound(f"no payment {shown}")


def check_min_age(value: float, what: str = "min_age") -> float:
    if not value >= 0:
        raise ValueError(f"{what} must be a number of seconds >= 0")
    return value


def check_free_request(
    payer: str, nonce: str, day: str, limit: int, address: str | None, address_limit: int
) -> str:
    """:meth:`Ledger.take_free`'s arguments; the payer checksummed."""
    checked = normalise_address(payer, "payer")
    if not 0 < len(nonce) <= 128 or not 0 < len(day) <= 16 or limit < 0:
        raise ValueError("nonce, day or limit out of range")
    if address is not None and (len(address) > 128 or address_limit < 1):
        raise ValueError("address or address_limit out of range")
    return checked


MAX_PRUNE_BATCH = 10_000


def check_write(write: SchemeWrite) -> None:
    """A transition's scheme write, made: its required statement returned a row, else
    :class:`WriteNotMade` (raised inside the transaction, which rolls it all back)."""
    if write.required is not None and not write.results[write.required][1]:
        raise WriteNotMade("the scheme's write with this move was not made")


def check_prune(before: str, batch: int) -> float:
    """:meth:`Ledger.prune_days`'s arguments: the start of day ``before`` (UTC, unix seconds)."""
    try:
        start = calendar.timegm(time.strptime(before, "%Y-%m-%d"))
    except (TypeError, ValueError):
        raise ValueError("before must be a UTC day, YYYY-MM-DD") from None
    if len(before) != 10 or not 0 < batch <= MAX_PRUNE_BATCH:
        raise ValueError(f"before must be a UTC day, YYYY-MM-DD; batch in 1..{MAX_PRUNE_BATCH}")
    return float(start)


def check_group(by: str) -> str:
    if by not in SUMMARY_GROUPS:
        raise ValueError(f"by must be one of {', '.join(SUMMARY_GROUPS)}")
    return by
