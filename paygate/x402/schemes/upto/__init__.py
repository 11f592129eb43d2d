"""The ``upto`` scheme (EVM, Permit2): the payer authorizes a maximum, the seller settles what
the request actually cost — pinned to the official x402 Python SDK 2.25's wire format.

Roles: ``offer`` (the maximum; settling an amount, nothing for 0), ``verify`` (the Permit2
witness transfer's fields and EIP-712 recovery), ``chain`` (the x402UptoPermit2Proxy's settle
and its Transfer proof), ``facilitator`` (answers, reconciling on chain first), ``client``
(metered offers within the spend policy, signing).
"""

from __future__ import annotations

from paygate.x402.offers import UPTO
from paygate.x402.schemes.base import scheme_package

SCHEME = scheme_package(__name__, UPTO, metered=True)
