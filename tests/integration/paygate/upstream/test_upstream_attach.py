"""Attach mode against real listeners: health monitor, circuit breaker, injected API key."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web
from paygate_dev.fake_model import FakeModelServer
from paygate_dev.stack import free_port

from paygate.config import ConfigError, load_settings
from paygate.upstream.readiness import probe
from tests.fixtures.gateway_support import running_stack

KEY = "sk-test-0123456789abcdef"
CHAT = {"model": "fake-llama", "messages": [{"role": "user", "content": "hi"}]}


async def _serve_fake(fake: FakeModelServer, port: int) -> web.AppRunner:
    runner = web.AppRunner(fake.app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_breaker_answers_503_at_once_while_down_and_probes_the_server_back() -> None:
    port = free_port()
    fake = FakeModelServer()
    runner = await _serve_fake(fake, port)
    overrides = {
        "upstream_monitor": True,
        "upstream_health_interval": 0.2,
        "upstream_failure_threshold": 2,
        "retry_after_seconds": 3,
    }
    async with running_stack(upstream_url=f"http://127.0.0.1:{port}", **overrides) as s:
        assert (await s.client.post(s.url + "/v1/chat/completions", json=CHAT)).status == 200
        await runner.cleanup()  # the model server goes away
        async with asyncio.timeout(10):
            while True:
                resp = await s.client.post(s.url + "/v1/chat/completions", json=CHAT)
                if resp.status == 503:
                    break
                assert resp.status == 502  # refused connections until the breaker opens
                await asyncio.sleep(0.05)
        assert resp.headers["Retry-After"] == "3"
        assert resp.headers["X-Paygate-Error"] == "upstream_down"
        assert (await resp.json())["error"]["code"] == "upstream_down"
        ready = await s.client.get(s.url + "/health/ready")
        body = await ready.json()
        assert ready.status == 503
        assert body["upstream"]["state"] == "down"
        assert body["upstream"]["breaker"]["state"] == "open"
        assert body["upstream"]["kind"] == "ollama"

        runner = await _serve_fake(fake, port)  # back on the same port
        try:
            async with asyncio.timeout(10):
                while (await s.client.get(s.url + "/health/ready")).status != 200:
                    await asyncio.sleep(0.05)
            resp = await s.client.post(s.url + "/v1/chat/completions", json=CHAT)
            assert resp.status == 200
            assert fake.hits["GET /api/version"] >= 2  # the monitor's probes
        finally:
            await runner.cleanup()


async def test_an_attached_server_down_at_start_is_reported_and_refused_fast() -> None:
    port = free_port()
    overrides = {"upstream_monitor": True, "upstream_health_interval": 0.2}
    async with running_stack(upstream_url=f"http://127.0.0.1:{port}", **overrides) as s:
        body = await (await s.client.get(s.url + "/health/ready")).json()
        assert body["upstream"]["state"] == "down"
        async with asyncio.timeout(10):
            while (await s.client.post(s.url + "/api/chat", json=CHAT)).status != 503:
                await asyncio.sleep(0.05)


async def test_the_api_key_is_injected_and_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    remote = FakeModelServer(api_key=KEY)  # like a remote OpenAI-compatible service
    overrides = {
        "upstream_monitor": True,
        "upstream_kind": "openai",
        "upstream_api_key": KEY,
        "upstream_health_interval": 0.2,
    }
    async with running_stack(fake=remote, **overrides) as s:
        resp = await s.client.post(
            s.url + "/v1/chat/completions",
            json=CHAT,
            headers={"Authorization": "Bearer caller-token"},
        )
        assert resp.status == 200
        seen = [r.headers.get("Authorization") for r in remote.received]
        assert set(seen) == {f"Bearer {KEY}"}  # probes and the request; never the caller's
        assert remote.hits["GET /v1/models"] >= 1  # the openai kind's health route
        shown = ""
        for path in ("/health", "/health/ready", "/metrics", "/v1/enclave/pubkey"):
            shown += await (await s.client.get(s.url + path)).text()
        shown += resp.headers.get("Authorization", "") + await resp.text()
        assert KEY not in shown
        assert KEY not in repr(s.settings)
        assert KEY not in caplog.text


async def test_a_wrong_api_key_is_not_ready() -> None:
    remote = FakeModelServer(api_key=KEY)
    overrides = {"upstream_monitor": True, "upstream_kind": "openai", "upstream_api_key": "wrong"}
    async with running_stack(fake=remote, **overrides) as s:
        ready = await s.client.get(s.url + "/health/ready")
        assert ready.status == 503
        assert (await ready.json())["upstream"]["last_probe"] == "http 401"


def test_an_api_key_over_plain_http_to_another_host_is_refused() -> None:
    with pytest.raises(ConfigError, match="upstream_api_key needs an https://") as refused:
        load_settings(None, upstream_url="http://models.example:8000", upstream_api_key=KEY)
    assert KEY not in str(refused.value)
    assert load_settings(None, upstream_url="https://models.example", upstream_api_key=KEY).secret(
        "upstream_api_key"
    )


async def test_unreachable_probe_reports_refused() -> None:
    async with aiohttp.ClientSession() as session:
        result = await probe(session, f"http://127.0.0.1:{free_port()}/", timeout=2)
    assert (result.ok, result.reachable, result.detail) == (False, False, "connection refused")
