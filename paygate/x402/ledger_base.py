"""The payment ledger's interface, :class:`Ledger`, as both stores offer it.

:class:`Ledger` takes each call, checks its arguments (``ledger_rules``, before any I/O) and
hands it to the store's statement of the same name through the store's ``_run`` (SQLite: on its
worker thread; PostgreSQL: in one transaction on a pooled connection). A store supplies
``_run``, ``_tail`` (its placeholder and tie-breaker spelling of the shared clauses below) and
the statements; it decides nothing that :mod:`paygate.x402.ledger_rules` decides.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any, Self

from paygate.x402.ledger import (
    MAX_LIST_LIMIT,
    RESERVATION_STATES,
    UNFINISHED_STATES,
    Budget,
    Earnings,
    LedgerError,
    Meter,
    PaymentEvent,
    PaymentRecord,
    PaymentState,
    ReceiptUsage,
    SchemeWrite,
    StoredReceipt,
    check_amount,
    check_document,
    check_error,
    check_idempotency_key,
    check_lease_seconds,
    check_limit,
    check_model,
    check_receipt,
    check_replica,
    check_route,
    check_scheme,
    check_transaction,
    check_version,
    default_replica_id,
    normalise_address,
    normalise_key,
    normalise_nonce,
)
from paygate.x402.ledger_rules import (
    Move,
    Reservation,
    check_free_request,
    check_group,
    check_min_age,
    check_prune,
)

# The clauses both stores run, with ``?`` for a value and ``{seq}`` for the insertion order
# (SQLite's rowid, PostgreSQL's seq column); a store's ``_tail`` spells them its way.
BY_ID = "WHERE id = ?"
BY_KEY = "WHERE network = ? AND asset = ? AND payer = ? AND nonce = ?"
BY_IDEMPOTENCY_KEY = "WHERE idempotency_key = ?"
BY_NONCE = "WHERE nonce = ? ORDER BY created_at LIMIT 10"
NEWEST = "ORDER BY created_at DESC, {seq} DESC LIMIT ?"
NEWEST_IN_STATE = "WHERE state = ? " + NEWEST
RECEIPTS_OF = "WHERE payment_id = ? ORDER BY created_at, kind"


class Ledger:
    """The payment ledger. All methods are async; implementations are safe for concurrent use
    from one event loop and across processes (and hosts) sharing the store. Every method that
    changes a record returns it as stored, and has made it durable before returning.

    A ledger is opened under a replica name (:attr:`replica`) with a lease length
    (:attr:`lease_seconds`): records it reserves or claims are owned by it until they end,
    it lets them go, or their lease runs out.

    Infrastructure failures (store unreachable, disk full, locked too long) raise
    :class:`LedgerUnavailable`: the gate answers 503 and never serves unpaid.

    A store subclasses this: each call is checked here (``ledger_rules``, before any I/O) and
    handed to the store's statement of the same name.
    """

    replica: str
    lease_seconds: float
    # The store's statements, run by ``_run`` (their arguments after the store's own).
    _one: Callable[..., Any]
    _many: Callable[..., Any]
    _clock_now: Callable[..., Any]  # the clock leases are measured by, read
    _reserve: Callable[..., Any]
    _transition: Callable[..., Any]
    _mark_served: Callable[..., Any]
    _renew: Callable[..., Any]
    _let_go: Callable[..., Any]
    _claim_unfinished: Callable[..., Any]
    _release_abandoned: Callable[..., Any]
    _history: Callable[..., Any]
    _in_states: Callable[..., Any]
    _forget_idempotency_key: Callable[..., Any]
    _take_free: Callable[..., Any]
    _add_receipt: Callable[..., Any]
    _receipts: Callable[..., Any]
    _signin_key: Callable[..., Any]
    _earnings: Callable[..., Any]
    _prune_days: Callable[..., Any]

    def __init__(self, replica: str | None, lease_seconds: float) -> None:
        self.replica = check_replica(replica or default_replica_id())
        self.lease_seconds = check_lease_seconds(lease_seconds)

    def _use_tables(self, tables: Any) -> None:
        """Run the side tables' statements (the store's ``*Tables``) like the store's own."""
        self._take_free, self._signin_key = tables.take_free, tables.signin_key
        self._add_receipt, self._receipts = tables.add_receipt, tables.receipts
        self._history, self._earnings = tables.history, tables.earnings
        self._forget_idempotency_key = tables.forget_idempotency_key
        self._prune_days = tables.prune_days

    async def _run(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        raise NotImplementedError

    def _tail(self, clause: str) -> str:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        raise NotImplementedError

    # --- changes ------------------------------------------------------------------------------

    async def reserve(
        self,
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
        scheme: str = "exact",
        model: str | None = None,
        budget: Budget | None = None,
        budgets: tuple[Budget, ...] = (),
        write: SchemeWrite | None = None,
    ) -> PaymentRecord:
        """Claim ``(network, asset, payer, nonce)`` atomically, as a new RESERVED record owned
        by this replica (a fresh lease).

        With a ``budget``, in the same transaction: the payer's spend on this asset since
        ``budget.since`` (authorized amounts until settled, then what moved; released and
        failed payments count nothing) plus ``amount`` must stay within ``budget.limit``, else
        :class:`BudgetExceeded` — so concurrent requests cannot overspend. A payment counts
        in the window it was last admitted (reserved, or re-reserved after a release) or
        settled in, never by its record's creation: an authorization released yesterday and
        served today counts today. ``budgets`` (the economics
        controls' windows, ``paygate.economics``) are checked the same way, each with its own
        ``since``; the exception names the one passed.

        A RELEASED record with that key is re-claimed instead (same id, attempts kept). Any
        other existing record raises :class:`AlreadyReserved` carrying it. An idempotency key
        that already belongs to a record with a different key raises
        :class:`IdempotencyKeyReused`. Inputs are normalised (see :func:`normalise_key`).
        ``write``: a scheme's statements on its own tables, made in the same transaction after
        the reservation (as :meth:`transition`'s; not made when the reservation is refused).
        """
        checked = Reservation(
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
            write=write,
        )
        return await self._run(self._reserve, checked)

    async def transition(
        self,
        payment_id: str,
        to: PaymentState,
        *,
        transaction: str | None = None,
        error: str | None = None,
        lease: int | None = None,
        meter: Meter | None = None,
        settled_amount: int | None = None,
        let_go: bool = False,
        via: PaymentState | tuple[PaymentState, ...] | None = None,
        reply_receipt: str | None = None,
        receipt_usage: ReceiptUsage | None = None,
        write: SchemeWrite | None = None,
    ) -> PaymentRecord:
        """Move a record along :data:`TRANSITIONS` (compare-and-set in one transaction).

        Any move into SETTLING counts an attempt. ``transaction``/``error``/``meter``/
        ``settled_amount`` overwrite only when given; a ``meter`` above the authorized
        ``amount`` raises ValueError. A move not in the table raises :class:`LedgerConflict`;
        an unknown id :class:`PaymentNotFound`. With ``lease`` (the epoch the caller holds) the
        move is fenced: checked in the same transaction, refused with :class:`LeaseLost` if the
        record was claimed since; a fenced move into a live state renews the lease, into a
        terminal state ends it. Without ``lease`` (operators, tests) it is not fenced.
        ``let_go``: the move also gives the lease up (as :meth:`let_go` would, in the same
        transaction): nothing more happens to the payment here. ``via``: move through that
        state (or those states, in order) first, in the same transaction (every move checked
        against the table and fenced, every one in the history), e.g. VERIFIED on the way to
        SERVED. ``reply_receipt``: the reply's
        signed receipt, kept in the same transaction, with the usage it states
        (``receipt_usage``), as :meth:`add_receipt` (``"reply"``, fenced by ``lease``) would.
        ``write``: a scheme's statements on its own tables, made in the same transaction after
        the moves (:class:`SchemeWrite`: its required statement returned no row, everything is
        rolled back and :class:`WriteNotMade` raised).
        """
        target = PaymentState(to)
        if settled_amount is not None:
            check_amount(settled_amount)
        if reply_receipt is not None:
            check_receipt("reply", reply_receipt)
        move = Move(
            target,
            transaction=check_transaction(transaction),
            error=check_error(error),
            lease=lease,
            meter=meter,
            settled_amount=settled_amount,
            let_go=bool(let_go),
            via=_states(via),
            reply_receipt=reply_receipt,
            receipt_usage=receipt_usage if reply_receipt is not None else None,
            write=write,
        )
        return await self._run(self._transition, payment_id, move)

    async def mark_served(self, payment_id: str, *, first: bool = False) -> PaymentRecord:
        """Record that the reply was produced, in any state (upfront mode serves after SETTLED).
        ``first``: only if no request marked it before (:class:`LeaseLost` else): the claim of
        the one reply a payment settled upfront buys, made before that reply leaves."""
        return await self._run(self._mark_served, payment_id, first)

    async def renew(
        self, payment_id: str, lease: int, *, meter: Meter | None = None
    ) -> PaymentRecord:
        """Extend this replica's lease by :attr:`lease_seconds`; :class:`LeaseLost` if the
        record was claimed since (or has ended). ``meter``: a SERVED stream's progress, kept in
        the same write (what a reconciler settles if the stream stalls); ignored in any other
        state (its final meter went with SETTLING)."""
        if meter is not None and meter.settle_amount < 0:
            raise ValueError("a metered charge cannot be negative")
        return await self._run(self._renew, payment_id, lease, meter)

    async def let_go(self, payment_id: str, lease: int) -> PaymentRecord:
        """Give the lease up (owner cleared, epoch kept): any replica's reconciler may take the
        record; :class:`LeaseLost` if it is no longer ours."""
        return await self._run(self._let_go, payment_id, lease)

    async def claim_unfinished(
        self, *, min_age: float, own: bool = False, limit: int = MAX_LIST_LIMIT
    ) -> builtins.list[PaymentRecord]:
        """Take over SERVED/SETTLING records nobody works on, oldest first: their lease ran out,
        or they have no owner and were not touched for ``min_age`` seconds (and, with ``own``,
        those owned by this replica's name: a previous incarnation). Atomic across replicas
        (``FOR UPDATE SKIP LOCKED``, or SQLite's write lock): each record goes to one claimer,
        with the epoch + 1.
        """
        check_min_age(min_age)
        return await self._run(self._claim_unfinished, min_age, own, check_limit(limit))

    async def release_abandoned(
        self,
        *,
        own: bool = False,
        limit: int = MAX_LIST_LIMIT,
        writes: Callable[[PaymentRecord], SchemeWrite | None] | None = None,
    ) -> builtins.list[PaymentRecord]:
        """Release RESERVED/VERIFIED records whose owner is gone (lease ran out, no owner, or,
        with ``own``, this replica's name), so their callers can retry; returns them.

        ``writes``: each released record's scheme write (what its reservation took: a
        channel's hold), made in the same transaction. It is called inside that transaction
        (on SQLite, on the ledger's thread): it only builds the write, never waits or raises.
        """
        return await self._run(self._release_abandoned, own, check_limit(limit), writes)

    async def forget_idempotency_key(
        self,
        key: str,
        *,
        payment_id: str,
        ended: tuple[PaymentState, ...],
        before: float,
    ) -> bool:
        """Free payment-identifier ``key`` from record ``payment_id`` (so that it may name a
        new payment) when that record was RELEASED, or is in one of the ``ended`` states and
        was last changed before ``before`` (unix seconds); in one statement, so a record that
        moved on meanwhile keeps it. True when freed (paygate.x402.idempotency)."""
        return await self._run(self._forget_idempotency_key, key, payment_id, ended, before)

    async def take_free(
        self,
        *,
        payer: str,
        nonce: str,
        day: str,
        limit: int,
        address: str | None = None,
        address_limit: int = 0,
    ) -> int | None:
        """Take one of ``payer``'s ``limit`` free requests of ``day`` (UTC, YYYY-MM-DD) with a
        sign-in ``nonce`` (used once, ever: :class:`SignInReused`). The requests left after
        this one, or None when none was left (nothing recorded). With ``address`` (the
        client's address key), in the same transaction, one of that key's ``address_limit``
        free requests of ``day`` too, whatever the wallet: :class:`FreeAddressUsed` when none
        is left (nothing recorded). Atomic across processes and replicas."""
        checked = check_free_request(payer, nonce, day, limit, address, address_limit)
        return await self._run(self._take_free, checked, nonce, day, limit, address, address_limit)

    async def signin_key(self) -> bytes:
        """The secret that proves a sign-in-with-x nonce was issued by this deployment (made
        once, kept in the store: every process and replica shares it)."""
        return await self._run(self._signin_key)

    async def add_receipt(
        self,
        payment_id: str,
        kind: str,
        token: str,
        *,
        usage: ReceiptUsage | None = None,
        lease: int | None = None,
    ) -> None:
        """Keep a signed receipt of a payment (one per ``kind``: the first kept stays, so its
        bytes never change). With ``usage``, a ``reply`` receipt also records the usage it
        states on the payment, whatever the scheme, where none is recorded yet — fenced by
        ``lease`` when given (a replica whose payment was claimed away changes no record)."""
        check_receipt(kind, token)
        await self._run(self._add_receipt, payment_id, kind, token, usage, lease)

    async def prune_days(self, *, before: str, batch: int = 500, batches: int = 100) -> int:
        """Delete the day-keyed rows of days before ``before`` (UTC, YYYY-MM-DD): free quotas,
        address allowances, sign-in nonces used before that day began, and channel vouchers
        recorded before it whose payment is finished. At most ``batch``
        rows per table per transaction, repeated while a table filled its batch, at most
        ``batches`` times (the rest waits for the next call). Safe to run from several
        processes at once (rows another pruner holds are skipped; deleting is idempotent).
        The rows deleted from the fullest table per batch, summed. Which day is safe to prune
        is the caller's (paygate.x402.retention)."""
        start = check_prune(before, batch)
        pruned = 0
        for _ in range(max(batches, 0)):
            deleted = await self._run(self._prune_days, before, start, batch)
            pruned += deleted
            if deleted < batch:
                break
        return pruned

    # --- reads --------------------------------------------------------------------------------

    async def history(self, payment_id: str) -> builtins.list[PaymentEvent]:
        """What was done to a payment, by which replica, oldest first (bounded)."""
        return await self._run(self._history, payment_id)

    async def get(self, payment_id: str) -> PaymentRecord | None:
        return await self._run(self._one, self._tail(BY_ID), (payment_id,))

    async def find(
        self, *, network: str, asset: str, payer: str, nonce: str
    ) -> PaymentRecord | None:
        """The record of one authorization key (normalised like ``reserve``), or None."""
        key = normalise_key(network, asset, payer, nonce)
        return await self._run(self._one, self._tail(BY_KEY), key)

    async def by_idempotency_key(self, key: str) -> PaymentRecord | None:
        return await self._run(self._one, self._tail(BY_IDEMPOTENCY_KEY), (key,))

    async def now(self) -> float:
        """This ledger's clock, the one its leases are measured by (PostgreSQL: the
        database's, which every replica shares; not this host's)."""
        return float(await self._run(self._clock_now))

    async def abandoned(self, record: PaymentRecord) -> bool:
        """Is ``record`` started and worked on by nobody alive (:meth:`PaymentRecord.abandoned`)
        by this ledger's clock? False when the clock cannot be read: not known to be."""
        try:
            return record.abandoned(await self.now())
        except LedgerError:
            return False

    async def by_nonce(self, nonce: str) -> builtins.list[PaymentRecord]:
        """The records of an authorization nonce on any network (a receipt's payment id)."""
        return await self._run(self._many, self._tail(BY_NONCE), (normalise_nonce(nonce),))

    async def unfinished(self, *, limit: int = MAX_LIST_LIMIT) -> builtins.list[PaymentRecord]:
        """SERVED (settlement owed) and SETTLING (outcome unknown) records, oldest first."""
        return await self._run(self._in_states, UNFINISHED_STATES, None, check_limit(limit))

    async def stale_reservations(
        self, older_than: float, *, limit: int = MAX_LIST_LIMIT
    ) -> builtins.list[PaymentRecord]:
        """RESERVED/VERIFIED records not updated for ``older_than`` seconds, oldest first."""
        check_min_age(older_than, "older_than")
        return await self._run(self._in_states, RESERVATION_STATES, older_than, check_limit(limit))

    async def list(
        self, *, state: PaymentState | None = None, limit: int = 50
    ) -> builtins.list[PaymentRecord]:
        """Records, newest first, at most ``min(limit, MAX_LIST_LIMIT)``."""
        if state is None:
            return await self._run(self._many, self._tail(NEWEST), (check_limit(limit),))
        params = (PaymentState(state).value, check_limit(limit))
        return await self._run(self._many, self._tail(NEWEST_IN_STATE), params)

    async def receipts(self, payment_id: str) -> builtins.list[StoredReceipt]:
        """A payment's kept receipts, oldest first."""
        return await self._run(self._receipts, self._tail(RECEIPTS_OF), (payment_id,))

    async def list_receipts(self, *, limit: int = 50) -> builtins.list[StoredReceipt]:
        """Kept receipts, newest first, at most ``min(limit, MAX_LIST_LIMIT)``."""
        return await self._run(self._receipts, self._tail(NEWEST), (check_limit(limit),))

    async def earnings(self, *, since: float, by: str) -> builtins.list[Earnings]:
        """SETTLED payments created since ``since``, grouped ``by`` "model", "day" (UTC) or
        "payer", ordered by that key."""
        return await self._run(self._earnings, float(since), check_group(by))


def _states(via: PaymentState | tuple[PaymentState, ...] | None) -> tuple[PaymentState, ...]:
    if via is None:
        return ()
    if isinstance(via, str):  # one state (a StrEnum)
        return (PaymentState(via),)
    return tuple(PaymentState(state) for state in via)
