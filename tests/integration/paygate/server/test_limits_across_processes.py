"""Replicas x limits, on real `paygate serve` processes (anvil + the SDK facilitator, the FAKE
model server counting what it serves):

- one client address rotating fresh wallets gets its daily free allowance once, not once per
  process: across the two workers of `paygate serve --workers 2` (SQLite ledger), and across two
  gateways on one PostgreSQL ledger, racing ones included;
- behind a trusted proxy, IPv6 addresses of one /64 are one client, and an IPv4-mapped IPv6
  address is its IPv4 address, whichever gateway they reach;
- with `--workers 2` each worker enforces its share of a `per_ip` rate limit, so the two
  together admit the configured burst, not twice it.

Which worker answers is made certain by stopping the other one (SIGSTOP, by its PID: the kernel
then hands every new connection to the one left running), and resuming it after. The
reconcilers run every minute here, not every half second: a worker stopped inside one of their
SQLite transactions would hold the write lock the other needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
from paygate_dev.chain.accounts import new_account
from x402.extensions.sign_in_with_x import create_siwx_payload, encode_siwx_header

from paygate import wire
from tests.fixtures.payment_support import CHAT, CHAT_BODY, challenge_of
from tests.fixtures.scale_support import COMPLETIONS, Env, fake_upstream, replicas
from tests.fixtures.serve_support import make_key

PUBLIC = "http://gate.test"  # what sign-ins are for (public_url), whatever port is reached
QUIET = {"PAYGATE_RECONCILE_INTERVAL_SECONDS": "60"}  # (module docs)


def free_env(per_address: int, **extra: str) -> dict[str, str]:
    return {
        "PAYGATE_PUBLIC_URL": PUBLIC,
        "PAYGATE_FREE_REQUESTS_PER_DAY": "5",
        "PAYGATE_FREE_REQUESTS_PER_ADDRESS_PER_DAY": str(per_address),
        **QUIET,
        **extra,
    }


async def free_request(url: str, forwarded_for: str | None = None) -> tuple[int, str | None]:
    """A fresh wallet's signed-in request to ``url`` on a connection of its own; (status,
    error code)."""
    extra = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        declared = (await challenge_of(SimpleNamespace(client=client, url=url)))["extensions"][
            "sign-in-with-x"
        ]
        info = {**declared["info"], **declared["supportedChains"][0]}
        proof = await create_siwx_payload(info, new_account(), PUBLIC + CHAT)
        headers = {wire.SIGN_IN_WITH_X: encode_siwx_header(proof), **extra}
        async with client.post(url + CHAT, json=CHAT_BODY, headers=headers) as response:
            await response.read()
            return response.status, response.headers.get(wire.ERROR_HEADER)


@contextlib.contextmanager
def only(running: int, workers: list[int]) -> Iterator[None]:
    """Every worker but ``running`` stopped for the block (resumed after, whatever happens)."""
    stopped = [pid for pid in workers if pid != running]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def served(answers: list[tuple[int, str | None]]) -> int:
    assert {a for a in answers if a[0] != 200} <= {(402, "free_quota_exhausted")}, answers
    return sum(status == 200 for status, _ in answers)


async def test_one_address_gets_its_free_allowance_once_across_two_workers(
    facilitator, seller, tmp_path
):
    ledger = f"sqlite:///{tmp_path / 'ledger' / 'payments.db'}"
    async with fake_upstream() as (fake, upstream):
        env = Env(
            make_key(tmp_path / "key.pem"),
            ledger,
            seller,
            facilitator.url,
            upstream,
            tmp_path,
            free_env(3),
        )
        async with replicas(env, ["w"], workers=2) as (parent,):
            first, second = sorted(parent.children())
            with only(first, [first, second]):
                on_first = [await free_request(parent.url) for _ in range(2)]
            with only(second, [first, second]):
                on_second = [await free_request(parent.url) for _ in range(4)]
            with only(first, [first, second]):
                again = [await free_request(parent.url) for _ in range(2)]
    # Each worker alone would have given 3; the host gives 3.
    assert (served(on_first), served(on_second), served(again)) == (2, 1, 0)
    assert fake.completed[COMPLETIONS] == 3


async def test_two_gateways_on_one_postgresql_ledger_share_one_address_s_allowance(
    facilitator, seller, tmp_path, pg_url
):
    async with fake_upstream() as (fake, upstream):
        env = Env(
            make_key(tmp_path / "key.pem"),
            pg_url,
            seller,
            facilitator.url,
            upstream,
            tmp_path,
            free_env(3, PAYGATE_TRUSTED_PROXIES="127.0.0.1"),
        )
        async with replicas(env, ["r1", "r2"]) as (one, two):
            # In turn: 3 in all, not 3 each.
            rotating = [await free_request(r.url) for r in (one, two) * 3]
            # A race: ten fresh wallets at once, five at each gateway, from one client.
            racing = await asyncio.gather(
                *(free_request(r.url, "198.51.100.7") for r in (one, two) * 5)
            )
            # One /64: four addresses, two at each gateway; its neighbour /64 is another client.
            in_one_64 = [
                await free_request(r.url, f"2001:db8:1:2::{n:x}")
                for n, r in enumerate((one, two) * 2, start=1)
            ]
            in_one_64.append(await free_request(two.url, "2001:db8:1:2:ffff:ffff:ffff:ffff"))
            neighbour = await free_request(one.url, "2001:db8:1:3::1")
            # An IPv4-mapped IPv6 address is its IPv4 address: 203.0.113.9 spends it.
            mapped = [
                await free_request(r.url, a)
                for r, a in (
                    (one, "203.0.113.9"),
                    (two, "::ffff:203.0.113.9"),
                    (one, "::ffff:cb00:7109"),
                    (two, "203.0.113.9"),
                )
            ]
    assert [status for status, _ in rotating] == [200, 200, 200, 402, 402, 402]
    assert served(rotating) == 3
    assert served(racing) == 3
    assert served(in_one_64) == 3
    assert neighbour == (200, None)
    assert served(mapped) == 3
    assert fake.completed[COMPLETIONS] == 3 + 3 + 3 + 1 + 3


async def test_two_workers_together_keep_to_the_configured_per_ip_burst(
    facilitator, seller, tmp_path
):
    # 1 a minute: nothing comes back during the test; a burst of 4 for the host, 2 a worker.
    limits = json.dumps({"*": {"per_ip": 1, "burst": 4}})
    async with fake_upstream() as (_, upstream):
        env = Env(
            make_key(tmp_path / "key.pem"),
            f"sqlite:///{tmp_path / 'ledger' / 'payments.db'}",
            seller,
            facilitator.url,
            upstream,
            tmp_path,
            {"PAYGATE_RATE_LIMITS": limits, **QUIET},
        )
        async with replicas(env, ["w"], workers=2) as (parent,):
            workers = sorted(parent.children())
            statuses = []
            for pid in (*workers, *workers):
                with only(pid, workers):
                    statuses.append([await unpaid(parent.url) for _ in range(3)])
            log = Path(parent.log).read_text(errors="replace")
    # Unpaid challenges count: 402 while a token is left, then 429.
    assert statuses == [[402, 402, 429], [402, 402, 429], [429] * 3, [429] * 3]
    assert "burst below workers" not in log


async def unpaid(url: str) -> int:
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as client,
        client.post(url + CHAT, json=CHAT_BODY) as response,
    ):
        await response.read()
        return response.status
