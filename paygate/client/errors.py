"""The client's exception family: one stable ``code`` per failure a caller may want to handle.

Messages are safe to log and show: they never carry wallet keys, signatures, payment headers,
request bodies or reply plaintext.
"""

from __future__ import annotations

from paygate.errors import PaygateError


class ClientError(PaygateError):
    """Base of every error raised by :mod:`paygate.client`."""

    code = "client_error"


class PubkeyUnavailable(ClientError):
    """The appliance's public key could not be fetched or its document is not valid."""

    code = "pubkey_unavailable"


class PinMismatch(ClientError):
    """The appliance presented a key other than the pinned one: nothing was sealed to it."""

    code = "pin_mismatch"


class AttestationFailed(ClientError):
    """The attestation hook refused the appliance's key: nothing was sealed to it."""

    code = "attestation_failed"


class ReplyOpenFailed(ClientError):
    """A sealed reply did not open: tampered, truncated, reordered or not meant for us.

    No plaintext of the failing part was handed out; chunks delivered before it were authentic.
    """

    code = "reply_open_failed"


class ReplyNotSealed(ReplyOpenFailed):
    """A sealed request got a successful reply in the clear: refused as a possible downgrade."""

    code = "reply_not_sealed"


class ReplyTooLarge(ClientError):
    """A reply the client must buffer (v1 blob, 402 challenge, key document) passed its bound."""

    code = "reply_too_large"


class RequestTooLarge(ClientError):
    """The request body passed the bound the client holds in memory to seal and re-send it."""

    code = "request_too_large"


class InvalidChallenge(ClientError):
    """A 402 whose payment requirements cannot be read."""

    code = "invalid_challenge"


class SpendRefused(ClientError):
    """No offered payment requirement fits the spend policy; nothing was signed."""

    code = "spend_refused"


class PaymentRefused(ClientError):
    """The server refused the signed payment; ``reason`` is the server's reason code."""

    code = "payment_refused"

    def __init__(self, reason: str, *, status: int = 402) -> None:
        super().__init__(f"payment refused by the server: {reason}")
        self.reason = reason
        self.status = status


class WalletKeyError(ClientError):
    """The wallet key file cannot be used (missing, unreadable by us, readable by others, or
    not a private key). The message never shows the key."""

    code = "wallet_key_invalid"
