"""The client's `batch-settlement` channels: a deposit once, then a cumulative voucher a request.

Opt-in: a :class:`~paygate.client.payer.SpendPolicy` with ``channel_deposit`` (whole tokens) pays
batch-settlement offers; without it they are declined as before. The limits, all checked
before anything is signed:

- a deposit is exactly ``channel_deposit`` (one more of the same when the channel runs dry), and
  an offer whose ``minDeposit`` asks for more is declined: the server does not choose how much
  of the caller's money is locked up;
- each deposit counts against ``max_total`` when it is signed (the money leaves the wallet);
  the vouchers spend the deposit and count nothing more; a refund takes off what came back;
- each request's price is held to ``max_per_request``, as any offer's;
- at most :data:`MAX_CHANNELS` channels (one per origin, network, asset and payTo) are kept, in
  memory, and with a state file (:mod:`paygate.client.channel_state`) across restarts too: the
  file is written before a voucher leaves, and what its channels hold counts against
  ``max_total`` from the start. Without one, a transport that is dropped leaves its deposits to
  be refunded by the contract's timed withdrawal (or by :meth:`refund` before).

The seller's word is checked against our own record: a receipt's ``chargedAmount`` is at most
the price; a corrective 402 (``channelState``/``voucherState``) is taken only when its voucher is
signed by us, for no more than the highest voucher we signed, and charges no less than the
receipts we were given — so a server can never make us sign past what we agreed to pay, nor
move our count back with an old voucher state. Sans-IO; thread-safe.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from paygate.client.channel_state import (
    ChannelKey,
    ChannelStateFile,
    OpenChannel,
    offer_fits,
)
from paygate.client.errors import ChannelStateRejected, SpendRefused
from paygate.x402.models import SettleResponse
from paygate.x402.networks import from_atomic, to_atomic
from paygate.x402.schemes.base import OfferedTerms, Signed
from paygate.x402.schemes.batch_settlement import channel as ch
from paygate.x402.schemes.batch_settlement.client import PayerChannel
from paygate.x402.schemes.batch_settlement.payload import BatchSettlementPayload

NAME = ch.NAME
MAX_CHANNELS = 64
# A request's hold on its channel ends with its receipt or refusal, at the latest after this
# (a connection dropped without either): the next request then resynchronises if need be.
MAX_HOLD_SECONDS = 300
# The corrective 402 errors the SDK's client resynchronises from.
CORRECTIVE_ERRORS = frozenset(
    {
        "invalid_batch_settlement_evm_cumulative_amount_mismatch",
        "invalid_batch_settlement_evm_cumulative_amount_below_claimed",
    }
)
# The seller knows no deposit for the channel: a deposit we signed never landed.
NO_CHANNEL = "invalid_batch_settlement_evm_channel_not_found"


def origin_of(url: str) -> str:
    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}"


@dataclass(frozen=True, slots=True)
class ChannelPayment:
    """What a channel payment commits: the signed payload and the deposit it carries; with a
    state file, the book's version that must be written (:meth:`ChannelBook.commit`) before it
    leaves, and what the channel held before it, to roll back to when that write fails."""

    signed: Signed
    deposit: int  # atomic; 0 for a voucher alone
    channel: OpenChannel = field(repr=False)
    version: int | None  # None: no state file, nothing to write
    created: bool
    # The channel's requirement, resource, url and highest voucher before this payment.
    before: tuple[dict[str, Any], dict[str, Any] | None, str, int] = field(repr=False)


class ChannelBook:
    """The payer's channels (see the module's docstring)."""

    def __init__(
        self, account: LocalAccount, deposit: Decimal, state: ChannelStateFile | None = None
    ) -> None:
        self._account = account
        self.deposit = deposit
        self._channels: dict[ChannelKey, OpenChannel] = {}
        self._by_id: dict[str, OpenChannel] = {}
        self._lock = threading.Lock()
        # Around a write of the file (taken before ``_lock``, never while holding it): writes
        # go one at a time, each with the book as it is when it starts, so the file never goes
        # back to an older count; the fsyncs run without ``_lock``.
        self._write_lock = threading.Lock()
        self._state = state
        self._version = 0  # changes to the book worth writing
        self._written = 0  # the version the file holds
        self.retired = Decimal(0)  # what drained channels spent (kept with the state)
        # Where a write after the seller's answer runs (write_later): None, in the caller's
        # thread; an async transport hands them to a worker thread of its own.
        self._later: _LaterWrites | None = None
        if state is not None:
            saved = state.load()
            self.retired = saved.retired
            for channel in saved.channels:
                self._add(channel)

    @property
    def carried(self) -> Decimal:
        """Whole tokens the kept channels count against ``max_total`` (deposits less refunds,
        and what drained channels spent): a restarted payer's starting spend."""
        with self._lock:
            held = sum(
                (
                    from_atomic(c.deposited - c.refunded, c.decimals)
                    for c in self._channels.values()
                ),
                Decimal(0),
            )
            return held + self.retired

    @property
    def keeps_state(self) -> bool:
        """Whether the book is kept in a state file (``channel_state``)."""
        return self._state is not None

    def write_later(self, submit: Callable[[Callable[[], None]], object] | None) -> None:
        """Run the writes that follow the seller's answer (a first receipt, a corrective 402,
        a refund) through ``submit`` (e.g. a one-thread executor's ``submit``) instead of the
        caller's thread: an async transport's event loop never waits for their fsyncs. At most
        one waits at a time: it writes the book as it is when it starts. The writes before a
        payment is sent are not affected (the caller awaits those: ``Payment.save``)."""
        self._later = None if submit is None else _LaterWrites(submit)

    def close(self) -> None:
        """Write the last receipts' count and let go of the state file (another transport may
        hold it now). Blocking; with ``write_later``, the caller first lets the writes it
        queued finish."""
        self._later = None
        if self._state is not None:
            self._save_quietly()
            with self._write_lock:
                self._state.close()

    # --- choosing --------------------------------------------------------------------------

    def decline(self, offer: OfferedTerms, *, url: str, decimals: int) -> str | None:
        """Why this channel offer is not paid now (before amounts against the total), or None."""
        extra = offer.extra
        authorizer = extra.get("receiverAuthorizer")
        if not isinstance(authorizer, str) or not _is_address(authorizer):
            return "batch-settlement offer without a receiverAuthorizer"
        if ch.is_zero(authorizer):
            return "batch-settlement offer with a zero receiverAuthorizer"
        method = extra.get("assetTransferMethod", "eip3009")
        if method != "eip3009":
            return f"batch-settlement deposit by {str(method)[:16]!r}: only eip3009 is paid"
        if not isinstance(extra.get("name"), str) or not isinstance(extra.get("version"), str):
            return "the token's EIP-712 domain is not in the offer"
        try:
            delay = int(extra.get("withdrawDelay"))
        except (TypeError, ValueError):
            return "batch-settlement offer without a withdrawDelay"
        if not ch.MIN_WITHDRAW_DELAY <= delay <= ch.MAX_WITHDRAW_DELAY:
            return "batch-settlement withdrawDelay outside the contract's bounds"
        deposit = to_atomic(self.deposit, decimals)
        minimum = _digits(extra.get("minDeposit"))
        if minimum is None and "minDeposit" in extra:
            return "batch-settlement minDeposit is not an amount"
        if minimum is not None and minimum > deposit:
            return (
                f"minDeposit {from_atomic(minimum, decimals)} is above the policy's "
                f"channel_deposit {self.deposit}"
            )
        if offer.amount > deposit:
            return f"price above the policy's channel_deposit {self.deposit}"
        with self._lock:
            known = self._channels.get(_key(offer, url))
            if known is None and len(self._channels) >= MAX_CHANNELS:
                return f"{MAX_CHANNELS} channels are open: no more"
            if known is not None and known.held_until > time.monotonic():
                return "the channel is in use by another request"
        return None

    def commitment(self, offer: OfferedTerms, *, url: str, decimals: int) -> int:
        """The deposit paying this offer needs now (atomic; 0: the channel holds enough)."""
        with self._lock:
            known = self._channels.get(_key(offer, url))
            if known is not None and offer.amount <= known.rest:
                return 0
        return to_atomic(self.deposit, decimals)

    # --- signing ---------------------------------------------------------------------------

    def sign(
        self,
        offer: OfferedTerms,
        requirement_of: Mapping[str, Any],
        *,
        url: str,
        decimals: int,
        resource: Mapping[str, Any] | None,
        chain_id: int,
    ) -> ChannelPayment:
        """The voucher (with a deposit first when the channel needs one) for ``offer``; the
        channel is held by this request until its receipt or refusal."""
        requirement = dict(requirement_of)
        key = _key(offer, url)
        deposit_size = to_atomic(self.deposit, decimals)
        with self._lock:
            channel = self._channels.get(key)
            if channel is None:
                if len(self._channels) >= MAX_CHANNELS:
                    raise SpendRefused(f"{MAX_CHANNELS} channels are open: no more")
                salt = "0x" + secrets.token_bytes(32).hex()  # a new channel, never a stale one
                payer = PayerChannel.open(self._account, requirement, chain_id, salt=salt)
                channel = OpenChannel(key, payer, requirement, None, url, decimals)
                created = True
            else:
                created = False
                # A kept channel (this process's, or loaded from the channel state) is paid only
                # when the offer describes the same channel: where its money may go and when it
                # can be withdrawn are fixed in its config, not in the offer just checked.
                wanted = PayerChannel.open(
                    self._account, requirement, chain_id, salt=channel.payer.config.salt
                )
                if wanted.config != channel.payer.config or chain_id != channel.payer.chain_id:
                    raise SpendRefused(
                        "the offer's channel terms differ from the open channel's"
                        " (receiver, authorizer, token, withdraw delay or chain): not paid"
                    )
            if channel.held_until > time.monotonic():
                raise SpendRefused("the channel is in use by another request")
            kept = dict(resource) if resource is not None else None
            if self._state is not None and not offer_fits(requirement, kept):
                raise SpendRefused("the channel offer is too large to keep in the channel state")
            maximum = channel.payer.charged + offer.amount
            deposit = deposit_size if offer.amount > channel.rest else 0
            if offer.amount > channel.rest + deposit:
                raise SpendRefused("the price does not fit a channel deposit")
            payload = channel.payer.pay(requirement, deposit=deposit)
            signed_before = channel.signed
            before = (channel.requirement, channel.resource, channel.url, signed_before)
            channel.requirement, channel.resource, channel.url = requirement, kept, url
            channel.deposited += deposit
            channel.signed = max(channel.signed, maximum)
            if created:
                self._add(channel)
            # Held from now, through the state's write (commit) to its receipt or refusal: no
            # other request signs on this channel meanwhile, whoever waits for the write.
            channel.pending = maximum
            hold = min(offer.max_timeout_seconds, MAX_HOLD_SECONDS)
            channel.held_until = time.monotonic() + hold
            version = self._changed() if self._state is not None else None
        signed = Signed(
            payload=BatchSettlementPayload.model_validate(payload),
            nonce=f"{channel.channel_id}:{maximum}",
            valid_before=int(time.time()) + hold,
            asset=to_checksum_address(offer.asset),
        )
        return ChannelPayment(signed, deposit, channel, version, created, before)

    def commit(self, made: ChannelPayment) -> None:
        """Write the state file as it is once ``made`` was signed, before ``made`` leaves the
        process (a restart then knows what it may meet). Blocking (two fsyncs): the async
        transport calls it from a worker thread. A write that fails rolls the channel back
        and frees it: :class:`SpendRefused`, and nothing may be sent."""
        if made.version is None:
            return
        try:
            self._write(made.version)
        except (OSError, ValueError) as exc:
            channel = made.channel
            with self._lock:
                if made.created:
                    self._drop(channel)
                requirement, resource, url, signed = made.before
                channel.requirement, channel.resource, channel.url = requirement, resource, url
                channel.deposited -= made.deposit
                channel.signed = signed
                channel.held_until, channel.pending = 0.0, None
                self._changed()
            raise SpendRefused(f"the channel state was not saved, nothing sent: {exc}") from None

    # --- what the seller says --------------------------------------------------------------

    def receipt(self, nonce: str, price: int, receipt: SettleResponse) -> str | None:
        """A paid request's receipt: count its charge (at most the price); the problem, or
        None. The channel is free again either way."""
        channel = self._channel(nonce)
        if channel is None:
            return None
        with self._lock:
            channel.held_until, pending, channel.pending = 0.0, channel.pending, None
            if not receipt.success:
                return None
            extra = receipt.extra or {}
            charged = _digits(extra.get("chargedAmount"))
            if charged is None:
                charged = price  # a server that does not say charged the price it asked
            first, channel.confirmed = not channel.confirmed, True
            problem = self._count(channel, charged, price, pending, extra)
            # Written now on a channel's first receipt, else with the next voucher (or at
            # close): a file a receipt behind only costs a restarted client one corrective
            # 402, and each write is an fsync.
            self._changed()
        if first:
            self._save_quietly()
        return problem

    def _count(
        self,
        channel: OpenChannel,
        charged: int,
        price: int,
        pending: int | None,
        extra: Mapping[str, Any],
    ) -> str | None:
        """Count a receipt's charge (under the lock); the problem, or None."""
        if charged > price:
            return "the receipt charges more than the price"
        if pending is not None and channel.payer.charged + charged > pending:
            return "the receipt charges more than the voucher"
        channel.payer.charged += charged
        state = extra.get("channelState")
        stated = _digits(state.get("chargedCumulativeAmount")) if isinstance(state, dict) else None
        if stated is not None and stated > channel.payer.charged:
            return "the receipt's channel state charges more than our own count"
        return None

    def release(self, nonce: str) -> None:
        """The request ended without a receipt (refused, an error): the channel is free."""
        channel = self._channel(nonce)
        if channel is not None:
            with self._lock:
                channel.held_until, channel.pending = 0.0, None

    def resync(self, nonce: str, offer: OfferedTerms, error: str | None) -> bool:
        """A corrective 402 for this request's channel: take the seller's state when it is
        signed by us, within what we signed and not behind our receipts (True: pay again);
        raise :class:`ChannelStateRejected` when it is not; False when it is no corrective."""
        channel = self._channel(nonce)
        if channel is not None and error == NO_CHANNEL:
            return self._not_deposited(channel)
        if channel is None or error not in CORRECTIVE_ERRORS:
            return False
        extra = offer.extra
        state, voucher = extra.get("channelState"), extra.get("voucherState")
        if not isinstance(state, dict) or not isinstance(voucher, dict):
            raise ChannelStateRejected("the corrective 402 carries no voucher state to check")
        charged = _digits(state.get("chargedCumulativeAmount"))
        signed = _digits(voucher.get("signedMaxClaimable"))
        signature = voucher.get("signature")
        if charged is None or signed is None or not isinstance(signature, str):
            raise ChannelStateRejected("the corrective 402's channel state is not readable")
        if not _is_hex(signature):
            raise ChannelStateRejected("the corrective 402's voucher signature is malformed")
        signer = ch.voucher_signer(channel.channel_id, signed, signature, channel.payer.chain_id)
        with self._lock:
            if signer is None or signer != channel.payer.account.address:
                raise ChannelStateRejected("the corrective 402's voucher is not signed by us")
            if signed > channel.signed:
                raise ChannelStateRejected("the corrective 402 names a voucher above any we signed")
            if charged > signed:
                raise ChannelStateRejected("the corrective 402 charges more than its voucher")
            if charged < channel.payer.charged:
                raise ChannelStateRejected(
                    "the corrective 402 charges less than the receipts we hold (an old state)"
                )
            channel.payer.charged = charged
            channel.held_until, channel.pending = 0.0, None
            channel.confirmed = True
            self._changed()
        self._save_quietly()
        return True

    def _not_deposited(self, channel: OpenChannel) -> bool:
        """The seller knows no deposit for a channel it never answered on (the deposit's
        request was lost, or refused, or a restart came between): True, pay again with a
        deposit. The lost deposit still counts against ``max_total`` (its authorization may
        yet be used until it expires; the money would land in our channel)."""
        with self._lock:
            if channel.confirmed or channel.deposited == 0:
                return False
            self.retired += from_atomic(channel.deposited - channel.refunded, channel.decimals)
            channel.deposited = channel.refunded = 0
            channel.held_until, channel.pending = 0.0, None
            self._changed()
        self._save_quietly()
        return True

    # --- refunds ---------------------------------------------------------------------------

    def channels(self, url: str | None = None) -> list[OpenChannel]:
        """The open channels (of ``url``'s origin), oldest first."""
        origin = origin_of(url) if url is not None else None
        with self._lock:
            return [c for c in self._channels.values() if origin is None or c.key[0] == origin]

    def refund_payload(self, channel: OpenChannel, amount: int | None) -> dict[str, Any]:
        with self._lock:
            rest = channel.rest
            if rest <= 0:
                raise SpendRefused("the channel has nothing left to refund")
            if amount is not None and not 0 < amount <= rest:
                raise ValueError(f"a refund is between 1 and {rest} (atomic units)")
            return channel.payer.refund(amount)

    def refunded(self, channel: OpenChannel, amount: int) -> int:
        """The seller refunded ``amount`` (bounded by what the channel held): what came back."""
        with self._lock:
            back = max(0, min(amount, channel.rest))
            channel.refunded += back
            if channel.rest <= 0:  # drained: forget it (what it spent stays counted)
                self._drop(channel)
                self.retired += from_atomic(channel.deposited - channel.refunded, channel.decimals)
            self._changed()
        self._save_quietly()
        return back

    def _channel(self, nonce: str) -> OpenChannel | None:
        channel_id = nonce.partition(":")[0].lower()
        with self._lock:
            return self._by_id.get(channel_id)

    # --- the state file --------------------------------------------------------------------

    def _add(self, channel: OpenChannel) -> None:
        self._channels[channel.key] = channel
        self._by_id[channel.channel_id.lower()] = channel

    def _drop(self, channel: OpenChannel) -> None:
        self._channels.pop(channel.key, None)
        self._by_id.pop(channel.channel_id.lower(), None)

    def _changed(self) -> int:
        """(Under the lock.) The book changed: its new version, for a write to carry."""
        self._version += 1
        return self._version

    def _write(self, version: int) -> None:
        """Make the file hold at least ``version`` of the book: written now, with the book as
        it is (a snapshot under the lock; the fsyncs outside it), unless a write that started
        later already carried it. Never called holding the lock."""
        if self._state is None:
            return
        with self._write_lock:
            with self._lock:
                if self._written >= version:
                    return
                current = self._version
                data = self._state.encode(list(self._channels.values()), self.retired)
            self._state.write(data)
            with self._lock:
                self._written = max(self._written, current)

    def _save_quietly(self) -> None:
        """A write after the seller's answer (or at close), when the file is behind: failing,
        the file keeps an older count (fewer charges, fewer refunds), which the next write or
        the corrective 402 brings up to date; never one that lets us sign more."""
        later = self._later
        if later is None or not later.queue(self._save_now):
            self._save_now()

    def _save_now(self) -> None:
        with self._lock:
            version = self._version
        with contextlib.suppress(OSError, ValueError):
            self._write(version)


class _LaterWrites:
    """A book's writes handed to another thread (:meth:`ChannelBook.write_later`), at most one
    waiting: it writes the book as it is when it starts, so a change meanwhile needs no other."""

    def __init__(self, submit: Callable[[Callable[[], None]], object]) -> None:
        self._submit = submit
        self._lock = threading.Lock()
        self._queued = False  # a write is waiting to start (it will carry any change)

    def queue(self, save: Callable[[], None]) -> bool:
        """``save`` queued (or one waiting already); False: not taken (the executor is shut
        down, closing), the caller writes itself."""
        with self._lock:
            if self._queued:
                return True
            self._queued = True
        try:
            self._submit(functools.partial(self._run, save))
        except RuntimeError:
            with self._lock:
                self._queued = False
            return False
        return True

    def _run(self, save: Callable[[], None]) -> None:
        with self._lock:
            self._queued = False
        save()


def _key(offer: OfferedTerms, url: str) -> ChannelKey:
    return (
        origin_of(url),
        offer.network,
        to_checksum_address(offer.asset),
        to_checksum_address(offer.pay_to),
    )


def _digits(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit() and len(value) <= 78:
        return int(value)
    return None


def _is_address(value: str) -> bool:
    return len(value) == 42 and value[:2] == "0x" and _is_hex(value)


def _is_hex(value: str) -> bool:
    if value[:2] != "0x" or len(value) % 2:
        return False
    try:
        bytes.fromhex(value[2:])
    except ValueError:
        return False
    return True
