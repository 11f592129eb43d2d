"""The ``exact`` scheme (EIP-3009 ``transferWithAuthorization``): the payer signs the price.

Settles exactly the amount signed, once; both x402 versions. Roles: ``offer`` (the price),
``verify`` (EIP-712 recovery and the authorization's fields), ``chain`` (the token's transfer
and its AuthorizationUsed + Transfer proof), ``facilitator`` (answers, re-sending to
reconcile), ``client`` (signing).
"""

from __future__ import annotations

from paygate.x402.offers import EXACT
from paygate.x402.schemes.base import scheme_package

SCHEME = scheme_package(__name__, EXACT, metered=False)
