"""EIP-3009 ``TransferWithAuthorization`` under EIP-712: build, sign (client), recover (seller).

The signature binds every field of the authorization and the token's domain (name, version,
chain id, token address), so a payment for one token, chain or amount cannot be replayed as
another. Signing and recovery use eth-account; nothing here touches the network.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from paygate.x402 import typed_digest
from paygate.x402.models import Authorization
from paygate.x402.networks import Asset

_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ],
}


def typed_data(auth: Authorization, *, chain_id: int, asset: Asset) -> dict[str, Any]:
    """The EIP-712 message a payer signs for ``auth`` on ``asset`` at ``chain_id``."""
    return {
        "types": _TYPES,
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": asset.name,
            "version": asset.version,
            "chainId": chain_id,
            "verifyingContract": asset.address,
        },
        "message": {
            "from": to_checksum_address(auth.from_),
            "to": to_checksum_address(auth.to),
            "value": int(auth.value),
            "validAfter": int(auth.valid_after),
            "validBefore": int(auth.valid_before),
            "nonce": bytes.fromhex(auth.nonce[2:]),
        },
    }


def new_authorization(
    *, payer: str, pay_to: str, value: int, valid_for: int, now: int | None = None
) -> Authorization:
    """A fresh authorization with a random 32-byte nonce, valid from a little in the past.

    ``validAfter`` sits 10 minutes back so a payer's clock running behind the seller's does not
    make a fresh payment "not yet valid"; ``validBefore`` is ``now + valid_for``.
    """
    now = int(time.time()) if now is None else now
    return Authorization.model_validate(
        {
            "from": to_checksum_address(payer),
            "to": to_checksum_address(pay_to),
            "value": str(value),
            "validAfter": str(max(now - 600, 0)),
            "validBefore": str(now + valid_for),
            "nonce": "0x" + secrets.token_hex(32),
        }
    )


def sign(account: LocalAccount, auth: Authorization, *, chain_id: int, asset: Asset) -> str:
    """The 65-byte signature over ``auth`` as 0x-hex."""
    message = encode_typed_data(full_message=typed_data(auth, chain_id=chain_id, asset=asset))
    return "0x" + account.sign_message(message).signature.hex().removeprefix("0x")


def digest(auth: Authorization, *, chain_id: int, asset: Asset) -> bytes:
    """The EIP-712 digest of ``auth`` (what :func:`sign` signs), written out (typed_digest)."""
    return typed_digest.digest(
        typed_digest.domain_separator(asset.name, asset.version, chain_id, asset.address),
        typed_digest.struct_hash(
            typed_digest.TRANSFER_WITH_AUTHORIZATION,
            typed_digest.address_word(auth.from_),
            typed_digest.address_word(auth.to),
            typed_digest.uint_word(int(auth.value)),
            typed_digest.uint_word(int(auth.valid_after)),
            typed_digest.uint_word(int(auth.valid_before)),
            typed_digest.bytes32_word(auth.nonce),
        ),
    )


def recover(auth: Authorization, signature: str, *, chain_id: int, asset: Asset) -> str | None:
    """The checksummed address that signed ``auth``, or None if the signature is not a valid
    65-byte ECDSA signature (contract-wallet signatures are not recovered locally)."""
    raw = bytes.fromhex(signature[2:])
    if len(raw) != 65:
        return None
    if raw[64] in (27, 28):  # what wallets send: the fast path (same answers, tested)
        return typed_digest.recover(digest(auth, chain_id=chain_id, asset=asset), raw)
    message = encode_typed_data(full_message=typed_data(auth, chain_id=chain_id, asset=asset))
    try:
        return str(Account.recover_message(message, signature=raw))
    except Exception:  # eth-keys raises several types for malformed (r, s, v); all mean "no"
        return None
