"""What the economics controls and the console keep in the ledger's store (schema v4), beside
the payments: token usage, limit events (refusals and shadow would-be refusals), alert claims
(one alert per event across replicas) and one-time console logins. ``store_sqlite`` and
``store_postgres`` implement it on the ledger's own connection, so nothing opens a second pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from paygate.x402.ledger import PaymentRecord, PaymentState

MAX_ROWS = 1000
USAGE_RETENTION_SECONDS = 40 * 86_400  # token usage kept: the monthly window and a margin
GROUPS = ("scheme", "model", "scheme_model")


@dataclass(frozen=True, slots=True)
class Tokens:
    tokens_in: int
    tokens_out: int
    requests: int = 0


@dataclass(frozen=True, slots=True)
class PayerTokens:
    payer: str
    tokens: Tokens


@dataclass(frozen=True, slots=True)
class PayerSpend:
    payer: str
    spent: int  # atomic units
    payments: int


@dataclass(frozen=True, slots=True)
class LimitEvent:
    at: float
    kind: str  # "tokens" | "budget"
    rule: str  # the configured rule's name, e.g. "*" or "model:llama" or "month"
    payer: str
    model: str | None
    enforced: bool  # False: shadow mode (logged, counted, not refused)
    detail: str | None


@dataclass(frozen=True, slots=True)
class EarningsRow:
    key: str
    payments: int
    settled: int  # atomic units


@dataclass(frozen=True, slots=True)
class PaymentFilter:
    """The console's payment filters; None means any."""

    state: PaymentState | None = None
    review: bool = False
    payer: str | None = None
    scheme: str | None = None
    model: str | None = None
    since: float | None = None
    until: float | None = None


class EconomicsStore(Protocol):
    async def record_tokens(
        self, *, payer: str, model: str, tokens_in: int, tokens_out: int
    ) -> None: ...

    async def tokens(
        self, *, since: float, payer: str | None = None, model: str | None = None
    ) -> Tokens:
        """Tokens recorded since ``since`` (unix seconds), for one payer and/or model."""
        ...

    async def top_token_payers(self, *, since: float, limit: int) -> list[PayerTokens]: ...

    async def spent(self, *, payer: str, asset: str, since: float) -> int:
        """What ``payer`` committed on ``asset`` since ``since``, counted as the ledger's own
        budget check counts it (released and failed payments count nothing)."""
        ...

    async def top_spenders(self, *, since: float, limit: int) -> list[PayerSpend]: ...

    async def record_limit_event(self, event: LimitEvent) -> None: ...

    async def limit_events(self, *, since: float, limit: int) -> list[LimitEvent]: ...

    async def claim_alert(self, key: str) -> bool:
        """True for the first caller, in any replica, to claim ``key``; False ever after."""
        ...

    async def put_login(self, token_hash: str, expires_at: float) -> None: ...

    async def take_login(self, token_hash: str) -> bool:
        """Use a one-time login once: True if it existed, was unused and unexpired."""
        ...

    async def search(self, where: PaymentFilter, *, limit: int) -> list[PaymentRecord]: ...

    async def earnings(self, *, since: float, group: str) -> list[EarningsRow]:
        """SETTLED payments since ``since`` grouped by scheme, model or both."""
        ...

    async def settle_latencies(self, *, since: float) -> list[float]:
        """Seconds from the first SETTLING to SETTLED of payments settled since ``since``."""
        ...

    async def count_states(self, *, since: float) -> dict[str, int]: ...

    def now(self) -> float: ...


def check_rows(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError("limit must be a positive integer")
    return min(limit, MAX_ROWS)


def check_group(group: str) -> str:
    if group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}")
    return group


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of ``values`` (None when there are none)."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]
