"""A local webhook receiver for the alert tests (aiohttp on 127.0.0.1, stopped by the test)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SECRET = b"alert-secret-for-tests-0123456789"
last_fake: Any = None  # the FAKE model server of the latest `gateways` (its received requests)
last_settings: list[Any] = []  # the Settings of each gateway of the latest `gateways`, in order


@dataclass
class Receiver:
    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)  # statuses to answer first, then 200

    def documents(self, kind: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(body) for _, body in self.received]
        return [d for d in found if kind is None or d["kind"] == kind]


@contextlib.asynccontextmanager
async def webhook_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        receiver.received.append((dict(request.headers), body))
        status = receiver.answers.pop(0) if receiver.answers else 200
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    receiver.url = f"http://{host}:{port}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def gateways(
    count: int, **overrides: Any
) -> AsyncIterator[list[tuple[web.Application, str]]]:
    """``count`` gateways (each its own app, ledger connection and replica name) in front of one
    FAKE model server; ``[(app, url)]``."""
    from paygate_dev.fake_model import FakeModelServer

    from enclave import SoftwareKey
    from paygate.config import load_settings
    from paygate.server.app import build_app, server_options

    global last_fake
    fake = last_fake = FakeModelServer()
    last_settings.clear()
    fake_runner = web.AppRunner(fake.app)
    await fake_runner.setup()
    await web.TCPSite(fake_runner, "127.0.0.1", 0).start()
    host, port = fake_runner.addresses[0][:2]
    key = SoftwareKey.generate()
    runners: list[web.AppRunner] = []
    out: list[tuple[web.Application, str]] = []
    try:
        for index in range(count):
            settings = load_settings(
                None,
                upstream_url=f"http://{host}:{port}",
                upstream_monitor=False,
                replica_id=f"r{index}",
                **overrides,
            )
            app = build_app(settings, key=key)
            last_settings.append(settings)
            runner = web.AppRunner(app, shutdown_timeout=2.0, **server_options(settings))
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            gw_host, gw_port = runner.addresses[0][:2]
            out.append((app, f"http://{gw_host}:{gw_port}"))
        yield out
    finally:
        for runner in runners:
            await runner.cleanup()
        await fake_runner.cleanup()
        key.close()
