"""The gateway and the FAKE model server on real loopback sockets, for the gateway tests.

``running_stack`` starts both in the running event loop; ``ThreadedStack`` runs the same in a
background thread for synchronous tests (hypothesis). Every wait here has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from paygate_dev.fake_model import FakeModelServer
from paygate_dev.stack import free_port

from enclave import KeyBackend, SoftwareKey
from paygate.config import Settings, load_settings
from paygate.server.app import LISTEN_BACKLOG, build_app, server_options
from paygate.server.payments import PaymentStep

TIMEOUT = aiohttp.ClientTimeout(total=15)


@dataclass
class Stack:
    fake: FakeModelServer
    key: KeyBackend
    settings: Settings
    url: str  # the gateway
    fake_url: str
    client: aiohttp.ClientSession

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.url.removeprefix("http://").rpartition(":")
        return host, int(port)


async def _serve(
    app: web.Application, *, port: int = 0, **options: Any
) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, shutdown_timeout=2.0, **options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=LISTEN_BACKLOG)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def running_stack(
    *,
    upstream_url: str | None = None,
    fake: FakeModelServer | None = None,
    key: KeyBackend | None = None,
    payments: PaymentStep | None = None,
    gpu: Any = None,
    **overrides: Any,
) -> AsyncIterator[Stack]:
    """The fake on a free port, and a gateway (software key in memory unless ``key`` is given,
    which stays the caller's to close) in front of it. ``public_url="self"``: the gateway's own
    URL (a port chosen first), as an operator would configure it."""
    fake = fake or FakeModelServer()
    fake_runner, fake_url = await _serve(fake.app, handler_cancellation=True)
    key = key if key is not None else SoftwareKey.generate()
    # These tests are about the proxy itself and count every request the fake sees: no health
    # monitor (nor breaker) unless a test asks; those have their own tests (test_upstream_*).
    overrides.setdefault("upstream_monitor", False)
    port = 0
    if overrides.get("public_url") == "self":
        port = free_port()
        overrides["public_url"] = f"http://127.0.0.1:{port}"
    settings = load_settings(None, upstream_url=upstream_url or fake_url, **overrides)
    gateway_runner, url = await _serve(
        build_app(settings, key=key, payments=payments, gpu=gpu),
        port=port,
        **server_options(settings),
    )
    client = aiohttp.ClientSession(timeout=TIMEOUT)
    try:
        yield Stack(fake, key, settings, url, fake_url, client)
    finally:
        await client.close()
        await gateway_runner.cleanup()
        await fake_runner.cleanup()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, failing after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


class ThreadedStack:
    """A running stack in its own thread and loop; ``with ThreadedStack() as stack: ...``."""

    def __init__(self, **overrides: Any) -> None:
        self._overrides = overrides
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.stack: Stack | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with running_stack(**self._overrides) as stack:
                self.stack = stack
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    def __enter__(self) -> Stack:
        self._thread.start()
        if not self._ready.wait(15) or self.stack is None:
            raise RuntimeError(f"stack did not start: {self.error!r}")
        return self.stack

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


_SIGNED_RECEIPT = re.compile(
    rb',"paygate_receipt":"[A-Za-z0-9_.-]+"|: paygate-receipt [A-Za-z0-9_.-]+\n\n'
)


def without_signed_receipt(plaintext: bytes) -> bytes:
    """A reply's plaintext minus the gateway's in-band signed receipt (paygate.server.receipts):
    what the model server sent. Fails if there was none."""
    stripped, count = _SIGNED_RECEIPT.subn(b"", plaintext)
    assert count == 1, "expected exactly one in-band signed receipt"
    return stripped
