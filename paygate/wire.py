"""The wire vocabulary shared by the gateway and the client: one definition of each name.

Header names, media types, the gateway's own local paths and the stable error codes that
callers branch on. Pure constants: the client imports this module, so it must stay free of
anything server-only.
"""

from __future__ import annotations

from typing import Final

from enclave import CONTENT_TYPE

# --- media types ---
SEALED_MEDIA_TYPE: Final = CONTENT_TYPE  # application/x-obol-encrypted (Obol's envelope v1 name)
SSE: Final = "text/event-stream"
NDJSON: Final = "application/x-ndjson"
JSON: Final = "application/json"
STREAM_MEDIA_TYPES: Final = frozenset({SSE, NDJSON})

# --- paygate's headers ---
REPLY_PUBKEY_HEADER: Final = "X-Obol-Reply-Pubkey"  # v1: the caller's reply key, in clear
ORIGINAL_TYPE_HEADER: Final = "X-Paygate-Content-Type"  # a sealed reply's plaintext media type
ENVELOPE_HEADER: Final = "X-Paygate-Envelope"  # v1 | v2 on a sealed reply
ERROR_HEADER: Final = "X-Paygate-Error"  # the stable error code of any refusal
OVERHEAD_HEADER: Final = "X-Paygate-Overhead-Ms"  # time spent in the gateway itself
REQUEST_ID_HEADER: Final = "X-Request-Id"  # from a trusted proxy, or made here; always returned
RECEIPT_HEADER: Final = "X-Paygate-Receipt"  # a whole reply's signed receipt (sealed if it is)
REQUEST_NONCE_HEADER: Final = "X-Paygate-Request-Nonce"  # plaintext/v1: the caller's fresh nonce
# The key id a request is sealed to (also inside a keyed v2 envelope, authenticated there): what
# a load balancer routes on (sticky by key, docs/SCALING.md) and what the gateway checks first.
KEY_ID_HEADER: Final = "X-Paygate-Key-Id"
REPLICA_HEADER: Final = "X-Paygate-Replica"  # on a wrong_replica answer: the replica to use

# --- x402's headers (v2, and v1's X- names) ---
PAYMENT_REQUIRED: Final = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE: Final = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE: Final = "PAYMENT-RESPONSE"
X_PAYMENT: Final = "X-PAYMENT"
X_PAYMENT_RESPONSE: Final = "X-PAYMENT-RESPONSE"
SIGN_IN_WITH_X: Final = "SIGN-IN-WITH-X"  # x402's sign-in-with-x extension (free quota)
FREE_REMAINING_HEADER: Final = "X-Paygate-Free-Remaining"  # free requests left today

# --- the gateway's local paths (answered by the gateway, never forwarded, never sealed) ---
HEALTH_PATH: Final = "/health"
LIVE_PATH: Final = "/health/live"
READY_PATH: Final = "/health/ready"
METRICS_PATH: Final = "/metrics"
PUBKEY_PATH: Final = "/v1/enclave/pubkey"
ATTESTATION_PATH: Final = "/v1/attestation"
ATTESTATION_ACTIVATE_PATH: Final = "/v1/attestation/activate"
LOG_CHECKPOINT_PATH: Final = "/v1/log/checkpoint"  # the transparency log (c2sp.org/tlog-tiles)
LOG_TILE_PATH: Final = "/v1/log/tile/{tile:path}"
LOG_RECEIPT_PROOF_PATH: Final = "/v1/log/receipt-proof"
RECEIPTS_PATH: Final = "/v1/receipts"  # GET /v1/receipts/{payment_id}: a settlement receipt
LOCAL_PATHS: Final = frozenset(
    {
        HEALTH_PATH,
        LIVE_PATH,
        READY_PATH,
        METRICS_PATH,
        PUBKEY_PATH,
        ATTESTATION_PATH,
        ATTESTATION_ACTIVATE_PATH,
    }
)


def is_local(path: str) -> bool:
    """A path the gateway answers itself (never sealed, never paid): the local endpoints, the
    transparency log's and the settlement receipts'."""
    return path in LOCAL_PATHS or path.startswith(("/v1/log/", RECEIPTS_PATH + "/"))


def media_type(content_type: str | None) -> str:
    """The bare, lower-case media type of a Content-Type value (``charset`` etc. dropped)."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def is_sealed(content_type: str | None) -> bool:
    return media_type(content_type) == SEALED_MEDIA_TYPE


def is_stream(content_type: str | None) -> bool:
    return media_type(content_type) in STREAM_MEDIA_TYPES
