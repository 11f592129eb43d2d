"""A `batch-settlement` channel's identity and the EIP-712 messages around it (sans-IO,
client-safe: eth_account and eth_utils only).

Every signature of the scheme is EIP-712 under the domain ``{name "x402 Batch Settlement",
version "1", chainId, verifyingContract: the x402BatchSettlement contract}``: the channel id is
the hash of its ``ChannelConfig``; the payer signs ``Voucher(channelId, maxClaimableAmount)``
(a cumulative ceiling); the receiver authorizer signs ``ClaimBatch`` and ``Refund``. The type
strings are the x402 specification's (and the official SDK 2.25's).
"""

from __future__ import annotations

import functools
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address

from paygate.x402 import typed_digest as td
from paygate.x402.evm import EIP712_DOMAIN, members
from paygate.x402.schemes.batch_settlement import payload
from paygate.x402.schemes.batch_settlement.payload import ChannelConfig

NAME = payload.NAME  # the scheme's name, declared with its payload model

# The contracts' canonical CREATE2 addresses (the SDK's constants; the same on every chain).
SETTLEMENT_ADDRESS = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"
ERC3009_COLLECTOR_ADDRESS = "0x4020806089470a89826cB9fB1f4059150b550004"
PERMIT2_COLLECTOR_ADDRESS = "0x4020425FAf3B746C082C2f942b4E5159887B0005"
# The contract's bounds on a channel's withdraw delay (seconds): 15 minutes to 30 days.
MIN_WITHDRAW_DELAY = 900
MAX_WITHDRAW_DELAY = 2_592_000
ZERO_ADDRESS = "0x" + "00" * 20
UINT128_MAX = 2**128 - 1
# The least a channel charges a metered request (atomic units): each voucher must raise the
# channel's cumulative (it is what was charged plus this request's price, and the voucher is
# the payment's replay key), so a charge of 0 would leave the payer's next voucher the one
# just paid, refused as used for ever. The gateway charges it, the client's receipt check
# expects it.
LEAST_CHARGE = 1

# The ChannelConfig struct: EIP-712 fields here, the ABI tuple's components in chain.py. The
# members as the specification's type strings write them (the type hashes below are of these).
_CONFIG_MEMBERS = (
    "address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
    "address token,uint40 withdrawDelay,bytes32 salt"
)
_VOUCHER_MEMBERS = "bytes32 channelId,uint128 maxClaimableAmount"
CHANNEL_CONFIG = members(_CONFIG_MEMBERS)
_VOUCHER = members(_VOUCHER_MEMBERS)
_CLAIM_ENTRY = members("bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed")
_REFUND = members("bytes32 channelId,uint256 nonce,uint128 amount")


def domain(chain_id: int) -> dict[str, Any]:
    return {
        "name": "x402 Batch Settlement",
        "version": "1",
        "chainId": chain_id,
        "verifyingContract": SETTLEMENT_ADDRESS,
    }


def _digest(chain_id: int, types: dict[str, Any], primary: str, message: dict[str, Any]) -> bytes:
    signable = encode_typed_data(
        full_message={
            "types": {"EIP712Domain": EIP712_DOMAIN, **types},
            "primaryType": primary,
            "domain": domain(chain_id),
            "message": message,
        }
    )
    return keccak(b"\x19\x01" + signable.header + signable.body)


def config_message(config: ChannelConfig) -> dict[str, Any]:
    return {
        "payer": to_checksum_address(config.payer),
        "payerAuthorizer": to_checksum_address(config.payer_authorizer),
        "receiver": to_checksum_address(config.receiver),
        "receiverAuthorizer": to_checksum_address(config.receiver_authorizer),
        "token": to_checksum_address(config.token),
        "withdrawDelay": config.withdraw_delay,
        "salt": bytes.fromhex(config.salt[2:]),
    }


def channel_id(config: ChannelConfig, chain_id: int) -> str:
    """The channel's id: the EIP-712 hash of its config (bound to the chain and contract)."""
    if 0 <= config.withdraw_delay < 2**40:
        fields = (
            config.payer,
            config.payer_authorizer,
            config.receiver,
            config.receiver_authorizer,
            config.token,
            config.withdraw_delay,
            config.salt,
        )
        try:
            return _config_id(fields, chain_id)
        except ValueError:
            pass  # not the types' shapes: eth-account's encoder gives its own error
    return (
        "0x"
        + _digest(
            chain_id, {"ChannelConfig": CHANNEL_CONFIG}, "ChannelConfig", config_message(config)
        ).hex()
    )


def voucher_id(channel: str, max_claimable: int) -> str:
    """A voucher's id (0x + 64 hex): the seller's replay key for it, and the payment id its
    ledger records and signed receipts name (one per channel and cumulative ceiling)."""
    return "0x" + td.keccak(bytes.fromhex(channel[2:]) + max_claimable.to_bytes(16, "big")).hex()


def _voucher_message(channel: str, max_claimable: int) -> dict[str, Any]:
    return {"channelId": bytes.fromhex(channel[2:]), "maxClaimableAmount": max_claimable}


# The hot path's digests written out (``typed_digest``): one voucher per paid request, and
# its channel's id, checked against eth-account's generic encoder by the unit tests.
_VOUCHER_TYPE = td.keccak(f"Voucher({_VOUCHER_MEMBERS})".encode())
_CONFIG_TYPE = td.keccak(f"ChannelConfig({_CONFIG_MEMBERS})".encode())


def _separator(chain_id: int) -> bytes:
    return td.domain_separator("x402 Batch Settlement", "1", chain_id, SETTLEMENT_ADDRESS)


def voucher_digest(channel: str, max_claimable: int, chain_id: int) -> bytes:
    """The EIP-712 digest a voucher signs (ValueError/OverflowError when out of its types)."""
    if not 0 <= max_claimable <= UINT128_MAX:
        raise ValueError("maxClaimableAmount out of uint128")
    words = td.bytes32_word(channel) + td.uint_word(max_claimable)
    return td.digest(_separator(chain_id), td.keccak(_VOUCHER_TYPE + words))


@functools.lru_cache(maxsize=4096)
def _config_id(fields: tuple[str, str, str, str, str, int, str], chain_id: int) -> str:
    payer, payer_auth, receiver, receiver_auth, token, delay, salt = fields
    words = b"".join(td.address_word(a) for a in (payer, payer_auth, receiver, receiver_auth))
    words += td.address_word(token) + td.uint_word(delay) + td.bytes32_word(salt)
    return "0x" + td.digest(_separator(chain_id), td.keccak(_CONFIG_TYPE + words)).hex()


@functools.lru_cache(maxsize=1024)
def voucher_signer(channel: str, max_claimable: int, signature: str, chain_id: int) -> str | None:
    """The checksummed address that signed the voucher, or None (not a 65-byte ECDSA
    signature, or malformed). A pure function, remembered: a request's voucher is checked when
    admitted, verified and committed."""
    try:
        raw = bytes.fromhex(signature[2:])
        digest = voucher_digest(channel, max_claimable, chain_id)
    except (ValueError, OverflowError):
        return None
    if len(raw) != 65:
        return None
    if raw[64] in (27, 28):  # libsecp256k1; another v goes through eth-account as before
        return td.recover(digest, raw)
    try:
        return str(Account._recover_hash(digest, signature=raw))
    except Exception:  # eth-keys raises several types for malformed (r, s, v); all mean "no"
        return None


def _sign(account: LocalAccount, digest: bytes) -> str:
    return "0x" + bytes(account.unsafe_sign_hash(digest).signature).hex()


def sign_voucher(account: LocalAccount, channel: str, max_claimable: int, chain_id: int) -> str:
    """The payer side: a voucher letting the receiver claim up to ``max_claimable`` in total."""
    return _sign(
        account,
        _digest(
            chain_id, {"Voucher": _VOUCHER}, "Voucher", _voucher_message(channel, max_claimable)
        ),
    )


def sign_claim_batch(
    account: LocalAccount, entries: list[tuple[str, int, int]], chain_id: int
) -> str:
    """The receiver authorizer's consent to claim ``(channelId, maxClaimable, totalClaimed)``
    rows in one ``claimWithSignature``."""
    message = {
        "claims": [
            {"channelId": bytes.fromhex(c[2:]), "maxClaimableAmount": m, "totalClaimed": t}
            for c, m, t in entries
        ]
    }
    types = {"ClaimBatch": members("ClaimEntry[] claims"), "ClaimEntry": _CLAIM_ENTRY}
    return _sign(account, _digest(chain_id, types, "ClaimBatch", message))


def sign_refund(account: LocalAccount, channel: str, nonce: int, amount: int, chain_id: int) -> str:
    """The receiver authorizer's consent to ``refundWithSignature`` (nonce: the channel's)."""
    message = {"channelId": bytes.fromhex(channel[2:]), "nonce": nonce, "amount": amount}
    return _sign(account, _digest(chain_id, {"Refund": _REFUND}, "Refund", message))


def is_zero(address: str) -> bool:
    return int(address, 16) == 0
