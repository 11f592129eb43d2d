"""One transparency log shared by replicas on PostgreSQL 15.

- three stores (three pools, as three replicas have) appending at once: the entries are 0..N-1,
  each exactly once, and every checkpoint's root is RFC 6962's over the entries before it;
- three real `paygate serve` replicas starting at once (their release and key-epoch appends
  race), then serving sealed requests: a receipt from any replica is proven included by
  `paygate receipts audit` through any other.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg

from enclave import SoftwareKey
from enclave.tlog import entries, merkle
from paygate.client import AsyncPaygateTransport, AttestationPolicy
from paygate.client.tlog import LogPolicy, LogState
from paygate.tlog.open_store import open_log_store
from paygate.tlog.service import LogConfig, TransparencyLog, log_identity
from paygate.x402.ledger_store import parse_ledger_url
from tests.fixtures.scale_support import Env, fake_upstream, replicas
from tests.fixtures.serve_support import make_key

ORIGIN = "replicas.test/v1/log"
ROOT = Path(__file__).resolve().parents[4]
CHAT = {"model": "fake-llama", "messages": [{"role": "user", "content": "hi"}]}


def naive_mth(data: list[bytes]) -> bytes:
    if not data:
        return hashlib.sha256(b"").digest()
    if len(data) == 1:
        return merkle.leaf_hash(data[0])
    k = 1
    while k * 2 < len(data):
        k *= 2
    return merkle.node_hash(naive_mth(data[:k]), naive_mth(data[k:]))


async def stored(pg_url: str) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        rows = await (
            await conn.execute("SELECT idx, data FROM tlog_entries ORDER BY idx")
        ).fetchall()
        cps = await (
            await conn.execute("SELECT size, root FROM tlog_checkpoints ORDER BY size")
        ).fetchall()
    return [(int(i), bytes(d)) for i, d in rows], [(int(s), bytes(r)) for s, r in cps]


async def test_concurrent_appends_from_three_stores_never_gap_or_duplicate(pg_url: str) -> None:
    key = SoftwareKey.generate()
    logs = []
    for name in ("r1", "r2", "r3"):
        store = await open_log_store(parse_ledger_url(pg_url))
        logs.append(TransparencyLog(LogConfig(origin=ORIGIN, replica=name), store, key))
    try:
        await logs[0].start([b"genesis"])

        async def appender(tlog: TransparencyLog, name: str) -> None:
            for round_ in range(15):
                batch = [f"{name}/{round_}/{k}".encode() for k in range(1 + round_ % 3)]
                await tlog.append(batch)

        await asyncio.gather(
            *(appender(t, n) for t, n in zip(logs, ("r1", "r2", "r3"), strict=True))
        )
    finally:
        for tlog in logs:
            await tlog.close()
    rows, checkpoints = await stored(pg_url)
    assert [i for i, _ in rows] == list(range(len(rows)))  # no gap
    data = [d for _, d in rows]
    assert len(set(data)) == len(data) == 1 + 3 * sum(1 + r % 3 for r in range(15))  # none twice
    sizes = [s for s, _ in checkpoints]
    assert sizes == sorted(set(sizes))
    for size, root in checkpoints:
        assert root == naive_mth(data[:size])


def audit(url: str, tokens: list[str], vkey: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "receipts", "audit", url, *tokens,
         "--log-key", vkey],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip


async def test_three_replicas_share_one_log_and_any_receipt_is_proven(
    tmp_path: Path, pg_url: str
) -> None:
    key_file = make_key(tmp_path / "key.pem")
    vkey = log_identity(ORIGIN, SoftwareKey.load_file(key_file)).key
    async with fake_upstream() as (_, upstream):
        env = Env(key_file, pg_url, "0x" + "11" * 20, "http://127.0.0.1:9", upstream, tmp_path)
        env.extra = {
            "PAYGATE_PAYMENT_MODE": "off",
            "PAYGATE_TRANSPARENCY_LOG": "true",
            "PAYGATE_LOG_ORIGIN": ORIGIN,
            "PAYGATE_LOG_RECEIPT_PERIOD": "1",
        }
        async with replicas(env, ["r1", "r2", "r3"]) as group:
            tokens = []
            for replica in group:
                state = LogState(tmp_path / f"client-{replica.name}.json")
                policy = AttestationPolicy(allow_unattested=True, log=LogPolicy(state=state))
                transport = AsyncPaygateTransport(attestation=policy)
                async with httpx.AsyncClient(transport=transport, timeout=30) as client:
                    for _ in range(2):
                        response = await client.post(
                            replica.url + "/v1/chat/completions", json=CHAT
                        )
                        assert response.status_code == 200
                        tokens.append(response.extensions["paygate_receipt"].token)
            async with asyncio.timeout(30):
                while True:
                    result = await asyncio.to_thread(audit, group[0].url, tokens, vkey)
                    assert result.returncode == 0, result.stderr
                    if "6 receipts proven" in result.stdout:
                        break
                    await asyncio.sleep(0.5)
            # Through another replica, the same proofs.
            other = await asyncio.to_thread(audit, group[2].url, tokens, vkey)
            assert "6 receipts proven" in other.stdout, other.stdout
    rows, checkpoints = await stored(pg_url)
    assert [i for i, _ in rows] == list(range(len(rows)))
    kinds = [entries.parse(d)["type"] for _, d in rows]
    assert kinds.count("release") == 3
    assert kinds.count("key-epoch") == 3
    periods = [entries.parse(d) for _, d in rows if entries.parse(d)["type"] == "receipts"]
    assert sum(p["count"] for p in periods) == 6  # every receipt in exactly one period
    for size, root in checkpoints:
        assert root == naive_mth([d for _, d in rows][:size])
