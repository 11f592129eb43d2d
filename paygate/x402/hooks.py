"""What the payment policy reports to, and asks of, the rest of the deployment: its events
(metrics), the economics controls and the payer rate check. Protocols (and the silent events),
so that admission, settlement and the session name them without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from paygate.x402.ledger import Budget
from paygate.x402.refusal import Refusal

#: (route, model, payer) → the 429's headers when the payer is over its rate, else None.
PayerCheck = Callable[[str, str | None, str], Mapping[str, str] | None]


class EconomicsVerdict(Protocol):
    refusal: Refusal | None
    budgets: tuple[Budget, ...]


class EconomicsCheck(Protocol):
    """The economics controls (``paygate.economics.controls.Economics``): token limits and
    budgets shared through the ledger, checked after the local checks, before the reservation."""

    @property
    def needs_model(self) -> bool: ...

    async def admit(
        self, *, payer: str, model: str | None, asset: str, amount: int, decimals: int
    ) -> EconomicsVerdict: ...

    async def budget_reached(
        self, budget: Budget, *, payer: str, model: str | None, enforced: bool
    ) -> Refusal: ...

    async def record(
        self, *, payer: str, model: str | None, tokens_in: int, tokens_out: int
    ) -> None: ...


class PaymentEvents(Protocol):
    """What the payment policy reports as it works (metrics); each call must be cheap and never
    raise. Labels are codes and the operator's own networks and assets, never caller data."""

    def admission(self, outcome: str, scheme: str) -> None:
        """A paid route's admission: ``admitted`` or the refusal code; scheme or ``none``."""
        ...

    def settlement(self, outcome: str, seconds: float) -> None:
        """One settle call: ``settled``, ``refused``, ``pending`` or ``unavailable``."""
        ...

    def earned(self, network: str, asset: str, amount: int) -> None:
        """A settlement to us succeeded: ``amount`` atomic units of ``asset`` on ``network``."""
        ...

    def settling(self, delta: int) -> None:
        """A settlement started (+1) or ended (-1)."""
        ...


class NoEvents:
    """Reports nowhere."""

    def admission(self, outcome: str, scheme: str) -> None:
        return None

    def settlement(self, outcome: str, seconds: float) -> None:
        return None

    def earned(self, network: str, asset: str, amount: int) -> None:
        return None

    def settling(self, delta: int) -> None:
        return None
