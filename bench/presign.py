"""Many distinct x402 v2 payments for one offer, signed fast, for load on a paid gateway.

The x402 SDK's client signs one payment (about 4 ms: EIP-712 encoding in Python); the rest
reuse its payload with a fresh nonce and a later ``validBefore``, signed here over the EIP-712
digest of EIP-3009 ``TransferWithAuthorization`` (keccak + secp256k1, both in C: ~0.1 ms). The
first digest is checked against the SDK's own signature, so a drift in either fails loudly.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import time
from typing import Any

import coincurve
from eth_account import Account
from eth_hash.auto import keccak
from paygate_dev.chain.payer import encode_header, sign_v2_payment

_DOMAIN = keccak(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
_TRANSFER = keccak(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)


def _word(value: int | str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value.rjust(32, b"\0")
    if isinstance(value, str):
        return bytes.fromhex(value.removeprefix("0x")).rjust(32, b"\0")
    return value.to_bytes(32, "big")


def _digest(accepted: dict[str, Any], auth: dict[str, Any]) -> bytes:
    chain_id = int(accepted["network"].split(":")[1])
    extra = accepted["extra"]
    domain = keccak(
        _DOMAIN
        + keccak(extra["name"].encode())
        + keccak(extra["version"].encode())
        + _word(chain_id)
        + _word(accepted["asset"])
    )
    struct = keccak(
        _TRANSFER
        + _word(auth["from"])
        + _word(auth["to"])
        + _word(int(auth["value"]))
        + _word(int(auth["validAfter"]))
        + _word(int(auth["validBefore"]))
        + _word(auth["nonce"])
    )
    return keccak(b"\x19\x01" + domain + struct)


def _sign(key: coincurve.PrivateKey, digest: bytes) -> str:
    signature = key.sign_recoverable(digest, hasher=None)
    return "0x" + (signature[:64] + bytes([signature[64] + 27])).hex()


def payment_headers(payment_required: str, n: int, *, lifetime: int = 3600) -> list[str]:
    """``n`` PAYMENT-SIGNATURE values answering the first offer of a PAYMENT-REQUIRED header."""
    accepted = json.loads(base64.b64decode(payment_required))["accepts"][0]
    account = Account.create()
    key = coincurve.PrivateKey(bytes(account.key))
    template = sign_v2_payment(account, accepted)
    auth = template["payload"]["authorization"]
    if _sign(key, _digest(accepted, auth)) != template["payload"]["signature"]:
        raise RuntimeError("the EIP-712 digest here differs from the x402 SDK's")
    headers = []
    valid_before = str(int(time.time()) + lifetime)
    for _ in range(n):
        payment = copy.deepcopy(template)
        fresh = payment["payload"]["authorization"]
        fresh["nonce"] = "0x" + os.urandom(32).hex()
        fresh["validBefore"] = valid_before
        payment["payload"]["signature"] = _sign(key, _digest(accepted, fresh))
        headers.append(encode_header(payment))
    return headers
