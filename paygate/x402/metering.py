"""Metered (``upto``) pricing, sans-IO: the most a request may cost, the body the model server
gets, the usage it reports, and the charge.

- **Maximum** = price(prompt tokens + output tokens) with the prompt estimated *from above* (the
  request body's byte length plus a chat-template allowance per message: byte-level BPE
  tokens are at least one byte each, and JSON never encodes text in fewer bytes than UTF-8) and
  the output bounded by the request's ``max_tokens``/``max_completion_tokens`` (Ollama:
  ``options.num_predict``), or the configured cap when it names none or a larger one — in which
  case the body sent upstream gets the cap, so the model cannot outrun what was authorized.
- **Usage** = what the model server reports (read by ``paygate.upstream.usage`` as the reply
  passes): OpenAI ``usage`` (on streams only when asked with ``stream_options.include_usage``,
  which the gateway asks for, and strips again for callers who did not), Ollama
  ``prompt_eval_count``/``eval_count`` on the final object.
- **Charge** = min(max(usage * price, minimum), maximum), rounded half up to atomic units; a
  reply with no output tokens costs nothing. No usage reported: the configured fallback —
  ``max`` (the authorized maximum) or ``estimate`` (the prompt bound and one token per four
  reply bytes, at most the output bound) — never a silent zero.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, Protocol

from paygate import jsonsafe
from paygate.x402.ledger import Meter
from paygate.x402.pricing import (
    INPUT_PRICE_EXTRA,
    MINIMUM_PRICE_EXTRA,
    OUTPUT_PRICE_EXTRA,
    prompt_token_bound,
    token_charge,
)

MILLION = Decimal(1_000_000)
WILDCARD = "*"
# Route paths whose replies are generated tokens: the only ones metered.
METERED_PATHS: Mapping[str, Literal["openai", "ollama", "responses", "messages"]] = {
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/api/chat": "ollama",
    "/api/generate": "ollama",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}
# The one output limit of the Responses and Messages APIs (both always state their usage,
# streamed or not: nothing to ask for, nothing to strip).
_SINGLE_LIMIT = {"responses": "max_output_tokens", "messages": "max_tokens"}
BYTES_PER_TOKEN_ESTIMATE = 4  # the `estimate` fallback's output tokens per reply byte
Fallback = Literal["max", "estimate"]


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """Per million tokens in whole tokens of the asset (USDC), and a minimum per request."""

    input: Decimal
    output: Decimal
    minimum: Decimal = Decimal(0)

    def cost(self, tokens_in: int, tokens_out: int) -> Decimal:
        return (self.input * tokens_in + self.output * tokens_out) / MILLION


class Usage(Protocol):
    """Tokens the model server says it read and wrote (paygate.upstream.usage reads them)."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Quote:
    """One metered request: its price, bounds, maximum and the body to forward."""

    model: str
    price: TokenPrice
    prompt_bound: int
    max_tokens: int
    maximum: Decimal  # whole tokens of the asset
    body: bytes = field(repr=False)  # the body for the model server (max tokens set, usage asked)
    strip_usage: bool  # the caller did not ask for stream usage: the gateway removes it

    def charge(
        self,
        usage: Usage | None,
        *,
        reply_bytes: int,
        decimals: int,
        maximum: int,
        fallback: Fallback,
    ) -> Meter:
        """The meter of a served request; ``maximum`` is the authorized cap in atomic units."""
        if usage is None:
            if fallback == "max":
                return Meter(self.prompt_bound, self.max_tokens, "fallback-max", maximum)
            tokens_out = min(self.max_tokens, math.ceil(reply_bytes / BYTES_PER_TOKEN_ESTIMATE))
            amount = self._amount(self.prompt_bound, tokens_out, decimals, maximum)
            return Meter(self.prompt_bound, tokens_out, "fallback-estimate", amount)
        amount = self._amount(usage.prompt_tokens, usage.completion_tokens, decimals, maximum)
        return Meter(usage.prompt_tokens, usage.completion_tokens, "upstream", amount)

    def _amount(self, tokens_in: int, tokens_out: int, decimals: int, maximum: int) -> int:
        return token_charge(
            input_price=self.price.input,
            output_price=self.price.output,
            minimum=self.price.minimum,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            decimals=decimals,
            maximum=maximum,
        )

    def offer_extra(self) -> tuple[tuple[str, str], ...]:
        """The prices an `upto` requirement advertises, so a payer can check them before it
        signs and its receipt after (paygate's own ``extra`` fields; others ignore them)."""
        return (
            (INPUT_PRICE_EXTRA, str(self.price.input)),
            (OUTPUT_PRICE_EXTRA, str(self.price.output)),
            (MINIMUM_PRICE_EXTRA, str(self.price.minimum)),
        )


@dataclass(frozen=True, slots=True)
class TokenPricing:
    """Token prices per model (``"*"``: any other model), the output cap, the fallback."""

    prices: Mapping[str, TokenPrice]
    max_tokens_cap: int
    fallback: Fallback = "max"

    def price_for(self, model: str | None) -> TokenPrice | None:
        if model is not None and model in self.prices:
            return self.prices[model]
        return self.prices.get(WILDCARD)

    def quote(self, path: str, body: bytes) -> Quote | None:
        """The quote of a request on a metered route, or None (not metered, not a JSON object
        with a priced model)."""
        api = METERED_PATHS.get(path)
        if api is None or not body:
            return None
        # Bounded by admission already (max_body_bytes); UntrustedJSONError is the caller's 400.
        data = jsonsafe.loads(body, max_bytes=len(body))
        if not isinstance(data, dict):
            return None
        model = data.get("model")
        if not isinstance(model, str) or not 0 < len(model) <= 256:
            return None
        price = self.price_for(model)
        if price is None:
            return None
        prompt_bound = prompt_token_bound(len(body), data.get("messages", data.get("input")))
        if api == "openai":
            max_tokens, strip = _openai_limits(data, self.max_tokens_cap)
        elif api in _SINGLE_LIMIT:
            max_tokens, strip = _single_limit(data, _SINGLE_LIMIT[api], self.max_tokens_cap)
        else:
            max_tokens, strip = _ollama_limits(data, self.max_tokens_cap)
        maximum = max(price.cost(prompt_bound, max_tokens), price.minimum)
        return Quote(
            model=model,
            price=price,
            prompt_bound=prompt_bound,
            max_tokens=max_tokens,
            maximum=maximum,
            body=json.dumps(data, separators=(",", ":")).encode(),
            strip_usage=strip,
        )


def _bound(value: Any, cap: int) -> int | None:
    """A request's own output limit if it is a usable one within the cap, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= cap:
        return value
    return None


def _openai_limits(data: dict[str, Any], cap: int) -> tuple[int, bool]:
    """Bound the output (edits ``data``); whether the caller gets usage it did not ask for."""
    named = [k for k in ("max_completion_tokens", "max_tokens") if k in data]
    limits = [_bound(data[k], cap) for k in named]
    if named and all(limit is not None for limit in limits):
        max_tokens = min(limit for limit in limits if limit is not None)
    else:
        max_tokens = cap
        for key in named or ["max_tokens"]:
            data[key] = cap
    strip = False
    if data.get("stream") is True:
        options = data.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        strip = options.get("include_usage") is not True
        options["include_usage"] = True
        data["stream_options"] = options
    return max_tokens, strip


def _single_limit(data: dict[str, Any], key: str, cap: int) -> tuple[int, bool]:
    """Bound the output of an API with one limit field (edits ``data``)."""
    limit = _bound(data.get(key), cap)
    if limit is None:
        limit = cap
        data[key] = cap
    return limit, False


def _ollama_limits(data: dict[str, Any], cap: int) -> tuple[int, bool]:
    options = data.get("options")
    options = dict(options) if isinstance(options, dict) else {}
    limit = _bound(options.get("num_predict"), cap)
    if limit is None:
        limit = cap
        options["num_predict"] = cap
    data["options"] = options
    return limit, False  # Ollama always reports its counts on the final object
