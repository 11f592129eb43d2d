"""Real `paygate serve` replicas (separate processes, or one process with N workers) sharing one
ledger, behind nginx, with anvil, the SDK facilitator and the FAKE model server in this process.

Every process is stopped by its own PID; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import web
from paygate_dev.fake_model import FakeModelServer
from paygate_dev.services import Nginx

from paygate import wire
from paygate.x402.ledger import PaymentEvent, PaymentRecord
from paygate.x402.ledger_store import open_ledger, parse_ledger_url
from tests.fixtures.components import free_port
from tests.integration.payment_support import CHAT, CHAT_BODY, v2_header

PAYGATE = str(Path(sys.executable).with_name("paygate"))
LEASE_SECONDS = 3.0
RECONCILE_SECONDS = 0.5
COMPLETIONS = "POST /v1/chat/completions"


def make_key(path: Path) -> Path:
    subprocess.run(
        [PAYGATE, "keys", "create", "--backend", "software", "--key-file", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


@dataclass
class Replica:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        """The worker PIDs of a ``--workers`` parent."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []


@dataclass
class Env:
    """What every replica is told."""

    key_file: Path
    ledger_url: str
    seller: str
    facilitator_url: str
    upstream: str
    work: Path
    extra: dict[str, str] = field(default_factory=dict)

    def for_replica(self, name: str, port: int, workers: int) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
            "PAYGATE_KEY_BACKEND": "software",
            "PAYGATE_KEY_FILE": str(self.key_file),
            "PAYGATE_LISTEN": f"127.0.0.1:{port}",
            "PAYGATE_UPSTREAM_URL": self.upstream,
            "PAYGATE_UPSTREAM_MONITOR": "false",
            "PAYGATE_PAYMENT_MODE": "facilitator",
            "PAYGATE_PAY_TO": self.seller,
            "PAYGATE_NETWORK": "base-sepolia",
            "PAYGATE_FACILITATOR_URL": self.facilitator_url,
            "PAYGATE_LEDGER_URL": self.ledger_url,
            "PAYGATE_FACILITATOR_TIMEOUT": "2",
            "PAYGATE_SETTLE_TIMEOUT": "5",
            "PAYGATE_REPLICA_ID": name,
            "PAYGATE_LEASE_SECONDS": str(LEASE_SECONDS),
            "PAYGATE_RECONCILE_INTERVAL_SECONDS": str(RECONCILE_SECONDS),
            "PAYGATE_SHUTDOWN_GRACE_SECONDS": "5",
            "PAYGATE_WORKERS": str(workers),
            **self.extra,
        }


async def wait_live(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, "paygate serve exited early"
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with client.get(url + "/health/live") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise AssertionError("paygate serve did not come up")


def start_replica(env: Env, name: str, *, workers: int = 1) -> Replica:
    port = free_port()
    log = env.work / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PAYGATE, "serve"],
            env=env.for_replica(name, port, workers),
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    return Replica(name, f"http://127.0.0.1:{port}", proc, log)


def stop(replica: Replica, timeout: float = 20) -> int | None:
    proc = replica.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@contextlib.asynccontextmanager
async def fake_upstream() -> AsyncIterator[tuple[FakeModelServer, str]]:
    fake = FakeModelServer()
    runner = web.AppRunner(fake.app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield fake, f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def replicas(env: Env, names: list[str], *, workers: int = 1) -> AsyncIterator[list[Replica]]:
    started = [start_replica(env, name, workers=workers) for name in names]
    try:
        await asyncio.gather(*(wait_live(r.url, r.proc) for r in started))
        yield started
    finally:
        for replica in started:
            await asyncio.to_thread(stop, replica)


@contextlib.asynccontextmanager
async def balancer(upstreams: list[Replica], work: Path) -> AsyncIterator[Nginx]:
    nginx = Nginx([r.url.removeprefix("http://") for r in upstreams], work / "nginx")
    await asyncio.to_thread(nginx.start)
    try:
        yield nginx
    finally:
        await asyncio.to_thread(nginx.stop)


async def sign(client: aiohttp.ClientSession, url: str, payer: Any) -> str:
    """A PAYMENT-SIGNATURE for a fresh challenge from ``url`` (SDK-signed)."""
    return await v2_header(SimpleNamespace(client=client, url=url), payer)


async def storm(url: str, header: str, copies: int = 20) -> list[int]:
    """``copies`` concurrent POSTs of one authorization; their statuses."""
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=copies, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:

        async def one() -> int:
            async with client.post(
                url + CHAT, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: header}
            ) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one() for _ in range(copies))))


async def ledger_records(url: str) -> list[PaymentRecord]:
    ledger = await open_ledger(parse_ledger_url(url), read_only=True, replica="test-reader")
    try:
        return await ledger.list(limit=100)
    finally:
        await ledger.close()


async def ledger_history(url: str, payment_id: str) -> list[PaymentEvent]:
    ledger = await open_ledger(parse_ledger_url(url), read_only=True, replica="test-reader")
    try:
        return await ledger.history(payment_id)
    finally:
        await ledger.close()


async def until_records(
    url: str, check: Callable[[list[PaymentRecord]], bool], timeout: float = 30
) -> list[PaymentRecord]:
    async with asyncio.timeout(timeout):
        while True:
            found = await ledger_records(url)
            if check(found):
                return found
            await asyncio.sleep(0.1)
