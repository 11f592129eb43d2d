"""A facilitator over x402's HTTP API: POST /verify, POST /settle, GET /supported.

Every call carries the operator's authentication (:mod:`paygate.x402.facilitator_auth`: static
headers from a secret file, or a short-lived JWT per call); never logged, only exception
classes are.

Retries only where they are safe: verification is read-only, so it is retried on connection
errors, time-outs, 5xx and garbage; a settlement is re-sent only when the request never left
(connection refused or not made in time, every connection busy), because after that its outcome
is unknown and must be reconciled.

What counts as paid: ``success: true`` with a transaction hash (and, when the gateway can read
the chain, that transaction's receipt proving the transfer). Every other outcome that is not a
plain refusal — pending, a lost answer, success without a hash, "nonce already used" — is
unknown: proven on chain when a :class:`~paygate.x402.chain_reader.ChainReader` is given,
otherwise left owed and flagged for review (:class:`ReviewRequired`), never recorded as paid.
How an answer is judged and a lost one reconciled is the payment's scheme's
(``schemes/<scheme>/facilitator.py``, found through the registry).

``/verify`` and ``/settle`` run on every paid request, so they go through
:class:`~paygate.x402.facilitator_http.FacilitatorHttp` (keep-alive connections, a C parser, one
timer per call; that module says why not aiohttp's session, and the stale-connection rule:
a verification is resent on a new connection, a settlement never once its bytes left). Their
body is encoded once with orjson, the JSON library paygate already parses with. ``/supported``
is asked at start only and stays on the gateway's aiohttp session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from pydantic import SecretStr, ValidationError

from paygate import jsonsafe
from paygate.errors import PaygateError
from paygate.x402.facilitator_auth import FacilitatorAuth, StaticHeaders
from paygate.x402.facilitator_http import MAX_ANSWER, FacilitatorHttp, FacilitatorHttpError, NotSent
from paygate.x402.models import (
    AnyPaymentPayload,
    SettleResponse,
    VerifyResponse,
    X402Model,
)
from paygate.x402.schemes import scheme_of
from paygate.x402.settler import SettlementSubject, SettlementUnknown, SettlerUnavailable

if TYPE_CHECKING:
    from paygate.x402.chain_reader import ChainReader

log = logging.getLogger("paygate.x402")
_VERIFY_ATTEMPTS = 2
_SETTLE_ATTEMPTS = 2
_M = TypeVar("_M", bound=X402Model)


class _Garbage(PaygateError):
    """The facilitator answered something that is not the expected JSON."""

    code = "facilitator_garbage"
    message = "the facilitator's answer is not the expected JSON"


class FacilitatorSettler:
    """Verify and settle through a facilitator at ``url`` using the gateway's session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        timeout: float,
        settle_timeout: float,
        backoff: float = 0.2,
        chain: ChainReader | None = None,
        headers: Mapping[str, SecretStr] | None = None,
        auth: FacilitatorAuth | None = None,
    ) -> None:
        self._session = session
        self.chain = chain
        self._authenticator: FacilitatorAuth = auth if auth is not None else StaticHeaders(headers)
        self._url = url.rstrip("/")
        self._http = FacilitatorHttp(self._url, max_answer=MAX_ANSWER)
        self._timeout = timeout
        self._settle_timeout = settle_timeout
        self._backoff = backoff

    async def verify(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        body = _request(payment, requirements)
        for attempt in range(_VERIFY_ATTEMPTS):
            try:
                return await self._post("/verify", body, VerifyResponse, self._timeout, True)
            except (FacilitatorHttpError, TimeoutError, _Garbage) as exc:
                log.warning("facilitator verify failed: %s", _what(exc))
                if attempt + 1 < _VERIFY_ATTEMPTS:
                    await asyncio.sleep(self._backoff * (attempt + 1))
        raise SettlerUnavailable("the facilitator could not verify the payment")

    async def settle(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        answer = await self.send(payment, requirements)
        subject = SettlementSubject(payment, requirements)
        return await scheme_of(payment).facilitator.judge(self, answer, subject)

    async def reconcile(self, subject: SettlementSubject) -> SettleResponse:
        return await scheme_of(subject.payment).facilitator.reconcile(self, subject)

    async def send(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        """POST /settle: the answer; re-sent only when the request never left."""
        return await self._settle(_request(payment, requirements))

    async def settle_body(self, body: dict[str, Any]) -> SettleResponse:
        """POST /settle with a body a scheme built itself (batch-settlement's deposits, claims,
        sweeps and refunds are not one payment's settlement); the answer as it came."""
        return await self._settle(jsonsafe.dumps_compact(body))

    async def _settle(self, data: bytes) -> SettleResponse:
        for attempt in range(_SETTLE_ATTEMPTS):
            try:
                return await self._post(
                    "/settle", data, SettleResponse, self._settle_timeout, False
                )
            except NotSent as exc:
                # Never connected: the request did not leave, so sending it again is safe.
                log.warning("facilitator settle not sent: %s", _what(exc))
                if attempt + 1 < _SETTLE_ATTEMPTS:
                    await asyncio.sleep(self._backoff * (attempt + 1))
            except (FacilitatorHttpError, TimeoutError, _Garbage) as exc:
                log.warning("facilitator settle outcome unknown: %s", _what(exc))
                raise SettlementUnknown("the facilitator's settle answer was lost") from None
        raise SettlerUnavailable("the facilitator could not be reached to settle")

    async def supported(self) -> list[dict[str, Any]]:
        """``GET /supported``'s ``kinds``: ``{x402Version, scheme, network, extra?}`` each."""
        try:
            async with self._session.get(
                self._url + "/supported",
                headers=self._auth("GET", "/supported"),
                timeout=aiohttp.ClientTimeout(
                    total=self._timeout, sock_connect=min(self._timeout, 5.0)
                ),
                allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise _Garbage(f"HTTP {response.status}")
                raw = await response.content.read(MAX_ANSWER + 1)
            if len(raw) > MAX_ANSWER:
                raise _Garbage("answer too large")
            document = jsonsafe.loads(raw, max_bytes=MAX_ANSWER)
            kinds = document.get("kinds") if isinstance(document, dict) else None
        except (aiohttp.ClientError, TimeoutError, _Garbage, ValueError) as exc:
            raise SettlerUnavailable(f"the facilitator's /supported failed: {_what(exc)}") from None
        if not isinstance(kinds, list):
            raise SettlerUnavailable("the facilitator's /supported lists no kinds")
        return [kind for kind in kinds if isinstance(kind, dict)]

    async def close(self) -> None:
        await self._http.close()  # its own connections; the aiohttp session is the app's

    def _auth(self, method: str, path: str) -> dict[str, str]:
        """The operator's authentication, on every call (a hosted facilitator guards
        /supported too); a JWT names this call's method and URL."""
        return self._authenticator.headers(method, self._url + path)

    async def _post(
        self, path: str, body: bytes, model: type[_M], timeout: float, read_only: bool
    ) -> _M:
        answer = await self._http.call(
            "POST",
            path,
            self._auth("POST", path),
            body,
            timeout=timeout,
            connect_timeout=min(timeout, 5.0),
            resend_stale=read_only,
        )
        if answer.status >= 500:
            raise _Garbage(f"HTTP {answer.status}")
        try:
            return model.model_validate(jsonsafe.loads(answer.body, max_bytes=MAX_ANSWER))
        except (ValueError, ValidationError):
            raise _Garbage(f"HTTP {answer.status} with an unreadable body") from None


def _request(payment: AnyPaymentPayload, requirements: dict[str, Any]) -> bytes:
    """The /verify and /settle body, ``dumps_compact({"x402Version", "paymentPayload",
    "paymentRequirements"})``'s bytes, around the payment's JSON made once (``wire_json``)."""
    return b'{"x402Version":%d,"paymentPayload":%s,"paymentRequirements":%s}' % (
        payment.x402_version,
        payment.wire_json(),
        jsonsafe.dumps_compact(requirements),
    )


def _what(exc: BaseException) -> str:
    # The class and, for our own marker, its text: aiohttp's messages can quote URLs, no bodies.
    return str(exc) if isinstance(exc, _Garbage) else type(exc).__name__
