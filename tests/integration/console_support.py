"""The console for the browser tests: a paid gateway (anvil + the SDK facilitator, the FAKE model
server) with its console on another loopback port, and headless Chromium from Debian driven by
Playwright (``executable_path``: the system browser, nothing downloaded)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from paygate.console.serve import start_console
from tests.integration import economics_support
from tests.integration.economics_support import gateways

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SECRET = "console-secret-for-the-browser-tests"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"


@dataclass
class Console:
    app: web.Application  # the gateway's
    gateway: str
    url: str


@contextlib.asynccontextmanager
async def console_stack(**settings: Any) -> AsyncIterator[Console]:
    from tests.fixtures.components import free_port

    port = free_port()
    settings.setdefault("console_secret", SECRET)
    async with gateways(1, console_listen=f"127.0.0.1:{port}", **settings) as [(app, url)]:
        runner = await start_console(economics_support.last_settings[0], app)
        assert runner is not None
        try:
            yield Console(app, url, f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def browser(*, javascript: bool = True) -> AsyncIterator[Any]:
    """A fresh browser context (no cookies); ``javascript=False`` proves a page needs none."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            context = await chromium.new_context(
                java_script_enabled=javascript, viewport={"width": 1280, "height": 900}
            )
            context.set_default_timeout(15_000)
            yield context
        finally:
            await chromium.close()
