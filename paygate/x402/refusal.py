"""An answer instead of service: what admission, the payment policy and the schemes refuse
with. Below the schemes (a scheme's corrective hook returns one) and the results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from paygate.x402.offers import Challenge


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer instead of service. ``challenge`` is set for 400/402 (x402's body shape)."""

    status: int
    code: str
    message: str
    challenge: Challenge | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
