"""Hold a 402 against the attested payment terms before anything is signed (sans-IO).

With an :class:`~paygate.client.attestation.AttestationPolicy`, the binding document the
appliance's evidence vouches for carries its whole payment terms (payTo, every accepted asset
per network with its EIP-712 domain and the upto facilitator, every price, the token prices and
the output cap). A 402 reaches the client over the same untrusted path as everything else, so
each of its offers must be one the attested appliance could have made for *this* request:

- payTo, network, asset (address, EIP-712 name/version) and maxTimeoutSeconds as attested;
- ``exact``: the amount is the attested price of this route/model (batch: the items' sum);
- ``upto``: the scheme and the facilitator are attested, the offered token prices are the
  attested ones for the model, and the maximum is at most what those prices allow for this
  request's prompt bound and the attested output cap;
- ``batch-settlement``: the network's attested channel terms name exactly the offer's receiver
  (payTo), token, ``receiverAuthorizer``, ``withdrawDelay`` and deposit method, and the
  settlement contract and deposit collector this client deposits into and signs vouchers
  for; the amount is the attested price, or within the attested metered maximum.

Any offer outside raises its own :class:`~paygate.client.errors.OfferNotAttested` code: a
tampered 402 is refused as a whole, never "the other offer" paid instead. One exception: an
appliance that attests batch-settlement among its schemes without channel terms (a release
before they were attested) cannot have its channel offers checked; those are left out and the
rest paid, or :class:`~paygate.client.errors.OfferChannelNotAttested` when nothing is left.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from eth_utils import is_address, to_checksum_address

from enclave.attestation.binding import AcceptedAsset, ChannelTerms, PaymentTerms, TokenPriceTerms
from paygate import jsonsafe
from paygate.client.errors import (
    OfferAssetMismatch,
    OfferChannelContractMismatch,
    OfferChannelNotAttested,
    OfferFacilitatorMismatch,
    OfferMaximumExceeded,
    OfferNetworkMismatch,
    OfferPayToMismatch,
    OfferPriceMismatch,
    OfferReceiverAuthorizerMismatch,
    OfferSchemeMismatch,
    OfferTimeoutExceeded,
    OfferTokenPriceMismatch,
    OfferWithdrawDelayMismatch,
    PaymentNotAttested,
)
from paygate.client.payer import ChallengeOffer, PaymentChallenge
from paygate.x402.batch import BATCH_PATH, BadBatch, parse_batch
from paygate.x402.batch import ITEM_PATH as BATCH_ITEM_PATH
from paygate.x402.networks import UnknownNetwork, resolve_network, to_atomic, to_atomic_ceiling
from paygate.x402.pricing import (
    MILLION,
    PricePolicy,
    model_of,
    offered_prices,
    prompt_token_bound,
)
from paygate.x402.schemes.batch_settlement import channel as ch
from paygate.x402.schemes.upto.offer import FACILITATOR_EXTRA

MAX_BATCH_ITEMS = 256  # the gateway's own bound (batch_max_items) is at most this
_WILDCARD = "*"


def check_challenge(
    challenge: PaymentChallenge,
    terms: PaymentTerms | None,
    *,
    method: str,
    path: str,
    body: bytes,
) -> PaymentChallenge:
    """Raise the first offer's refusal, or return the challenge to pay: every offer within
    ``terms`` (channel offers of an appliance that attests no channel terms left out)."""
    if terms is None:
        raise PaymentNotAttested(
            "the attested appliance does not charge: this 402 is not from it (nothing signed)"
        )
    request = _Request(terms, method=method, path=path, body=body)
    unchecked = 0
    for offer in challenge.offers:
        if not _check_offer(offer, terms, request):
            unchecked += 1
    if not unchecked:
        return challenge
    kept = tuple(o for o in challenge.offers if o.scheme != ch.NAME)
    if not kept:
        raise OfferChannelNotAttested(
            "the attested terms carry no channel terms (an older gateway) and the 402 offers "
            "nothing else: nothing signed"
        )
    return dataclasses.replace(challenge, offers=kept)


class _Request:
    """What the attested terms say this request may cost (computed once, when asked)."""

    def __init__(self, terms: PaymentTerms, *, method: str, path: str, body: bytes) -> None:
        self._terms = terms
        self._method = method.upper()
        self._path = path
        self._body = body
        self._items: tuple[bytes, ...] | None = None

    @property
    def terms(self) -> PaymentTerms:
        return self._terms

    def items(self) -> tuple[bytes, ...]:
        """The request bodies priced one by one: a batch's items, else the body itself."""
        if self._items is None:
            self._items = (self._body,)
            if self._method == "POST" and self._path == BATCH_PATH:
                try:
                    self._items = parse_batch(self._body, max_items=MAX_BATCH_ITEMS).items
                except BadBatch:
                    self._items = ()
        return self._items

    def price(self) -> Decimal:
        """The attested exact price of this request (whole tokens)."""
        terms = self._terms
        policy = PricePolicy(
            default=Decimal(terms.price),
            routes={k: Decimal(v) for k, v in terms.route_prices},
            models={k: Decimal(v) for k, v in terms.model_prices},
            per_million_tokens=(
                None if terms.per_million_tokens is None else Decimal(terms.per_million_tokens)
            ),
            token_estimate=terms.token_estimate,
        )
        if self._method == "POST" and self._path == BATCH_PATH:
            return sum(
                (
                    policy.price(method="POST", path=BATCH_ITEM_PATH, model=_model(item))
                    for item in self.items()
                ),
                Decimal(0),
            )
        return policy.price(method=self._method, path=self._path, model=_model(self._body))

    def token_price(self) -> TokenPriceTerms | None:
        """The attested token prices the upto offer must state (a batch: its first item's)."""
        items = self.items()
        return _token_price(self._terms, _model(items[0])) if items else None

    def maximum(self) -> Decimal | None:
        """The most an upto offer may authorize: every item's prompt bound and the attested
        output cap (times the sequences it asks for: ``n``, ``best_of``) at the attested token
        prices (None: some item has no token price)."""
        cap = self._terms.max_tokens_cap
        if cap is None or not self.items():
            return None
        total = Decimal(0)
        for item in self.items():
            price = _token_price(self._terms, _model(item))
            if price is None:
                return None
            prompt = prompt_token_bound(len(item), _messages(item))
            output = cap * _choices(item)
            cost = (Decimal(price.input) * prompt + Decimal(price.output) * output) / MILLION
            total += max(cost, Decimal(price.minimum))
        return total


def _check_offer(offer: ChallengeOffer, terms: PaymentTerms, request: _Request) -> bool:
    """Raise the offer's refusal; False: a channel offer the terms cannot check (no channel
    terms attested), True: within the terms."""
    what = f"{offer.scheme} offer on {offer.network[:40]}"
    if not is_address(offer.pay_to) or to_checksum_address(offer.pay_to) != (
        to_checksum_address(terms.pay_to)
    ):
        raise OfferPayToMismatch(f"{what}: payTo {offer.pay_to[:42]} is not the attested payee")
    accepted = _accepted(terms, offer.network)
    if accepted is None:
        raise OfferNetworkMismatch(f"{what}: the attested terms accept no such network")
    if not is_address(offer.asset) or to_checksum_address(offer.asset) != (
        to_checksum_address(accepted.asset)
    ):
        raise OfferAssetMismatch(f"{what}: asset {offer.asset[:42]} is not the attested token")
    for field, attested in (("name", accepted.name), ("version", accepted.version)):
        stated = offer.extra.get(field)
        if stated is not None and stated != attested:
            raise OfferAssetMismatch(f"{what}: the token's EIP-712 {field} is not the attested")
    if offer.max_timeout_seconds > terms.max_timeout_seconds:
        raise OfferTimeoutExceeded(
            f"{what}: maxTimeoutSeconds {offer.max_timeout_seconds} is above the attested "
            f"{terms.max_timeout_seconds}"
        )
    if offer.scheme == "exact":
        expected = to_atomic(request.price(), accepted.decimals)
        if offer.amount != expected:
            raise OfferPriceMismatch(
                f"{what}: asks {offer.amount}, the attested price is {expected} (atomic units)"
            )
    elif offer.scheme == "upto":
        _check_upto(offer, terms, accepted, request, what)
    elif offer.scheme == ch.NAME and ch.NAME in terms.schemes:
        if not terms.channels:
            return False
        _check_channel(offer, accepted, request, what)
    else:
        raise OfferSchemeMismatch(f"{what}: scheme {offer.scheme[:16]!r} is not attested")
    return True


def _check_channel(
    offer: ChallengeOffer, accepted: AcceptedAsset, request: _Request, what: str
) -> None:
    """Every field of the channel the payer would open (where its deposit goes, who may claim
    and refund it, how long it stays locked) as attested, before a deposit is signed."""
    channel = request.terms.channel(accepted.network)
    if channel is None:
        raise OfferNetworkMismatch(f"{what}: the attested terms open no channel on this chain")
    if not _same_address(offer.pay_to, channel.receiver):
        raise OfferPayToMismatch(f"{what}: the channel's receiver is not the attested one")
    if not _same_address(offer.asset, channel.token):
        raise OfferAssetMismatch(f"{what}: the channel's token is not the attested one")
    authorizer = offer.extra.get("receiverAuthorizer")
    if not isinstance(authorizer, str) or not _same_address(
        authorizer, channel.receiver_authorizer
    ):
        raise OfferReceiverAuthorizerMismatch(
            f"{what}: receiverAuthorizer is not the attested {channel.receiver_authorizer}"
        )
    if _seconds(offer.extra.get("withdrawDelay")) != channel.withdraw_delay:
        raise OfferWithdrawDelayMismatch(
            f"{what}: withdrawDelay is not the attested {channel.withdraw_delay} s"
        )
    _check_contracts(offer, channel, what)
    _check_channel_amount(offer, accepted, request, what)


def _check_contracts(offer: ChallengeOffer, channel: ChannelTerms, what: str) -> None:
    # The offer does not name the contracts: this client deposits into and signs vouchers for
    # the canonical ones, so the appliance must attest exactly those.
    if not _same_address(channel.contract, ch.SETTLEMENT_ADDRESS) or not _same_address(
        channel.deposit_collector, ch.ERC3009_COLLECTOR_ADDRESS
    ):
        raise OfferChannelContractMismatch(
            f"{what}: the attested settlement contract or deposit collector is not the one this "
            "client deposits into"
        )
    method = offer.extra.get("assetTransferMethod", "eip3009")
    if method != channel.asset_transfer_method:
        raise OfferChannelContractMismatch(f"{what}: the deposit method is not the attested one")


def _check_channel_amount(
    offer: ChallengeOffer, accepted: AcceptedAsset, request: _Request, what: str
) -> None:
    """A channel offer's amount: the attested price, or (a metered route: the charge is what
    was used, up to it) at most the attested metered maximum."""
    if offer.amount <= 0:  # the gateway offers no channel for a free request
        raise OfferPriceMismatch(f"{what}: a channel payment of nothing is not attested")
    if offer.amount == to_atomic(request.price(), accepted.decimals):
        return
    maximum = request.maximum()
    if maximum is None or offer.amount > to_atomic_ceiling(maximum, accepted.decimals):
        raise OfferPriceMismatch(
            f"{what}: asks {offer.amount}, neither the attested price nor within the attested "
            "metered maximum (atomic units)"
        )


def _check_upto(
    offer: ChallengeOffer,
    terms: PaymentTerms,
    accepted: AcceptedAsset,
    request: _Request,
    what: str,
) -> None:
    if "upto" not in terms.schemes or accepted.upto_facilitator is None:
        raise OfferSchemeMismatch(f"{what}: metered payments are not in the attested terms")
    facilitator = offer.extra.get(FACILITATOR_EXTRA)
    if (
        not isinstance(facilitator, str)
        or not is_address(facilitator)
        or (to_checksum_address(facilitator) != to_checksum_address(accepted.upto_facilitator))
    ):
        raise OfferFacilitatorMismatch(f"{what}: the facilitator is not the attested one")
    attested = request.token_price()
    stated = offered_prices(offer.extra)
    if attested is None or stated is None or stated != _decimals(attested):
        raise OfferTokenPriceMismatch(f"{what}: the token prices are not the attested ones")
    maximum = request.maximum()
    allowed = None if maximum is None else to_atomic_ceiling(maximum, accepted.decimals)
    if allowed is None or offer.amount > allowed:
        raise OfferMaximumExceeded(
            f"{what}: the maximum {offer.amount} is above the {allowed} the attested prices and "
            "output cap allow for this request (atomic units)"
        )


def _same_address(stated: str, attested: str) -> bool:
    return is_address(stated) and to_checksum_address(stated) == to_checksum_address(attested)


def _seconds(value: object) -> int | None:
    """A withdrawDelay as the offer states it (a decimal string, or a number), or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        return int(value)
    return None


def _accepted(terms: PaymentTerms, network: str) -> AcceptedAsset | None:
    try:
        caip2 = resolve_network(network).caip2
    except UnknownNetwork:
        return None
    return terms.accepted(caip2)


def _token_price(terms: PaymentTerms, model: str | None) -> TokenPriceTerms | None:
    prices = dict(terms.token_prices)
    if model is not None and model in prices:
        return prices[model]
    return prices.get(_WILDCARD)


def _decimals(price: TokenPriceTerms) -> tuple[Decimal, Decimal, Decimal]:
    return Decimal(price.input), Decimal(price.output), Decimal(price.minimum)


def _model(body: bytes) -> str | None:
    try:
        return model_of(body)
    except jsonsafe.UntrustedJSONError:
        return None


def _choices(body: bytes) -> int:
    """How many sequences a body asks an engine to generate (``n``, ``best_of``; at least 1):
    the gateway prices its output cap once per sequence."""
    try:
        data = jsonsafe.loads(body, max_bytes=max(len(body), 1))
    except jsonsafe.UntrustedJSONError:
        return 1
    if not isinstance(data, dict):
        return 1
    counts = [data.get(key) for key in ("n", "best_of")]
    return max([1, *(c for c in counts if isinstance(c, int) and not isinstance(c, bool))])


def _messages(body: bytes) -> object:
    try:
        data = jsonsafe.loads(body, max_bytes=max(len(body), 1))
    except jsonsafe.UntrustedJSONError:
        return None
    return data.get("messages") if isinstance(data, dict) else None
