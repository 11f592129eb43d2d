"""`paygate serve --workers 2` on one TPM (swtpm behind tpm2-abrmd, the resource manager, slowed
to a discrete TPM's pace): PCR 23 is measured once for the appliance, and a worker that is
killed and restarted leaves it alone, so every quote of every worker keeps verifying.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from paygate_dev.stack import Swtpm

from enclave.attestation import binding
from enclave.attestation import tpm as att
from enclave.keys.tpm import TpmKey
from tests.fixtures.components import free_port, require_binary
from tests.fixtures.gateway_support import ThreadedStack
from tests.fixtures.slow_tpm import SlowTpm, Tabrmd

PAYGATE = str(Path(sys.executable).with_name("paygate"))
DELAY = 0.02  # seconds per TPM command
REPLICA = "tpm-host"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verified(document: dict[str, Any], nonce: bytes) -> str:
    """The replica that answered, once its quote verifies and PCR 23 measures what the binding
    names (the client's quote and app_pcr checks); AssertionError otherwise."""
    bound = binding.parse(document["binding"])
    assert bound.nonce == nonce
    evidence = document["tpm"]
    ak = att.check_ak(_unb64(evidence["ak_public"]))
    pcrs = {int(i): bytes.fromhex(v) for i, v in evidence["pcrs"].items()}
    signed = att.SignedAttest(
        _unb64(evidence["quote"]["attest"]), _unb64(evidence["quote"]["signature"])
    )
    att.check_quote(ak, signed, pcrs, bound.digest())
    code = bytes.fromhex(bound.code_digest.removeprefix("sha256:"))
    expected = att.app_pcr_value(att.app_digest(code, bound.config_digest()))
    assert pcrs[att.APP_PCR] == expected, "PCR 23 does not measure this code and configuration"
    return str(document["replica"])


def attest(url: str) -> str:
    nonce = os.urandom(32)
    # A new connection each time, so that both workers answer some.
    response = httpx.get(f"{url}/v1/attestation", params={"nonce": nonce.hex()}, timeout=30)
    assert response.status_code == 200, response.text
    return verified(response.json(), nonce)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@pytest.fixture
def shared_tpm(swtpm_factory: Callable[[], Swtpm], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A TPM key made on a fresh swtpm, then the swtpm shared through a slowed relay and
    tpm2-abrmd: (the workers' TCTI, the key directory)."""
    dbus = require_binary("dbus-daemon", "dbus")
    abrmd = require_binary("tpm2-abrmd", "tpm2-abrmd")
    require_binary("dbus-send", "dbus")
    tpm = swtpm_factory()
    key_dir = tmp_path / "tpm-key"
    with TpmKey.generate(tpm.tcti, key_dir):
        pass  # swtpm serves one connection at a time: this one closes before the broker's
    with SlowTpm(tpm.port, DELAY) as slow:
        broker = Tabrmd(slow.tcti, tmp_path / "tabrmd", dbus=dbus, abrmd=abrmd).start()
        try:
            os.environ.update(broker.env)  # for the gateway processes started below
            yield broker.client_tcti, key_dir
        finally:
            os.environ.pop("DBUS_SESSION_BUS_ADDRESS", None)
            broker.stop()


def _wait_live(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            if httpx.get(url + "/health/live", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "workers did not answer"
        time.sleep(0.1)


def test_two_workers_measure_pcr23_once_and_a_restarted_worker_keeps_quotes_valid(
    shared_tpm: tuple[str, Path], tmp_path: Path
) -> None:
    tcti, key_dir = shared_tpm
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        "PAYGATE_KEY_BACKEND": "tpm",
        "PAYGATE_TPM_TCTI": tcti,
        "PAYGATE_TPM_KEY_DIR": str(key_dir),
        "PAYGATE_ATTESTATION": "tpm",
        "PAYGATE_REPLICA_ID": REPLICA,
        "PAYGATE_ATTESTATION_RATE_PER_MINUTE": "100000",
        "PAYGATE_ATTESTATION_GLOBAL_RATE_PER_MINUTE": "100000",
        "PAYGATE_ATTESTATION_MAX_CONCURRENT": "8",
    }
    with ThreadedStack() as fake:
        proc = subprocess.Popen(
            [PAYGATE, "serve", "--workers", "2", "--listen", f"127.0.0.1:{port}",
             "--upstream-url", fake.fake_url],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            _wait_live(url, proc)
            deadline = time.monotonic() + 60
            while len(_children(proc.pid)) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            answered: set[str] = set()
            while answered != {f"{REPLICA}.w1", f"{REPLICA}.w2"}:
                answered.add(attest(url))  # both workers, started together, quote validly
                assert time.monotonic() < deadline, answered
            # Quote without pause while one worker is killed and its replacement starts.
            failures: list[str] = []
            quoted: list[str] = []
            stop = threading.Event()

            def keep_quoting() -> None:
                while not stop.is_set():
                    try:
                        quoted.append(attest(url))
                    except (AssertionError, att.TpmEvidenceError, httpx.HTTPError) as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")

            quoting = threading.Thread(target=keep_quoting, daemon=True)
            quoting.start()
            before = _children(proc.pid)
            victim = before[0]
            os.kill(victim, signal.SIGKILL)
            restarted = time.monotonic() + 60
            while True:
                workers = _children(proc.pid)
                if len(workers) == 2 and victim not in workers:
                    break
                assert time.monotonic() < restarted, "the worker was not restarted"
                time.sleep(0.05)
            (replacement,) = set(workers) - set(before)
            # Until the replacement has measured (or not) and served some quotes itself.
            served_from = len(quoted)
            while len(quoted) - served_from < 10 and time.monotonic() < restarted:
                time.sleep(0.1)
            stop.set()
            quoting.join(60)
            assert failures == []
            assert len(quoted) - served_from >= 10
            assert replacement in _children(proc.pid)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert (key_dir / "app-pcr.lock").exists()
    shutil.rmtree(key_dir, ignore_errors=True)
