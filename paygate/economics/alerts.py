"""Webhook alerts (``alert_webhook``): a payment needs review, the model server is down, an
attestation failed, a budget was reached.

Raising an alert never blocks a request: :meth:`WebhookAlerts.notify` puts it on a bounded
queue (full: dropped and logged) and one background task delivers. Each alert has a key naming
its event; the task claims the key in the ledger first (:meth:`EconomicsStore.claim_alert`), so
an event seen by several workers or replicas is sent once. Delivery is a JSON POST signed with
HMAC-SHA256 over ``"<timestamp>.<body>"`` (``X-Paygate-Signature: t=<unix>,v1=<hex>``),
retried with exponential backoff on a network error or a 5xx/429 answer, for a bounded number
of attempts. Alerts carry codes, ids and addresses, never a prompt, a reply or a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from paygate.x402.ledger import LedgerError

if TYPE_CHECKING:
    from paygate.economics.store import EconomicsStore

log = logging.getLogger("paygate.alerts")
SIGNATURE_HEADER = "X-Paygate-Signature"
ALERT_ID_HEADER = "X-Paygate-Alert-Id"
KINDS = ("payment_review", "upstream_down", "attestation_failed", "budget_reached")


@dataclass(frozen=True, slots=True)
class Alert:
    kind: str  # one of KINDS
    key: str  # names the event: one alert per key, across replicas
    summary: str
    facts: Mapping[str, str | int | bool | None] = field(default_factory=dict)


class AlertSink(Protocol):
    def notify(self, alert: Alert) -> None:
        """Queue ``alert``; never blocks, never raises."""
        ...


class NoAlerts:
    def notify(self, alert: Alert) -> None:
        return None


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, *, now: float, tolerance: float = 300) -> bool:
    """A receiver's check of :func:`sign` (constant-time; stale timestamps refused)."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    stamp = parts.get("t", "")
    if not stamp.isdigit() or abs(now - int(stamp)) > tolerance:
        return False
    return hmac.compare_digest(
        sign(secret, int(stamp), body), f"t={stamp},v1={parts.get('v1', '')}"
    )


class WebhookAlerts:
    """The alert queue and its delivery task (:meth:`run`, started by the app)."""

    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        replica: str,
        max_queue: int = 1000,
        attempts: int = 6,
        first_backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._secret = secret
        self._replica = replica
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(max_queue)
        self._attempts = attempts
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._timeout = timeout
        self._clock = clock
        self._seen: set[str] = set()  # keys claimed here (no store: this process only)
        self.store: EconomicsStore | None = None  # set once the ledger is open
        self.sent = 0
        self.failed = 0

    def notify(self, alert: Alert) -> None:
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            log.error("alert queue full: %s alert dropped", alert.kind)

    async def run(self) -> None:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:
            while True:
                alert = await self._queue.get()
                try:
                    if await self._claim(alert.key):
                        await self._deliver(session, alert)
                except Exception as exc:  # keep delivering: one bad alert must not end it
                    log.error("alert %s not delivered: %s", alert.kind, type(exc).__name__)

    async def _claim(self, key: str) -> bool:
        if key in self._seen:
            return False
        if self.store is not None:
            try:
                if not await self.store.claim_alert(key):
                    self._seen.add(key)
                    return False
            except LedgerError as exc:  # no ledger: send anyway (a duplicate beats silence)
                log.warning("alert claim failed: %s", exc.code)
        if len(self._seen) > 100_000:
            self._seen.clear()
        self._seen.add(key)
        return True

    def body(self, alert: Alert) -> bytes:
        document: dict[str, Any] = {
            "id": hashlib.sha256(alert.key.encode()).hexdigest()[:32],
            "kind": alert.kind,
            "summary": alert.summary,
            "facts": dict(alert.facts),
            "replica": self._replica,
            "at": int(self._clock()),
        }
        return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()

    async def _deliver(self, session: aiohttp.ClientSession, alert: Alert) -> None:
        body = self.body(alert)
        alert_id = json.loads(body)["id"]
        delay = self._first_backoff
        for attempt in range(1, self._attempts + 1):
            stamp = int(self._clock())
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(self._secret, stamp, body),
                ALERT_ID_HEADER: alert_id,
            }
            status = 0
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.post(self._url, data=body, headers=headers) as response:
                    status = response.status
            if 200 <= status < 300:
                self.sent += 1
                log.info("alert %s delivered (attempt %d)", alert.kind, attempt)
                return
            if 400 <= status < 500 and status != 429:
                break  # the receiver refuses it: asking again will not help
            if attempt < self._attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
        self.failed += 1
        log.error("alert %s not delivered (last status %s)", alert.kind, status or "none")
