"""EVM pieces every scheme shares, sans-IO and client-safe (eth-account, eth-utils only).

EIP-712 signing and recovery of a scheme's typed data, and reading the words of an event log
(topics, data) the way the chain proofs compare them. A scheme package keeps only its own
message types and contracts; nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount

# keccak256("Transfer(address,address,uint256)"): the ERC-20 event every proof looks for.
TRANSFER_TOPIC = "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


def members(declaration: str) -> list[dict[str, str]]:
    """The ``{"name", "type"}`` entries of ``declaration``'s comma-separated ``type name``
    pairs, written as in a Solidity signature or an EIP-712 type string: a struct's members
    (EIP-712, an ABI tuple's components) or a function's parameters."""
    return [dict(zip(("type", "name"), m.split(), strict=True)) for m in declaration.split(",")]


def abi_tuple(
    name: str, components: list[dict[str, Any]], *, array: bool = False
) -> dict[str, Any]:
    """An ABI parameter that is a struct (``array``: a list of them)."""
    return {"name": name, "type": "tuple[]" if array else "tuple", "components": components}


# The EIP-712 domain of a contract with a name and a version (EIP-3009 tokens, x402's
# settlement contract).
EIP712_DOMAIN = members("string name, string version, uint256 chainId, address verifyingContract")
# EIP-3009's authorization: TransferWithAuthorization and ReceiveWithAuthorization have these
# same fields (only the primary type's name differs).
EIP3009_AUTHORIZATION = members(
    "address from, address to, uint256 value, uint256 validAfter, uint256 validBefore,"
    " bytes32 nonce"
)


def abi_function(
    name: str,
    inputs: list[dict[str, Any]],
    outputs: Sequence[str | dict[str, Any]] = (),
    *,
    mutability: str = "nonpayable",
) -> dict[str, Any]:
    """A function's entry in a contract ABI (the part paygate calls); an output given as a
    bare type is unnamed."""
    return {
        "type": "function",
        "name": name,
        "inputs": inputs,
        "outputs": [{"name": "", "type": o} if isinstance(o, str) else o for o in outputs],
        "stateMutability": mutability,
    }


def sign_typed(account: LocalAccount, typed_data: dict[str, Any]) -> str:
    """The 65-byte EIP-712 signature of ``typed_data`` as 0x-hex."""
    message = encode_typed_data(full_message=typed_data)
    return "0x" + account.sign_message(message).signature.hex().removeprefix("0x")


def recover_typed(typed_data: dict[str, Any], signature: str) -> str | None:
    """The checksummed signer of ``typed_data``, or None if ``signature`` is not a valid
    65-byte ECDSA signature (a contract wallet's is not recovered locally: smartwallet)."""
    raw = bytes.fromhex(signature[2:])
    if len(raw) != 65:
        return None
    message = encode_typed_data(full_message=typed_data)
    try:
        return str(Account.recover_message(message, signature=raw))
    except Exception:  # eth-keys raises several types for malformed (r, s, v); all mean "no"
        return None


def hex_of(value: Any) -> str:
    """A log word (bytes or hex text) as lowercase hex without 0x."""
    if isinstance(value, str):
        return value.lower().removeprefix("0x")
    return bytes(value).hex()


def word(raw: bytes) -> str:
    """``raw`` left-padded to one 32-byte word, as hex without 0x."""
    return raw.rjust(32, b"\0").hex()


def int_of(value: Any) -> int:
    """A log's data word as an integer."""
    return int(hex_of(value) or "0", 16)


def address_word(address: str) -> str:
    """An address as an indexed topic (hex without 0x)."""
    return word(bytes.fromhex(address.removeprefix("0x")))
