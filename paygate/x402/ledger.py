"""The payment ledger: the durable life of every payment, and the replay guard.

An EIP-3009 authorization is only consumed on chain at settlement, so between verify and settle
the same signed header could be served many times. The ledger closes that gap: the gate
*reserves* the authorization's key ``(network, asset, payer, nonce)`` before any network or
upstream call, and every later step is a recorded state change made durable before the side
effect that follows it. After a crash, :meth:`Ledger.unfinished` says what settlement is owed
or in doubt, and :meth:`Ledger.stale_reservations` what can be released.

Several processes (workers, replicas on other hosts) may share one store. Each opens it under a
*replica* name, and owns the records it works on through a **lease**: an owner, an expiry and an
epoch (``lease``, a fencing token that grows by one at every change of owner). A live owner
renews its leases; a lease that ran out means its owner is presumed dead, and another replica
may *claim* the record (epoch + 1). Every change an owner makes names the epoch it holds, and is
refused with :class:`LeaseLost` once the record was claimed away: a process that was frozen past
its lease (SIGSTOP, a long pause, a partition) cannot record or settle a second time.

This module holds what the ledger speaks in (states, record, errors, input normalisation, the
fence and the transition table); ``ledger_rules`` computes what every change writes,
``ledger_base`` is the interface (:class:`~paygate.x402.ledger_base.Ledger`: each call checked
before the store runs it), ``ledger_sqlite`` and ``ledger_postgres`` run the SQL, and
``ledger_store`` opens one from a location. Nothing here does I/O, and nothing here imports
aiohttp or ``paygate.server``.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from paygate.errors import PaygateError
from paygate.x402 import typed_digest
from paygate.x402.networks import UnknownNetwork, resolve_network

MAX_LIST_LIMIT = 1000  # the hard cap of every query that returns several records
MAX_DOCUMENT_CHARS = 64 * 1024  # payload / requirements JSON: a header is < 8 KB, so generous

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_NONCE = re.compile(r"^0x[0-9a-f]{64}$")
_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_-]{16,128}$")  # the payment-identifier extension
_TRANSACTION = re.compile(r"^0x[0-9a-fA-F]{64}$")
_ROUTE_MAX_CHARS = 200
_ERROR_MAX_CHARS = 200
_UINT256_MAX = 2**256 - 1


class PaymentState(StrEnum):
    """The life of one payment."""

    RESERVED = "reserved"  # the key is claimed, before any network or upstream call
    VERIFIED = "verified"  # the facilitator/chain said the authorization is valid
    SERVED = "served"  # the reply was produced: settlement is now owed
    SETTLING = "settling"  # settlement about to be / being sent: recorded BEFORE the call
    SETTLED = "settled"  # terminal: transaction hash known and confirmed
    FAILED = "failed"  # terminal: settlement refused for good (reason kept)
    RELEASED = "released"  # failed before settlement: the authorization may be retried


S = PaymentState
#: Every allowed ``transition``. RELEASED → RESERVED is not here: only ``reserve`` does it.
TRANSITIONS: Mapping[PaymentState, frozenset[PaymentState]] = {
    S.RESERVED: frozenset({S.VERIFIED, S.RELEASED, S.SETTLING, S.FAILED}),
    S.VERIFIED: frozenset({S.SERVED, S.SETTLING, S.RELEASED, S.FAILED}),
    S.SERVED: frozenset({S.SETTLING, S.RELEASED}),
    S.SETTLING: frozenset({S.SETTLED, S.FAILED, S.SETTLING}),
    S.SETTLED: frozenset(),
    S.FAILED: frozenset(),
    S.RELEASED: frozenset(),
}
#: A SETTLING record whose ``error`` starts with this is flagged for an operator's review: its
#: outcome is unknown and nothing here can prove it (no chain to read). Never SETTLED by itself.
REVIEW_PREFIX = "review_required: "
#: States whose settlement is owed (SERVED) or in doubt (SETTLING): resumed at start-up.
UNFINISHED_STATES = (S.SERVED, S.SETTLING)
#: States a crashed request can leave behind before anything was served or settled.
RESERVATION_STATES = (S.RESERVED, S.VERIFIED)
del S

DEFAULT_LEASE_SECONDS = 30.0
_REPLICA = re.compile(r"^[A-Za-z0-9._:/@-]{1,100}$")


class EventAction(StrEnum):
    """What a replica did to a payment; the history says who did what, and when."""

    RESERVED = "reserved"  # claimed the authorization (new, or a released one again)
    MOVED = "moved"  # a transition (the event's state is the new one)
    SERVED = "served"  # mark_served
    CLAIMED = "claimed"  # took over an expired or unowned lease (detail: the former owner)
    RELEASED = "released"  # released a reservation whose owner is gone (start-up, reconciler)
    LET_GO = "let_go"  # the owner gave the lease up (a pending settlement, for any reconciler)
    COPIED = "copied"  # written by the record-by-record copy of earlier releases: still read


@dataclass(frozen=True, slots=True)
class PaymentEvent:
    """One line of a payment's history."""

    payment_id: str
    at: float  # unix seconds
    replica: str  # who did it
    action: EventAction
    state: PaymentState  # the record's state after it
    lease: int  # the epoch it was done under
    transaction: str | None = None
    error: str | None = None
    detail: str | None = None  # e.g. the former owner of a claimed lease


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """One payment as the ledger holds it. ``repr`` never shows the payload or requirements."""

    id: str  # 32 hex digits, time-ordered (ledger_rules.new_payment_id): shown to operators
    network: str  # CAIP-2, e.g. "eip155:84532"
    asset: str  # checksummed token address
    payer: str  # checksummed authorization `from`
    nonce: str  # 0x + 64 hex, lowercase
    pay_to: str  # checksummed
    amount: int  # atomic units
    x402_version: int  # 1 or 2
    route: str  # route name, e.g. "chat.completions"
    state: PaymentState
    served: bool
    # The payment payload JSON: it holds the signature, needed to resume settlement. Never
    # printed in full by the CLI, never logged.
    payload: str = field(repr=False)
    requirements: str = field(repr=False)  # the matched requirement JSON
    idempotency_key: str | None  # x402 payment-identifier extension, if any
    transaction: str | None  # settlement tx hash once known (also while settlement_pending)
    error: str | None  # last failure reason (an x402 reason code, never a secret)
    attempts: int  # settlement attempts
    created_at: float  # unix seconds
    updated_at: float  # unix seconds
    owner: str | None = None  # the replica holding the lease (None: nobody works on it)
    lease: int = 0  # fencing epoch: +1 at every change of owner
    lease_until: float | None = None  # the owner's lease runs out then (unix seconds)
    scheme: str = "exact"  # the x402 scheme: "exact" settles ``amount``, "upto" at most it
    model: str | None = None  # the request's model, when the price depended on it
    # Metering (upto): recorded with SERVED, before settlement, so a restart settles the same.
    tokens_in: int | None = None
    tokens_out: int | None = None
    usage_source: str | None = None  # one of USAGE_SOURCES
    settle_amount: int | None = None  # atomic units owed; None: ``amount`` (exact)
    settled_amount: int | None = None  # atomic units moved, once SETTLED

    def abandoned(self, now: float) -> bool:
        """In progress and worked on by nobody alive at ``now``: started (RESERVED/VERIFIED)
        with no owner or one whose lease ran out (the replica presumed dead), or past its
        reply (SERVED — a stream's progress recorded before its replica stalled — or SETTLING)
        with an owner whose lease ran out (one let go is a pending settlement's, handed to any
        reconciler). Its hold on anything (a retry of it, a channel) is then this server's
        failure, not its payer's doing."""
        ran_out = self.lease_until is None or self.lease_until <= now
        if self.state in (PaymentState.RESERVED, PaymentState.VERIFIED):
            return self.owner is None or ran_out
        return self.state in (PaymentState.SERVED, PaymentState.SETTLING) and (
            self.owner is not None and ran_out
        )

    @property
    def owed(self) -> int:
        """Atomic units this payment settles for: the metered charge, else the amount signed."""
        return self.amount if self.settle_amount is None else self.settle_amount

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The replay key: one authorization is one ``(network, asset, payer, nonce)``."""
        return (self.network, self.asset, self.payer, self.nonce)

    @property
    def needs_review(self) -> bool:
        """Owed, outcome unknown and unprovable here: listed for an operator."""
        return self.state is PaymentState.SETTLING and (self.error or "").startswith(REVIEW_PREFIX)

    @property
    def terminal(self) -> bool:
        return not TRANSITIONS[self.state]


RECEIPT_KINDS = ("reply", "settlement")
MAX_RECEIPT_CHARS = 8 * 1024  # a token is about a kilobyte (enclave.receipts.MAX_TOKEN)


@dataclass(frozen=True, slots=True)
class StoredReceipt:
    """A signed receipt as the ledger keeps it (the token, byte for byte)."""

    payment_id: str
    kind: str  # "reply" | "settlement"
    token: str = field(repr=False)
    created_at: float


@dataclass(frozen=True, slots=True)
class ReceiptUsage:
    """The usage a reply receipt states, recorded on its payment (any scheme)."""

    tokens_in: int
    tokens_out: int
    source: str  # the ledger's words: "upstream" (reported) or the metering fallback

    def __post_init__(self) -> None:
        check_amount(self.tokens_in)
        check_amount(self.tokens_out)
        if not isinstance(self.source, str) or not 0 < len(self.source) <= 32:
            raise ValueError("usage source must be a short name")


def check_receipt(kind: str, token: str) -> None:
    if kind not in RECEIPT_KINDS:
        raise ValueError(f"receipt kind must be one of {', '.join(RECEIPT_KINDS)}")
    if not isinstance(token, str) or not 0 < len(token) <= MAX_RECEIPT_CHARS:
        raise ValueError(f"a receipt token is 1-{MAX_RECEIPT_CHARS} characters")


@dataclass(frozen=True, slots=True)
class Earnings:
    """One group of settled payments: what moved, and the tokens it paid for."""

    key: str
    payments: int
    tokens_in: int
    tokens_out: int
    settled: int  # atomic units


SUMMARY_KEYS = ("model", "day", "payer")


@dataclass(frozen=True, slots=True)
class Budget:
    """A payer's spend limit (atomic units of one asset) since a moment (unix seconds)."""

    limit: int
    since: float
    window: str = "day"  # what it is called in refusals and alerts ("day", "month")
    resets_at: float | None = None  # when the window starts again (unix seconds), if known


@dataclass(frozen=True, slots=True)
class Meter:
    """A metered request's usage and the charge it settles for (recorded with SERVED)."""

    tokens_in: int
    tokens_out: int
    source: str  # how the usage was obtained: one of USAGE_SOURCES
    settle_amount: int  # atomic units, at most the authorized amount

    def __post_init__(self) -> None:
        for value in (self.tokens_in, self.tokens_out, self.settle_amount):
            check_amount(value)
        if self.source not in USAGE_SOURCES:
            raise ValueError(f"usage source must be one of {', '.join(USAGE_SOURCES)}")


# How a metered request's usage was obtained: the engine's final report, its running counts
# (a stream cut short), its tokenizer on what was delivered, or the operator's fallback.
USAGE_SOURCES = (
    "upstream",
    "running",
    "tokenizer",
    "fallback-prompt",
    "fallback-max",
    "fallback-estimate",
)
# An x402 scheme name ("exact", "batch-settlement"). Which schemes exist is the registry's
# business (x402.schemes, above the ledger): the processor records only a registered one.
_SCHEME_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


def check_scheme(value: str) -> str:
    if not isinstance(value, str) or not _SCHEME_NAME.match(value):
        raise ValueError("scheme must be an x402 scheme name")
    return value


def check_model(value: str | None) -> str | None:
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 256):
        raise ValueError("model must be a name of 1-256 characters")
    return value


@dataclass(slots=True, eq=False)
class SchemeWrite:
    """Statements on a scheme package's own tables (``?`` placeholders, both stores' SQL: a
    channel's charge, its take) made in the transaction of a payment's move or reservation
    (:meth:`Ledger.transition`, :meth:`Ledger.reserve` ``write``), after it: all or nothing
    with it. When statement ``required`` (if any) returns no row, the whole transaction is
    rolled back and :class:`WriteNotMade` raised. ``results``: each statement's (rows changed,
    rows returned), filled in by the store once made."""

    statements: list[tuple[str, tuple[Any, ...]]]
    required: int | None = None
    results: list[tuple[int, list[tuple[Any, ...]]]] = field(default_factory=list)


# --- errors -------------------------------------------------------------------------------


class LedgerError(PaygateError):
    """Base of the ledger's errors. Messages name payment ids and states, never payloads."""

    message = "the payment ledger failed"

    code = "ledger_error"


class AlreadyReserved(LedgerError):
    """The authorization is already claimed: a replay, or a concurrent duplicate."""

    message = "the authorization is already claimed"

    code = "payment_replayed"

    def __init__(self, record: PaymentRecord) -> None:
        super().__init__(f"payment {record.id} is already {record.state.value}")
        self.record = record


class BudgetExceeded(LedgerError):
    """The payer's budget would be passed by this payment."""

    message = "the payer's budget would be passed by this payment"

    code = "budget_exceeded"

    def __init__(self, message: str, budget: Budget | None = None) -> None:
        super().__init__(message)
        self.budget = budget


class SignInReused(LedgerError):
    """A sign-in-with-x nonce was already used."""

    message = "a sign-in-with-x nonce was already used"

    code = "siwx_nonce_reused"


class FreeAddressUsed(LedgerError):
    """The client address's free requests of the day are used (nothing was recorded)."""

    message = "today's free requests from this address are used"

    code = "free_address_exhausted"


class IdempotencyKeyReused(LedgerError):
    """The payment-identifier already names a different authorization."""

    message = "the payment-identifier already names a different authorization"

    code = "idempotency_key_reused"


class LedgerConflict(LedgerError):
    """A state change the table does not allow, or that lost a race."""

    message = "a state change the table does not allow, or that lost a race"

    code = "ledger_conflict"


class WriteNotMade(LedgerConflict):
    """A :class:`SchemeWrite`'s required statement changed nothing: the whole transition was
    rolled back (nothing recorded)."""

    message = "the scheme's write with this move was not made; nothing was recorded"

    code = "ledger_write_not_made"


class PaymentNotFound(LedgerConflict):
    """No record has that payment id."""

    message = "no record has that payment id"

    code = "payment_not_found"


class LeaseLost(LedgerConflict):
    """The record was claimed by another replica (its epoch moved on): leave it alone."""

    message = "the record was claimed by another replica (its epoch moved on)"

    code = "lease_lost"


class LedgerUnavailable(LedgerError):
    """The store cannot be opened or written (missing, unwritable, disk full, locked too long)."""

    message = "the ledger store cannot be opened or written"

    code = "ledger_unavailable"


class LedgerNotFound(LedgerUnavailable):
    """Opening without ``create``: there is no ledger at that path."""

    message = "the ledger does not exist (and was not to be created)"

    code = "ledger_not_found"


# --- input normalisation ------------------------------------------------------------------


def normalise_address(value: str, what: str) -> str:
    """A 20-byte hex address in any case → its EIP-55 checksum form."""
    if not isinstance(value, str) or not _ADDRESS.match(value):
        raise ValueError(f"{what} must be a 0x-prefixed 20-byte hex address")
    return typed_digest.checksum(value.lower())


def normalise_nonce(value: str) -> str:
    """A 32-byte hex nonce in any case → lowercase ``0x`` + 64 hex."""
    text = value.lower() if isinstance(value, str) else ""
    if not _NONCE.match(text):
        raise ValueError("nonce must be 0x followed by 64 hex digits")
    return text


def normalise_network(value: str) -> str:
    """A v1 name or CAIP-2 id → CAIP-2, so one authorization has one key in both versions."""
    try:
        if not isinstance(value, str):
            raise UnknownNetwork("not a string")
        return resolve_network(value).caip2
    except UnknownNetwork:
        raise ValueError("network must be a known network name or an eip155 CAIP-2 id") from None


def normalise_key(network: str, asset: str, payer: str, nonce: str) -> tuple[str, str, str, str]:
    """The canonical replay key: CAIP-2 network, checksummed addresses, lowercase nonce."""
    return (
        normalise_network(network),
        normalise_address(asset, "asset"),
        normalise_address(payer, "payer"),
        normalise_nonce(nonce),
    )


def check_idempotency_key(value: str | None) -> str | None:
    if value is not None and (not isinstance(value, str) or not _IDEMPOTENCY_KEY.match(value)):
        raise ValueError("idempotency_key must be 16-128 characters of [A-Za-z0-9_-]")
    return value


def check_amount(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT256_MAX:
        raise ValueError("amount must be an integer of atomic units in uint256 range")
    return value


def check_version(value: int) -> int:
    if value not in (1, 2) or isinstance(value, bool):
        raise ValueError("x402_version must be 1 or 2")
    return value


def check_route(value: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _ROUTE_MAX_CHARS:
        raise ValueError(f"route must be a name of 1-{_ROUTE_MAX_CHARS} characters")
    return value


def check_document(value: str, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_DOCUMENT_CHARS:
        raise ValueError(f"{what} must be a JSON string of at most {MAX_DOCUMENT_CHARS} chars")
    return value


def check_transaction(value: str | None) -> str | None:
    if value is not None and (not isinstance(value, str) or not _TRANSACTION.match(value)):
        raise ValueError("transaction must be a 0x-prefixed 32-byte hex hash")
    return value.lower() if value is not None else None


def check_error(value: str | None) -> str | None:
    """A failure reason is a short code: bounded, one line (it is shown to operators)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("error must be a string")
    return " ".join(value.split())[:_ERROR_MAX_CHARS]


def review_error(reason: str) -> str:
    """The ``error`` that flags a record for review (see :data:`REVIEW_PREFIX`)."""
    return REVIEW_PREFIX + reason


def check_limit(limit: int) -> int:
    """A requested page size, capped at :data:`MAX_LIST_LIMIT`."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError("limit must be a positive integer")
    return min(limit, MAX_LIST_LIMIT)


# --- leases and replicas --------------------------------------------------------------------


def default_replica_id() -> str:
    """``<hostname>:<pid>``: unique among live processes, new at every start."""
    return f"{socket.gethostname()}:{os.getpid()}"


def check_replica(value: str) -> str:
    if not isinstance(value, str) or not _REPLICA.match(value):
        raise ValueError("replica must be 1-100 characters of [A-Za-z0-9._:/@-]")
    return value


def check_lease_seconds(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise ValueError("lease_seconds must be a number of seconds in (0, 3600]")
    return float(value)


def check_move(
    record: PaymentRecord, to: PaymentState, lease: int | None, state: PaymentState | None = None
) -> None:
    """The rules of :meth:`Ledger.transition`, for every store: the fence (a caller whose lease
    is gone learns that first, whatever became of the record), then the table (from ``state``,
    where a move before this one in the same call left the record; else its own)."""
    check_fence(record, lease)
    state = record.state if state is None else state
    if to not in TRANSITIONS[state]:
        raise LedgerConflict(f"payment {record.id}: {state.value} -> {to.value} is not allowed")


def check_fence(record: PaymentRecord, lease: int | None) -> None:
    if lease is not None and record.lease != lease:
        raise LeaseLost(
            f"payment {record.id}: lease {lease} is gone (now {record.lease}, "
            f"held by {record.owner or 'nobody'})"
        )
