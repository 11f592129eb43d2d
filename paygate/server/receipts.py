"""Signed receipts on replies (enclave.receipts signs; this module decides what and where).

Every paid or sealed reply gets one, signed by the receipt key the attestation certified:

- **whole replies**: the ``X-Paygate-Receipt`` header; ``reply_digest`` is the SHA-256 of the
  body as sent (the sealed blob for a sealed reply, so the clear header reveals nothing about
  the plaintext). Any such header from the upstream was dropped with every ``X-Paygate-*``.
- **streams**: in-band, after everything else (the x402 payment receipt included), as the
  stream's last SSE comment ``: paygate-receipt <token>`` or a ``paygate_receipt`` key on
  NDJSON's final ``"done": true`` object; for v2 inside the final sealed frame.
  ``reply_digest`` is a running SHA-256 over the bytes sent before the receipt: plaintext
  streams up to the comment (or up to the done line), v2 streams up to the final frame.

``request_digest`` is the SHA-256 of the request body as received (the sealed bytes).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from enclave import receipts
from enclave.attestation.binding import ModelDigest
from enclave.keys.base import ReceiptSigner
from enclave.keys.epochs import request_signer
from paygate import wire
from paygate.upstream.usage import Usage
from paygate.x402.inband import DoneLineHolder, done_object
from paygate.x402.processor import Receipt

SSE_PREFIX = b": paygate-receipt "
NDJSON_KEY = "paygate_receipt"


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the receipt says about the request, known before the reply."""

    request_digest: str
    model: str | None


@dataclass(frozen=True, slots=True)
class PaymentFacts:
    scheme: str
    network: str
    amount: str
    payer: str

    def claims(self, receipt: Receipt | None) -> dict[str, str]:
        transaction = receipt.response.transaction if receipt is not None else ""
        return {
            "scheme": self.scheme,
            "network": self.network,
            "amount": self.amount,
            "payer": self.payer,
            "transaction": transaction or "pending",
        }


class ReceiptIssuer:
    """Signs receipts with the key backend's receipt key (off the event loop: a TPM or token
    round trip)."""

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

    async def token(
        self,
        request: RequestFacts,
        reply_digest: str,
        *,
        payment: PaymentFacts | None,
        receipt: Receipt | None,
        usage: Mapping[str, Any] | None = None,
    ) -> str:
        claims = {
            "request_digest": request.request_digest,
            "reply_digest": reply_digest,
            "model": request.model,
            "model_digest": self._models.get(request.model) if request.model else None,
            "usage": dict(usage) if usage else None,
            "payment": payment.claims(receipt) if payment is not None else None,
            "issued_at": int(self._clock()),
        }
        loop = asyncio.get_running_loop()
        # Under key epochs: the receipt key of the epoch this request was sealed to.
        signer = request_signer(self._signer)
        token = await loop.run_in_executor(None, receipts.sign, claims, signer)
        if self._on_signed is not None:
            await self._on_signed(token)
        return token


def usage_claims(usage: Usage | None) -> dict[str, int] | None:
    """The receipt's ``usage``: the tokens the model server stated (paygate.upstream.usage)."""
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class InbandSignedReceipt:
    """The stream's signed receipt, last: a body transform (see paygate.server.replies).

    ``digest`` gives the reply digest at the end: this transform's own running hash of what
    it passed on (plaintext streams), or the wire hash of the frames sent so far (v2).
    """

    def __init__(
        self,
        media_type: str,
        sign: Callable[[str], Any],
        digest: Callable[[], str] | None = None,
    ) -> None:
        self._ndjson = media_type == wire.NDJSON
        self._sign = sign
        self._own = receipts.RunningHash()
        self._digest = digest or self._own.digest
        self._holder = DoneLineHolder()

    def feed(self, chunk: bytes) -> bytes:
        out = self._holder.feed(chunk) if self._ndjson else chunk
        self._own.update(out)
        return out

    async def finish(self, tail: bytes, end: object) -> bytes:
        if self._ndjson:
            rest = self.feed(tail) + self._holder.release()
            token = await self._sign(self._digest(), end)
            first, sep, after = rest.partition(b"\n")
            done = done_object(first) if first else None
            if done is None:
                # No done object to carry it (an upstream cut short): a final line of its own.
                line = json.dumps({NDJSON_KEY: token, "done": True}, separators=(",", ":"))
                return rest + line.encode() + b"\n"
            # The upstream's bytes stay as they were: the key is inserted before the last "}".
            body = first.rstrip()
            entry = json.dumps({NDJSON_KEY: token}, separators=(",", ":")).encode()[1:]
            joined = body[:-1] + (b"," if done else b"") + entry
            return joined + first[len(body) :] + sep + after
        self._own.update(tail)
        token = await self._sign(self._digest(), end)
        return tail + SSE_PREFIX + token.encode("ascii") + b"\n\n"


class WireHash:
    """Hashes the bytes as sent (after the sealer); its digest before the final frame is what a
    v2 stream's receipt covers."""

    def __init__(self) -> None:
        self._hash = receipts.RunningHash()

    def digest(self) -> str:
        return self._hash.digest()

    def feed(self, chunk: bytes) -> bytes:
        self._hash.update(chunk)
        return chunk

    async def finish(self, tail: bytes, end: object) -> bytes:
        return tail  # the final frame (it carries the receipt) is not covered
