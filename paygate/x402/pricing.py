"""What one request costs: per route, per model, or per million tokens on an estimate.

Precedence, first match wins: the route's own price, the request's model's price, the
per-million-token price times the token estimate, the default price. A price of 0 makes the
request free (no challenge). Sans-IO: a pure function of the settings and the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from paygate import jsonsafe

MILLION = Decimal(1_000_000)
# The token prices an `upto` requirement carries in ``extra`` (whole tokens per million).
INPUT_PRICE_EXTRA = "inputPricePerMillionTokens"
OUTPUT_PRICE_EXTRA = "outputPricePerMillionTokens"
MINIMUM_PRICE_EXTRA = "minimumPrice"
TEMPLATE_TOKENS = 16  # chat-template tokens allowed for the request as a whole
TEMPLATE_TOKENS_PER_MESSAGE = 8  # and per message (role markers, separators)


@dataclass(frozen=True, slots=True)
class PricePolicy:
    default: Decimal
    routes: Mapping[str, Decimal] = field(default_factory=dict)
    models: Mapping[str, Decimal] = field(default_factory=dict)
    per_million_tokens: Decimal | None = None
    token_estimate: int = 1000

    @property
    def needs_model(self) -> bool:
        """True when the price depends on the request body's ``model``."""
        return bool(self.models)

    def price(self, *, method: str, path: str, model: str | None = None) -> Decimal:
        """The price of one request in whole tokens of the settlement asset.

        Route keys may be ``"POST /v1/chat/completions"`` or just the path template.
        """
        for key in (f"{method} {path}", path):
            if key in self.routes:
                return self.routes[key]
        if model is not None and model in self.models:
            return self.models[model]
        if self.per_million_tokens is not None:
            return self.per_million_tokens * self.token_estimate / MILLION
        return self.default


def token_charge(
    *,
    input_price: Decimal,
    output_price: Decimal,
    minimum: Decimal,
    tokens_in: int,
    tokens_out: int,
    decimals: int,
    maximum: int,
) -> int:
    """A metered (upto) request's charge in atomic units: min(max(usage x price, minimum),
    maximum), rounded half up; the prompt is charged even when no output was generated (it
    cost model time), nothing when nothing was read or written. Prices are whole tokens per
    million tokens. Shared by the gateway (what it settles) and the client (what it
    checks its receipt against)."""
    if tokens_in <= 0 and tokens_out <= 0:
        return 0
    cost = max((input_price * tokens_in + output_price * tokens_out) / MILLION, minimum)
    atomic = int(cost.scaleb(decimals).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return min(atomic, maximum)


def prompt_token_bound(body_bytes: int, messages: object) -> int:
    """An upper bound on a request's prompt tokens: byte-level BPE tokens are at least one
    byte each, plus a chat-template allowance. Shared by the gateway (an upto maximum) and the
    client (which holds an offered maximum against the attested prices)."""
    # ``messages``: the body's messages (a list) or their count; at least one is allowed for.
    if isinstance(messages, int) and not isinstance(messages, bool):
        count = messages
    else:
        count = len(messages) if isinstance(messages, list) else 1
    return body_bytes + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * max(count, 1)


def model_of(body: bytes, *, limit: int = 4 * 1024 * 1024) -> str | None:
    """The ``model`` field of a JSON request body, or None (not JSON, no model, too large)."""
    if not body or len(body) > limit:
        return None
    # Only the top level is read, so the parser's own depth limit is the bound that matters.
    data = jsonsafe.loads(body, max_bytes=limit, max_depth=None)
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and 0 < len(model) <= 256 else None


def offered_prices(extra: Mapping[str, Any]) -> tuple[Decimal, Decimal, Decimal] | None:
    """A metered requirement's advertised token prices from its ``extra`` (input, output per
    million; minimum per request), or None when absent or not finite non-negative amounts."""
    try:
        values = tuple(
            Decimal(str(extra[name]))
            for name in (INPUT_PRICE_EXTRA, OUTPUT_PRICE_EXTRA, MINIMUM_PRICE_EXTRA)
        )
    except (KeyError, InvalidOperation):
        return None
    if not all(v.is_finite() and v >= 0 for v in values):
        return None
    return values  # type: ignore[return-value]
