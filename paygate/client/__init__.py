"""The paygate client: httpx transports that seal requests to the appliance, pay x402
challenges within a spend policy, and open sealed replies (streams included).

``openai.OpenAI(base_url=..., http_client=httpx.Client(transport=PaygateTransport(...)))`` is
all an OpenAI SDK program needs. Imports nothing server-only. See docs/CLIENT.md.
"""

from paygate.client.attestation import (
    AttestationPolicy,
    Attested,
    GpuPolicy,
    TeePolicy,
    load_tee_policies,
)
from paygate.client.core import Envelope, ReplyInfo
from paygate.client.errors import (
    ActivationFailed,
    AkInvalid,
    AttestationFailed,
    AttestationRefused,
    ClientError,
    CodeNotAccepted,
    EkUntrusted,
    EvidenceMalformed,
    EvidenceStale,
    EvidenceUnavailable,
    InvalidChallenge,
    KeyNotCertified,
    ModelNotAccepted,
    NonceMismatch,
    OfferNotAttested,
    PaymentNotAttested,
    PaymentRefused,
    PayToMismatch,
    PayToNotAllowed,
    PcrMismatch,
    PinMismatch,
    PubkeyUnavailable,
    QuoteInvalid,
    ReceiptInvalid,
    ReceiptMismatch,
    ReplyNotSealed,
    ReplyOpenFailed,
    ReplyTooLarge,
    RequestTooLarge,
    SpendRefused,
    Unattested,
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
    "ActivationFailed",
    "AkInvalid",
    "AsyncPaygateTransport",
    "AttestationFailed",
    "AttestationPolicy",
    "AttestationRefused",
    "Attested",
    "ClientError",
    "CodeNotAccepted",
    "EkUntrusted",
    "EnclaveKey",
    "Envelope",
    "EvidenceMalformed",
    "EvidenceStale",
    "EvidenceUnavailable",
    "GpuPolicy",
    "InvalidChallenge",
    "KeyNotCertified",
    "KeyPin",
    "ModelNotAccepted",
    "NonceMismatch",
    "OfferNotAttested",
    "PayToMismatch",
    "PayToNotAllowed",
    "PaygateTransport",
    "PaymentNotAttested",
    "PaymentRecord",
    "PaymentRefused",
    "PcrMismatch",
    "PinMismatch",
    "PubkeyUnavailable",
    "QuoteInvalid",
    "ReceiptInvalid",
    "ReceiptMismatch",
    "ReplyInfo",
    "ReplyNotSealed",
    "ReplyOpenFailed",
    "ReplyTooLarge",
    "RequestTooLarge",
    "SettleResponse",
    "SpendPolicy",
    "SpendRefused",
    "TeePolicy",
    "Unattested",
    "WalletKeyError",
    "load_tee_policies",
    "load_wallet",
]
