"""The ``exact`` scheme (EIP-3009 ``transferWithAuthorization``): the payer signs the price.

Settles exactly the amount signed, once; both x402 versions. Roles: ``offer`` (the price),
``verify`` (EIP-712 recovery and the authorization's fields), ``chain`` (the token's transfer
and its AuthorizationUsed + Transfer proof), ``facilitator`` (answers, re-sending to
reconcile), ``client`` (signing).
"""

from __future__ import annotations

from paygate.x402.offers import EXACT
from paygate.x402.schemes.base import Scheme
from paygate.x402.schemes.exact import client, offer, verify

SCHEME = Scheme(
    name=EXACT,
    metered=False,
    offer=offer.ROLE,
    verifier=verify.ROLE,
    client=client.ROLE,
    chain_module="paygate.x402.schemes.exact.chain",
    facilitator_module="paygate.x402.schemes.exact.facilitator",
)
