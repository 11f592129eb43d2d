"""``batch-settlement``'s binding role (server-only): the scheme bound to one gateway.

:class:`BoundBatchSettlement` is the registry's :data:`~..SCHEME` plus the gateway's
:class:`~.claims.Channels` (the channel state in its ledger, and who moves the money: the gas
key in chain mode, the facilitator — the channels' receiver authorizer, read from its
``GET /supported`` at start — in facilitator mode). It answers the hooks every scheme has
(``schemes.base.Scheme``): its own offers (naming the receiver authorizer and withdraw delay),
the refund (an operation, not a paid request), the corrective 402 and the claim loop; and it
verifies and commits vouchers against the channel itself, never through the settler.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, ClassVar

from paygate.x402.chain import ChainSettler
from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.ledger import LeaseLost, LedgerError, SchemeWrite
from paygate.x402.models import AnyPaymentPayload, SettleResponse, VerifyResponse
from paygate.x402.offers import Offer, PaymentTerms
from paygate.x402.refusal import Refusal
from paygate.x402.schemes.base import (
    Authorized,
    Binding,
    CheckTime,
    LedgerSettlement,
    PaymentRejected,
    Scheme,
)
from paygate.x402.schemes.batch_settlement import offer as offer_role
from paygate.x402.schemes.batch_settlement.chain import BatchChain, ChannelChain, not_bound
from paygate.x402.schemes.batch_settlement.channel import LEAST_CHARGE, NAME
from paygate.x402.schemes.batch_settlement.channels import Channels, channel_state
from paygate.x402.schemes.batch_settlement.facilitator import BatchFacilitator, receiver_authorizer
from paygate.x402.schemes.batch_settlement.store import ChannelBusy
from paygate.x402.schemes.batch_settlement.verify import (
    BUSY,
    NOT_CUMULATIVE,
    WITHDRAWING,
    ChannelTerms,
    CheckedVoucher,
    authorized,
    check_against,
    check_payload,
    payload_of,
)
from paygate.x402.schemes.batch_settlement.verify import (
    ROLE as VERIFY,
)
from paygate.x402.schemes.batch_settlement.withdrawals import WithdrawalEvents
from paygate.x402.settler import SettlementSubject, Settler

BUSY_RETRY_AFTER = "1"  # seconds: a channel is held for the length of one request
# Seconds before a refund refused "ask again" (the chain unreadable, its outcome not known yet)
# is worth asking again: a block or so on a 2-second chain.
UNCONFIRMED_RETRY_AFTER = "2"
_CHECKS_MAX = 1024  # requests between their check and their commit whose voucher is remembered


class CheckedPayments:
    """Each request's checked voucher, from its admission check through its verify to its
    commit: a voucher's signature is recovered and its ids hashed once a request, not at each
    step. Found by the payment object itself (held here, so its ``id`` is not reused while
    remembered) and the terms it was checked against; anything else (a payment read back from
    the ledger by the reconciler, other terms) is checked again. Bounded: a request refused
    between its check and its commit leaves its entry until newer ones push it out."""

    def __init__(self, limit: int = _CHECKS_MAX) -> None:
        self._limit = limit
        self._by_payment: dict[int, tuple[AnyPaymentPayload, ChannelTerms, CheckedVoucher]] = {}
        # The channel's take made with each request's reservation, for its verify.
        self._takes: dict[int, tuple[AnyPaymentPayload, SchemeWrite]] = {}

    def remember_take(self, payment: AnyPaymentPayload, write: SchemeWrite) -> None:
        if len(self._takes) >= self._limit:
            self._takes.pop(next(iter(self._takes)))
        self._takes[id(payment)] = (payment, write)

    def take_of(self, payment: AnyPaymentPayload) -> SchemeWrite | None:
        """The take written with ``payment``'s reservation (once), if any."""
        entry = self._takes.pop(id(payment), None)
        return entry[1] if entry is not None and entry[0] is payment else None

    def remember(
        self, payment: AnyPaymentPayload, terms: ChannelTerms, checked: CheckedVoucher
    ) -> None:
        if len(self._by_payment) >= self._limit:
            self._by_payment.pop(next(iter(self._by_payment)))
        self._by_payment[id(payment)] = (payment, terms, checked)

    def checked(
        self, payment: AnyPaymentPayload, terms: ChannelTerms, *, last: bool = False
    ) -> CheckedVoucher:
        """``payment``'s voucher checked against ``terms``: as remembered, else checked now
        (raises PaymentRejected). ``last``: the request's last use (its commit)."""
        entry = self._by_payment.get(id(payment))
        if entry is not None and entry[0] is payment and (entry[1] is terms or entry[1] == terms):
            if last:
                del self._by_payment[id(payment)]
            return entry[2]
        checked = check_payload(payload_of(payment), terms)
        if not last:
            self.remember(payment, terms, checked)
        return checked

    def forget(self, payment: AnyPaymentPayload) -> None:
        entry = self._by_payment.get(id(payment))
        if entry is not None and entry[0] is payment:
            del self._by_payment[id(payment)]
        self.take_of(payment)

    def __len__(self) -> int:
        return len(self._by_payment)


@dataclasses.dataclass(frozen=True)
class BoundBatchSettlement(Scheme):
    """The scheme bound to a processor's ledger and chain: verifies against the channel state,
    commits charges, answers refunds; its :class:`Channels` also claims in the background."""

    # Its settle commits the charge to the channel in the ledger, once (idempotent).
    settles_in_ledger: ClassVar[bool] = True
    # A metered request is charged at least one unit (channel.LEAST_CHARGE: why).
    least_charge: ClassVar[int] = LEAST_CHARGE

    channels: Channels | None = dataclasses.field(default=None, repr=False, compare=False)
    checks: CheckedPayments = dataclasses.field(
        default_factory=CheckedPayments, repr=False, compare=False
    )

    @property
    def _channels(self) -> Channels:
        assert self.channels is not None  # built by BatchSettlementBinding.bind
        return self.channels

    # --- the hooks every scheme has ---

    def own_offers(
        self, terms: PaymentTerms, *, price: Decimal, maximum: Decimal | None
    ) -> tuple[Offer, ...]:
        return offer_role.offers(
            terms,
            price=price,
            maximum=maximum,
            receiver_authorizer=self._channels.receiver_authorizer,
            withdraw_delay=self._channels.withdraw_delay,
        )

    async def operation(self, payment: AnyPaymentPayload, offer: Offer) -> SettleResponse | None:
        """A cooperative refund request (answered without serving the route), else None.
        Raises PaymentRejected when the refund is refused."""
        payload = payload_of(payment)
        if payload.type != "refund":
            return None
        checked = check_payload(payload, ChannelTerms.of_offer(offer))
        return await self._channels.refund(checked, offer.v2().wire())

    async def corrective(self, refusal: Refusal, payment: AnyPaymentPayload) -> Refusal:
        """A stale voucher's 402 (``…_cumulative_amount_mismatch``) carries the channel's state
        and the last voucher it committed (``extra.channelState``/``voucherState``), so the payer
        can check that voucher's signature and resynchronise; a withdrawing channel's
        (``…_withdrawal_pending``) its state, ``withdrawRequestedAt`` set. A busy channel's 402
        says when to try again (``Retry-After``: the request holding it is in progress), and so
        does a refund's "ask again" (``PaymentUnconfirmed``: the server's own failure); other
        refusals as they are."""
        if refusal.code == BUSY:
            return dataclasses.replace(
                refusal, headers={**refusal.headers, "Retry-After": BUSY_RETRY_AFTER}
            )
        if refusal.server_side:  # PaymentUnconfirmed: the chain unreadable, an outcome unknown
            return dataclasses.replace(
                refusal, headers={**refusal.headers, "Retry-After": UNCONFIRMED_RETRY_AFTER}
            )
        if refusal.code not in (NOT_CUMULATIVE, WITHDRAWING) or refusal.challenge is None:
            return refusal
        try:
            payload = payload_of(payment)
            channel = await self._channels.store.get(payload.voucher.channel_id)
        except (PaymentRejected, LedgerError):
            return refusal
        if channel is None or channel.config != payload.channel_config:
            return refusal
        state: dict[str, Any] = {"channelState": channel_state(channel)}
        if refusal.code == NOT_CUMULATIVE:
            state["voucherState"] = {
                "signedMaxClaimable": str(channel.signed_max),
                "signature": channel.signature,
            }
        challenge = refusal.challenge
        accepts = [
            r.model_copy(update={"extra": {**r.extra, **state}}) if r.scheme == NAME else r
            for r in challenge.v2.accepts
        ]
        v2 = challenge.v2.model_copy(update={"accepts": accepts})
        return dataclasses.replace(refusal, challenge=dataclasses.replace(challenge, v2=v2))

    def tasks(self) -> tuple[Callable[[], Awaitable[None]], ...]:
        return (self._channels.claim_forever,)

    # --- a paid request ---

    def check(self, payment: AnyPaymentPayload, offer: Offer, when: CheckTime) -> Authorized:
        # The requirement verify and settle get is this offer's wire form: the same terms.
        terms = ChannelTerms.of_offer(offer)
        checked = VERIFY.checked(payment, terms)
        self.checks.remember(payment, terms, checked)
        # The charge must be committed while this request holds the channel.
        return authorized(checked, offer, when.now + int(self._channels.pending_seconds))

    def reserve_write(self, payment: AnyPaymentPayload, offer: Offer) -> SchemeWrite | None:
        """A voucher's channel taken in the transaction of its reservation (one ledger call
        fewer; verify reads what it found). Not a deposit's: its channel is made at verify."""
        try:
            checked = self.checks.checked(payment, ChannelTerms.of_offer(offer))
        except PaymentRejected:
            return None
        if checked.payload.type != "voucher":
            return None
        write = self._channels.store.take_write(checked.channel_id, checked.voucher_key)
        self.checks.remember_take(payment, write)
        return write

    async def holder(self, reason: str, payment: AnyPaymentPayload) -> str | None:
        """A busy channel's holder: its hold's owner, the voucher (the payment's nonce) of the
        request that took it; None when the hold is gone by now or the channel unreadable."""
        if reason != BUSY:
            return None
        try:
            channel = await self._channels.store.get(payload_of(payment).voucher.channel_id)
        except (PaymentRejected, LedgerError):
            return None
        return None if channel is None else channel.pending_owner

    def release_write(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SchemeWrite | None:
        """The channel's hold let go with the payment's release (a request that ended before
        its charge: refused after its take, cut short, or its upstream failed), so the payer's
        next voucher is served at once rather than refused busy until the hold runs out.
        Guarded by the owner: only this voucher's hold goes, never another request's, nor
        its own deposit's while that is finishing (Channels.release_write)."""
        try:
            checked = self.checks.checked(
                payment, ChannelTerms.of_requirements(requirements), last=True
            )
        except (PaymentRejected, KeyError, ValueError):
            return None
        self.checks.forget(payment)
        return self._channels.release_write(checked)

    async def verify(
        self, settler: Settler, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        """A deposit is sent and proven on chain first; then the voucher is checked against
        the channel's state in the ledger and the channel taken for this request (taken with
        its reservation already, when that found it free)."""
        channels = self._channels
        reserved = self.checks.take_of(payment)
        try:
            checked = self.checks.checked(payment, ChannelTerms.of_requirements(requirements))
            if checked.payload.type == "deposit":
                await channels.deposit(checked, payment.wire(), requirements)
            channel = await channels.take(checked, reserved)
            try:
                check_against(checked, channel, int(requirements["amount"]), refund=False)
            except PaymentRejected:
                await channels.store.release(checked.channel_id, checked.voucher_key)
                raise
        except PaymentRejected as exc:
            self.checks.forget(payment)
            return VerifyResponse(
                is_valid=False, invalid_reason=exc.reason, invalid_message=str(exc)
            )
        except LeaseLost:  # its reservation released meanwhile: the processor's lease_lost
            self.checks.forget(payment)
            raise
        except LedgerError as exc:
            self.checks.forget(payment)
            raise not_bound(f"the channel ledger is unavailable: {exc.code}") from None
        return VerifyResponse(is_valid=True, payer=checked.payer)

    async def settle(
        self, settler: Settler, subject: SettlementSubject, amount: int
    ) -> SettleResponse:
        """Commit ``amount`` (at most the price) to the channel under this voucher. No money
        moves here: it moves when the claim loop claims the channel (proven on chain)."""
        terms = ChannelTerms.of_requirements(subject.requirements)
        checked = self.checks.checked(subject.payment, terms, last=True)
        try:
            return await self._channels.commit(checked, subject.requirements, amount)
        except LedgerError as exc:  # not committed, or not known to be: committed again later
            raise not_bound(f"the channel ledger is unavailable: {exc.code}") from None
        except ChannelBusy:  # another request holds the channel: committed again later
            raise not_bound("another request holds the channel") from None

    def ledger_settlement(self, subject: SettlementSubject, amount: int) -> LedgerSettlement | None:
        """The charge as it would be committed on the request's path (the channel as this
        request took it, unchanged since), to be made with SETTLED in one transaction; None
        when this process did not take the channel for it (then :meth:`settle`)."""
        terms = ChannelTerms.of_requirements(subject.requirements)
        try:
            checked = self.checks.checked(subject.payment, terms)
        except PaymentRejected:
            return None  # settle() answers it
        found = self._channels.charge(checked, subject.requirements, amount)
        if found is None:
            return None
        write, charge, answer = found

        def answered() -> SettleResponse:
            self.checks.forget(subject.payment)
            return answer()

        return LedgerSettlement(write, charge, answered)

    async def reconcile(
        self, settler: Settler, subject: SettlementSubject, amount: int
    ) -> SettleResponse:
        # Committing is idempotent (a voucher's charge is made once, marked with it): a charge
        # whose answer was lost is simply committed again; one lost and since passed by a later
        # voucher is FAILED (store.ChannelStore.commit).
        return await self.settle(settler, subject, amount)


class BatchSettlementBinding:
    async def bind(self, scheme: Scheme, binding: Binding) -> Scheme:
        """The scheme over this gateway's ledger, moving money with the gas key (chain mode)
        or through the facilitator (its receiver authorizer, from GET /supported).
        SettlerUnavailable when the facilitator does not offer batch-settlement."""
        settings = binding.settings
        settler = binding.settler
        chain_mode = isinstance(settler, ChainSettler)
        assert settings.chain_rpc_url is not None  # checked with the settings
        chain = BatchChain(
            settings.chain_rpc_url,
            settings.secret("gas_key") if chain_mode else None,
            timeout=settings.facilitator_timeout,
            settle_timeout=settings.settle_timeout,
            send=settler.send if isinstance(settler, ChainSettler) else None,
        )
        mover: ChannelChain = chain
        authorizer = chain.address if chain_mode else ""
        if isinstance(settler, FacilitatorSettler):
            authorizer = await receiver_authorizer(settler, binding.network)
            mover = BatchFacilitator(settler, chain, binding.network)
        channels = Channels(
            binding.ledger,
            mover,
            receiver_authorizer=authorizer,
            replica=binding.replica,
            withdraw_delay=settings.batch_withdraw_delay,
            pending_seconds=float(settings.max_timeout_seconds),
            claim_interval=settings.batch_claim_interval,
            max_per_claim=settings.batch_max_vouchers_per_claim,
            clock=time.time,
        )
        if isinstance(binding.events, WithdrawalEvents):  # the metrics (docs/OPERATIONS.md)
            channels.claims.withdrawals.events = binding.events
        fields = {f.name: getattr(scheme, f.name) for f in dataclasses.fields(Scheme) if f.init}
        fields.pop("_loaded")
        return BoundBatchSettlement(**fields, channels=channels)


ROLE = BatchSettlementBinding()
