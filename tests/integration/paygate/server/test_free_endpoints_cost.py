"""The free endpoints cost the appliance a bounded amount of key work, whoever floods them.

``/health/ready`` answers from checks run at most once per interval (shared by every caller);
attestation is limited per client address — the one the trusted-proxy rules give, not the
proxy's — and in all; a nonce is exactly 64 hexadecimal digits. Floods come from 127.0.0.2.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.fixtures.gateway_support import Stack, key_operations, running_stack

FLOOD = "127.0.0.2"
NONCE = "ab" * 32


def _flood_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(FLOOD, 0), limit=50),
        timeout=aiohttp.ClientTimeout(total=30),
    )


async def _ready_flood(stack: Stack, count: int) -> list[int]:
    async with _flood_session() as session:

        async def one() -> int:
            async with session.get(stack.url + "/health/ready") as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(one() for _ in range(count)))


async def test_a_readiness_flood_costs_one_key_check_and_one_probe() -> None:
    async with running_stack(upstream_health_interval=300.0) as stack:
        statuses = await _ready_flood(stack, 300)
        assert statuses == [200] * 300
        # One ECDH on the key and one probe of the (unmonitored) model server for all 300.
        assert await key_operations(stack) == 1
        assert stack.fake.hits["GET /"] == 1
        async with stack.client.get(stack.url + "/health/ready") as response:
            document = await response.json()
        assert document["checks"] == {"key": "ok", "upstream": "ok"}
        assert document["checked_seconds_ago"] >= 0


async def test_readiness_is_checked_again_after_the_interval() -> None:
    async with running_stack(upstream_health_interval=0.2) as stack:
        assert (await stack.client.get(stack.url + "/health/ready")).status == 200
        await asyncio.sleep(0.3)
        assert (await stack.client.get(stack.url + "/health/ready")).status == 200
        assert await key_operations(stack) == 2
        assert stack.fake.hits["GET /"] == 2


async def test_a_monitored_model_server_is_not_probed_by_readiness_callers() -> None:
    async with running_stack(upstream_monitor=True, upstream_health_interval=300.0) as stack:
        probes = dict(stack.fake.hits)
        statuses = await _ready_flood(stack, 100)
        assert statuses == [200] * 100
        assert stack.fake.hits == probes  # the monitor's state answered
        assert await key_operations(stack) == 1


async def test_readiness_reports_a_down_server_from_the_shared_check() -> None:
    async with running_stack(
        upstream_url="http://127.0.0.1:9", ready_probe_timeout=1.0, upstream_health_interval=300.0
    ) as stack:
        statuses = await _ready_flood(stack, 20)
        assert statuses == [503] * 20
        async with stack.client.get(stack.url + "/health/ready") as response:
            assert (await response.json())["checks"]["upstream"] == "unreachable"


# --- attestation ------------------------------------------------------------------------------


async def _attest(stack: Stack, nonce: str = NONCE, **headers: str) -> aiohttp.ClientResponse:
    async with stack.client.get(
        stack.url + "/v1/attestation", params={"nonce": nonce}, headers=headers
    ) as response:
        await response.read()
        return response


async def test_attestation_limits_the_forwarded_client_not_the_proxy() -> None:
    # The gateway behind a trusted proxy on 127.0.0.1: every request comes from its address.
    async with running_stack(trusted_proxies=["127.0.0.1"], attestation_rate_per_minute=8) as stack:
        first = "198.51.100.1"
        statuses = [(await _attest(stack, **{"X-Forwarded-For": first})).status for _ in range(3)]
        assert statuses == [200, 200, 429]  # the burst is a quarter minute: 2
        other = await _attest(stack, **{"X-Forwarded-For": "198.51.100.2"})
        assert other.status == 200  # another client is not refused for the first one
        # A spoofed chain: the rightmost untrusted hop is the client, as in admission.
        spoofed = await _attest(stack, **{"X-Forwarded-For": f"198.51.100.9, {first}"})
        assert spoofed.status == 429


async def test_without_trusted_proxies_a_forwarded_header_does_not_pick_the_key() -> None:
    async with running_stack(attestation_rate_per_minute=8) as stack:
        statuses = [
            (await _attest(stack, **{"X-Forwarded-For": f"198.51.100.{i}"})).status
            for i in range(3)
        ]
        assert statuses == [200, 200, 429]


async def test_attestation_is_bounded_in_all_whatever_the_addresses() -> None:
    async with running_stack(
        trusted_proxies=["127.0.0.1"],
        attestation_rate_per_minute=1000,
        attestation_global_rate_per_minute=8,
    ) as stack:
        responses = [
            await _attest(stack, **{"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(6)
        ]
        assert [r.status for r in responses] == [200, 200, 503, 503, 503, 503]
        assert responses[-1].headers["X-Paygate-Error"] == "attestation_busy"
        assert "Retry-After" in responses[-1].headers


@pytest.mark.parametrize(
    "nonce",
    [
        "ab" * 22 + " " * 20,  # 64 characters that bytes.fromhex reads as 22 bytes
        "ab " * 21 + "a",
        "\tab" + "ab" * 30 + "a",
        "ab" * 31,
        "ab" * 33,
        "ab" * 31 + "zz",
        "+" + "a" * 63,
        "ab" * 31 + "a\n",
    ],
)
async def test_a_nonce_is_exactly_64_hex_digits(nonce: str) -> None:
    async with running_stack() as stack:
        response = await _attest(stack, nonce)
        assert response.status == 400
        assert response.headers["X-Paygate-Error"] == "invalid_nonce"


async def test_a_nonce_in_either_case_is_taken() -> None:
    async with running_stack() as stack:
        for nonce in ("AB" * 32, "0123456789abcdef" * 4):
            response = await _attest(stack, nonce)
            assert response.status == 200
