"""An answer instead of service: what admission, the payment policy and the schemes refuse
with, and the error of a proof they reject. Below the schemes (a scheme's corrective hook
returns one) and the results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from paygate.errors import PaygateError
from paygate.x402.offers import Challenge


class ProofRejected(PaygateError):
    """What the client sent as proof (a payment, a sign-in) does not prove what it must;
    ``reason`` is x402's code for why, which the new 402 challenge names."""

    code = "proof_rejected"
    message = "what the client sent does not prove what it must"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer instead of service. ``challenge`` is set for 400/402 (x402's body shape);
    ``server_side`` when it is this server's failure (a dependency it could not ask, a hold
    or a reservation a failed request left behind) or its own limit (a model-wide token
    budget), not the caller's doing, though answered as a refusal."""

    status: int
    code: str
    message: str
    challenge: Challenge | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    server_side: bool = False
