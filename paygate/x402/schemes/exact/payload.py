"""The ``exact`` scheme's payload: an EIP-3009 ``TransferWithAuthorization`` and its signature.

Registered for both x402 versions (v1 knows ``exact`` only).
"""

from __future__ import annotations

from pydantic import Field

from paygate.x402.models import Address, Nonce, Signature, Uint256, X402Model, register_payload
from paygate.x402.offers import EXACT


class Authorization(X402Model):
    """EIP-3009 ``TransferWithAuthorization`` fields, numbers as decimal strings."""

    from_: Address = Field(alias="from")
    to: Address
    value: Uint256
    valid_after: Uint256
    valid_before: Uint256
    nonce: Nonce


class ExactEvmPayload(X402Model):
    signature: Signature
    authorization: Authorization


register_payload(EXACT, ExactEvmPayload, v1=True)
