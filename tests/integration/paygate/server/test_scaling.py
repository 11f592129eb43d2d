"""Scale-out on real components: `paygate serve` replicas (3 processes behind nginx, or one
process with 2 workers) sharing one ledger (PostgreSQL 15, or SQLite for workers on one host),
anvil + the SDK facilitator, and the FAKE model server counting upstream hits.

- a storm of 20 concurrent copies of one authorization is served once, settled once, and
  reaches the upstream once;
- a replica SIGKILLed while holding a settlement: another settles it, once, after the lease ran
  out, and the ledger's history says who did what;
- a replica SIGSTOPped past its lease and resumed does not settle a second time (fencing);
- the parent of `--workers` restarts a killed worker on the same listening socket.

Leases are 3 s and the reconciler runs every 0.5 s here; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from paygate import wire
from paygate.x402.ledger import EventAction, PaymentState
from tests.fixtures.components import free_port
from tests.fixtures.payment_support import CHAT, CHAT_BODY, PRICE_ATOMIC
from tests.fixtures.scale_support import (
    COMPLETIONS,
    LEASE_SECONDS,
    RECONCILE_SECONDS,
    Env,
    Replica,
    balancer,
    fake_upstream,
    ledger_history,
    ledger_records,
    replicas,
    sign,
    stop,
    storm,
    until_records,
)
from tests.fixtures.serve_support import PAYGATE, make_key, wait_live

S = PaymentState
PAYER_FUNDS = 100_000_000


def settled(found: list) -> bool:
    return [r.state for r in found] == [S.SETTLED]


def check_storm(statuses: list[int]) -> None:
    assert statuses.count(200) == 1, statuses
    # The others were told the authorization is in use (409) or already used (402).
    assert set(statuses) <= {200, 402, 409}, statuses


async def test_three_replicas_behind_nginx_serve_and_settle_one_authorization_once(
    facilitator, usdc, payer, seller, tmp_path, pg_url
):
    async with fake_upstream() as (fake, upstream):
        env = Env(
            make_key(tmp_path / "key.pem"), pg_url, seller, facilitator.url, upstream, tmp_path
        )
        async with replicas(env, ["r1", "r2", "r3"]) as group, balancer(group, tmp_path) as lb:
            async with aiohttp.ClientSession() as client:
                header = await sign(client, lb.url, payer)
            statuses = await storm(lb.url, header, copies=20)
            check_storm(statuses)
            found = await until_records(pg_url, settled)
            # nginx spread the copies over every replica.
            access = (tmp_path / "nginx" / "access.log").read_text()
            assert {r.url.removeprefix("http://") for r in group} <= set(access.split())
    assert fake.completed[COMPLETIONS] == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - PRICE_ATOMIC
    assert facilitator.stats.calls("settle") == 1
    (record,) = found
    assert record.served
    assert record.owner is None


async def _held_settlement(env: Env, group, lb, facilitator, payer, pg_url):
    """A paid request through nginx whose settle call the facilitator holds; returns the
    SETTLING record and the replica that holds it."""
    facilitator.set_fault("hold_settle")
    async with aiohttp.ClientSession() as client:
        header = await sign(client, lb.url, payer)
    request = asyncio.ensure_future(storm(lb.url, header, copies=1))
    (record,) = await until_records(pg_url, lambda f: [r.state for r in f] == [S.SETTLING])
    holder = next(r for r in group if r.name == record.owner)
    return record, holder, request


async def test_a_killed_replica_s_settlement_is_finished_once_by_another_after_its_lease(
    facilitator, usdc, payer, seller, tmp_path, pg_url
):
    async with fake_upstream() as (fake, upstream):
        env = Env(
            make_key(tmp_path / "key.pem"), pg_url, seller, facilitator.url, upstream, tmp_path
        )
        async with replicas(env, ["r1", "r2", "r3"]) as group, balancer(group, tmp_path) as lb:
            record, holder, request = await _held_settlement(
                env, group, lb, facilitator, payer, pg_url
            )
            assert fake.completed[COMPLETIONS] == 1  # served, not yet settled
            holder.proc.send_signal(signal.SIGKILL)  # by its own PID
            await asyncio.to_thread(holder.proc.wait, 10)
            killed_at = asyncio.get_running_loop().time()
            facilitator.reset()  # the held settle is dropped, never executed
            assert await request == [502]  # nginx: its replica died mid-request
            (done,) = await until_records(pg_url, settled)
            waited = asyncio.get_running_loop().time() - killed_at
        history = await ledger_history(pg_url, record.id)
    # Not before the lease ran out: renewed every third of it until the kill.
    assert waited >= 2 * LEASE_SECONDS / 3 - 0.2
    claims = [e for e in history if e.action is EventAction.CLAIMED]
    assert len(claims) == 1
    (claim,) = claims
    assert claim.detail == holder.name
    assert claim.replica != holder.name
    assert claim.lease == record.lease + 1
    final = history[-1]
    assert (final.action, final.state, final.replica) == (
        EventAction.MOVED,
        S.SETTLED,
        claim.replica,
    )
    assert {e.replica for e in history[: history.index(claim)]} == {holder.name}
    assert done.transaction is not None
    assert usdc.balance_of(seller) == PRICE_ATOMIC  # exactly once
    assert facilitator.stats.calls("settle") == 1  # counted since the reset: only the finisher


async def test_a_replica_stopped_past_its_lease_does_not_settle_again_when_resumed(
    facilitator, usdc, payer, seller, tmp_path, pg_url
):
    async with fake_upstream() as (_, upstream):
        env = Env(
            make_key(tmp_path / "key.pem"), pg_url, seller, facilitator.url, upstream, tmp_path
        )
        async with replicas(env, ["r1", "r2", "r3"]) as group, balancer(group, tmp_path) as lb:
            record, holder, request = await _held_settlement(
                env, group, lb, facilitator, payer, pg_url
            )
            os.kill(holder.pid, signal.SIGSTOP)
            try:
                facilitator.reset()  # its settle call is dropped while it sleeps
                (done,) = await until_records(pg_url, settled)
                settles = facilitator.stats.calls("settle")
            finally:
                os.kill(holder.pid, signal.SIGCONT)
            # Resumed: its settle call fails, its fenced "pending" is refused, its lease keeper
            # and reconciler find nothing of theirs. Give it a few lease periods to misbehave.
            await asyncio.sleep(2 * LEASE_SECONDS + 4 * RECONCILE_SECONDS)
            assert holder.proc.poll() is None  # alive and well
            request.cancel()
            after = await ledger_records(pg_url)
            history = await ledger_history(pg_url, record.id)
            log = holder.log.read_text(errors="replace")
    assert after == [done]
    assert facilitator.stats.calls("settle") == settles == 1
    claim = next(e for e in history if e.action is EventAction.CLAIMED)
    assert claim.replica != holder.name
    assert all(e.replica != holder.name for e in history[history.index(claim) :])
    assert "lease lost" in log
    assert usdc.balance_of(seller) == PRICE_ATOMIC


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_two_workers_on_one_port_serve_and_settle_one_authorization_once(
    facilitator, usdc, payer, seller, tmp_path, store, request
):
    url = (
        f"sqlite:///{tmp_path / 'ledger' / 'payments.db'}"
        if store == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    async with fake_upstream() as (fake, upstream):
        env = Env(make_key(tmp_path / "key.pem"), url, seller, facilitator.url, upstream, tmp_path)
        async with replicas(env, ["w"], workers=2) as (parent,):
            workers = parent.children()
            assert len(workers) == 2
            async with aiohttp.ClientSession() as client:
                header = await sign(client, parent.url, payer)
            check_storm(await storm(parent.url, header, copies=20))
            await until_records(url, settled)
            code = await asyncio.to_thread(stop, parent)
        assert code == 0  # SIGTERM to the parent stops every worker gracefully
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    assert fake.completed[COMPLETIONS] == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    assert facilitator.stats.calls("settle") == 1


def _nonce(header: str) -> str:
    return str(json.loads(base64.b64decode(header))["payload"]["authorization"]["nonce"]).lower()


async def test_two_workers_on_one_sqlite_file_lose_no_answered_payment_when_one_is_killed(
    facilitator, anvil, usdc, payer, seller, tmp_path
):
    """Two workers writing one SQLite file (each runs its statements on its event loop and
    hands a call to its ledger thread when the other holds the write lock), 24 payments at
    once, one worker SIGKILLed mid-load: every payment answered 200 is in the ledger, served,
    and settles exactly once; nothing is left unfinished (a settlement the kill cut short is
    proven on chain by whoever finishes it: with no chain to read it would await review)."""
    url = f"sqlite:///{tmp_path / 'ledger' / 'payments.db'}"
    async with fake_upstream() as (_, upstream):
        env = Env(make_key(tmp_path / "key.pem"), url, seller, facilitator.url, upstream, tmp_path)
        env.extra["PAYGATE_CHAIN_RPC_URL"] = anvil.rpc_url
        async with replicas(env, ["w"], workers=2) as (parent,):
            workers = parent.children()
            assert len(workers) == 2
            async with aiohttp.ClientSession() as client:
                headers = [await sign(client, parent.url, payer) for _ in range(24)]
            timeout = aiohttp.ClientTimeout(total=60)
            connector = aiohttp.TCPConnector(limit=24, force_close=True)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:

                async def pay(header: str) -> int | None:
                    try:
                        async with client.post(
                            parent.url + CHAT,
                            json=CHAT_BODY,
                            headers={wire.PAYMENT_SIGNATURE: header},
                        ) as response:
                            await response.read()
                            return response.status
                    except aiohttp.ClientError:  # its worker was killed under it
                        return None

                paying = [asyncio.create_task(pay(h)) for h in headers]
                async with asyncio.timeout(60):  # a few answered, the rest still in flight
                    while sum(t.done() and t.result() == 200 for t in paying) < 4:
                        await asyncio.sleep(0.005)
                os.kill(workers[0], signal.SIGKILL)  # by its own PID
                statuses = await asyncio.gather(*paying)
            ended = (S.SETTLED, S.RELEASED, S.FAILED)
            try:
                found = await until_records(
                    url, lambda f: all(r.state in ended for r in f), timeout=60
                )
            except TimeoutError:
                left = [(r.state, r.served, r.owner, r.error) for r in await ledger_records(url)]
                raise AssertionError(f"left unfinished: {left}") from None
    answered = {_nonce(h) for h, status in zip(headers, statuses, strict=True) if status == 200}
    assert answered, statuses
    by_nonce = {r.nonce.lower(): r for r in found}
    assert len(by_nonce) == len(found)  # one record per authorization
    for nonce in answered:
        assert by_nonce[nonce].served
        assert by_nonce[nonce].state is S.SETTLED
    settled = [r for r in found if r.state is S.SETTLED]
    assert usdc.balance_of(seller) == PRICE_ATOMIC * len(settled)  # each exactly once
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - PRICE_ATOMIC * len(settled)


async def test_the_parent_restarts_a_killed_worker_on_the_same_port(tmp_path):
    async with fake_upstream() as (fake, upstream):
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
            "PAYGATE_KEY_BACKEND": "software",
            "PAYGATE_KEY_FILE": str(make_key(tmp_path / "key.pem")),
            "PAYGATE_LISTEN": f"127.0.0.1:{port}",
            "PAYGATE_UPSTREAM_URL": upstream,
            "PAYGATE_UPSTREAM_MONITOR": "false",
            "PAYGATE_SHUTDOWN_GRACE_SECONDS": "5",
        }
        proc = subprocess.Popen(
            [PAYGATE, "serve", "--workers", "2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        parent = Replica("w", f"http://127.0.0.1:{port}", proc, tmp_path / "unused.log")
        try:
            await wait_live(parent.url, proc)
            first = parent.children()
            assert len(first) == 2
            os.kill(first[0], signal.SIGKILL)
            async with asyncio.timeout(20):
                while len(now := parent.children()) != 2 or first[0] in now:
                    await asyncio.sleep(0.1)
            assert first[1] in now  # the other worker was left alone
            async with aiohttp.ClientSession() as client:
                for _ in range(6):  # every answer, whichever worker accepted it
                    async with client.post(
                        parent.url + "/v1/chat/completions",
                        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                    ) as response:
                        assert response.status == 200
        finally:
            code = await asyncio.to_thread(stop, parent)
    assert code == 0
    assert fake.completed[COMPLETIONS] == 6
