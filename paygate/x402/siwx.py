"""x402's ``sign-in-with-x`` extension on EVM (EIP-4361 messages, EIP-191 signatures), sans-IO:
how a wallet proves itself for the free quota without paying.

The 402 declares the extension (``extensions["sign-in-with-x"]``: the domain and URI the
message must name, a fresh nonce, when it was issued and expires, the supported chains); the
wallet signs the EIP-4361 message built from those fields and its address and sends the fields
and the signature base64-JSON-encoded in the ``SIGN-IN-WITH-X`` header (the official x402 SDK
2.25's shape). We check the domain and URI origin, the times (issued within ``max_age``, not
expired, not before its ``notBefore``), the chain, and that the signature recovers the
address; the nonce's single use is the ledger's business. A contract wallet (ERC-1271, or
ERC-6492 before it is deployed) signs in through :func:`verify_wallet`, which puts a signature
that recovers no such EOA to the wallet itself on chain (``paygate.x402.smartwallet``).

Only nonces this deployment issued are taken (CAIP-122 leaves the nonce to the relying party):
a nonce is the time it was issued, a random part and a MAC of both under the deployment's
sign-in key (kept in the ledger, shared by every process), so it is checked without storing
one row per 402 (an unpaid flood must not become database writes); it expires with the
sign-in's ``MAX_AGE_SECONDS``, and its single use is recorded when it is spent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_defunct
from eth_utils import is_checksum_address
from pydantic import Field, ValidationError

from paygate.x402.models import X402Model
from paygate.x402.refusal import ProofRejected

if TYPE_CHECKING:
    from paygate.x402.smartwallet import WalletVerifier

EXTENSION = "sign-in-with-x"
MAX_HEADER_CHARS = 8 * 1024
MAX_AGE_SECONDS = 300
_NONCE = re.compile(r"^[A-Za-z0-9]{8,64}$")
_HEX = re.compile(r"^0x(?:[0-9a-fA-F]{2})*$")
# A contract wallet's signature is longer than 65 bytes (ERC-6492 adds the deployment call).
MAX_SIGNATURE_BYTES = 2048
_REQUIRED = [
    "domain",
    "address",
    "uri",
    "version",
    "chainId",
    "type",
    "nonce",
    "issuedAt",
    "signature",
]


class SiwxRejected(ProofRejected):
    """A sign-in that does not prove the wallet; ``reason`` is the extension's code."""

    message = "a sign-in that does not prove the wallet"

    code = "siwx_rejected"


class SiwxProof(X402Model):
    """The ``SIGN-IN-WITH-X`` header's payload (EVM, EIP-191)."""

    domain: str = Field(max_length=256)
    address: str
    uri: str = Field(max_length=2048)
    version: str = Field(max_length=8)
    chain_id: str = Field(max_length=64)
    type: str
    nonce: str
    issued_at: str = Field(max_length=64)
    statement: str | None = Field(default=None, max_length=1024)
    expiration_time: str | None = Field(default=None, max_length=64)
    not_before: str | None = Field(default=None, max_length=64)
    request_id: str | None = Field(default=None, max_length=256)
    resources: list[str] | None = Field(default=None, max_length=16)
    signature: str = Field(max_length=2 + 2 * MAX_SIGNATURE_BYTES)


_MAC_HEX = 32  # hex characters of the nonce's MAC (128 bits)


def new_nonce(key: bytes, now: float) -> str:
    """A nonce issued now under ``key``: ``<issued, hex><random, 16 hex><mac, 32 hex>``."""
    body = f"{int(now):x}{secrets.token_hex(8)}"
    return body + _mac(key, body)


def issued_at(key: bytes, nonce: str) -> float | None:
    """When ``nonce`` was issued under ``key``, or None when this key did not issue it."""
    body, mac = nonce[:-_MAC_HEX], nonce[-_MAC_HEX:]
    if len(body) <= 16 or not hmac.compare_digest(mac, _mac(key, body)):
        return None
    try:
        return float(int(body[:-16], 16))
    except ValueError:
        return None


def _mac(key: bytes, body: str) -> str:
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()[:_MAC_HEX]


def stamp(moment: float) -> str:
    """An ISO 8601 UTC time as the messages carry it: 2026-12-01T08:45:00Z."""
    return datetime.fromtimestamp(int(moment), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def declaration(
    *, domain: str, uri: str, networks: list[str], now: float, statement: str, key: bytes
) -> dict[str, Any]:
    """``extensions["sign-in-with-x"]`` of a 402 (a nonce issued now under ``key``, valid
    MAX_AGE_SECONDS)."""
    return {
        "info": {
            "domain": domain,
            "uri": uri,
            "statement": statement,
            "version": "1",
            "nonce": new_nonce(key, now),
            "issuedAt": stamp(now),
            "expirationTime": stamp(now + MAX_AGE_SECONDS),
            "resources": [uri],
        },
        "supportedChains": [{"chainId": n, "type": "eip191"} for n in networks],
        "schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "domain": {"type": "string"},
                "address": {"type": "string"},
                "uri": {"type": "string"},
                "version": {"type": "string"},
                "chainId": {"type": "string"},
                "type": {"type": "string"},
                "nonce": {"type": "string"},
                "issuedAt": {"type": "string"},
                "signature": {"type": "string"},
            },
            "required": list(_REQUIRED),
        },
    }


def parse(header: str) -> SiwxProof:
    """The header's proof; SiwxRejected("invalid_siwx_payload") when it is not one."""
    if len(header) > MAX_HEADER_CHARS:
        raise SiwxRejected("invalid_siwx_payload", "the SIGN-IN-WITH-X header is too long")
    try:
        data = json.loads(base64.b64decode(header, validate=True))
        return SiwxProof.model_validate(data)
    except (binascii.Error, ValueError, ValidationError, RecursionError):
        raise SiwxRejected(
            "invalid_siwx_payload", "the SIGN-IN-WITH-X header is malformed"
        ) from None


def message(proof: SiwxProof) -> str:
    """The EIP-4361 text the wallet signed."""
    chain = proof.chain_id.removeprefix("eip155:")
    head = f"{proof.domain} wants you to sign in with your Ethereum account:\n{proof.address}"
    head = f"{head}\n\n{proof.statement}" if proof.statement is not None else head + "\n"
    lines = [
        f"URI: {proof.uri}",
        f"Version: {proof.version}",
        f"Chain ID: {chain}",
        f"Nonce: {proof.nonce}",
        f"Issued At: {proof.issued_at}",
    ]
    if proof.expiration_time:
        lines.append(f"Expiration Time: {proof.expiration_time}")
    if proof.not_before:
        lines.append(f"Not Before: {proof.not_before}")
    if proof.request_id is not None:
        lines.append(f"Request ID: {proof.request_id}")
    if proof.resources is not None:
        lines.append("\n".join(["Resources:", *(f"- {r}" for r in proof.resources)]))
    return head + "\n\n" + "\n".join(lines)


async def verify_wallet(
    proof: SiwxProof,
    *,
    origin: str,
    networks: list[str],
    now: float,
    key: bytes,
    wallets: WalletVerifier | None,
    max_age: int = MAX_AGE_SECONDS,
) -> str:
    """The wallet the proof signs in (checksummed), or SiwxRejected with the reason; its nonce
    must be one issued under ``key`` within ``max_age``. An EOA's signature is checked here;
    with ``wallets`` (an RPC) a contract wallet's is put to the wallet (ERC-1271
    ``isValidSignature`` of the EIP-191 digest; ERC-6492 when not deployed); without, only EOAs
    sign in. SettlerUnavailable when the chain cannot be asked."""
    check(proof, origin=origin, networks=networks, now=now, key=key, max_age=max_age)
    if _eoa_signed(proof):
        return proof.address
    if wallets is not None:
        digest = _hash_eip191_message(encode_defunct(text=message(proof)))
        signature = bytes.fromhex(proof.signature[2:])
        if await wallets.signed(proof.address, digest, signature, network=proof.chain_id):
            return proof.address
    raise SiwxRejected("invalid_siwx_signature", "the signature is not the address's")


def check(
    proof: SiwxProof,
    *,
    origin: str,
    networks: list[str],
    now: float,
    key: bytes,
    max_age: int = MAX_AGE_SECONDS,
) -> None:
    """Everything but the signature's signer: domain, origin, chain, nonce (one issued under
    ``key`` within ``max_age``), times, address."""
    parts = urlsplit(origin)
    if proof.domain != parts.netloc:
        raise SiwxRejected("invalid_siwx_domain_mismatch", "the sign-in names another domain")
    uri = urlsplit(proof.uri)
    if (uri.scheme, uri.netloc) != (parts.scheme, parts.netloc):
        raise SiwxRejected("invalid_siwx_uri_mismatch", "the sign-in names another origin")
    if proof.type != "eip191" or proof.chain_id not in networks:
        raise SiwxRejected("invalid_siwx_unsupported_chain", "the sign-in's chain is not offered")
    if not _NONCE.match(proof.nonce):
        raise SiwxRejected("invalid_siwx_nonce", "the sign-in's nonce is malformed")
    issued_nonce = issued_at(key, proof.nonce)
    if issued_nonce is None:
        raise SiwxRejected("invalid_siwx_nonce", "the sign-in's nonce was not issued here")
    if not now - max_age <= issued_nonce <= now + 60:
        raise SiwxRejected("invalid_siwx_nonce", "the sign-in's nonce has expired")
    issued = _time(proof.issued_at, "invalid_siwx_issued_at")
    if issued > now + 60:
        raise SiwxRejected("invalid_siwx_issued_at_in_future", "the sign-in is from the future")
    if issued < now - max_age:
        raise SiwxRejected("invalid_siwx_issued_at_too_old", "the sign-in is too old")
    if (
        proof.expiration_time
        and _time(proof.expiration_time, "invalid_siwx_expiration_time") <= now
    ):
        raise SiwxRejected("invalid_siwx_expired", "the sign-in has expired")
    if proof.not_before and _time(proof.not_before, "invalid_siwx_not_before") > now:
        raise SiwxRejected("invalid_siwx_not_yet_valid", "the sign-in is not valid yet")
    if not is_checksum_address(proof.address):
        raise SiwxRejected("invalid_siwx_payload", "the address is not EIP-55 checksummed")
    if not _HEX.match(proof.signature):
        raise SiwxRejected("invalid_siwx_signature", "the sign-in's signature is not hex")


def _eoa_signed(proof: SiwxProof) -> bool:
    """Does the 65-byte EIP-191 signature recover the address?"""
    raw = bytes.fromhex(proof.signature[2:])
    if len(raw) != 65:
        return False
    try:
        signer = Account.recover_message(encode_defunct(text=message(proof)), signature=raw)
    except Exception:  # malformed (r, s, v) raise several types; all mean "no"
        return False
    return bool(signer == proof.address)


def _time(value: str, reason: str) -> float:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise SiwxRejected(reason, "a sign-in time is not ISO 8601") from None
