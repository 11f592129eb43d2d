"""Payment schemes as plug-ins (see ``base``): ``exact`` (EIP-3009) and ``upto`` (Permit2)."""

from __future__ import annotations

from paygate.x402.schemes.base import Authorized, Scheme
from paygate.x402.schemes.exact import ExactScheme
from paygate.x402.schemes.upto import UptoScheme

SCHEMES: dict[str, Scheme] = {"exact": ExactScheme(), "upto": UptoScheme()}

__all__ = ["SCHEMES", "Authorized", "ExactScheme", "Scheme", "UptoScheme"]
