"""The ``upto`` scheme's payload: a Permit2 ``PermitWitnessTransferFrom`` and its signature
(x402 SDK 2.25's shape)."""

from __future__ import annotations

from pydantic import Field

from paygate.x402.models import Address, Signature, Uint256, X402Model, register_payload
from paygate.x402.offers import UPTO


class TokenPermissions(X402Model):
    """Permit2's ``TokenPermissions``: the token and the most that may be moved."""

    token: Address
    amount: Uint256


class UptoWitness(X402Model):
    """The `upto` witness the payer signs into the Permit2 transfer (x402 SDK 2.25's shape)."""

    to: Address
    facilitator: Address
    valid_after: Uint256


class UptoAuthorization(X402Model):
    """A Permit2 ``PermitWitnessTransferFrom`` for the x402UptoPermit2Proxy as spender."""

    from_: Address = Field(alias="from")
    permitted: TokenPermissions
    spender: Address
    nonce: Uint256  # Permit2's unordered nonce: a uint256 as a decimal string
    deadline: Uint256
    witness: UptoWitness


class UptoEvmPayload(X402Model):
    """The `upto` scheme's payload: ``{permit2Authorization, signature}``."""

    permit2_authorization: UptoAuthorization
    signature: Signature


register_payload(UPTO, UptoEvmPayload)
