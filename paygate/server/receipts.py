"""Signed receipts on replies (enclave.receipts signs; this module decides what and where).

Every paid or sealed reply below 400 gets one, signed by the receipt key the attestation
certified. ``reply_digest`` is the SHA-256 of the reply's plaintext up to the receipt:

- **whole replies**: the ``X-Paygate-Receipt`` header over the whole plaintext body. On a
  sealed reply the header is itself sealed to the caller (enclave.sealed_receipt): the model
  and usage it names never travel in clear. Any such header from the upstream was dropped
  with every ``X-Paygate-*``.
- **streams**: in-band, after everything else (the x402 payment receipt included), as the
  stream's last SSE comment ``: paygate-receipt <token>`` (digest of the bytes before that
  line), or a ``paygate_receipt`` entry joined to NDJSON's final ``"done": true`` object
  (digest of the bytes before that line and the line as it was without the entry); for v2
  both inside the final sealed frame, over the plaintext. A stream whose settlement was
  refused for good ends the same way with a ``refusal`` receipt in that place (no charge, the
  refusal's code): the x402 receipt before it is unauthenticated, and a path that can rewrite
  a plain stream could otherwise forge the refusal or strip the charge's receipt.

``request_digest`` is enclave.receipts.request_digest over the request as received: method,
path, the body (the sealed bytes of a sealed request), the caller's fresh nonce (v2: derived
from the reply secret inside the seal; plaintext and v1: the ``X-Paygate-Request-Nonce``
header, absent for callers that send none) and v1's clear reply key.

A paid request's receipt also goes to the ledger (which records its usage, whatever the
scheme); its settlement receipt is signed when first asked for at ``GET /v1/receipts/{id}``
(:class:`ReceiptEndpoint`) and kept, so its bytes never change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from aiohttp import web

from enclave import receipts, sealed_receipt
from enclave.attestation.binding import ModelDigest
from enclave.envelope_v2 import request_nonce
from enclave.keys.base import ReceiptSigner
from enclave.keys.epochs import request_signer
from paygate import wire
from paygate.server.errors import GatewayError, InvalidRequestNonce
from paygate.server.opening import INLINE_BACKENDS, OpenedBody, ReplyPlan, V1Reply, V2Reply
from paygate.upstream.usage import Usage
from paygate.x402.inband import DoneLineHolder, done_object
from paygate.x402.ledger import LedgerError, Meter, PaymentRecord, PaymentState
from paygate.x402.ledger_base import Ledger
from paygate.x402.metering import TokenPrice
from paygate.x402.models import SETTLE_FAILED
from paygate.x402.results import Receipt

log = logging.getLogger("paygate.server")

SSE_PREFIX = b": paygate-receipt "
NDJSON_KEY = "paygate_receipt"
REPLY, SETTLEMENT, REFUSAL = receipts.REPLY, receipts.SETTLEMENT, receipts.REFUSAL
_NONCE_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_PAYMENT_ID = re.compile(r"^0x[0-9a-fA-F]{64}$")
# The metering result's word for how usage was counted → the receipt's.
_SOURCES = {"upstream": "reported"}


@dataclass(frozen=True, slots=True)
class ReceiptRequest:
    """What the receipt says about the request, known before the reply."""

    request_digest: str
    model: str | None
    # The digest of the weights that served it (several upstreams may serve one name).
    model_digest: str | None = None


def request_nonce_header(headers: Mapping[str, str]) -> bytes | None:
    """The caller's ``X-Paygate-Request-Nonce`` (64 hex digits), None when absent;
    :class:`InvalidRequestNonce` when malformed (checked before anything is paid)."""
    values = headers.getall(wire.REQUEST_NONCE_HEADER, [])  # type: ignore[attr-defined]
    if not values:
        return None
    if len(values) != 1 or not _NONCE_HEX.match(values[0].strip()):
        raise InvalidRequestNonce
    return bytes.fromhex(values[0].strip())


def request_facts(
    request: web.BaseRequest, *, received: bytes, opened: OpenedBody, nonce: bytes | None,
    model: str | None, model_digest: str | None = None,
) -> ReceiptRequest:  # fmt: skip
    """The request's digest as the caller computes it (see the module docstring): its method
    and path, the body ``received``, and the reply key or nonce."""
    plan = opened.reply
    reply_key = None
    if isinstance(plan, V2Reply):
        nonce = request_nonce(plan.keys)  # inside the seal; a clear header is not used
    elif isinstance(plan, V1Reply):
        reply_key = plan.public_key
    digest = receipts.request_digest(
        method=request.method, path=request.path, body=received, nonce=nonce, reply_key=reply_key
    )
    return ReceiptRequest(request_digest=digest, model=model, model_digest=model_digest)


def usage_claims(usage: Usage | None, meter: Meter | None) -> dict[str, Any] | None:
    """The receipt's ``usage``: what was charged for (a metered payment's meter), else what the
    model server stated; ``source`` says how it was counted (``reported`` by the model server,
    or the metering fallback)."""
    if meter is not None:
        obtained = getattr(meter, "obtained", None)
        source = obtained or _SOURCES.get(meter.source, meter.source)
        prompt, completion = meter.tokens_in, meter.tokens_out
    elif usage is not None:
        source, prompt, completion = "reported", usage.prompt_tokens, usage.completion_tokens
    else:
        return None
    cached = getattr(usage, "cached_tokens", None) if usage is not None else None
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached if isinstance(cached, int) and cached >= 0 else None,
        "total_tokens": prompt + completion,
        "source": str(source),
    }


def payment_claims(
    record: PaymentRecord | None,
    *,
    charged: int | None,
    price: TokenPrice | None,
    receipt: Receipt | None,
) -> dict[str, Any] | None:
    """The receipt's ``payment``: the payment whole, with what it was charged."""
    if record is None:
        return None
    # A hash only once settled: a pending settlement's hash proves nothing yet.
    if receipt is not None:
        transaction = receipt.response.transaction if receipt.response.success else None
    else:
        transaction = record.transaction if record.state is PaymentState.SETTLED else None
    prices = None
    if price is not None:
        prices = {
            "input_per_million": str(price.input),
            "output_per_million": str(price.output),
            "minimum": str(price.minimum),
        }
    return {
        "id": record.nonce,
        "scheme": record.scheme,
        "network": record.network,
        "asset": record.asset,
        "pay_to": record.pay_to,
        "payer": record.payer,
        "authorized": str(record.amount),
        "charged": str(record.owed if charged is None else charged),
        "prices": prices,
        "transaction": transaction or "pending",
    }


class ReceiptIssuer:
    """Signs receipts with the key backend's receipt key: off the event loop for a TPM or token
    (a round trip), on it for a key in this process's memory (an ECDSA signature costs less
    than the hand-off to a thread and back)."""

    def __init__(
        self,
        signer: ReceiptSigner,
        models: tuple[ModelDigest, ...],
        *,
        clock: Callable[[], float] = time.time,
        on_signed: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._signer = signer
        self._models = {m.name: m.digest for m in models}
        self._clock = clock
        self._on_signed = on_signed  # the transparency log keeps each token's leaf hash
        info = getattr(signer, "info", None)  # every key backend has it; the protocol not
        self._inline = info is not None and info().backend in INLINE_BACKENDS

    async def token(
        self,
        request: ReceiptRequest,
        reply_digest: str,
        *,
        payment: dict[str, Any] | None,
        usage: dict[str, Any] | None = None,
        publish: bool = True,
    ) -> str:
        """A reply's receipt. ``publish``: recorded in the transparency log now; else the
        caller does it (:meth:`publish`) once the reply is sure to go out (a receipt signed
        before its settlement, whose reply a refused settlement withholds)."""
        return await self._sign(
            {
                "kind": REPLY,
                "request_digest": request.request_digest,
                "reply_digest": reply_digest,
                "model": request.model,
                "model_digest": self._model_digest(request),
                "usage": usage,
                "payment": payment,
            },
            publish=publish,
        )

    async def refusal(
        self, request: ReceiptRequest, reply_digest: str, *, payment: dict[str, Any], reason: str
    ) -> str:
        """A stream's signed refusal: its settlement was refused for good after the content
        went out. The same binding as :meth:`token` (the request, the bytes delivered), no
        charge (``payment.charged`` "0"): what lets a client tell it from a forged refusal."""
        return await self._sign(
            {
                "kind": REFUSAL,
                "request_digest": request.request_digest,
                "reply_digest": reply_digest,
                "model": request.model,
                "model_digest": self._model_digest(request),
                "payment": {
                    **payment,
                    "charged": "0",
                    "transaction": receipts.REFUSAL_TRANSACTION,
                },
                "reason": reason[: receipts.MAX_REASON] or SETTLE_FAILED,
            }
        )

    def _model_digest(self, request: ReceiptRequest) -> str | None:
        """The weights that served it (several upstreams may serve one name), else the digest
        the binding states for the name."""
        if not request.model:
            return None
        return request.model_digest or self._models.get(request.model)

    async def settlement(self, payment: dict[str, Any], request_digest: str | None) -> str:
        return await self._sign(
            {"kind": SETTLEMENT, "request_digest": request_digest, "payment": payment}
        )

    async def publish(self, token: str) -> None:
        """Record a token signed with ``publish=False`` in the transparency log."""
        if self._on_signed is not None:
            await self._on_signed(token)

    async def _sign(self, claims: dict[str, Any], *, publish: bool = True) -> str:
        claims["issued_at"] = int(self._clock())
        # Under key epochs: the receipt key of the epoch this request was sealed to.
        signer = request_signer(self._signer)
        if self._inline:  # a software or TEE-memory key: cheaper than a thread hop
            token = receipts.sign(claims, signer)
        else:  # a TPM or token round trip: off the event loop
            loop = asyncio.get_running_loop()
            token = await loop.run_in_executor(None, receipts.sign, claims, signer)
        if publish:
            await self.publish(token)
        return token


def sealed_header(plan: ReplyPlan, token: str) -> str:
    """A whole sealed reply's receipt header: the token sealed to the caller."""
    if isinstance(plan, V2Reply):
        return sealed_receipt.seal_v2(plan.keys, token)
    if isinstance(plan, V1Reply):
        return sealed_receipt.seal_v1(plan.public_key, token)
    return token


class InbandSignedReceipt:
    """The stream's signed receipt, last: a body transform (see paygate.server.replies), on
    the plaintext (before a v2 sealer).

    ``reply_digest`` covers what it passed on before the receipt: SSE up to the comment,
    NDJSON up to the done line plus that line as it came (without the joined entry).
    ``sign`` returns the reply's receipt, or a refusal (a charge refused for good), or None
    when none is to be signed.
    """

    def __init__(self, media_type: str, sign: Callable[[str, object], Any]) -> None:
        self._ndjson = media_type == wire.NDJSON
        self._sign = sign
        self._own = receipts.RunningHash()
        self._holder = DoneLineHolder()

    def feed(self, chunk: bytes) -> bytes:
        out = self._holder.feed(chunk) if self._ndjson else chunk
        self._own.update(out)
        return out

    async def finish(self, tail: bytes, end: object) -> bytes:
        if self._ndjson:
            rest = self.feed(tail) + self._holder.release()
            first, sep, after = rest.partition(b"\n")
            done = done_object(first) if first else None
            if done is None or after:
                # No done object to carry it (an upstream cut short, or lines after it): a
                # final line of its own, after everything.
                self._own.update(rest)
                token = await self._sign(self._own.digest(), end)
                if token is None:
                    return rest
                line = json.dumps({NDJSON_KEY: token, "done": True}, separators=(",", ":"))
                return rest + line.encode() + b"\n"
            # The upstream's bytes stay as they were: the entry goes before the last "}".
            self._own.update(first + sep)
            token = await self._sign(self._own.digest(), end)
            if token is None:
                return first + sep
            body = first.rstrip()
            entry = json.dumps({NDJSON_KEY: token}, separators=(",", ":")).encode()[1:]
            joined = body[:-1] + (b"," if done else b"") + entry
            return joined + first[len(body) :] + sep
        self._own.update(tail)
        token = await self._sign(self._own.digest(), end)
        if token is None:
            return tail
        return tail + SSE_PREFIX + token.encode("ascii") + b"\n\n"


# --- GET /v1/receipts/{payment_id} ---------------------------------------------------------


class ReceiptNotFound(GatewayError):
    message = "no payment with that id is known here"

    status = 404
    code = "receipt_not_found"


class ReceiptPending(GatewayError):
    message = "the payment is not settled yet: ask again later"

    status = 404
    code = "receipt_pending"


class SettlementFailed(GatewayError):
    message = "the payment did not settle: there is no settlement receipt"

    status = 409
    code = "settlement_failed"


class InvalidPaymentId(GatewayError):
    message = "a payment id is its authorization nonce: 0x and 64 hex digits"

    status = 400
    code = "invalid_payment_id"


class ReceiptsUnavailable(GatewayError):
    message = "the ledger cannot be read now"

    status = 503
    code = "ledger_unavailable"


class ReceiptEndpoint:
    """``GET /v1/receipts/{payment_id}``: the signed settlement receipt of a payment, by its
    authorization nonce. It states only what the chain shows (no model, no usage), so anyone
    who knows the nonce may read it."""

    def __init__(self, ledger: Ledger | None, issuer: ReceiptIssuer | None) -> None:
        self._ledger = ledger
        self._issuer = issuer

    async def handle(self, request: web.Request) -> web.Response:
        payment_id = request.path.rsplit("/", 1)[-1]
        if not _PAYMENT_ID.match(payment_id):
            raise InvalidPaymentId
        payment_id = payment_id.lower()
        if self._ledger is None or self._issuer is None:
            raise ReceiptNotFound
        try:
            token, record = await self.settlement_receipt(payment_id)
        except LedgerError:
            raise ReceiptsUnavailable from None
        return web.json_response(
            {"payment_id": payment_id, "state": record.state.value, "receipt": token},
            headers={"Cache-Control": "no-store"},
        )

    async def settlement_receipt(self, payment_id: str) -> tuple[str, PaymentRecord]:
        assert self._ledger is not None
        assert self._issuer is not None
        records = await self._ledger.by_nonce(payment_id)
        if not records:
            raise ReceiptNotFound
        settled = [r for r in records if r.state is PaymentState.SETTLED]
        if not settled:
            if all(r.state in (PaymentState.FAILED, PaymentState.RELEASED) for r in records):
                raise SettlementFailed
            raise ReceiptPending(retry_after=5)
        record = settled[0]
        stored = await self._ledger.receipts(record.id)
        for kept in stored:
            if kept.kind == SETTLEMENT:
                return kept.token, record
        request_digest = None
        for kept in stored:
            if kept.kind == REPLY:
                request_digest = receipts.unverified_claims(kept.token)["request_digest"]
        payment = payment_claims(
            record, charged=record.settled_amount, price=_price_of(stored), receipt=None
        )
        assert payment is not None
        token = await self._issuer.settlement(payment, request_digest)
        # The first one kept wins (two replicas may sign at once): its bytes never change.
        await self._ledger.add_receipt(record.id, SETTLEMENT, token)
        for kept in await self._ledger.receipts(record.id):
            if kept.kind == SETTLEMENT:
                return kept.token, record
        return token, record


def _price_of(stored: list[Any]) -> TokenPrice | None:
    """The token prices the reply receipt stated (a metered payment), for its settlement's."""
    for kept in stored:
        if kept.kind != REPLY:
            continue
        payment = receipts.unverified_claims(kept.token).get("payment") or {}
        prices = payment.get("prices")
        if isinstance(prices, dict):
            return TokenPrice(
                Decimal(prices["input_per_million"]),
                Decimal(prices["output_per_million"]),
                Decimal(prices["minimum"]),
            )
    return None
