"""A real x402 facilitator over HTTP on loopback, with switchable faults, for tests and the demo.

The official SDK does the work (``x402FacilitatorSync`` + ``register_exact_evm_facilitator`` with a
``FacilitatorWeb3Signer``: v2 on ``eip155:84532`` and v1 on the SDK's legacy names such as
``base-sepolia``; the SDK's ``upto`` and ``batch-settlement`` facilitator schemes, v2 on
``eip155:84532``); this
module only puts the standard HTTP API in front of it:
POST /verify and POST /settle with ``{x402Version, paymentPayload, paymentRequirements}``, and
GET /supported. The SDK's EVM code is synchronous web3, so every call runs on a worker thread with
a timeout. Loopback control endpoints (``/_control/...``) flip faults from another process.

Run in-process with :class:`FacilitatorServer` (its own thread and event loop), or as a process:
``python -m paygate_dev.chain.facilitator --rpc-url URL --port P --key-file F``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from pydantic import ValidationError
from x402 import SchemeNotFoundError, x402FacilitatorSync
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.batch_settlement.authorizer_signer import LocalAuthorizerSigner
from x402.mechanisms.evm.batch_settlement.facilitator import BatchSettlementEvmFacilitator
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.mechanisms.evm.upto import UptoEvmFacilitatorScheme, UptoEvmSchemeConfig
from x402.schemas import SettleResponse, VerifyResponse
from x402.schemas.helpers import parse_payment_payload, parse_payment_requirements

from paygate.errors import PaygateError
from paygate_dev.chain.anvil import NETWORK
from paygate_dev.chain.faults import FacilitatorStats, Fault, FaultControls, FaultError
from paygate_dev.chain.jwt_guard import JwtGuard

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT = 10.0  # seconds for the server thread to listen
STOP_TIMEOUT = 5.0  # seconds for it to shut down
SHUTDOWN_GRACE = 0.5  # seconds in-flight (held) requests get when the server goes down
GARBAGE_BODY = b"<html>upstream proxy error: this is not JSON {"


@dataclass(frozen=True, slots=True)
class FacilitatorSettings:
    """How to build the SDK facilitator. The key never appears in repr()."""

    rpc_url: str
    private_key: str = field(repr=False)
    network: str = NETWORK
    # Receipt wait inside the SDK; past it, settle answers settlement_pending with the hash.
    confirmation_timeout: float = 15.0
    # Re-simulate inside settle: a replayed payload is refused with the exact reason
    # (invalid_exact_evm_nonce_already_used) instead of being broadcast, reverting and coming
    # back as transaction_failed with the hash of a reverted transaction (the SDK's default).
    simulate_in_settle: bool = True
    verify_timeout: float = 30.0
    settle_timeout: float = 60.0
    # Headers every API call must carry (a hosted facilitator's API key); 401 without them.
    required_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # A CDP-style JWT every API call must carry (Authorization: Bearer), checked with this
    # key; 401 without a valid one (paygate_dev.chain.jwt_guard).
    jwt_guard: JwtGuard | None = None
    # ERC-6492 factories the SDK may call to deploy a counterfactual smart-wallet payer.
    eip6492_factories: tuple[str, ...] = ()


def build_sdk_facilitator(settings: FacilitatorSettings) -> tuple[x402FacilitatorSync, str]:
    """The SDK facilitator (v2 on ``settings.network``, v1 on its legacy names) and its address."""
    signer = FacilitatorWeb3Signer(
        private_key=settings.private_key,
        rpc_url=settings.rpc_url,
        confirmation_timeout_seconds=settings.confirmation_timeout,
    )
    facilitator = x402FacilitatorSync()
    register_exact_evm_facilitator(
        facilitator,
        signer,
        networks=settings.network,
        eip6492_allowed_factories=list(settings.eip6492_factories),
        simulate_in_settle=settings.simulate_in_settle,
    )
    # `upto` (Permit2 through the x402UptoPermit2Proxy), v2 only, as the SDK ships it.
    facilitator.register(
        [settings.network],
        UptoEvmFacilitatorScheme(
            signer, UptoEvmSchemeConfig(simulate_in_settle=settings.simulate_in_settle)
        ),
    )
    # `batch-settlement` (channels in the x402BatchSettlement contract), v2 only; its own key is
    # the receiver authorizer it announces in /supported and signs claims and refunds with.
    facilitator.register(
        [settings.network],
        BatchSettlementEvmFacilitator(
            signer, authorizer_signer=LocalAuthorizerSigner(settings.private_key)
        ),
    )
    return facilitator, signer.address


def _dump(model: VerifyResponse | SettleResponse | Any) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


class FacilitatorApp:
    """The HTTP handlers. Loop-agnostic: one instance serves any number of aiohttp apps in turn."""

    def __init__(
        self,
        facilitator: x402FacilitatorSync,
        settings: FacilitatorSettings,
        faults: FaultControls,
        stats: FacilitatorStats,
    ) -> None:
        self._facilitator = facilitator
        self._settings = settings
        self.faults = faults
        self.stats = stats
        self._held: set[asyncio.Future[None]] = set()

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024, middlewares=[self._authenticate])
        app.router.add_post("/verify", self._verify)
        app.router.add_post("/settle", self._settle)
        app.router.add_get("/supported", self._supported)
        app.router.add_get("/_control/state", self._control_state)
        app.router.add_post("/_control/faults", self._control_faults)
        app.router.add_post("/_control/reset", self._control_reset)
        app.router.add_post("/_control/release", self._control_release)
        return app

    @web.middleware
    async def _authenticate(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if not request.path.startswith("/_control/"):
            for name, value in self._settings.required_headers:
                if request.headers.get(name) != value:
                    self.stats.record("unauthorized", None)
                    return web.json_response({"error": "unauthorized"}, status=401)
            guard = self._settings.jwt_guard
            if guard is not None:
                refused = guard.refuse(
                    request.headers.get("Authorization"), request.method, request.host, request.path
                )
                if refused is not None:
                    self.stats.record("unauthorized", {"reason": refused})
                    return web.json_response(
                        {"error": "unauthorized", "reason": refused}, status=401
                    )
        return await handler(request)

    # -- the facilitator API -------------------------------------------------------------

    async def _supported(self, request: web.Request) -> web.StreamResponse:
        self.stats.record("supported", None)
        early = await self._early_fault(self.faults.get("supported"))
        if early is not None:
            return early
        return web.json_response(_dump(self._facilitator.get_supported()))

    async def _verify(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        self.stats.record("verify", body)
        early = await self._early_fault(self.faults.get("verify"))
        if early is not None:
            return early
        parsed = self._parse(body)
        if isinstance(parsed, web.Response):
            return parsed
        try:
            result = await self._off_loop(
                lambda: self._facilitator.verify(*parsed), self._settings.verify_timeout
            )
        except SchemeNotFoundError as exc:
            return web.json_response(
                {
                    "isValid": False,
                    "invalidReason": "unsupported_scheme",
                    "invalidMessage": str(exc),
                }
            )
        except Exception as exc:
            log.warning("verify failed: %s", type(exc).__name__)
            return web.json_response(
                {"isValid": False, "invalidReason": "unexpected_verify_error",
                 "invalidMessage": type(exc).__name__},
                status=500,
            )  # fmt: skip
        return web.json_response(_dump(result))

    async def _settle(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        self.stats.record("settle", body)
        fault = self.faults.get("settle")
        if fault is Fault.HOLD_SETTLE:
            return await self._hold(request)
        early = await self._early_fault(fault)
        if early is not None:
            return early
        parsed = self._parse(body)
        if isinstance(parsed, web.Response):
            return parsed
        network = str(parsed[1].network)
        try:
            result = await self._off_loop(
                lambda: self._facilitator.settle(*parsed), self._settings.settle_timeout
            )
        except SchemeNotFoundError as exc:
            return web.json_response(
                {"success": False, "errorReason": "unsupported_scheme", "errorMessage": str(exc),
                 "transaction": "", "network": network}
            )  # fmt: skip
        except Exception as exc:
            log.warning("settle failed: %s", type(exc).__name__)
            return web.json_response(
                {"success": False, "errorReason": "unexpected_settle_error",
                 "errorMessage": type(exc).__name__, "transaction": "", "network": network},
                status=500,
            )  # fmt: skip
        if result.transaction:
            self.stats.record_transaction(result.transaction)
        if fault is Fault.SETTLE_THEN_HANG:
            return await self._hold(request)
        answer = _dump(result)
        if fault is Fault.SETTLEMENT_PENDING and result.success:
            # The shape the SDK itself answers when the receipt wait fails after broadcasting.
            answer.update(
                success=False,
                errorReason="settlement_pending",
                errorMessage="injected fault: receipt not seen yet",
            )
            answer.pop("amount", None)
        return web.json_response(answer)

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    async def _read_json(request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return None

    @staticmethod
    def _parse(body: Any) -> tuple[Any, Any] | web.Response:
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        payload, requirements = body.get("paymentPayload"), body.get("paymentRequirements")
        if not isinstance(payload, dict) or not isinstance(requirements, dict):
            return web.json_response(
                {"error": "paymentPayload and paymentRequirements are required"}, status=400
            )
        try:
            parsed_payload = parse_payment_payload(payload)
            parsed_requirements = parse_payment_requirements(
                parsed_payload.x402_version, requirements
            )
        except (ValidationError, ValueError) as exc:
            return web.json_response(
                {"error": "invalid payload or requirements", "detail": str(exc)[:500]}, status=400
            )
        return parsed_payload, parsed_requirements

    @staticmethod
    async def _off_loop(call: Callable[[], Any], timeout: float) -> Any:
        # The SDK's web3 calls block; a timed-out call keeps its worker thread until web3's own
        # request timeout, which is bounded too.
        return await asyncio.wait_for(asyncio.to_thread(call), timeout)

    async def _early_fault(self, fault: Fault) -> web.Response | None:
        if fault is Fault.SLOW:
            await asyncio.sleep(self.faults.delay)
        elif fault is Fault.HTTP_500:
            return web.json_response({"error": "injected fault: internal error"}, status=500)
        elif fault is Fault.GARBAGE:
            return web.Response(body=GARBAGE_BODY, content_type="application/json")
        elif fault is Fault.DEEP_JSON:
            return web.Response(body=b"[" * 32_000 + b"]" * 32_000, content_type="application/json")
        elif fault is Fault.HUGE_NUMBER:
            body = b'{"isValid": true, "payer": ' + b"7" * 5000 + b"}"
            return web.Response(body=body, content_type="application/json")
        return None

    async def _hold(self, request: web.Request) -> web.StreamResponse:
        """Never answer: wait until released, stopped or ``hang_limit``, then hang up."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.add(waiter)
        self.stats.held_delta(1)
        try:
            await asyncio.wait([waiter], timeout=self.faults.hang_limit)
        finally:
            self._held.discard(waiter)
            self.stats.held_delta(-1)
        if request.transport is not None:
            request.transport.abort()
        raise web.HTTPServiceUnavailable  # never delivered: the connection is already gone

    def release_held(self) -> None:
        """Drop every held request's connection now (call on the server's loop)."""
        for waiter in list(self._held):
            if not waiter.done():
                waiter.set_result(None)

    # -- control (loopback only, for tests in another process) ---------------------------

    async def _control_state(self, request: web.Request) -> web.Response:
        return web.json_response({"faults": self.faults.snapshot(), "stats": self.stats.snapshot()})

    async def _control_faults(self, request: web.Request) -> web.Response:
        body = await self._read_json(request)
        if not isinstance(body, dict) or "fault" not in body:
            return web.json_response({"error": "want {fault, endpoints?, delay?}"}, status=400)
        try:
            self.faults.set(body["fault"], body.get("endpoints"), delay=body.get("delay"))
        except (FaultError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.faults.snapshot())

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.faults.clear()
        self.stats.reset()
        self.release_held()
        return web.json_response(self.faults.snapshot())

    async def _control_release(self, request: web.Request) -> web.Response:
        self.release_held()
        return web.json_response({"released": True})


class FacilitatorServer:
    """The facilitator on 127.0.0.1 in this process, served by its own thread and event loop.

    ``faults`` and ``stats`` are read and written directly from the test's thread. :meth:`down`
    closes the listening socket and every connection (clients get "connection refused");
    :meth:`up` listens again on the same port.
    """

    def __init__(self, settings: FacilitatorSettings, port: int = 0) -> None:
        self.settings = settings
        self.faults = FaultControls()
        self.stats = FacilitatorStats()
        facilitator, self.address = build_sdk_facilitator(settings)
        self._handlers = FacilitatorApp(facilitator, settings, self.faults, self.stats)
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"FacilitatorServer(url={self.url!r}, address={self.address!r}, up={self.is_up})"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._runner is not None

    def start(self) -> Self:
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="x402-dev-facilitator", daemon=True
        )
        self._thread.start()
        try:
            self.up()
        except BaseException:
            self.stop()
            raise
        return self

    def _call(self, make: Callable[[], Awaitable[Any]], timeout: float = START_TIMEOUT) -> Any:
        if self._loop is None:
            raise PaygateError("facilitator server is not started")
        future = asyncio.run_coroutine_threadsafe(make(), self._loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def up(self) -> None:
        """Listen again (same port once one was chosen). No-op when already up."""
        self._call(self._up)

    async def _up(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(
            self._handlers.make_app(), access_log=None, shutdown_timeout=SHUTDOWN_GRACE
        )
        await runner.setup()
        site = web.TCPSite(runner, HOST, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner

    def down(self) -> None:
        """Stop listening and drop every connection, held requests included."""
        self._call(self._down, timeout=STOP_TIMEOUT + SHUTDOWN_GRACE)

    async def _down(self) -> None:
        runner, self._runner = self._runner, None
        self._handlers.release_held()
        if runner is not None:
            await runner.cleanup()

    def set_fault(
        self,
        fault: Fault | str,
        endpoints: list[str] | str | None = None,
        *,
        delay: float | None = None,
    ) -> None:
        """Switch a fault on. ``down`` stops the server; :meth:`reset` or :meth:`up` restarts it."""
        if Fault(fault) is Fault.DOWN:
            self.down()
        else:
            self.faults.set(fault, endpoints, delay=delay)

    def release_held(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._handlers.release_held)

    def reset(self) -> None:
        """No faults, counters at zero, held requests dropped, listening."""
        self.faults.clear()
        self.release_held()
        self.up()
        self.stats.reset()

    def stop(self) -> None:
        """Shut down the server and its thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            self.down()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- as a process ------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m paygate_dev.chain.facilitator",
        description="dev x402 facilitator on 127.0.0.1 (tests and demo only)",
    )
    parser.add_argument("--rpc-url", required=True)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--key-file", type=Path, required=True, help="file holding the 0x-hex key")
    parser.add_argument("--network", default=NETWORK)
    parser.add_argument("--confirmation-timeout", type=float, default=15.0)
    parser.add_argument(
        "--no-simulate-in-settle",
        dest="simulate_in_settle",
        action="store_false",
        help="the SDK default: settle broadcasts without re-simulating",
    )
    return parser.parse_args(argv)


async def _serve(settings: FacilitatorSettings, port: int) -> None:
    facilitator, address = build_sdk_facilitator(settings)
    handlers = FacilitatorApp(facilitator, settings, FaultControls(), FacilitatorStats())
    runner = web.AppRunner(handlers.make_app(), access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # One line on stdout tells a parent where we listen and who settles.
    print(f"READY http://{HOST}:{runner.addresses[0][1]} {address}", flush=True)
    try:
        await stop.wait()
    finally:
        handlers.release_held()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    key = args.key_file.read_text().strip()
    settings = FacilitatorSettings(
        rpc_url=args.rpc_url,
        private_key=key,
        network=args.network,
        confirmation_timeout=args.confirmation_timeout,
        simulate_in_settle=args.simulate_in_settle,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(settings, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
