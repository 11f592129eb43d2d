"""A paid request's life after admission, in one object: :class:`PaymentSession`.

One entry: the processor's admission creates it (``PaymentProcessor.admit``). One exit:
:meth:`PaymentSession.finish`, idempotent, run by ``async with session:`` whatever happens —
shielded from cancellation, with ``caller_gone`` set when the caller disconnected. In between,
the reply stage only reports what it sees (the upstream's ``status``, the reply's usage and
bytes through :meth:`~PaymentSession.measure` / :meth:`~PaymentSession.meter_items`) and asks for
the receipt to send (:meth:`~PaymentSession.settle`) or says nothing was earned
(:meth:`~PaymentSession.give_up`). The session decides the rest:

- **metering** (a metered scheme, ``upto``): usage → charge by the quote's token prices, within
  the authorized maximum; a reply that ended without usage (caller gone, stream cut short) is
  counted by the best count there is — the engine's running counts, its tokenizer on what was
  delivered, else the operator's fallback — never a silent zero;
- **finish**: settle what is owed (a good reply), release what was not earned, record the tokens
  for the economics controls — through the settlement steps (paygate.x402.settlements), whose
  strategy says *when* a payment settles;
- **receipts' payment facts**: the ledger record, the charge, the token prices, the paying
  authorization's expiry (asked of the payment's scheme).

No HTTP here: the server's adapter (paygate.server.payments) turns headers into an admission and
refusals into responses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from types import TracebackType
from typing import Any, Protocol

from paygate.x402.hooks import EconomicsCheck
from paygate.x402.ledger import Meter
from paygate.x402.metering import Fallback, Quote, TokenCounts, TokenPrice
from paygate.x402.networks import to_atomic_ceiling
from paygate.x402.results import PaymentAdmission, Receipt
from paygate.x402.settlements import Settlements


class MeteredReply(Protocol):
    """What the session reads of a metered reply (paygate.server.proxy.UpstreamReply)."""

    @property
    def usage(self) -> TokenCounts | None:
        """The usage the engine reported at the end (None: not reported)."""
        ...

    @property
    def running_usage(self) -> TokenCounts | None:
        """The engine's counts so far (a stream cut short)."""
        ...

    @property
    def completion_text(self) -> str:
        """The completion delivered so far (bounded)."""
        ...


class CompletionCounter(Protocol):
    """The engine's tokenizer for this request (paygate.server.counting.Tokenizer)."""

    async def usage(self, completion: str, prompt_bound: int) -> TokenCounts | None:
        """The prompt and ``completion`` in the engine's tokens (the prompt at most
        ``prompt_bound``), or None when it cannot count them."""
        ...


class ByteCount(Protocol):
    @property
    def bytes_seen(self) -> int: ...


@dataclass(frozen=True, slots=True)
class MeteredTerms:
    """How a metered request is charged: the quote of a single request, or a batch's quotes
    aligned with its items (None: an item not forwarded, never charged), and the fallback."""

    quote: Quote | None = None
    items: tuple[Quote | None, ...] | None = None
    fallback: Fallback = "prompt"


class PaymentSession:
    """One admitted request's payment, from admission to its one exit (see the module)."""

    __slots__ = (
        "_admission",
        "_decimals",
        "_due",
        "_economics",
        "_finished",
        "_lease_clock",
        "_model",
        "_recording",
        "_settlements",
        "_terms",
        "_watched",
        "caller_gone",
        "counter",
        "settle_seconds",
        "status",
        "usage",
    )

    def __init__(
        self,
        admission: PaymentAdmission,
        *,
        settlements: Settlements | None = None,
        terms: MeteredTerms | None = None,
        decimals: int = 0,
        economics: EconomicsCheck | None = None,
        model: str | None = None,
    ) -> None:
        self._admission = admission
        self._settlements = settlements  # None: nothing to settle (payments off, free route)
        self._terms = terms if terms is not None else MeteredTerms()
        self._decimals = decimals  # of the paid asset on the payment's network
        self._economics = economics
        self._model = model  # the model the request named, for the economics' token windows
        self._finished = False
        # Reported by the reply stage: the upstream's status, the engine's stated usage (once
        # the body has ended), whether the caller went away before the end.
        self.status = 0
        self.usage: TokenCounts | None = None
        self.caller_gone = False
        # The engine's tokenizer (set by the gateway): counts a stream that ended early.
        self.counter: CompletionCounter | None = None
        self.settle_seconds: float | None = None  # how long the settle call took (traces)
        # A metered stream's reply and byte count: what the meter reads when it ends early.
        self._watched: tuple[MeteredReply, ByteCount] | None = None
        # A stream's lease window (local clock) once its head left: see :meth:`lease_live`.
        self._due: float | None = None
        self._lease_clock: Callable[[], float] = time.monotonic  # the leases' (stream_began)
        # The move recording a stream's progress, started after its first content went out.
        self._recording: asyncio.Task[str | None] | None = None

    @classmethod
    def unpaid(cls) -> PaymentSession:
        """A request with nothing to pay (payments off, a free route)."""
        return cls(PaymentAdmission(price=Decimal(0)))

    # --- the one exit ---

    async def __aenter__(self) -> PaymentSession:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is not None and issubclass(kind, asyncio.CancelledError | ConnectionResetError):
            self.caller_gone = True
        if self._finished:
            return
        # Shielded: a second cancellation must not cut the ledger write short. Its own task from
        # the first step: whatever the exit binds to its task (an ``asyncio.timeout``, say)
        # binds to the task that runs it to its end, never to the request's, which is leaving.
        # (The task made here, as shield would: shield's own check of a coroutine costs a
        # failed attribute look-up on every request.)
        await asyncio.shield(asyncio.get_running_loop().create_task(self.finish()))

    async def finish(self) -> None:
        """The request is over (once): meter a reply that ended without its meter, settle what
        is owed or release what was not earned, record the tokens for the economics."""
        if self._finished:
            return
        self._finished = True
        if self._settlements is None:
            return
        if self._recording is not None:  # a cut stream settles or releases from what it left
            await self._progress_recorded()
        admission = self._admission
        if self.settles:
            # A metered reply that ended without its meter (caller gone, stream cut short):
            # what the reader saw, else the fallback.
            if self._watched is not None:
                reply, counted = self._watched
                await self.measure(reply, reply_bytes=counted.bytes_seen)
            else:
                self.meter(None, reply_bytes=0)
        await self._settlements.finish(
            admission, succeeded=0 < self.status < 400, caller_gone=self.caller_gone
        )
        if self.settles and self._economics is not None and admission.record is not None:
            meter = admission.meter
            usage = self.usage
            tokens = (
                (meter.tokens_in, meter.tokens_out)
                if meter is not None
                else (usage.prompt_tokens, usage.completion_tokens)
                if usage is not None
                else None
            )
            if tokens is not None:
                await self._economics.record(
                    payer=admission.record.payer,
                    model=self._model,
                    tokens_in=tokens[0],
                    tokens_out=tokens[1],
                )

    async def give_up(self) -> None:
        """Nothing was earned (the upstream failed): release now, before the error is sent,
        so the caller's immediate retry with the same authorization is not "in progress"."""
        await self.finish()

    async def reply_ended(
        self,
        reply: MeteredReply | None = None,
        *,
        reply_bytes: int = 0,
        receipt_follows: bool = False,
        sign: Callable[[], Awaitable[tuple[str, Mapping[str, Any] | None]]] | None = None,
        publish: Callable[[str], Awaitable[None]] | None = None,
    ) -> Receipt | None:
        """The reply is here and its end not sent yet: the receipt to send with it, if any.
        Nothing earned (the upstream failed): released now, before the error goes out, so the
        caller's immediate retry with the same authorization is not "in progress". Earned:
        metered (a metered scheme) by ``reply``, then settled as the strategy says.
        ``receipt_follows``: the caller keeps a signed receipt (:meth:`keep_receipt`) before
        the reply's end leaves, so a SERVED recorded now may wait for it (one ledger
        transaction for both). ``sign``: makes that receipt (token, the usage it states) once
        metered; called here, before settling, when the settlement is a charge in this ledger
        (its transaction keeps the receipt too: see ``PaymentAdmission.reply_receipt``);
        ``publish`` logs it once that transaction is made (else the caller does)."""
        admission = self._admission
        # The end's SETTLING follows its stream's SERVED (no coroutine for any other reply).
        if self._recording is not None and await self._progress_recorded() is not None:
            return None  # refused: the lease lost (``unrecorded``), the end withheld
        admission.receipt_follows = receipt_follows and self.settles
        if not self.settles:
            if self.paid:
                await self.give_up()
            return admission.receipt
        if reply is not None:
            await self.measure(reply, reply_bytes=reply_bytes)
        if (
            sign is not None
            and admission.scheme.settles_in_ledger
            and admission.receipt is None
            and admission.settle_task is None
        ):
            admission.reply_receipt = await sign()
            admission.publish_receipt = publish
        return await self.settle()

    async def items_ended(
        self, items: list[tuple[bool, TokenCounts | None, int]]
    ) -> Receipt | None:
        """A batch's items are here (succeeded, usage, reply bytes, in order): as
        :meth:`reply_ended`, metered per item."""
        if self.settles:
            self.meter_items(items)
        return await self.reply_ended()

    async def settle(self) -> Receipt | None:
        """Settle now (a good reply, before its end leaves); the receipt to send, if any."""
        if self._settlements is None:
            return None
        started = time.monotonic()
        try:
            return await self._settlements.settle(self._admission)
        finally:
            self.settle_seconds = time.monotonic() - started

    # --- metering ---

    @property
    def metered(self) -> bool:
        """Paid with a metered scheme (upto): the charge follows the reported usage."""
        terms = self._terms
        return self._admission.metered and (terms.quote is not None or terms.items is not None)

    def watch(self, reply: MeteredReply, counted: ByteCount) -> None:
        """The metered reply being streamed, for a meter taken when it ends early."""
        self._watched = (reply, counted)

    async def measure(self, reply: MeteredReply, *, reply_bytes: int) -> None:
        """Meter a metered reply by the best count there is, once, before :meth:`settle`: the
        usage the engine reported at the end; else its running counts (a stream cut short);
        else the engine's tokenizer on the completion delivered; else the fallback."""
        quote = self._terms.quote
        if not self.metered or self._admission.meter is not None or quote is None:
            return
        if reply.usage is not None:
            self.meter(reply.usage, source="upstream", reply_bytes=reply_bytes)
        elif reply.running_usage is not None:
            self.meter(reply.running_usage, source="running", reply_bytes=reply_bytes)
        else:
            counted = None
            if self.counter is not None:
                counted = await self.counter.usage(reply.completion_text, quote.prompt_bound)
            if counted is not None:
                self.meter(counted, source="tokenizer", reply_bytes=reply_bytes)
            else:
                self.meter(None, reply_bytes=reply_bytes)

    def meter(
        self, usage: TokenCounts | None, *, source: str = "upstream", reply_bytes: int
    ) -> None:
        """Record what a metered reply used (None: nothing could be counted), once, before
        :meth:`settle`; the charge follows the token prices, capped by the authorization."""
        admission = self._admission
        quote = self._terms.quote
        if not self.metered or admission.meter is not None or quote is None:
            return
        assert admission.record is not None
        admission.meter = self._at_least(
            quote.charge(
                usage,
                source=source,
                reply_bytes=reply_bytes,
                decimals=self._decimals,
                maximum=admission.record.amount,
                fallback=self._terms.fallback,
            )
        )

    def meter_items(self, items: list[tuple[bool, TokenCounts | None, int]]) -> None:
        """A metered batch's meter: per item (succeeded, usage, reply bytes) priced with its
        own quote (failed and refused items cost nothing), summed, capped by the
        authorization."""
        admission = self._admission
        quotes = self._terms.items
        if not self.metered or admission.meter is not None or quotes is None:
            return
        assert admission.record is not None
        decimals = self._decimals
        meters = [
            quote.charge(
                usage,
                source="upstream",
                reply_bytes=size,
                decimals=decimals,
                maximum=to_atomic_ceiling(quote.maximum, decimals),
                fallback=self._terms.fallback,
            )
            for quote, (ok, usage, size) in zip(quotes, items, strict=True)
            if quote is not None and ok
        ]
        sources = {m.source for m in meters} - {"upstream"}
        admission.meter = self._at_least(
            Meter(
                tokens_in=sum(m.tokens_in for m in meters),
                tokens_out=sum(m.tokens_out for m in meters),
                source=min(sources) if sources else "upstream",
                settle_amount=min(sum(m.settle_amount for m in meters), admission.record.amount),
            )
        )

    def _at_least(self, meter: Meter) -> Meter:
        """``meter`` charging at least the scheme's ``least_charge`` (a channel's: 1), within
        the authorization: the receipt, the record and the charge all state that amount."""
        admission = self._admission
        assert admission.record is not None
        least = min(admission.scheme.least_charge, admission.record.amount)
        if meter.settle_amount >= least:
            return meter
        return replace(meter, settle_amount=least)

    # --- what the reply stage and the receipts read ---

    @property
    def admission(self) -> PaymentAdmission:
        """What was admitted, as it stands: its ledger ``record`` (None when free), the
        ``receipt`` known before the reply (upfront settlement), a metered payment's ``meter``
        once taken (what it is charged for), a free request's ``free_remaining`` today."""
        return self._admission

    @property
    def paid(self) -> bool:
        return self._admission.paid

    @property
    def settles(self) -> bool:
        """Paid, and the upstream answered below 400: settlement is owed."""
        return self.paid and 0 < self.status < 400

    @property
    def scheme(self) -> str | None:
        """The paying scheme's name (None when free)."""
        return self._admission.scheme.name if self.paid else None

    @property
    def charged(self) -> int | None:
        """Atomic units this payment settles for (the meter's charge, else the amount)."""
        return self._admission.owed if self.paid else None

    @property
    def token_price(self) -> TokenPrice | None:
        """A metered payment's token prices."""
        quote = self._terms.quote
        return quote.price if self.metered and quote is not None else None

    @property
    def valid_before(self) -> int | None:
        """The paying authorization's expiry (unix seconds): it cannot settle after it."""
        admission = self._admission
        if admission.payment is None:
            return None
        if admission.authorized is not None:
            return admission.authorized.valid_before
        return admission.scheme.valid_before(admission.payment)

    @property
    def unrecorded(self) -> str | None:
        """Why this payment's charge could not be recorded (``lease_lost``: another replica
        took it while this process was stalled; ``ledger_unavailable``), else None: a reply
        that would claim the charge is withheld."""
        return self._admission.unrecorded

    async def confirm_lease(self) -> str | None:
        """Before a reply whose charge is recorded after it starts to leave (a stream): None
        while the payment is still this process's to charge, else why not (see
        :attr:`unrecorded`)."""
        if self._settlements is None or not self.paid:
            return None
        return await self._settlements.confirm_lease(self._admission)

    def stream_began(self) -> None:
        """A stream whose charge is recorded after it has left sent its head: from now its
        lease is checked before each write (:meth:`lease_live`, :meth:`stream_progress`)."""
        if self._settlements is not None and self.paid:
            self._due = self._settlements.lease_window(self._admission)
            self._lease_clock = self._settlements.leases.now

    def lease_live(self) -> bool:
        """Before a stream's write: whether its lease is known live from the local clock (one
        clock read, no ledger call); False: :meth:`stream_progress` decides."""
        due = self._due
        return due is None or self._lease_clock() < due

    def content_sent(self) -> None:
        """A stream's first content went out: the move that records its progress (SERVED,
        what a disconnect now would be charged) starts now, in the background — after that
        write, so the first chunk waits for no ledger call — and is awaited before the next
        write past the lease window and before the stream's end (:meth:`_progress_recorded`).
        Refused (the lease lost), the next write finds the window passed and the stream cut."""
        settlements = self._settlements
        if (
            self._due is None
            or self._recording is not None
            or settlements is None
            or not settlements.records_progress(self._admission)
        ):
            return
        move = settlements.stream_progress(self._admission, self.progress, first=True)

        async def record() -> str | None:
            code = await move
            if code is not None:
                self._due = 0.0  # the next write asks (and is cut)
            return code

        self._recording = asyncio.get_running_loop().create_task(record())

    async def _progress_recorded(self) -> str | None:
        """The progress move started at the first content, waited for (once; shielded: a
        caller gone meanwhile leaves the record as written); why the stream is cut, or None."""
        task = self._recording
        if task is None:
            return None
        code = await asyncio.shield(task)
        if self._settlements is not None and code is None:
            self._due = self._settlements.lease_window(self._admission)
        return code

    async def stream_progress(self) -> str | None:
        """A stream's lease window passed: None while it is still this process's to send (the
        progress delivered recorded, or the lease renewed, in a fenced move), else why not
        (``unrecorded``: the stream is cut). Its own task, shielded: a caller gone meanwhile
        leaves the record as written."""
        settlements = self._settlements
        if settlements is None:
            return None
        code = await self._progress_recorded()
        if code is not None or self.lease_live():
            return code
        admission = self._admission
        move = settlements.stream_progress(admission, self.progress)
        code = await asyncio.shield(asyncio.get_running_loop().create_task(move))
        self._due = settlements.lease_window(admission)
        return code

    def progress(self) -> Meter | None:
        """What a metered stream delivered so far is charged, were it cut now (as
        :meth:`measure` counts a disconnect, but from what is at hand: the engine's running
        counts, else the operator's fallback on the bytes so far; the tokenizer, a call to the
        engine, is not asked); None: not metered (the amount)."""
        quote = self._terms.quote
        record = self._admission.record
        if not self.metered or quote is None or self._watched is None or record is None:
            return None
        reply, counted = self._watched
        usage = reply.running_usage
        return self._at_least(
            quote.charge(
                usage,
                source="running",
                reply_bytes=counted.bytes_seen,
                decimals=self._decimals,
                maximum=record.amount,
                fallback=self._terms.fallback,
            )
        )

    async def keep_receipt(self, token: str, usage: Mapping[str, Any] | None) -> None:
        """Keep a paid reply's signed receipt, and its usage, in the ledger."""
        if self._admission.record is None or self._settlements is None:
            return
        await self._settlements.keep_receipt(self._admission, token, usage)
