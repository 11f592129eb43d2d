"""Token-bucket rate limits per client address and per payer, in memory (per process: a flood
must not become database writes).

Each limit is a bucket of ``burst`` requests refilled at ``per_minute``; a request takes one
token or is refused with 429, ``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers. The
limit that applies is the first configured of: the request's model (``"model:NAME"``, payer
limits only: the address limit runs before the body is read), its route (``"POST
/v1/chat/completions"``), then ``"*"``. Address limits cover unpaid challenges too. The number
of buckets is bounded; past it the least recently used are forgotten (a forgotten bucket is a
full one: forgetting never refuses anyone).

With ``--workers N`` every worker keeps its own buckets (a ledger round trip per request, free
ones included, would cost every request), so each enforces its share (:meth:`RateLimitTable.
share`): ``per_minute / N``, and the ``burst`` split so that the shares add up to it exactly
(worker i of N gets ``burst // N``, plus one for the first ``burst % N``). A host then never
admits more than the configured rate, whichever worker the kernel hands each connection to.
The price: one client whose requests all reach one worker (one keep-alive connection) gets that
worker's share, not the whole limit. A share is at least one request, so a ``burst`` below N is
exceeded (N at once instead of ``burst``; the rate still holds): ``share_warning`` says so
at start. Replicas on other hosts share nothing here: a fleet-wide limit belongs in the load
balancer (docs/SCALING.md).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from paygate.server.errors import GatewayError

MAX_BUCKETS = 100_000  # per limit kind: bounded memory under a flood of addresses or payers
ANY = "*"
MODEL_PREFIX = "model:"


class RateLimited(GatewayError):
    message = "too many requests; retry after the time in Retry-After"

    status = 429
    code = "rate_limited"


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_minute`` requests on average, ``burst`` at once."""

    per_minute: float
    burst: int

    def __post_init__(self) -> None:
        if not self.per_minute > 0 or self.burst < 1:
            raise ValueError("a rate needs per_minute > 0 and burst >= 1")


@dataclass(frozen=True, slots=True)
class RateLimitTable:
    """The configured rates: key (``"*"``, a route name, ``"model:NAME"``) → rate."""

    per_ip: Mapping[str, Rate]
    per_payer: Mapping[str, Rate]

    @property
    def empty(self) -> bool:
        return not self.per_ip and not self.per_payer

    def share(self, worker: int, workers: int) -> RateLimitTable:
        """Worker ``worker``'s (1..``workers``) share of every rate (module docs)."""
        if not 1 <= worker <= workers:
            raise ValueError("worker must be in 1..workers")

        def one(rate: Rate) -> Rate:
            burst = rate.burst // workers + (worker <= rate.burst % workers)
            return Rate(rate.per_minute / workers, max(1, burst))

        return RateLimitTable(
            per_ip={key: one(rate) for key, rate in self.per_ip.items()},
            per_payer={key: one(rate) for key, rate in self.per_payer.items()},
        )

    def share_warning(self, workers: int) -> str | None:
        """What :meth:`share` cannot keep: the limits whose ``burst`` is below ``workers``."""
        rates = {**self.per_ip, **self.per_payer}
        low = sorted(key for key, rate in rates.items() if rate.burst < workers)
        if not low:
            return None
        return (
            f"rate_limits {', '.join(low)}: burst below workers ({workers}): each worker admits "
            f"at least one at once, so up to {workers} at once from one host"
        )


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float  # until the bucket is full again
    retry_after: float  # until one token is back (0 when allowed)

    def headers(self) -> dict[str, str]:
        headers = {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(self.remaining),
            "x-ratelimit-reset-requests": f"{self.reset_seconds:.3f}s",
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


class TokenBuckets:
    """One bucket per key at one rate; LRU-bounded."""

    def __init__(
        self,
        rate: Rate,
        *,
        max_buckets: int = MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._per_second = rate.per_minute / 60.0
        self._max = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def take(self, key: str) -> Decision:
        now = self._clock()
        tokens, at = self._buckets.pop(key, (float(self._rate.burst), now))
        tokens = min(float(self._rate.burst), tokens + (now - at) * self._per_second)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        missing = self._rate.burst - tokens
        return Decision(
            allowed=allowed,
            limit=self._rate.burst,
            remaining=int(tokens),
            reset_seconds=missing / self._per_second,
            retry_after=0.0 if allowed else (1.0 - tokens) / self._per_second,
        )


class RateLimits:
    """The gateway's address and payer limits (one instance per process)."""

    def __init__(
        self, table: RateLimitTable, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_ip = {key: TokenBuckets(rate, clock=clock) for key, rate in table.per_ip.items()}
        self._per_payer = {
            key: TokenBuckets(rate, clock=clock) for key, rate in table.per_payer.items()
        }

    def check_address(self, route: str, address: str) -> None:
        """Take a token for ``address`` on ``route``; RateLimited when none is left."""
        self._take(self._per_ip, (route, ANY), address, "requests from this address")

    def check_payer(self, route: str, model: str | None, payer: str) -> dict[str, str] | None:
        """Take a token for ``payer``; the refusal's headers when none is left, else None."""
        keys = ((MODEL_PREFIX + model,) if model else ()) + (route, ANY)
        try:
            self._take(self._per_payer, keys, payer.lower(), "requests from this payer")
        except RateLimited as exc:
            return exc.headers
        return None

    @staticmethod
    def _take(
        buckets: Mapping[str, TokenBuckets], keys: tuple[str, ...], who: str, what: str
    ) -> None:
        for key in keys:
            bucket = buckets.get(key)
            if bucket is None:
                continue
            decision = bucket.take(f"{key}\x00{who}")
            if not decision.allowed:
                raise RateLimited(f"too many {what}; retry later", headers=decision.headers())
            return
