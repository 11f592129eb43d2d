"""The free, local endpoints: health, readiness, metrics and the envelope public key.

None of them touches a request body or the payment step; readiness is the only one that talks
to the key backend and the model server, each under a short timeout and at most once per
interval whoever asks (:mod:`paygate.server.readiness`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

from aiohttp import web

import enclave
from enclave import KeyBackend, hpke, p256
from enclave.keys.epochs import EpochKeys
from paygate.server.attestation import AttestationService
from paygate.server.epochs import caught_up, epochs_document
from paygate.server.limits import ConcurrencyLimiter
from paygate.server.metrics import CONTENT_TYPE, Metrics
from paygate.server.readiness import ReadinessChecks
from paygate.server.routes import Target
from paygate.server.routing import Router

LocalHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def pubkey_document(key: KeyBackend) -> dict[str, Any]:
    """Obol's ``/v1/enclave/pubkey`` shape plus our fingerprint and the v2 suite."""
    info = key.info()
    return {
        "pubkey": info.public_key.hex(),
        "tag": info.label or info.backend,
        "persistent": info.persistent,
        "algorithm": enclave.V1_ALGORITHM,
        "fingerprint": p256.fingerprint(info.public_key),
        "backend": info.backend,
        "suites": {
            "v1": {"name": enclave.V1_ALGORITHM, "version": 1},
            "v2": {
                "name": enclave.V2_SUITE,
                "version": 2,
                "kem_id": hpke.KEM_ID,
                "kdf_id": hpke.KDF_ID,
                "aead_id": hpke.AEAD_ID,
                "request_info": "paygate-envelope-v2 request\\x00METHOD\\x00PATH",
            },
        },
        "content_type": enclave.CONTENT_TYPE,
    }


@dataclass(slots=True, kw_only=True, eq=False, repr=False)
class LocalEndpoints:
    """The handlers of the table's local targets."""

    key: KeyBackend
    upstream: Router
    limiter: ConcurrencyLimiter
    metrics: Metrics
    payment_mode: str
    probe_timeout: float
    check_interval: InitVar[float]
    # A monitored model server: the monitor's state answers, nothing is probed here.
    upstream_status: Callable[[], Mapping[str, Any]] | None = None
    models: Sequence[Mapping[str, str]] = ()
    attestation: AttestationService | None = None
    epochs: EpochKeys | None = None
    readiness: ReadinessChecks = field(init=False)
    _pubkey: dict[str, Any] = field(init=False)

    def __post_init__(self, check_interval: float) -> None:
        self.models = [dict(item) for item in self.models]
        self._pubkey = pubkey_document(self.key)
        self.readiness = ReadinessChecks(
            check_key=self._key_usable,
            check_upstream=self._upstream_reachable if self.upstream_status is None else None,
            interval=check_interval,
        )

    def handlers(self) -> Mapping[Target, LocalHandler]:
        handlers: dict[Target, LocalHandler] = {
            "health": self.health,
            "live": self.live,
            "ready": self.ready,
            "metrics": self.metrics_page,
            "pubkey": self.pubkey,
        }
        if self.attestation is not None:
            handlers["attestation"] = self.attestation.handle_evidence
            handlers["activate"] = self.attestation.handle_activate
        return handlers

    async def health(self, request: web.Request) -> web.Response:
        # With key epochs the key changes: the current one, not the one at start.
        await caught_up(self.epochs)
        pubkey = self._pubkey if self.epochs is None else pubkey_document(self.key)
        return web.json_response(
            {
                "status": "ok",
                "payment_mode": self.payment_mode,
                "key": {
                    "backend": pubkey["backend"],
                    "persistent": pubkey["persistent"],
                    "fingerprint": pubkey["fingerprint"],
                },
                "in_flight": self.limiter.in_flight,
                "max_concurrent_requests": self.limiter.limit,
            }
        )

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        checked = await self.readiness.current()
        key_ok, upstream_ok = checked.key_ok, checked.upstream_ok
        status = dict(self.upstream_status()) if self.upstream_status is not None else None
        if status is not None:
            upstream_ok = status.get("state") == "ready"
        ready = key_ok and upstream_ok
        document: dict[str, Any] = {
            "checks": {
                "key": "ok" if key_ok else "unusable",
                "upstream": "ok" if upstream_ok else "unreachable",
            },
            # How old the key check (and an unmonitored server's probe) is: shared, not per call.
            "checked_seconds_ago": round(max(0.0, time.monotonic() - checked.at), 3),
        }
        if status is not None:
            # The monitor's view: container restarts, breaker state (never URLs or keys).
            document["upstream"] = status
        # The served weights' digests (public: attestation binds the same values).
        document["models"] = self.models
        document = {"status": "ready" if ready else "not_ready", **document}
        return web.json_response(document, status=200 if ready else 503)

    async def _upstream_reachable(self) -> bool:
        return await self.upstream.probe(self.probe_timeout)

    async def _key_usable(self) -> bool:
        # A real ECDH (with our own public point) exercises the token or TPM session.
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.probe_timeout):
                await loop.run_in_executor(None, self.key.ecdh, self.key.public_key)
        except Exception:  # any failure means "not ready"; the reason is for the operator's logs
            return False
        return True

    async def metrics_page(self, request: web.Request) -> web.Response:
        body = self.metrics.render(
            in_flight=self.limiter.in_flight, breaker_open=self.upstream.breaker_open
        )
        return web.Response(
            body=body,
            headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"},
        )

    async def pubkey(self, request: web.Request) -> web.Response:
        if self.epochs is None:
            return web.json_response(self._pubkey)
        # Key epochs: the current key (what Obol clients seal to) and the live epochs, now.
        await caught_up(self.epochs)
        document = {**pubkey_document(self.key), **epochs_document(self.epochs)}
        return web.json_response(document, headers={"Cache-Control": "no-store"})
