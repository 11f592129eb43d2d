"""The gateway's HTTP errors: one family, stable machine codes, rendered in the route's own shape.

OpenAI-style routes (``/v1``) answer ``{"error": {"message", "type", "code"}}``; Ollama routes
(``/api``) answer ``{"error": "..."}`` as Ollama does; everything else uses the OpenAI shape.
Every error also carries ``X-Paygate-Error: <code>`` so a client can branch without parsing.
Messages are fixed texts or name a setting: never a body, a header value or a key.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from paygate.errors import PaygateError
from paygate.wire import ERROR_HEADER

ApiStyle = Literal["openai", "ollama", "free"]


class GatewayError(PaygateError):
    """An HTTP error the gateway answers on purpose; ``status`` and ``code`` are stable."""

    status = 500
    code = "internal_error"
    #: The wire message when none is given: a fixed text, never a body, header value or key.
    message = "the gateway could not answer this request"

    def __init__(
        self,
        message: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message or self.message)
        self.headers = headers or {}
        if retry_after is not None:  # seconds the caller should wait before trying again
            self.headers = {**self.headers, "Retry-After": str(retry_after)}

    def render(self, api: ApiStyle) -> web.Response:
        """This error as a response in the shape of ``api``."""
        return error_response(self, api)


class RouteNotFound(GatewayError):
    message = "no such route on this gateway"

    status = 404
    code = "route_not_found"


class BadRequest(GatewayError):
    message = "the request is malformed"

    status = 400
    code = "bad_request"


class InvalidJSON(GatewayError):
    message = "the request body is not JSON within the gateway's bounds (size, depth, number size)"

    # The body is parsed before payment only where the price depends on it (model prices).
    status = 400
    code = "invalid_json"


class QueryNotAllowed(GatewayError):
    message = "this route takes no query string"

    status = 400
    code = "query_not_allowed"


class MalformedHTTP(GatewayError):
    message = "the request is not valid HTTP/1.1"

    # aiohttp's parser refused it before any handler ran: the message never quotes the bytes.
    status = 400
    code = "malformed_http"


class HeadersTooLarge(GatewayError):
    message = "the request's header section is too large (too long or too many header lines)"

    status = 431
    code = "headers_too_large"


class DecryptionFailed(GatewayError):
    message = "decryption failed"

    # One message for every way a sealed body can be wrong: no oracle (DESIGN.md, conventions).
    status = 400
    code = "decryption_failed"

    def __init__(self) -> None:
        super().__init__("decryption failed")


class InvalidReplyKey(GatewayError):
    message = "X-Obol-Reply-Pubkey must be a hex 65-byte uncompressed P-256 public key"

    status = 400
    code = "invalid_reply_key"


class InvalidRequestNonce(GatewayError):
    message = "X-Paygate-Request-Nonce must be one value of 64 hex digits (32 random bytes)"

    status = 400
    code = "invalid_request_nonce"


class ReplyKeyNotAllowed(GatewayError):
    message = (
        "X-Obol-Reply-Pubkey is refused with a v2 sealed request: its reply key is inside the seal"
    )

    status = 400
    code = "reply_key_not_allowed"


class EncryptionRequired(GatewayError):
    message = (
        "this gateway requires sealed request bodies (Content-Type: application/x-obol-encrypted)"
    )

    status = 415
    code = "encryption_required"


class BodyTooLarge(GatewayError):
    message = "the request body is larger than this gateway accepts"

    status = 413
    code = "body_too_large"


class ExpectationFailed(GatewayError):
    message = 'only "Expect: 100-continue" is supported'

    status = 417
    code = "expectation_failed"


class BodyTimeout(GatewayError):
    message = "the request body did not arrive in time"

    status = 408
    code = "body_timeout"


class Overloaded(GatewayError):
    message = "the gateway is at its concurrency limit; retry shortly"

    status = 503
    code = "overloaded"


class TooManyUploads(GatewayError):
    message = "too many request bodies in flight from this address; retry shortly"

    status = 429
    code = "too_many_uploads"


class InvalidBatch(GatewayError):
    message = "the batch body is not a bounded JSON array of chat requests"

    status = 400
    code = "invalid_batch"


class UploadsBusy(GatewayError):
    message = "the gateway is reading as many unpaid request bodies as it allows; retry shortly"

    status = 503
    code = "uploads_busy"


class KeyUnavailable(GatewayError):
    message = "the envelope key is not usable right now"

    status = 503
    code = "key_unavailable"


class UpstreamTimeout(GatewayError):
    message = "the model server did not answer in time"

    status = 504
    code = "upstream_timeout"

    def __init__(self, phase: str) -> None:
        # phase is one of the fixed names connect | first_byte | idle | total
        super().__init__(f"the model server timed out ({phase} timeout)")
        self.phase = phase


class UpstreamUnavailable(GatewayError):
    message = "the model server could not be reached"

    status = 502
    code = "upstream_unavailable"


class UpstreamDown(GatewayError):
    message = "the model server is down; retry later"

    # The circuit breaker is open: answered at once, nothing is sent to the model server.
    status = 503
    code = "upstream_down"


class UpstreamFault(GatewayError):
    message = "the model server sent a broken response"

    status = 502
    code = "upstream_fault"


class UpstreamReplyTooLarge(GatewayError):
    message = "the model server's reply is larger than this gateway seals in one piece"

    # Also for a paid plaintext reply, held until settlement under its own limit.

    status = 502
    code = "reply_too_large"


class InternalError(GatewayError):
    message = "internal error"

    status = 500
    code = "internal_error"


def api_style_for_path(path: str) -> ApiStyle:
    """The error shape for a path that matched no route (or before routing)."""
    if path == "/api" or path.startswith("/api/"):
        return "ollama"
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    return "free"


def _openai_type(status: int) -> str:
    if status == 503:
        return "server_overloaded"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(error: GatewayError, api: ApiStyle) -> dict[str, object]:
    """The JSON body of ``error`` in the shape of ``api``."""
    message = str(error)
    if api == "ollama":
        return {"error": message}
    return {"error": {"message": message, "type": _openai_type(error.status), "code": error.code}}


def error_response(error: GatewayError, api: ApiStyle) -> web.Response:
    """``error`` as an aiohttp response in the shape of ``api``."""
    headers = {ERROR_HEADER: error.code, **error.headers}
    return web.json_response(error_body(error, api), status=error.status, headers=headers)
