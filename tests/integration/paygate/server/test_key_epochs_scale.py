"""Per-replica keys: three `paygate serve` replicas, each with its own swtpm (EK certificates
under the test CA) and its own key epochs made in that TPM, behind nginx routing sticky by key
(docs/SCALING.md). Sealed requests succeed through any replica; no replica holds another's key
and no private key material exists outside its TPM; a replica's death loses only its epochs:
its clients get 421 wrong_replica from a sibling, re-attest once and go on, the others are
untouched. Every process is stopped by its own PID; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from paygate_dev.services import Nginx
from paygate_dev.stack import Swtpm

from enclave.keys.tpm import TpmKey
from enclave.keys.tpm_epochs import STATE_FILE
from paygate import release, wire
from paygate.client import AttestationPolicy, PaygateTransport
from tests.fixtures.components import free_port
from tests.fixtures.payment_support import CHAT, CHAT_BODY
from tests.fixtures.scale_support import Replica, fake_upstream, stop
from tests.fixtures.serve_support import PAYGATE, wait_live
from tests.fixtures.swtpm import EkCa

NAMES = ["r1", "r2", "r3"]
LONG_LIVED = {f"{n}.{e}" for n in ("ecdh", "ak", "receipt", "log") for e in ("pub", "priv")}


def _start(name: str, tpm: Swtpm, work: Path, upstream: str) -> Replica:
    key_dir = work / name / "tpm-key"
    TpmKey.generate(tpm.tcti, key_dir).close()  # the long-lived keys (AK, log) in its own TPM
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        "PAYGATE_KEY_BACKEND": "tpm",
        "PAYGATE_TPM_TCTI": tpm.tcti,
        "PAYGATE_TPM_KEY_DIR": str(key_dir),
        "PAYGATE_ATTESTATION": "tpm",
        "PAYGATE_KEY_EPOCH": "1h",
        "PAYGATE_KEY_EPOCH_GRACE": "5m",
        "PAYGATE_KEY_EPOCH_DIR": str(work / name / "epochs"),
        "PAYGATE_LISTEN": f"127.0.0.1:{port}",
        "PAYGATE_UPSTREAM_URL": upstream,
        "PAYGATE_UPSTREAM_MONITOR": "false",
        "PAYGATE_PAYMENT_MODE": "off",
        "PAYGATE_REQUIRE_ENCRYPTION": "true",
        "PAYGATE_LEDGER_PATH": str(work / name / "ledger.db"),
        "PAYGATE_REPLICA_ID": name,
        "PAYGATE_ATTESTATION_RATE_PER_MINUTE": "100000",
        "PAYGATE_ATTESTATION_GLOBAL_RATE_PER_MINUTE": "100000",
        "PAYGATE_SHUTDOWN_GRACE_SECONDS": "2",
    }
    log = work / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([PAYGATE, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=out)
    return Replica(name, f"http://127.0.0.1:{port}", proc, log)


@pytest.fixture
def tpms(ek_swtpm_factory: Callable[[EkCa], Swtpm], ek_ca: EkCa) -> list[Swtpm]:
    return [ek_swtpm_factory(ek_ca) for _ in NAMES]


@contextlib.asynccontextmanager
async def cluster(tpms: list[Swtpm], work: Path) -> AsyncIterator[tuple[list[Replica], Nginx]]:
    async with fake_upstream() as (_, fake_url):
        started = [_start(n, t, work, fake_url) for n, t in zip(NAMES, tpms, strict=True)]
        nginx: Nginx | None = None
        try:
            await asyncio.gather(*(wait_live(r.url, r.proc, timeout=60) for r in started))
            sticky = {r.name: r.url.removeprefix("http://") for r in started}
            nginx = await asyncio.to_thread(Nginx([], work / "nginx", sticky=sticky).start)
            yield started, nginx
        finally:
            if nginx is not None:
                await asyncio.to_thread(nginx.stop)
            for replica in started:
                await asyncio.to_thread(stop, replica)


def _policy(ek_ca: EkCa) -> AttestationPolicy:
    return AttestationPolicy.from_files(ek_ca.chain_pem, code_digests={release.code_digest()})


def _client(url: str, ek_ca: EkCa) -> tuple[PaygateTransport, httpx.Client]:
    transport = PaygateTransport(envelope="v2", attestation=_policy(ek_ca))
    return transport, httpx.Client(transport=transport, base_url=url, timeout=30)


def _replica_of(transport: PaygateTransport, url: str) -> str:
    key = transport.key(url)
    assert key is not None
    assert key.key_id is not None
    return key.key_id.partition("@")[2]


async def test_three_replicas_each_with_its_own_tpm_keys_behind_sticky_nginx(
    tpms: list[Swtpm], ek_ca: EkCa, tmp_path: Path
) -> None:
    async with cluster(tpms, tmp_path) as (replicas, nginx):
        # The clients are synchronous (as an application would be): they run in a thread, so
        # this loop keeps serving the FAKE model server.
        await asyncio.to_thread(_scenario, replicas, nginx, ek_ca, tmp_path)


def _scenario(replicas: list[Replica], nginx: Nginx, ek_ca: EkCa, tmp_path: Path) -> None:
    # Each replica's key document: its own keys, never another's.
    documents = {r.name: httpx.get(r.url + wire.PUBKEY_PATH, timeout=10).json() for r in replicas}
    assert {d["replica"] for d in documents.values()} == set(NAMES)
    assert len({d["pubkey"] for d in documents.values()}) == 3
    assert all(d["key_id"].endswith("@" + n) for n, d in documents.items())

    # Clients attest whichever replica answers first, then stick to it by key id.
    clients = [_client(nginx.url, ek_ca) for _ in range(6)]
    owners = []
    for transport, client in clients:
        for _ in range(3):
            reply = client.post(CHAT, json=CHAT_BODY)
            assert reply.status_code == 200, reply.text
        owners.append(_replica_of(transport, nginx.url))
    assert len(set(owners)) >= 2, owners  # spread over the replicas: any one serves
    # Every sealed request reached the replica whose key it named (nginx's own log).
    access = (nginx.dir / "access.log").read_text().splitlines()
    upstream_of = {r.name: r.url.removeprefix("http://") for r in replicas}
    keyed = [f for f in (line.split() for line in access) if len(f) == 3 and f[2] != "-"]
    assert len(keyed) >= 6 * 3
    for status, upstream, key_id in keyed:
        assert upstream == upstream_of[key_id.partition("@")[2]], (status, upstream, key_id)

    # No private key material outside a TPM: each key directory holds the long-lived keys'
    # wrapped blobs (useless outside that TPM) and a list of persistent handles, no more.
    for replica in replicas:
        key_dir = tmp_path / replica.name / "tpm-key"
        names = {p.name for p in key_dir.iterdir()}
        assert names <= LONG_LIVED | {STATE_FILE, "app-pcr.lock"}, names
        state = json.loads((key_dir / STATE_FILE).read_text())
        assert set(state) == {"handles"}
        assert len(state["handles"]) == 2  # one live epoch: its sealing and receipt keys

    # A replica dies: only its epochs are lost. Its clients re-attest once, elsewhere.
    victim = next(r for r in replicas if r.name == owners[0])
    victim.proc.kill()
    victim.proc.wait(10)
    for (transport, client), owner in zip(clients, owners, strict=True):
        before = transport.attested(nginx.url)
        reply = client.post(CHAT, json=CHAT_BODY)
        assert reply.status_code == 200, reply.text
        after_owner = _replica_of(transport, nginx.url)
        if owner == victim.name:
            assert after_owner != victim.name
            assert transport.attested(nginx.url) is not before  # attested again
        else:
            assert after_owner == owner
            assert transport.attested(nginx.url) is before  # untouched
    for _, client in clients:
        client.close()
    # The dead replica's clients met a sibling's 421 wrong_replica (nginx's backup).
    after = (nginx.dir / "access.log").read_text().splitlines()[len(access) :]
    assert any(line.startswith("421 ") for line in after), after
