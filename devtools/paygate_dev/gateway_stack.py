"""The gateway in front of the FAKE model server on real loopback sockets, started in the running
event loop: for the gateway tests (tests/fixtures/gateway_support) and the benchmarks that need
a live stack (bench/key_epochs.py). Every wait has a timeout; both servers bind 127.0.0.1."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from enclave import KeyBackend, SoftwareKey
from paygate.config import Settings, load_settings
from paygate.server.app import LISTEN_BACKLOG, build_app, server_options
from paygate.server.payments import PaymentStep
from paygate_dev.fake_model import FakeModelServer
from paygate_dev.stack import free_port

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
