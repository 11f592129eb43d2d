"""x402 on the paying side: read a 402, choose a requirement within a spend policy, sign it.

Sans-IO: :func:`parse_challenge` reads a 402's headers and body, :class:`Payer` turns it into a
payment header (signed with eth-account by the offer's scheme: its ``client`` role, found in
the registry ``paygate.x402.schemes``) and a :class:`SentPayment` that later receives the
server's receipt. ``exact`` (EIP-3009) is paid on EVM networks, and ``upto`` (Permit2,
metered) when the policy names a ``max_price_per_million``; everything else is declined with a
reason. A metered payment counts its authorized maximum against ``max_total`` until its receipt
says what was settled, and the receipt is checked: at most the maximum, and exactly the
reported usage at the offered prices.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TypedDict, Unpack

from eth_account.signers.local import LocalAccount
from eth_utils import is_address, to_checksum_address
from pydantic import ValidationError

from paygate import jsonsafe, wire
from paygate.client.channel_state import ChannelStateFile
from paygate.client.channels import NAME as CHANNEL_SCHEME
from paygate.client.channels import ChannelBook, ChannelPayment
from paygate.client.errors import InvalidChallenge, PayToNotAllowed, SpendRefused
from paygate.x402 import codec
from paygate.x402.models import (
    PAYMENT_IDENTIFIER,
    USAGE_EXTENSION,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequiredV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    SettleResponse,
)
from paygate.x402.networks import Asset, UnknownNetwork, from_atomic, resolve_network
from paygate.x402.pricing import token_charge
from paygate.x402.schemes import by_name
from paygate.x402.schemes.base import Signed

X402Version = Literal[1, 2]
# A challenge is a few KB (the x402 reference keeps PAYMENT-REQUIRED under 8 KB).
MAX_CHALLENGE_BYTES = 64 * 1024
# An authorization is valid for the requirement's timeout, but never longer than this.
MAX_VALID_SECONDS = 3600
_MAX_REASON = 200
_PAY_TO_DECLINED = "payTo not in the spend policy's pay_to"


class SpendPolicy:
    """What a caller agrees to pay, checked before anything is signed.

    Amounts are whole tokens (``"0.01"`` is one cent of USDC). ``networks``: v1 names or CAIP-2
    ids (None: any EVM network). ``assets``: token address → decimals (None: the USDC contracts
    of the known networks, 6 decimals). ``max_total`` counts every authorization signed, settled
    or not: a signature is money the server can collect until it expires. ``pay_to``: the
    wallets this caller pays (None: any; with an AttestationPolicy the attested payTo is
    enforced anyway) — an offer to pay anyone else is declined before signing.
    """

    __slots__ = (
        "assets",
        "chain_ids",
        "channel_deposit",
        "max_per_request",
        "max_price_per_million",
        "max_total",
        "max_valid_seconds",
        "pay_to",
    )

    def __init__(
        self,
        *,
        max_per_request: Decimal | str | int,
        max_total: Decimal | str | int | None = None,
        networks: Iterable[str] | None = None,
        assets: Mapping[str, int] | None = None,
        max_valid_seconds: int = MAX_VALID_SECONDS,
        max_price_per_million: Decimal | str | int | None = None,
        pay_to: Iterable[str] | None = None,
        channel_deposit: Decimal | str | int | None = None,
    ) -> None:
        self.max_per_request: Decimal = _amount(max_per_request, "max_per_request")
        # Metered (upto) offers: the most per million tokens, input or output (None: decline).
        self.max_price_per_million: Decimal | None = (
            None
            if max_price_per_million is None
            else _amount(max_price_per_million, "max_price_per_million")
        )
        self.max_total: Decimal | None = (
            None if max_total is None else _amount(max_total, "max_total")
        )
        self.chain_ids: frozenset[int] | None = (
            None if networks is None else frozenset(_chain_id(n) for n in networks)
        )
        self.pay_to: frozenset[str] | None = None
        if pay_to is not None:
            if isinstance(pay_to, str):
                raise ValueError("pay_to is a list of addresses, not one string")
            self.pay_to = frozenset(_wallet(a) for a in pay_to)
            if not self.pay_to:
                raise ValueError("pay_to is empty: nobody could be paid (None allows any)")
        self.assets: Mapping[str, int] | None = None
        if assets is not None:
            self.assets = {_address(a): _decimals(d) for a, d in assets.items()}
        if max_valid_seconds < 1:
            raise ValueError("max_valid_seconds must be positive")
        # batch-settlement (paygate.client.channels): the deposit one channel gets (None:
        # such offers are declined). Each deposit counts against max_total when signed.
        self.channel_deposit: Decimal | None = None
        if channel_deposit is not None:
            self.channel_deposit = _amount(channel_deposit, "channel_deposit")
            if self.channel_deposit <= 0:
                raise ValueError("channel_deposit must be positive (None declines channels)")
            if self.max_total is not None and self.channel_deposit > self.max_total:
                raise ValueError("channel_deposit is above max_total: no deposit could be made")
        self.max_valid_seconds = max_valid_seconds

    @classmethod
    def from_env(
        cls, *, environ: Mapping[str, str] | None = None, **defaults: Unpack[SpendTerms]
    ) -> SpendPolicy:
        """The arguments as defaults, each overridden by its ``PAYGATE_SPEND_*`` variable:
        ``MAX_PER_REQUEST``, ``MAX_TOTAL``, ``NETWORKS`` (comma-separated), ``ASSETS``
        (comma-separated ``ADDRESS[:DECIMALS]``, 6 decimals if omitted),
        ``MAX_PRICE_PER_MILLION`` and ``PAY_TO`` (comma-separated wallets)."""
        env = os.environ if environ is None else environ
        terms: dict[str, Any] = dict(defaults)
        for variable, name, read in _SPEND_VARIABLES:
            value = env.get(f"PAYGATE_SPEND_{variable}", "").strip()
            if value:  # set but empty: the default stands
                terms[name] = read(value)
        return cls(**terms)

    def decimals(self, chain_id: int, asset: str) -> int | None:
        """The decimals of an allowed asset on ``chain_id``, or None if it is not allowed."""
        if self.assets is not None:
            return self.assets.get(asset)
        usdc = _table_usdc(chain_id)
        return usdc.decimals if usdc is not None and usdc.address == asset else None

    def __repr__(self) -> str:
        return (
            f"SpendPolicy(max_per_request={self.max_per_request}, max_total={self.max_total}, "
            f"max_price_per_million={self.max_price_per_million}, "
            f"channel_deposit={self.channel_deposit}, "
            f"chain_ids={sorted(self.chain_ids) if self.chain_ids else None}, "
            f"pay_to={sorted(self.pay_to) if self.pay_to is not None else None}, "
            f"assets={dict(self.assets) if self.assets is not None else 'USDC'})"
        )


def payment_header_value(document: dict[str, Any]) -> str:
    """A payment header's value: the payload document as compact JSON in base64, as x402
    sends it (PAYMENT-SIGNATURE / X-PAYMENT)."""
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()


def parse_assets(items: Iterable[str]) -> dict[str, int]:
    """``ADDRESS[:DECIMALS]`` strings as an ``assets`` mapping (6 decimals if omitted)."""
    out: dict[str, int] = {}
    for item in items:
        address, _, decimals = item.strip().partition(":")
        out[_address(address)] = _decimals(int(decimals) if decimals.strip().isdigit() else 6)
    return out


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class SpendTerms(TypedDict, total=False):
    """The arguments of :class:`SpendPolicy` (see it for each), as
    :meth:`SpendPolicy.from_env` takes them for defaults."""

    max_per_request: Decimal | str | int
    max_total: Decimal | str | int | None
    networks: Iterable[str] | None
    assets: Mapping[str, int] | None
    max_valid_seconds: int
    max_price_per_million: Decimal | str | int | None
    pay_to: Iterable[str] | None
    channel_deposit: Decimal | str | int | None


# The PAYGATE_SPEND_* variables: the argument each sets, read from the variable's text.
_SPEND_VARIABLES: tuple[tuple[str, str, Callable[[str], object]], ...] = (
    ("MAX_PER_REQUEST", "max_per_request", str),
    ("MAX_TOTAL", "max_total", str),
    ("NETWORKS", "networks", _split),
    ("ASSETS", "assets", lambda text: parse_assets(_split(text))),
    ("MAX_PRICE_PER_MILLION", "max_price_per_million", str),
    ("PAY_TO", "pay_to", _split),
)


def _amount(value: Decimal | str | int, name: str) -> Decimal:
    try:
        amount = Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError(f"{name} must be a decimal amount") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{name} must be a finite, non-negative amount")
    return amount


def _chain_id(network: str) -> int:
    try:
        return resolve_network(network).chain_id
    except UnknownNetwork:
        raise ValueError(f"unknown network {network!r}") from None


def _address(value: str) -> str:
    if not is_address(value.strip()):
        raise ValueError(f"not a token address: {value!r}")
    return to_checksum_address(value.strip())


def _wallet(value: str) -> str:
    if not isinstance(value, str) or not is_address(value.strip()):
        raise ValueError(f"pay_to: not a wallet address: {value!r}")
    return to_checksum_address(value.strip())


def _decimals(value: int) -> int:
    if not 0 <= value <= 36:
        raise ValueError("token decimals must be between 0 and 36")
    return value


def _table_usdc(chain_id: int) -> Asset | None:
    try:
        return resolve_network(f"eip155:{chain_id}").usdc
    except UnknownNetwork:
        return None


@dataclass(frozen=True, slots=True)
class ChallengeOffer:
    """One payment requirement of a challenge, normalised for choosing."""

    version: X402Version
    requirement: Mapping[str, Any]  # as sent: a v2 payload echoes it as ``accepted``
    scheme: str
    network: str
    chain_id: int | None  # None: not an EVM network we know
    asset: str
    amount: int
    pay_to: str
    max_timeout_seconds: int
    extra: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PaymentChallenge:
    """A 402's payment requirements in the version the client will answer."""

    version: X402Version
    offers: tuple[ChallengeOffer, ...]
    error: str | None
    resource: Mapping[str, Any] | None = None
    extensions: Mapping[str, Any] | None = None


def parse_challenge(
    headers: Mapping[str, str], body: bytes, *, version: X402Version | None = None
) -> PaymentChallenge:
    """The challenge of a 402: the v2 ``PAYMENT-REQUIRED`` header, else the v1 JSON body.

    ``version`` restricts the choice to one protocol version (None: prefer v2).
    """
    header = headers.get(wire.PAYMENT_REQUIRED)
    if header and version in (None, 2):
        return _challenge_v2(header)
    if version in (None, 1):
        v1 = _challenge_v1(body)
        if v1 is not None:
            return v1
    wanted = "an x402 challenge" if version is None else f"an x402 v{version} challenge"
    raise InvalidChallenge(f"the 402 carries no {wanted}")


def _challenge_v2(header: str) -> PaymentChallenge:
    try:
        model = codec.decode_payment_required(header)
        raw = codec.decode_json(header, header=wire.PAYMENT_REQUIRED)
    except codec.PaymentHeaderError as exc:
        raise InvalidChallenge(str(exc)) from None
    offers = tuple(
        _offer(2, raw_req, req, req.amount)
        for req, raw_req in zip(model.accepts, raw["accepts"], strict=True)
    )
    return PaymentChallenge(2, offers, model.error, raw.get("resource"), model.extensions)


def _challenge_v1(body: bytes) -> PaymentChallenge | None:
    try:
        data = jsonsafe.loads(body, max_bytes=MAX_CHALLENGE_BYTES) if body else None
    except jsonsafe.UntrustedJSONError:
        return None
    if not isinstance(data, dict) or data.get("x402Version") != 1:
        return None
    try:
        model = PaymentRequiredV1.model_validate(data)
    except ValidationError:
        raise InvalidChallenge("the 402's x402 v1 body is not a valid challenge") from None
    offers = tuple(_offer(1, req.wire(), req, req.max_amount_required) for req in model.accepts)
    return PaymentChallenge(1, offers, model.error)


def _offer(
    version: X402Version,
    requirement: Mapping[str, Any],
    req: PaymentRequirements | PaymentRequirementsV1,
    amount: str,
) -> ChallengeOffer:
    """One requirement of either version (``amount``: its atomic amount, as the version
    names it), normalised for choosing."""
    return ChallengeOffer(
        version=version,
        requirement=requirement,
        scheme=req.scheme,
        network=req.network,
        chain_id=_offer_chain_id(req.network),
        asset=req.asset,
        amount=_atomic(amount),
        pay_to=req.pay_to,
        max_timeout_seconds=req.max_timeout_seconds,
        extra=req.extra or {},
    )


def _offer_chain_id(network: str) -> int | None:
    try:
        return resolve_network(network).chain_id
    except UnknownNetwork:
        return None


def _atomic(value: str) -> int:
    if not value.isdigit() or len(value) > 78:
        raise InvalidChallenge("a requirement's amount is not an atomic-unit integer")
    return int(value)


def refusal_reason(headers: Mapping[str, str], body: bytes) -> str:
    """The server's reason for refusing a payment, from whichever place it put it."""
    reason: str | None = None
    header = headers.get(wire.PAYMENT_REQUIRED)
    if header:
        try:
            reason = codec.decode_payment_required(header).error
        except codec.PaymentHeaderError:
            reason = None
    for name in (wire.PAYMENT_RESPONSE, wire.X_PAYMENT_RESPONSE):
        value = headers.get(name)
        if not reason and value:
            try:
                receipt = codec.decode_settle_response(value, header=name)
            except codec.PaymentHeaderError:
                continue
            reason = receipt.error_reason or receipt.error_message
    if not reason:
        try:
            data = jsonsafe.loads(body, max_bytes=MAX_CHALLENGE_BYTES) if body else None
        except jsonsafe.UntrustedJSONError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            reason = data["error"]
    return _printable(reason or "no reason given")


def _printable(text: str) -> str:
    # The reason is the server's text: keep it one short printable line in our messages.
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean[:_MAX_REASON]


@dataclass
class SentPayment:
    """One signed payment and, once the server sends it, its receipt.

    Holds no signature: only what identifies the payment (payer, nonce) and what it was for.
    """

    url: str
    x402_version: X402Version
    network: str
    chain_id: int
    asset: str
    amount: Decimal  # whole tokens
    amount_atomic: int
    pay_to: str
    payer: str
    nonce: str
    valid_before: int
    receipt: SettleResponse | None = None
    receipt_source: Literal["header", "stream"] | None = None
    receipt_error: str | None = field(default=None)
    scheme: str = "exact"
    # The payment-identifier id the payment carries (None: the server declared none).
    identifier: str | None = None
    retries: int = 0  # times re-sent after a dropped connection (paygate.client.core.send_paid)
    # times re-sent after the gateway withheld its reply, the payment released
    # (paygate.client.withheld)
    withheld: int = 0
    # batch-settlement: the deposit this payment signed (whole tokens; 0 for a voucher).
    deposit: Decimal | None = None
    # A metered scheme: the offered prices (input, output, minimum per million/request), and
    # once the receipt is checked, the usage it reports and what was charged (whole tokens).
    prices: tuple[Decimal, Decimal, Decimal] | None = None
    decimals: int = 6
    tokens_in: int | None = None
    tokens_out: int | None = None
    charged: Decimal | None = None

    @property
    def settled(self) -> bool:
        return self.receipt is not None and self.receipt.success

    @property
    def transaction(self) -> str | None:
        return self.receipt.transaction if self.receipt is not None else None


@dataclass(frozen=True, slots=True)
class Payment:
    """A payment ready to send: the header to add, and the record to keep."""

    header: str
    value: str = field(repr=False)
    record: SentPayment
    # A channel payment's state write, still to be done before it is sent (``pay(write=
    # False)``: the transport does it, off the event loop when async); raising refuses it.
    save: Callable[[], None] | None = field(default=None, repr=False)


class Payer:
    """A wallet and its spend policy. Thread-safe; the wallet key never leaves eth-account."""

    def __init__(
        self,
        account: LocalAccount,
        policy: SpendPolicy,
        channel_state: str | os.PathLike[str] | None = None,
    ) -> None:
        self._account = account
        self.policy = policy
        self._lock = threading.Lock()
        self.channels: ChannelBook | None = None
        if policy.channel_deposit is not None:
            state = ChannelStateFile(channel_state, account) if channel_state else None
            try:
                self.channels = ChannelBook(account, policy.channel_deposit, state)
            except BaseException:
                if state is not None:
                    state.close()
                raise
        elif channel_state is not None:
            raise ValueError("channel_state keeps channels: the SpendPolicy opens none")
        # A kept channel's money counts from the start: max_total holds across restarts.
        self._spent = _plain(self.channels.carried) if self.channels is not None else Decimal(0)

    def close(self) -> None:
        if self.channels is not None:
            self.channels.close()

    @property
    def address(self) -> str:
        return str(self._account.address)

    @property
    def spent(self) -> Decimal:
        """Whole tokens signed away so far (settled or not)."""
        with self._lock:
            return self._spent

    def __repr__(self) -> str:
        return f"Payer({self.address}, spent={self.spent}, {self.policy!r})"

    def choose(self, challenge: PaymentChallenge, *, url: str = "") -> tuple[ChallengeOffer, int]:
        """The cheapest offer the policy allows (a channel's, else the first offered, on a tie)
        and its decimals."""
        best: tuple[Decimal, ChallengeOffer, int] | None = None
        declined: list[str] = []
        with self._lock:
            spent = self._spent
        for offer in challenge.offers:
            decimals, reason = self._check(offer, spent, url)
            if reason is not None or decimals is None:
                declined.append(f"{offer.network} {offer.asset}: {reason}")
                continue
            price = from_atomic(offer.amount, decimals)
            # Opted into channels: a channel offer wins a tie (no settlement per request).
            channel_tie = (
                best is not None
                and price == best[0]
                and offer.scheme == CHANNEL_SCHEME
                and best[1].scheme != CHANNEL_SCHEME
            )
            if best is None or price < best[0] or channel_tie:
                best = (price, offer, decimals)
        if best is None:
            detail = "; ".join(declined[:5]) or "the server offered nothing"
            if declined and all(reason.endswith(_PAY_TO_DECLINED) for reason in declined):
                raise PayToNotAllowed(f"no offer pays an allowed wallet ({detail})")
            raise SpendRefused(f"no offered payment fits the spend policy ({detail})")
        return best[1], best[2]

    def _check(
        self, offer: ChallengeOffer, spent: Decimal, url: str
    ) -> tuple[int | None, str | None]:
        policy = self.policy
        scheme = by_name(offer.scheme)
        if scheme is None:
            return None, f"scheme {offer.scheme!r} is not supported"
        channel = offer.scheme == CHANNEL_SCHEME and self.channels is not None
        if not channel:
            reason = scheme.client.decline(
                offer, max_price_per_million=policy.max_price_per_million
            )
            if reason is not None:
                return None, reason
        if offer.chain_id is None:
            return None, "not a known EVM network"
        if policy.chain_ids is not None and offer.chain_id not in policy.chain_ids:
            return None, "network not allowed"
        if not is_address(offer.asset) or not is_address(offer.pay_to):
            return None, "asset or payTo is not an address"
        if policy.pay_to is not None and to_checksum_address(offer.pay_to) not in policy.pay_to:
            return None, _PAY_TO_DECLINED
        decimals = policy.decimals(offer.chain_id, to_checksum_address(offer.asset))
        if decimals is None:
            return None, "asset not allowed"
        price = from_atomic(offer.amount, decimals)
        if price > policy.max_per_request:
            return None, f"price {price} above max per request {policy.max_per_request}"
        if offer.max_timeout_seconds < 1:
            return None, "maxTimeoutSeconds is not positive"
        if channel:
            assert self.channels is not None
            reason = self.channels.decline(offer, url=url, decimals=decimals)
            if reason is not None:
                return None, reason
            price = from_atomic(
                self.channels.commitment(offer, url=url, decimals=decimals), decimals
            )
        if policy.max_total is not None and spent + price > policy.max_total:
            return None, f"price {price} would pass max total {policy.max_total}"
        if channel:
            return decimals, None
        reason = scheme.client.cannot_sign(offer)
        if reason is not None:
            return None, reason
        return decimals, None

    def receipt_arrived(self, record: SentPayment) -> None:
        """A metered payment's receipt: check it, record usage and charge, and count what was
        settled instead of the maximum (a refused or unreadable one keeps the maximum)."""
        receipt = record.receipt
        scheme = by_name(record.scheme)
        if scheme is None or not scheme.metered or receipt is None or record.charged is not None:
            return
        if record.scheme == CHANNEL_SCHEME:
            return  # counted by its channel (channel_receipt): the deposit was the spend
        problem = _check_metered(record, receipt)
        if problem is not None:
            record.receipt_error = problem
            return
        assert record.charged is not None
        with self._lock:
            self._spent -= record.amount - record.charged

    def channel_receipt(self, record: SentPayment) -> None:
        """A batch-settlement receipt: the channel counts the charge and is free again."""
        if self.channels is None or record.scheme != CHANNEL_SCHEME or record.receipt is None:
            return
        problem = self.channels.receipt(record.nonce, record.amount_atomic, record.receipt)
        if problem is not None:
            record.receipt_error = problem

    def channel_ended(self, record: SentPayment) -> None:
        """A channel payment's request ended without a receipt: its channel is free again."""
        if self.channels is not None and record.scheme == CHANNEL_SCHEME:
            self.channels.release(record.nonce)

    def resync(
        self, record: SentPayment, challenge: PaymentChallenge, *, url: str, write: bool = True
    ) -> Payment | None:
        """A corrective 402 answered a channel payment: the payment again on the seller's
        state once it checks out against ours (None: nothing to resync)."""
        if self.channels is None or record.scheme != CHANNEL_SCHEME:
            return None
        offers = tuple(o for o in challenge.offers if o.scheme == CHANNEL_SCHEME)
        matching = [
            o
            for o in offers
            if to_checksum_address(o.pay_to) == record.pay_to
            and o.network == record.network
            and is_address(o.asset)
            and to_checksum_address(o.asset) == record.asset
        ]
        if not matching or not self.channels.resync(record.nonce, matching[0], challenge.error):
            self.channels.release(record.nonce)
            return None
        return self.pay(dataclasses.replace(challenge, offers=(matching[0],)), url=url, write=write)

    def refunded(self, amount: Decimal) -> None:
        """A channel refund came back: it no longer counts against ``max_total``."""
        with self._lock:
            self._spent -= min(amount, self._spent)

    def pay(self, challenge: PaymentChallenge, *, url: str, write: bool = True) -> Payment:
        """Choose an offer, reserve its price against the policy, sign it. A channel payment
        with a state file writes it before returning; with ``write=False`` the caller runs
        :attr:`Payment.save` before sending (it refuses the payment when the write fails)."""
        offer, decimals = self.choose(challenge, url=url)
        price = from_atomic(offer.amount, decimals)
        if offer.scheme == CHANNEL_SCHEME and self.channels is not None:
            made = self._channel_payment(challenge, offer, decimals, url)
            payment = self._document(challenge, offer, decimals, price, url, made.signed)
            payment.record.deposit = _plain(from_atomic(made.deposit, decimals))
            if made.version is None:
                return payment
            save = functools.partial(self._commit, made, from_atomic(made.deposit, decimals))
            if write:
                save()
                return payment
            return dataclasses.replace(payment, save=save)
        with self._reserved(price, "price"):
            signed = self._sign(offer, decimals)
            return self._document(challenge, offer, decimals, price, url, signed)

    @contextmanager
    def _reserved(self, amount: Decimal, what: str) -> Iterator[None]:
        """``amount`` counted against ``max_total`` before signing, and given back if signing
        fails. Checked again under the lock: concurrent requests must not overshoot it."""
        with self._lock:
            limit = self.policy.max_total
            if limit is not None and self._spent + amount > limit:
                raise SpendRefused(f"{what} {amount} would pass max total {limit}")
            self._spent += amount
        try:
            yield
        except BaseException:
            with self._lock:
                self._spent -= amount
            raise

    def _channel_payment(
        self, challenge: PaymentChallenge, offer: ChallengeOffer, decimals: int, url: str
    ) -> ChannelPayment:
        """A voucher on the offer's channel, with a deposit counted against the policy when
        the channel needs one (reserved before signing, as every payment is)."""
        assert self.channels is not None
        assert offer.chain_id is not None
        needed = from_atomic(self.channels.commitment(offer, url=url, decimals=decimals), decimals)
        with self._reserved(needed, "deposit"):
            made = self.channels.sign(
                offer,
                offer.requirement,
                url=url,
                decimals=decimals,
                resource=challenge.resource,
                chain_id=offer.chain_id,
            )
        deposit = from_atomic(made.deposit, decimals)
        if deposit != needed:  # another request topped the channel up meanwhile
            with self._lock:
                self._spent += deposit - needed
        return made

    def _commit(self, made: ChannelPayment, deposit: Decimal) -> None:
        """Write the channel state before ``made`` leaves; failing, its deposit no longer
        counts (nothing was sent) and :class:`SpendRefused` is raised."""
        assert self.channels is not None
        try:
            self.channels.commit(made)
        except SpendRefused:
            with self._lock:
                self._spent -= deposit
            raise

    def _sign(self, offer: ChallengeOffer, decimals: int) -> Signed:
        valid_for = min(offer.max_timeout_seconds, self.policy.max_valid_seconds)
        scheme = by_name(offer.scheme)
        assert scheme is not None  # chosen: a registered scheme
        return scheme.client.sign(self._account, offer, decimals=decimals, valid_for=valid_for)

    def _document(
        self,
        challenge: PaymentChallenge,
        offer: ChallengeOffer,
        decimals: int,
        price: Decimal,
        url: str,
        signed: Signed,
    ) -> Payment:
        """The payment header carrying ``signed``, and its record."""
        assert offer.chain_id is not None
        inner = signed.payload
        document: dict[str, Any]
        if offer.version == 2:
            document = {
                "x402Version": 2,
                "accepted": dict(offer.requirement),
                "payload": inner.wire(),
            }
            if challenge.resource is not None:
                document["resource"] = dict(challenge.resource)
            extensions = _echo_extensions(challenge.extensions)
            if extensions:
                document["extensions"] = extensions
            PaymentPayload.model_validate(document)  # what we send must be what we model
            header = wire.PAYMENT_SIGNATURE
        else:
            # Only a v1 scheme's client signs a v1 offer (the others decline it).
            document = PaymentPayloadV1.model_validate(
                {
                    "x402Version": 1,
                    "scheme": offer.scheme,
                    "network": offer.network,
                    "payload": inner.wire(),
                }
            ).wire()
            header = wire.X_PAYMENT
        value = payment_header_value(document)
        record = SentPayment(
            url=url,
            x402_version=offer.version,
            network=offer.network,
            chain_id=offer.chain_id,
            asset=signed.asset,
            amount=_plain(price),
            amount_atomic=offer.amount,
            pay_to=to_checksum_address(offer.pay_to),
            payer=self.address,
            nonce=signed.nonce,
            valid_before=signed.valid_before,
            scheme=offer.scheme,
            prices=signed.prices,
            decimals=decimals,
            identifier=_identifier(document.get("extensions")),
        )
        return Payment(header=header, value=value, record=record)


def _check_metered(record: SentPayment, receipt: SettleResponse) -> str | None:
    """Check a metered receipt against the authorization and the offered prices; on success
    fill the record's usage and charge. The problem, or None."""
    if not receipt.success:
        return None  # nothing to check: a refusal settles nothing (the maximum stays counted)
    if receipt.amount is None or not receipt.amount.isdigit():
        return "the metered receipt names no settled amount"
    settled = int(receipt.amount)
    if settled > record.amount_atomic:
        return "the receipt settles more than the authorized maximum"
    info = ((receipt.extensions or {}).get(USAGE_EXTENSION) or {}).get("info")
    if not isinstance(info, dict) or record.prices is None:
        return "the metered receipt reports no usage"
    tokens_in, tokens_out = info.get("promptTokens"), info.get("completionTokens")
    if not isinstance(tokens_in, int) or not isinstance(tokens_out, int):
        return "the metered receipt reports no usage"
    expected = token_charge(
        input_price=record.prices[0],
        output_price=record.prices[1],
        minimum=record.prices[2],
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        decimals=record.decimals,
        maximum=record.amount_atomic,
    )
    if settled != expected:
        return f"the receipt settles {settled}, not the reported usage at the offered prices"
    record.tokens_in, record.tokens_out = tokens_in, tokens_out
    record.charged = _plain(from_atomic(settled, record.decimals))
    return None


def _identifier(extensions: object) -> str | None:
    entry = extensions.get(PAYMENT_IDENTIFIER) if isinstance(extensions, dict) else None
    info = entry.get("info") if isinstance(entry, dict) else None
    value = info.get("id") if isinstance(info, dict) else None
    return value if isinstance(value, str) else None


def _plain(amount: Decimal) -> Decimal:
    """Without trailing zeros and without an exponent: 0.001000 → 0.001, 10 stays 10."""
    return amount.quantize(Decimal(1)) if amount == amount.to_integral() else amount.normalize()


def _echo_extensions(declared: Mapping[str, Any] | None) -> dict[str, Any]:
    """The server's declared extensions, echoed as the x402 SDK client does, with a fresh
    ``payment-identifier`` id when the server declares that extension (idempotency key)."""
    if not declared:
        return {}
    out = json.loads(json.dumps(dict(declared)))  # a deep copy of plain JSON
    entry = out.get(PAYMENT_IDENTIFIER)
    if isinstance(entry, dict):
        info = entry.get("info") if isinstance(entry.get("info"), dict) else {}
        entry["info"] = {**info, "id": "pg_" + secrets.token_hex(16)}
    return out
