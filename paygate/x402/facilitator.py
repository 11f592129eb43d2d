"""A facilitator over x402's HTTP API: POST /verify, POST /settle.

Retries only where they are safe: verification is read-only, so it is retried on connection
errors, time-outs, 5xx and garbage; a settlement is re-sent only when the request never left
(connection refused), because after that its outcome is unknown and must be reconciled.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, TypeVar

import aiohttp
from pydantic import ValidationError

from paygate.x402.models import AnyPaymentPayload, SettleResponse, VerifyResponse, X402Model
from paygate.x402.settler import (
    NONCE_USED,
    SETTLEMENT_PENDING,
    SettlementUnknown,
    SettlerUnavailable,
)

log = logging.getLogger("paygate.x402")
_MAX_ANSWER = 64 * 1024
_VERIFY_ATTEMPTS = 2
_SETTLE_ATTEMPTS = 2
_M = TypeVar("_M", bound=X402Model)


class _Garbage(Exception):
    """The facilitator answered something that is not the expected JSON."""


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
    ) -> None:
        self._session = session
        self._url = url.rstrip("/")
        self._timeout = timeout
        self._settle_timeout = settle_timeout
        self._backoff = backoff

    async def verify(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        body = _request(payment, requirements)
        for attempt in range(_VERIFY_ATTEMPTS):
            try:
                return await self._post("/verify", body, VerifyResponse, self._timeout)
            except (aiohttp.ClientError, TimeoutError, _Garbage) as exc:
                log.warning("facilitator verify failed: %s", _what(exc))
                if attempt + 1 < _VERIFY_ATTEMPTS:
                    await asyncio.sleep(self._backoff * (attempt + 1))
        raise SettlerUnavailable("the facilitator could not verify the payment")

    async def settle(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        body = _request(payment, requirements)
        for attempt in range(_SETTLE_ATTEMPTS):
            try:
                answer = await self._post("/settle", body, SettleResponse, self._settle_timeout)
            except aiohttp.ClientConnectorError as exc:
                # Never connected: the request did not leave, so sending it again is safe.
                log.warning("facilitator settle not sent: %s", _what(exc))
                if attempt + 1 < _SETTLE_ATTEMPTS:
                    await asyncio.sleep(self._backoff * (attempt + 1))
                    continue
                raise SettlerUnavailable("the facilitator could not be reached to settle") from None
            except (aiohttp.ClientError, TimeoutError, _Garbage) as exc:
                log.warning("facilitator settle outcome unknown: %s", _what(exc))
                raise SettlementUnknown("the facilitator's settle answer was lost") from None
            if not answer.success and answer.error_reason == SETTLEMENT_PENDING:
                raise SettlementUnknown(
                    "the settlement is pending", transaction=answer.transaction or None
                )
            return answer
        raise SettlerUnavailable("the facilitator could not be reached to settle")

    async def reconcile(
        self,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
        transaction: str | None,
    ) -> SettleResponse:
        # The facilitator API has no status query: re-send the same authorization. If our first
        # attempt went through, its nonce is spent and the answer is "nonce already used" —
        # which, for an authorization whose ``to`` is us, means the money reached us.
        answer = await self.settle(payment, requirements)
        if not answer.success and answer.error_reason == NONCE_USED:
            return SettleResponse(
                success=True,
                payer=answer.payer,
                transaction=transaction or answer.transaction or "",
                network=answer.network,
                amount=answer.amount,
            )
        return answer

    async def close(self) -> None:
        return None  # the session belongs to the app

    async def _post(self, path: str, body: dict[str, Any], model: type[_M], timeout: float) -> _M:
        async with self._session.post(
            self._url + path,
            json=body,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 5.0)),
            allow_redirects=False,
        ) as response:
            if response.status >= 500:
                raise _Garbage(f"HTTP {response.status}")
            raw = await response.content.read(_MAX_ANSWER + 1)
        if len(raw) > _MAX_ANSWER:
            raise _Garbage("answer too large")
        try:
            return model.model_validate(json.loads(raw))
        except (ValueError, ValidationError, RecursionError):
            raise _Garbage(f"HTTP {response.status} with an unreadable body") from None


def _request(payment: AnyPaymentPayload, requirements: dict[str, Any]) -> dict[str, Any]:
    return {
        "x402Version": payment.x402_version,
        "paymentPayload": payment.wire(),
        "paymentRequirements": requirements,
    }


def _what(exc: BaseException) -> str:
    # The class and, for our own marker, its text: aiohttp's messages can quote URLs, no bodies.
    return str(exc) if isinstance(exc, _Garbage) else type(exc).__name__
