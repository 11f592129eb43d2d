"""Key epochs: what a rotation costs in each backend, and what a stale key costs a client.

- Rotation: ``EpochKeys.rotate`` (generate both keys in the backend; the TPM also certifies them
  with the AK) and retirement (destroy: TPM EvictControl, PKCS#11 C_DestroyObject, memory drop)
  for memory, swtpm and SoftHSM2; and one ECDH open with an epoch key.
- The client side (in-process gateway, software key, evidence kind none): a sealed request
  with a live key, against a request whose key epoch was retired (410 key_epoch_retired, one
  re-fetch and re-attestation, re-sealed, sent again) — what a replica's death or a retired
  epoch costs once per client, and what forwarding would have cost on every request instead.

Prints a table, writes bench/results/key_epochs.json.

    .venv/bin/python -m bench.key_epochs [--rounds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from paygate_dev.stack import Swtpm, init_softhsm_token

import enclave
from enclave.keys.epochs import EpochKeys, MemoryEpochVault

RESULTS = Path(__file__).parent / "results" / "key_epochs.json"
CHAT = "/v1/chat/completions"
BODY = {"model": "fake-llama", "messages": [{"role": "user", "content": "hello"}]}


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 2),
    }


def _backend(name: str, make: Callable[[], EpochKeys], rounds: int) -> dict[str, Any]:
    epochs = make()
    try:
        rotate, destroy, opens = [], [], []
        for _ in range(rounds):
            started = time.perf_counter()
            epochs.rotate()
            rotate.append(time.perf_counter() - started)
            old = epochs.live()[-1]
            started = time.perf_counter()
            # the previous epoch retired now (what the loop does after the grace period)
            epochs._retire(old)
            destroy.append(time.perf_counter() - started)
            epochs._live = epochs._live[:1]
            current = epochs.current
            assert current.key is not None
            blob = enclave.seal_v2(current.sealing_key, b"{}", method="POST", path=CHAT).blob
            started = time.perf_counter()
            enclave.open_v2(current.key, blob, method="POST", path=CHAT)
            opens.append(time.perf_counter() - started)
        return {
            "backend": name,
            "rotate": _ms(rotate),
            "destroy": _ms(destroy),
            "open": _ms(opens),
        }
    finally:
        epochs.close()


def backends(rounds: int, work: Path) -> list[dict[str, Any]]:
    out = [
        _backend(
            "memory",
            lambda: EpochKeys(
                MemoryEpochVault("software"), replica="b", epoch_seconds=3600, grace_seconds=60
            ),
            rounds,
        )
    ]
    from enclave.keys.tpm import TpmKey
    from enclave.keys.tpm_epochs import TpmEpochVault

    tpm = Swtpm(binary=shutil.which("swtpm") or "swtpm", state_dir=work / "swtpm")
    tpm.start()
    try:
        base = TpmKey.generate(tpm.tcti, work / "tpm-key")
        out.append(
            _backend(
                "tpm (swtpm)",
                lambda: EpochKeys(
                    TpmEpochVault(base),
                    replica="b",
                    epoch_seconds=3600,
                    grace_seconds=60,
                    base=base,
                ),
                rounds,
            )
        )
    finally:
        tpm.stop()
    from enclave.keys.pkcs11 import Pkcs11Key
    from enclave.keys.pkcs11_epochs import Pkcs11EpochVault

    token = init_softhsm_token(work / "softhsm", label="bench")
    os.environ["SOFTHSM2_CONF"] = str(token.conf)
    base11 = Pkcs11Key.generate(token.module_path, token.token_label, token.pin, "bench")
    out.append(
        _backend(
            "pkcs11 (SoftHSM2)",
            lambda: EpochKeys(
                Pkcs11EpochVault(token.module_path, token.token_label, token.pin, "bench"),
                replica="b",
                epoch_seconds=3600,
                grace_seconds=60,
                base=base11,
            ),
            rounds,
        )
    )
    return out


async def client_paths(rounds: int, work: Path) -> dict[str, Any]:
    """Live key vs. retired key (410, re-attest once, re-seal, resend), through the client."""
    from paygate_dev.gateway_stack import running_stack

    from enclave import SoftwareKey
    from paygate import release
    from paygate.client import AsyncPaygateTransport, AttestationPolicy
    from paygate.server.epochs import request_rotation

    live, stale = [], []
    async with running_stack(
        key=SoftwareKey.generate(),
        key_epoch=3600,
        key_epoch_grace=0,
        key_epoch_dir=work / "epochs",
    ) as stack:
        policy = AttestationPolicy(
            allow_unattested=True, code_digests=frozenset({release.code_digest()})
        )
        fetched: list[str] = []

        class Counting(httpx.AsyncBaseTransport):
            def __init__(self) -> None:
                self._inner = httpx.AsyncHTTPTransport()

            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                fetched.append(request.url.path)
                return await self._inner.handle_async_request(request)

        transport = AsyncPaygateTransport(transport=Counting(), envelope="v2", attestation=policy)
        async with httpx.AsyncClient(transport=transport, base_url=stack.url, timeout=30) as c:
            await c.post(CHAT, json=BODY)
            for _ in range(rounds):
                started = time.perf_counter()
                assert (await c.post(CHAT, json=BODY)).status_code == 200
                live.append(time.perf_counter() - started)
                await asyncio.to_thread(request_rotation, work / "epochs", 20.0)
                await asyncio.sleep(1.2)  # grace 0: retired at the loop's next pass
                started = time.perf_counter()
                reply = await c.post(CHAT, json=BODY)
                stale.append(time.perf_counter() - started)
                assert reply.status_code == 200
        attests = fetched.count("/v1/attestation")
        assert attests == rounds + 1, attests  # each retired-key request re-attested once
    return {"live_key": _ms(live), "retired_key_reattest": _ms(stale)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "backends": backends(args.rounds, work),
            "client": asyncio.run(client_paths(max(5, args.rounds // 3), work)),
        }
    print(f"{'backend':20} {'rotate ms':>12} {'destroy ms':>12} {'open ms':>10}")
    for row in results["backends"]:
        print(
            f"{row['backend']:20} {row['rotate']['median_ms']:>12} "
            f"{row['destroy']['median_ms']:>12} {row['open']['median_ms']:>10}"
        )
    client = results["client"]
    print(f"sealed request, live key:            {client['live_key']['median_ms']} ms median")
    print(
        "sealed request, retired key (410,   "
        f"re-attest, resend): {client['retired_key_reattest']['median_ms']} ms median"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
