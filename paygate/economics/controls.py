"""Token limits and budgets, checked for each paid request against the shared ledger.

*Token limits* count the tokens the model server reported (input and output, each weighted)
over the last :data:`WINDOW_SECONDS`: per payer (``per_payer``) and for everyone together
(``per_model``), under the rule ``"*"`` (every model) and ``"model:NAME"`` (that model). A
request is refused (429 ``token_limit_exceeded``) while a matching rule's window is full; the
request that fills it is served (its tokens are known only after the reply), as with any token
quota. *Budgets* limit what one payer commits per UTC day and month; enforced ones are checked
by the ledger in the reservation's transaction (no overspend under concurrency, across
replicas), like ``payer_daily_budget``.

A rule in *shadow mode* is checked the same way but never refuses: each would-be refusal is a
limit event (the console lists them, ``/metrics`` counts them) and a log line. Every event,
enforced or shadow, is recorded in the ledger and alerted once per payer and window.
"""

from __future__ import annotations

import calendar
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from paygate.economics.alerts import Alert, AlertSink, NoAlerts
from paygate.economics.store import EconomicsStore, LimitEvent
from paygate.x402.ledger import Budget, LedgerError
from paygate.x402.networks import to_atomic
from paygate.x402.refusal import Refusal

log = logging.getLogger("paygate.economics")
WINDOW_SECONDS = 60.0
ANY = "*"
MODEL_PREFIX = "model:"
WINDOWS = ("day", "month")
NO_MODEL = "-"


@dataclass(frozen=True, slots=True)
class TokenLimit:
    """Weighted tokens per minute: per payer and/or for all payers together."""

    per_payer: int | None = None
    per_model: int | None = None
    input_weight: Decimal = Decimal(1)
    output_weight: Decimal = Decimal(1)
    shadow: bool = False

    def weigh(self, tokens_in: int, tokens_out: int) -> Decimal:
        return self.input_weight * tokens_in + self.output_weight * tokens_out


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """USDC a payer may commit per window (``day`` or ``month``, UTC)."""

    per_payer: Decimal
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class Controls:
    """The configured rules: token limits by key (``"*"``, ``"model:NAME"``), budgets by window."""

    token_limits: Mapping[str, TokenLimit] = field(default_factory=dict)
    budgets: Mapping[str, BudgetRule] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.token_limits and not self.budgets

    @property
    def needs_model(self) -> bool:
        """A model's rule needs the request's model at admission (the body read first)."""
        return any(key.startswith(MODEL_PREFIX) for key in self.token_limits)

    def token_rules(self, model: str | None) -> list[tuple[str, TokenLimit]]:
        keys = [ANY] + ([MODEL_PREFIX + model] if model else [])
        return [(key, self.token_limits[key]) for key in keys if key in self.token_limits]


def window_start(window: str, now: float) -> tuple[float, float]:
    """The UTC ``day``/``month`` containing ``now``: (start, next start)."""
    moment = time.gmtime(now)
    if window == "day":
        start = calendar.timegm((moment.tm_year, moment.tm_mon, moment.tm_mday, 0, 0, 0))
        return float(start), float(start + 86_400)
    if window == "month":
        start = calendar.timegm((moment.tm_year, moment.tm_mon, 1, 0, 0, 0))
        year, month = (
            (moment.tm_year + 1, 1) if moment.tm_mon == 12 else (moment.tm_year, moment.tm_mon + 1)
        )
        return float(start), float(calendar.timegm((year, month, 1, 0, 0, 0)))
    raise ValueError(f"window must be one of {', '.join(WINDOWS)}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the controls decided before the reservation."""

    refusal: Refusal | None = None
    budgets: tuple[Budget, ...] = ()  # enforced budgets, checked by the ledger's reserve


class Economics:
    """The processor's hook (``paygate.x402.hooks.EconomicsCheck``)."""

    def __init__(
        self,
        controls: Controls,
        store: EconomicsStore,
        *,
        alerts: AlertSink | None = None,
        on_event: Callable[[str, bool], None] | None = None,
        record_usage: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.controls = controls
        # Token usage is written when a token limit needs it, or the console shows it.
        self._record_usage = record_usage or bool(controls.token_limits)
        self._store = store
        self._alerts: AlertSink = alerts if alerts is not None else NoAlerts()
        self._on_event = on_event
        self._clock = clock

    @property
    def needs_model(self) -> bool:
        return self.controls.needs_model

    async def admit(
        self, *, payer: str, model: str | None, asset: str, amount: int, decimals: int
    ) -> Verdict:
        """Token limits (a refusal, unless in shadow mode), shadow budgets (events only) and
        the enforced budgets for the ledger. A ledger failure here refuses nothing: the
        reservation that follows reaches the same ledger and answers 503 itself."""
        now = self._clock()
        try:
            refusal = await self._check_tokens(payer, model, now)
            if refusal is not None:
                return Verdict(refusal=refusal)
            enforced: list[Budget] = []
            for window, rule in self.controls.budgets.items():
                start, reset = window_start(window, now)
                budget = Budget(
                    limit=to_atomic(rule.per_payer, decimals),
                    since=start,
                    window=window,
                    resets_at=reset,
                )
                if not rule.shadow:
                    enforced.append(budget)
                    continue
                spent = await self._store.spent(payer=payer, asset=asset, since=start)
                if spent + amount > budget.limit:
                    await self.budget_reached(budget, payer=payer, model=model, enforced=False)
        except LedgerError as exc:
            log.warning("economics check skipped: %s", exc.code)
            return Verdict()
        return Verdict(budgets=tuple(enforced))

    async def _check_tokens(self, payer: str, model: str | None, now: float) -> Refusal | None:
        since = now - WINDOW_SECONDS
        for key, rule in self.controls.token_rules(model):
            scoped = model if key.startswith(MODEL_PREFIX) else None
            for scope, limit, who in (
                ("per_payer", rule.per_payer, payer),
                ("per_model", rule.per_model, None),
            ):
                if limit is None:
                    continue
                used = await self._store.tokens(since=since, payer=who, model=scoped)
                weighed = rule.weigh(used.tokens_in, used.tokens_out)
                if weighed < limit:
                    continue
                detail = f"{scope} {weighed:f}/{limit} weighted tokens in {WINDOW_SECONDS:g}s"
                await self._event(
                    LimitEvent(now, "tokens", key, payer, model, not rule.shadow, detail)
                )
                if not rule.shadow:
                    return Refusal(
                        429,
                        "token_limit_exceeded",
                        "too many tokens in the last minute; retry later",
                        headers={"Retry-After": str(int(WINDOW_SECONDS))},
                        # Everyone's tokens together: this server's budget, not the caller's
                        # doing (a claim refused so is not doubted: paygate.server.claims).
                        server_side=who is None,
                    )
        return None

    async def budget_reached(
        self, budget: Budget, *, payer: str, model: str | None, enforced: bool
    ) -> Refusal:
        """Record (and alert) a budget reached; the refusal an enforced one answers."""
        now = self._clock()
        detail = f"{budget.window} budget {budget.limit} atomic units"
        await self._event(LimitEvent(now, "budget", budget.window, payer, model, enforced, detail))
        self._alerts.notify(
            Alert(
                kind="budget_reached",
                key=f"budget:{budget.window}:{int(budget.since)}:{payer}:{int(enforced)}",
                summary=f"a payer reached its {budget.window} budget"
                + ("" if enforced else " (shadow mode: not refused)"),
                facts={"payer": payer, "window": budget.window, "enforced": enforced},
            )
        )
        retry = max(1, int((budget.resets_at or now + 86_400) - now))
        return Refusal(
            429,
            "budget_exceeded",
            f"this payer's {budget.window} budget is spent",
            headers={"Retry-After": str(retry)},
        )

    async def _event(self, event: LimitEvent) -> None:
        mode = "enforced" if event.enforced else "shadow"
        log.info(
            "limit %s %s %s for payer %s (%s)",
            event.kind,
            event.rule,
            mode,
            event.payer,
            event.detail,
        )
        if self._on_event is not None:
            self._on_event(event.kind, event.enforced)
        try:
            await self._store.record_limit_event(event)
        except LedgerError as exc:
            log.warning("limit event not recorded: %s", exc.code)

    async def record(
        self, *, payer: str, model: str | None, tokens_in: int, tokens_out: int
    ) -> None:
        """A served request's tokens (after its reply), for the windows of later requests."""
        if not self._record_usage:
            return
        try:
            await self._store.record_tokens(
                payer=payer, model=model or NO_MODEL, tokens_in=tokens_in, tokens_out=tokens_out
            )
        except LedgerError as exc:
            log.warning("token usage not recorded: %s", exc.code)


def controls_from(
    token_limits: Mapping[str, Mapping[str, object]], budgets: Mapping[str, Mapping[str, object]]
) -> Controls:
    """Rules from plain mappings (the settings' shape)."""
    return Controls(
        token_limits={
            key: TokenLimit(**dict(value))  # type: ignore[arg-type]
            for key, value in token_limits.items()
        },
        budgets={key: BudgetRule(**dict(value)) for key, value in budgets.items()},  # type: ignore[arg-type]
    )
