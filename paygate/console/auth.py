"""Console sign-in and sessions, sans-IO where it can be.

* **Sessions** are signed cookies: ``base64url(JSON) "." hex(HMAC-SHA256)`` with the operator,
  how they signed in, a random session id and an expiry; ``HttpOnly``, ``SameSite=Strict``,
  ``Secure`` behind TLS. The key is ``console_secret``: the same on every replica, so a session
  works behind a balancer.
* **CSRF**: every form carries ``HMAC(secret, "csrf." + session id)``; a POST without it is
  refused. Before sign-in, the sign-in forms use a double-submit token (a random cookie echoed
  in the form).
* **Wallet sign-in** (EIP-4361): the console issues a nonce (one use, kept in the ledger so any
  replica can check it), the operator signs the message built from it, and the signature must
  recover an address on the ``console_wallets`` allow-list — or, for a contract wallet on the
  list, its ``isValidSignature`` (EIP-1271) must accept it when an RPC is configured.
* **Login links** (``paygate console login``): a random token whose SHA-256 is kept in the
  ledger, valid once for :data:`LINK_SECONDS`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_defunct
from eth_utils import to_checksum_address

from paygate.x402 import siwx

COOKIE = "paygate_console"
PRE_COOKIE = "paygate_console_pre"
LINK_SECONDS = 600.0
NONCE_SECONDS = 300.0
EIP1271_MAGIC = "0x1626ba7e"
STATEMENT = "Sign in to the paygate operator console"


@dataclass(frozen=True, slots=True)
class Session:
    operator: str  # a wallet address, or "login-link"
    method: str  # "wallet" | "link"
    sid: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    def __init__(self, secret: bytes, *, seconds: float) -> None:
        if len(secret) < 16:
            raise ValueError("the console secret must be at least 16 bytes")
        self._key = hashlib.sha256(b"paygate-console-session\x00" + secret).digest()
        self._csrf = hashlib.sha256(b"paygate-console-csrf\x00" + secret).digest()
        self.seconds = seconds

    def issue(self, operator: str, method: str, now: float) -> tuple[str, Session]:
        session = Session(operator, method, secrets.token_hex(16), now + self.seconds)
        body = _b64(
            json.dumps(
                {"op": operator, "m": method, "sid": session.sid, "exp": int(session.expires)},
                separators=(",", ":"),
            ).encode()
        )
        return f"{body}.{self._mac(body)}", session

    def read(self, cookie: str | None, now: float) -> Session | None:
        """The session a cookie carries, or None (absent, forged, expired, malformed)."""
        if not cookie or len(cookie) > 1024 or "." not in cookie:
            return None
        body, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(self._mac(body), mac):
            return None
        try:
            data = json.loads(_unb64(body))
            session = Session(str(data["op"]), str(data["m"]), str(data["sid"]), float(data["exp"]))
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        return session if session.expires > now else None

    def csrf(self, session: Session) -> str:
        return hmac.new(self._csrf, session.sid.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, session: Session, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(self.csrf(session), token)

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()


def token_hash(kind: str, token: str) -> str:
    """What the ledger keeps of a login token or a sign-in nonce (never the token itself)."""
    return hashlib.sha256(f"{kind}:{token}".encode()).hexdigest()


def new_link_token() -> str:
    return secrets.token_urlsafe(32)


def signin_proof(
    *, domain: str, uri: str, address: str, chain_id: int, nonce: str, issued_at: float
) -> siwx.SiwxProof:
    """The EIP-4361 fields of a console sign-in (signature empty until signed)."""
    return siwx.SiwxProof(
        domain=domain,
        address=to_checksum_address(address),
        uri=uri,
        version="1",
        chain_id=f"eip155:{chain_id}",
        type="eip191",
        nonce=nonce,
        issued_at=siwx.stamp(issued_at),
        statement=STATEMENT,
        expiration_time=siwx.stamp(issued_at + NONCE_SECONDS),
        signature="0x",
    )


def signin_message(proof: siwx.SiwxProof) -> str:
    return siwx.message(proof)


def recover(message: str, signature: str) -> str | None:
    """The EOA that signed ``message`` (EIP-191), or None for a signature that is not one."""
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
        return Account.recover_message(encode_defunct(text=message), signature=raw)
    except Exception:  # malformed (r, s, v) raise several types; all mean "not an EOA's"
        return None


def message_hash(message: str) -> bytes:
    """The EIP-191 digest a contract wallet's ``isValidSignature`` is asked about."""
    return _hash_eip191_message(encode_defunct(text=message))


def is_valid_signature_call(wallet: str, digest: bytes, signature: str) -> dict[str, str]:
    """The ``eth_call`` of EIP-1271 ``isValidSignature(bytes32,bytes)``."""
    raw = bytes.fromhex(signature.removeprefix("0x"))
    length = len(raw).to_bytes(32, "big")
    padded = raw + b"\x00" * (-len(raw) % 32)
    data = bytes.fromhex(EIP1271_MAGIC[2:]) + digest + (64).to_bytes(32, "big") + length + padded
    return {"to": to_checksum_address(wallet), "data": "0x" + data.hex()}


def now() -> float:
    return time.time()
