"""Metered (``upto``) pricing, sans-IO: the most a request may cost, the usage it reports, and
the charge.

- **Maximum** = price(prompt tokens + output tokens) with the prompt estimated *from above* (the
  request body's byte length plus a chat-template allowance per message: byte-level BPE
  tokens are at least one byte each, and JSON never encodes text in fewer bytes than UTF-8) and
  the output the limit the engine will obey times the sequences it generates — computed and
  written into the forwarded body by ``paygate.upstream.shaping`` (one function for every
  payment path), so the model cannot outrun what was authorized.
- **TokenCounts** = what the model server reports (read by ``paygate.upstream.usage`` as the reply
  passes): OpenAI ``usage`` (on streams only when asked with ``stream_options.include_usage``,
  which the gateway asks for, and strips again for callers who did not), Ollama
  ``prompt_eval_count``/``eval_count`` on the final object. A stream that ends early is
  counted by the gateway (``source``: the engine's running counts, or its tokenizer on the
  delivered text).
- **Charge** = min(max(usage * price, minimum), maximum), rounded half up to atomic units; the
  prompt is charged even when nothing was generated (it cost model time). Nothing counted at
  all: the operator's fallback — ``prompt`` (the default: the prompt bound, no output),
  ``estimate`` (the prompt bound and one token per four reply bytes, at most the output
  bound) or ``max`` (the authorized maximum) — never a silent zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, Protocol

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
BYTES_PER_TOKEN_ESTIMATE = 4  # the `estimate` fallback's output tokens per reply byte
Fallback = Literal["prompt", "estimate", "max"]


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """Per million tokens in whole tokens of the asset (USDC), and a minimum per request."""

    input: Decimal
    output: Decimal
    minimum: Decimal = Decimal(0)

    def cost(self, tokens_in: int, tokens_out: int) -> Decimal:
        return (self.input * tokens_in + self.output * tokens_out) / MILLION


class TokenCounts(Protocol):
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
        usage: TokenCounts | None,
        *,
        source: str = "upstream",
        reply_bytes: int,
        decimals: int,
        maximum: int,
        fallback: Fallback,
    ) -> Meter:
        """The meter of a served request; ``maximum`` is the authorized cap in atomic units;
        ``source`` says how ``usage`` was obtained (None: nothing could be counted)."""
        if usage is None:
            if fallback == "max":
                return Meter(self.prompt_bound, self.max_tokens, "fallback-max", maximum)
            tokens_out = 0
            if fallback == "estimate":
                tokens_out = min(self.max_tokens, math.ceil(reply_bytes / BYTES_PER_TOKEN_ESTIMATE))
            amount = self._amount(self.prompt_bound, tokens_out, decimals, maximum)
            return Meter(self.prompt_bound, tokens_out, f"fallback-{fallback}", amount)
        amount = self._amount(usage.prompt_tokens, usage.completion_tokens, decimals, maximum)
        return Meter(usage.prompt_tokens, usage.completion_tokens, source, amount)

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
    """Token prices per model (``"*"``: any other model) and the fallback."""

    prices: Mapping[str, TokenPrice]
    fallback: Fallback = "prompt"

    def price_for(self, model: str | None) -> TokenPrice | None:
        if model is not None and model in self.prices:
            return self.prices[model]
        return self.prices.get(WILDCARD)

    def quote(
        self, *, model: str | None, body: bytes, messages: int, max_output: int,
        forward: bytes, strip_usage: bool,
    ) -> Quote | None:  # fmt: skip
        """The quote of a shaped generation request (``body`` as the caller sent it,
        ``forward`` as the model server gets it), or None when its model has no price."""
        if model is None:
            return None
        price = self.price_for(model)
        if price is None:
            return None
        prompt_bound = prompt_token_bound(len(body), messages)
        maximum = max(price.cost(prompt_bound, max_output), price.minimum)
        return Quote(
            model=model,
            price=price,
            prompt_bound=prompt_bound,
            max_tokens=max_output,
            maximum=maximum,
            body=forward,
            strip_usage=strip_usage,
        )
