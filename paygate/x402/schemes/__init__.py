"""Payment schemes as plug-ins (see ``base``): ``exact`` (EIP-3009), ``upto`` (Permit2) and
``batch-settlement`` (a channel: one deposit, a voucher per request).

:data:`SCHEMES` is the one registry: the processor, the settlers and the ticket find a payment's
scheme through :func:`scheme_of` (by its payload's type) and never test the payload themselves.
"""

from __future__ import annotations

from paygate.x402.models import AnyPaymentPayload
from paygate.x402.schemes.base import Authorized, ChannelScheme, Scheme
from paygate.x402.schemes.batch_settlement import BatchSettlementScheme
from paygate.x402.schemes.exact import ExactScheme
from paygate.x402.schemes.upto import UptoScheme

SCHEMES: dict[str, Scheme] = {
    "exact": ExactScheme(),
    "upto": UptoScheme(),
    "batch-settlement": BatchSettlementScheme(),
}


class UnknownScheme(ValueError):
    """A payment whose payload belongs to no registered scheme."""


def scheme_of(payment: AnyPaymentPayload) -> Scheme:
    """The registered scheme whose payload ``payment`` carries."""
    for scheme in SCHEMES.values():
        if isinstance(payment.payload, scheme.payload_type):
            return scheme
    raise UnknownScheme("the payment's payload belongs to no known scheme")


__all__ = [
    "SCHEMES",
    "Authorized",
    "BatchSettlementScheme",
    "ChannelScheme",
    "ExactScheme",
    "Scheme",
    "UnknownScheme",
    "UptoScheme",
    "scheme_of",
]
