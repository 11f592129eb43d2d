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
  request's prompt bound and the attested output cap.

Any offer outside raises its own :class:`~paygate.client.errors.OfferNotAttested` code: a
tampered 402 is refused as a whole, never "the other offer" paid instead.
"""

from __future__ import annotations

from decimal import Decimal

from eth_utils import is_address, to_checksum_address

from enclave.attestation.binding import AcceptedAsset, PaymentTerms, TokenPriceTerms
from paygate import jsonsafe
from paygate.client.errors import (
    OfferAssetMismatch,
    OfferFacilitatorMismatch,
    OfferMaximumExceeded,
    OfferNetworkMismatch,
    OfferPayToMismatch,
    OfferPriceMismatch,
    OfferSchemeMismatch,
    OfferTimeoutExceeded,
    OfferTokenPriceMismatch,
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
) -> None:
    """Raise the first offer's refusal, or return: every offer is within ``terms``."""
    if terms is None:
        raise PaymentNotAttested(
            "the attested appliance does not charge: this 402 is not from it (nothing signed)"
        )
    request = _Request(terms, method=method, path=path, body=body)
    for offer in challenge.offers:
        _check_offer(offer, terms, request)


class _Request:
    """What the attested terms say this request may cost (computed once, when asked)."""

    def __init__(self, terms: PaymentTerms, *, method: str, path: str, body: bytes) -> None:
        self._terms = terms
        self._method = method.upper()
        self._path = path
        self._body = body
        self._items: tuple[bytes, ...] | None = None

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


def _check_offer(offer: ChallengeOffer, terms: PaymentTerms, request: _Request) -> None:
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
    else:
        raise OfferSchemeMismatch(f"{what}: scheme {offer.scheme[:16]!r} is not attested")


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
