"""Metered pricing (sans-IO), token buckets, and the settings that contradict themselves."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from decimal import Decimal

import pytest
from pydantic import ValidationError

from paygate.config import Settings
from paygate.server.ratelimit import Rate, RateLimited, RateLimits, RateLimitTable, TokenBuckets
from paygate.server.replies import StreamEnd, UsageMeter
from paygate.server.shaping import metered_quote
from paygate.upstream.engines import profile_for
from paygate.upstream.shaping import RequestShaper
from paygate.x402.metering import Quote, TokenPrice, TokenPricing


@dataclass(frozen=True)
class Priced:
    """Prices and a cap, quoting as the gateway does: shaped for the engine, then priced."""

    pricing: TokenPricing
    cap: int = 64
    engine: str = "ollama"

    def quote(self, path: str, raw: bytes) -> Quote | None:
        shaper = RequestShaper(profile_for(self.engine), cap=self.cap)
        shaped = shaper.shape(path, raw)
        return None if shaped is None else metered_quote(self.pricing, shaper, raw, shaped)


PRICES = Priced(
    TokenPricing(
        prices={
            "*": TokenPrice(Decimal(100), Decimal(400)),
            "cheap": TokenPrice(Decimal(1), Decimal(2)),
        }
    )
)


@dataclass
class U:
    prompt_tokens: int
    completion_tokens: int


def body(**fields) -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    ).encode()


def test_the_maximum_bounds_prompt_and_output_and_sets_max_tokens() -> None:
    raw = body()
    quote = PRICES.quote("/v1/chat/completions", raw)
    assert quote is not None
    assert quote.prompt_bound == len(raw) + 16 + 8
    assert quote.max_tokens == 64
    assert quote.maximum == Decimal(100 * quote.prompt_bound + 400 * 64) / 1_000_000
    assert json.loads(quote.body)["max_tokens"] == 64


@pytest.mark.parametrize(
    ("fields", "expected", "sent"),
    [
        ({"max_tokens": 5}, 5, {"max_tokens": 5}),
        ({"max_tokens": 500}, 64, {"max_tokens": 64}),
        # Ollama does not read max_completion_tokens: its max_tokens gets the priced limit.
        ({"max_completion_tokens": 7}, 64, {"max_completion_tokens": 64, "max_tokens": 64}),
        ({"max_tokens": 1, "max_completion_tokens": 64}, 1, {"max_completion_tokens": 1}),
        ({"max_tokens": 0}, 64, {"max_tokens": 64}),  # 0 is "no limit" to Ollama
        ({"max_tokens": -3}, 64, {"max_tokens": 64}),
    ],
)
def test_a_requests_own_limit_counts_only_within_the_cap(fields, expected, sent) -> None:
    quote = PRICES.quote("/v1/chat/completions", body(**fields))
    assert quote is not None
    assert quote.max_tokens == expected
    forwarded = json.loads(quote.body)
    assert {k: forwarded[k] for k in sent} == sent


def test_streams_ask_for_usage_and_remember_whether_the_caller_did() -> None:
    asked = PRICES.quote(
        "/v1/chat/completions", body(stream=True, stream_options={"include_usage": True})
    )
    silent = PRICES.quote("/v1/chat/completions", body(stream=True))
    assert asked is not None
    assert silent is not None
    assert json.loads(silent.body)["stream_options"] == {"include_usage": True}
    assert (asked.strip_usage, silent.strip_usage) == (False, True)


def test_ollama_gets_num_predict() -> None:
    raw = json.dumps({"model": "m", "prompt": "x", "options": {"num_predict": -1}}).encode()
    quote = PRICES.quote("/api/generate", raw)
    assert quote is not None
    assert json.loads(quote.body)["options"]["num_predict"] == 64


@pytest.mark.parametrize("path", ["/v1/embeddings", "/api/tags"])
def test_only_generation_routes_are_metered(path) -> None:
    assert PRICES.quote(path, body()) is None


def test_no_price_for_the_model_is_not_metered() -> None:
    only = Priced(TokenPricing(prices={"cheap": TokenPrice(Decimal(1), Decimal(1))}), cap=8)
    assert only.quote("/v1/chat/completions", body()) is None


def test_the_charge_is_usage_times_price_capped_and_the_prompt_is_always_charged() -> None:
    quote = PRICES.quote("/v1/chat/completions", body())
    assert quote is not None
    charge = quote.charge(U(3, 5), reply_bytes=0, decimals=6, maximum=10_000, fallback="max")
    assert (charge.settle_amount, charge.source) == (100 * 3 + 400 * 5, "upstream")
    capped = quote.charge(U(3, 500), reply_bytes=0, decimals=6, maximum=10_000, fallback="max")
    assert capped.settle_amount == 10_000
    # No output, but the prompt cost model time: it is charged.
    assert (
        quote.charge(
            U(9, 0), reply_bytes=0, decimals=6, maximum=10_000, fallback="max"
        ).settle_amount
        == 100 * 9
    )
    assert (
        quote.charge(
            U(0, 0), reply_bytes=0, decimals=6, maximum=10_000, fallback="max"
        ).settle_amount
        == 0
    )


def test_the_minimum_and_half_up_rounding() -> None:
    pricing = Priced(
        TokenPricing(prices={"*": TokenPrice(Decimal("0.5"), Decimal("0.5"), Decimal("0.00001"))}),
        cap=8,
    )
    quote = pricing.quote("/v1/chat/completions", body())
    assert quote is not None
    assert (
        quote.charge(U(1, 1), reply_bytes=0, decimals=6, maximum=99, fallback="max").settle_amount
        == 10
    )
    assert (
        quote.charge(U(1, 2), reply_bytes=0, decimals=6, maximum=99, fallback="max").settle_amount
        == 10
    )
    pricing = Priced(TokenPricing(prices={"*": TokenPrice(Decimal("0.5"), Decimal("0.5"))}), cap=8)
    quote = pricing.quote("/v1/chat/completions", body())
    assert quote is not None
    # 2 tokens x 0.5 per million = 1e-6 USDC = 1 atomic; 1 token = 0.5 atomic → rounds half up to 1
    assert (
        quote.charge(U(0, 1), reply_bytes=0, decimals=6, maximum=99, fallback="max").settle_amount
        == 1
    )


def test_fallbacks_never_charge_zero_for_silence() -> None:
    quote = PRICES.quote("/v1/chat/completions", body())
    assert quote is not None
    worst = quote.charge(None, reply_bytes=40, decimals=6, maximum=7777, fallback="max")
    assert (worst.settle_amount, worst.source, worst.tokens_out) == (7777, "fallback-max", 64)
    guess = quote.charge(None, reply_bytes=40, decimals=6, maximum=10**9, fallback="estimate")
    assert guess.tokens_out == 10
    assert guess.settle_amount == 100 * quote.prompt_bound + 400 * 10
    # The default favours the caller: the prompt bound only, and says so.
    prompt = quote.charge(None, reply_bytes=40, decimals=6, maximum=10**9, fallback="prompt")
    assert (prompt.tokens_out, prompt.source) == (0, "fallback-prompt")
    assert prompt.settle_amount == 100 * quote.prompt_bound


def test_the_usage_meter_strips_only_what_the_caller_did_not_ask_for() -> None:
    usage_only = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    beside = (
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    )
    plain = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    meter = UsageMeter("text/event-stream", strip=True)
    stream = plain + beside + usage_only + b"data: [DONE]\n\n"
    out = b"".join(meter.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    out += asyncio.run(meter.finish(b"", StreamEnd()))
    assert b"usage" not in out
    assert out.startswith(plain)
    assert b'"finish_reason":"stop"' in out
    assert out.endswith(b"data: [DONE]\n\n")
    assert meter.bytes_seen == len(stream)
    keep = UsageMeter("text/event-stream", strip=False)
    assert keep.feed(stream) == stream


def test_token_buckets_refill_at_their_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(Rate(per_minute=60, burst=2), clock=lambda: now[0])
    assert [buckets.take("a").allowed for _ in range(3)] == [True, True, False]
    refused = buckets.take("a")
    assert refused.headers()["Retry-After"] == "1"
    assert buckets.take("b").allowed  # another key, another bucket
    now[0] = 1.0
    assert buckets.take("a").allowed
    assert not buckets.take("a").allowed


def test_the_most_specific_limit_applies() -> None:
    limits = RateLimits(
        RateLimitTable(
            per_ip={"*": Rate(60, 1)},
            per_payer={"model:big": Rate(60, 1), "*": Rate(60, 100)},
        )
    )
    limits.check_address("POST /x", "10.0.0.1")
    with pytest.raises(RateLimited):
        limits.check_address("POST /x", "10.0.0.1")
    assert limits.check_payer("POST /x", "big", "0xA") is None
    assert limits.check_payer("POST /x", "big", "0xA") is not None
    assert limits.check_payer("POST /x", "small", "0xA") is None


@pytest.mark.parametrize(
    "fields",
    [
        {
            "token_prices": {"*": {"input": "1", "output": "1"}},
            "price_per_million_tokens": "1",
            "payment_schemes": "upto",
        },
        {"payment_schemes": "upto"},
        {"token_prices": {"*": {"input": "1", "output": "1"}}},
        {
            "payment_schemes": "upto",
            "token_prices": {"*": {"input": "1", "output": "1"}},
            "settle_timing": "upfront",
        },
        {"payment_schemes": "exact,bogus"},
        # batch-settlement: the gateway's own transactions (chain mode), charged after the reply.
        {"payment_schemes": "batch-settlement", "payment_mode": "facilitator"},
        {"payment_schemes": "batch-settlement", "payment_mode": "verify-only"},
        {"payment_schemes": "batch-settlement", "settle_timing": "upfront"},
        {"payment_schemes": "batch-settlement", "batch_withdraw_delay": 899},
        {"payment_schemes": "batch-settlement", "batch_max_vouchers_per_claim": 0},
        {"payment_schemes": "batch-settlement", "batch_claim_interval": 0},
    ],
)
def test_settings_that_contradict_themselves_refuse_to_start(fields) -> None:
    with pytest.raises(ValidationError):
        Settings(**fields)
