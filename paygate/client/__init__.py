"""The paygate client: httpx transports that seal requests to the appliance, pay x402
challenges within a spend policy, and open sealed replies (streams included).

``openai.OpenAI(base_url=..., http_client=httpx.Client(transport=PaygateTransport(...)))`` is
all an OpenAI SDK program needs. Imports nothing server-only. See docs/CLIENT.md.
"""

from paygate.client.core import Envelope, ReplyInfo
from paygate.client.errors import (
    AttestationFailed,
    ClientError,
    InvalidChallenge,
    PaymentRefused,
    PinMismatch,
    PubkeyUnavailable,
    ReplyNotSealed,
    ReplyOpenFailed,
    ReplyTooLarge,
    RequestTooLarge,
    SpendRefused,
    WalletKeyError,
)
from paygate.client.payer import PaymentRecord, SpendPolicy
from paygate.client.pubkey import EnclaveKey, KeyPin
from paygate.client.transport import AsyncPaygateTransport, PaygateTransport
from paygate.client.wallet import load_wallet
from paygate.wire import LOCAL_PATHS
from paygate.x402.models import SettleResponse

__all__ = [
    "LOCAL_PATHS",
    "AsyncPaygateTransport",
    "AttestationFailed",
    "ClientError",
    "EnclaveKey",
    "Envelope",
    "InvalidChallenge",
    "KeyPin",
    "PaygateTransport",
    "PaymentRecord",
    "PaymentRefused",
    "PinMismatch",
    "PubkeyUnavailable",
    "ReplyInfo",
    "ReplyNotSealed",
    "ReplyOpenFailed",
    "ReplyTooLarge",
    "RequestTooLarge",
    "SettleResponse",
    "SpendPolicy",
    "SpendRefused",
    "WalletKeyError",
    "load_wallet",
]
