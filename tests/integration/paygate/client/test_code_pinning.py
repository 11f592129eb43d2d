"""Pin the code: a gateway running other code is refused by a client pinning the release digest.

Two real ``paygate serve`` processes on TPM keys (swtpm, EK certificates from a local CA): one
from this tree, one from a copy of the installed packages with one file changed. Both attest
honestly: each measures its own files into PCR 23 and names that code digest in its binding,
so every TPM check passes for both (the evidence is self-consistent). Only the pin tells them
apart: ``paygate release digest`` of this tree is accepted, the changed tree is refused with
``code_not_accepted`` before anything is sealed, by ``paygate attest verify --code-digest`` and
by the transport's AttestationPolicy(code_digests=...).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from paygate_dev.stack import Swtpm

from enclave.keys.tpm import TpmKey
from paygate.client import AttestationPolicy, ClientError, PaygateTransport
from tests.fixtures.attestation_support import ollama_models_dir
from tests.fixtures.gateway_support import Stack, ThreadedStack
from tests.fixtures.swtpm import EkCa

ROOT = Path(__file__).resolve().parents[4]
WEIGHTS = b"fake-llama weights"
DIGEST = "sha256:" + hashlib.sha256(WEIGHTS).hexdigest()
START_TIMEOUT = 60.0


def _release_digest(cwd: Path, pythonpath: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "release", "digest"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": pythonpath},
        check=True,
    )
    return result.stdout.strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """``paygate serve`` from the tree at ``tree`` (its own interpreter path) on a TPM key."""

    def __init__(self, tree: Path, tpm: Swtpm, key_dir: Path, models: Path, upstream: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")}
        env.update(
            PYTHONPATH=str(tree),
            TSS2_LOG="all+none",
            PAYGATE_KEY_BACKEND="tpm",
            PAYGATE_TPM_TCTI=tpm.tcti,
            PAYGATE_TPM_KEY_DIR=str(key_dir),
            PAYGATE_UPSTREAM_MODEL_PATH=str(models),
            PAYGATE_REQUIRE_ENCRYPTION="true",
        )
        self._proc = subprocess.Popen(  # cwd=tree: `-m` puts the cwd first on the path
            [sys.executable, "-m", "paygate.cli.main", "serve", "--listen",
             f"127.0.0.1:{self.port}", "--upstream-url", upstream],
            cwd=tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def __enter__(self) -> Served:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"paygate serve exited: {self._proc.stderr.read()[-2000:]!r}")  # type: ignore[union-attr]
            try:
                if httpx.get(self.url + "/health/live", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("paygate serve did not come up")

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()  # by its own PID
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)


@pytest.fixture(scope="module")
def fake() -> Iterator[Stack]:
    """Only for its FAKE model server (the gateways under test run in their own processes)."""
    with ThreadedStack() as running:
        yield running


@pytest.fixture
def tpm_key_dir(
    ek_swtpm_factory: Callable[[EkCa], Swtpm], ek_ca: EkCa, tmp_path: Path
) -> tuple[Swtpm, Path]:
    tpm = ek_swtpm_factory(ek_ca)
    with TpmKey.generate(tpm.tcti, tmp_path / "key"):
        pass
    return tpm, tmp_path / "key"


def _changed_tree(directory: Path) -> Path:
    """The installed packages, copied, with one file changed as a tampered install would be."""
    for package in ("paygate", "enclave"):
        shutil.copytree(
            ROOT / package, directory / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    target = directory / "paygate" / "server" / "health.py"
    target.write_text(target.read_text() + "\n# not the release\n")
    return directory


def _verify(url: str, ek_ca: EkCa, pin: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "attest", "verify", url,
         "--ek-ca", str(ek_ca.chain_pem), "--model-digest", DIGEST, "--code-digest", pin,
         "--json"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "TSS2_LOG": "all+none"},
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert (result.returncode == 0) == report["ok"]
    return report


def test_the_release_digest_is_accepted_and_other_code_refused(
    fake: Stack, tpm_key_dir: tuple[Swtpm, Path], ek_ca: EkCa, tmp_path: Path
) -> None:
    tpm, key_dir = tpm_key_dir
    models = ollama_models_dir(tmp_path / "models", "fake-llama", "latest", WEIGHTS)
    release = _release_digest(ROOT, str(ROOT))
    changed = _changed_tree(tmp_path / "changed")
    other = _release_digest(changed, str(changed))
    assert other != release  # one changed file is another digest
    pinned = AttestationPolicy.from_files(
        ek_ca.chain_pem, model_digests={DIGEST}, code_digests={release}
    )

    with Served(ROOT, tpm, key_dir, models, fake.fake_url) as genuine:
        report = _verify(genuine.url, ek_ca, release)
        assert report["ok"] is True
        assert report["binding"]["gateway"]["code_digest"] == release
        assert {"app_pcr": "pass", "code": "pass"}.items() <= {
            c["name"]: c["status"] for c in report["checks"]
        }.items()
        transport = PaygateTransport(attestation=pinned)
        with httpx.Client(transport=transport, timeout=30) as http:
            reply = http.post(
                genuine.url + "/v1/chat/completions",
                json={
                    "model": "fake-llama:latest",
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
        assert reply.status_code == 200

    chats = fake.fake.hits["POST /v1/chat/completions"]
    assert chats == 1  # the genuine one served
    with Served(changed, tpm, key_dir, models, fake.fake_url) as modified:
        report = _verify(modified.url, ek_ca, release)
        assert report["ok"] is False
        statuses = {c["name"]: (c["status"], c.get("code")) for c in report["checks"]}
        # Every TPM check passes: the changed gateway honestly measured its own code ...
        assert statuses["quote"][0] == statuses["app_pcr"][0] == "pass"
        # ... and the pin refuses it.
        assert statuses["code"] == ("fail", "code_not_accepted")
        assert report["code"] == "code_not_accepted"
        (detail,) = [c["detail"] for c in report["checks"] if c["name"] == "code"]
        assert other in detail  # the digest it attested is the changed tree's
        transport = PaygateTransport(attestation=pinned)
        with (
            httpx.Client(transport=transport, timeout=30) as http,
            pytest.raises(ClientError) as caught,
        ):
            http.post(modified.url + "/v1/chat/completions", json={"model": "fake-llama:latest"})
        assert caught.value.code == "code_not_accepted"
    assert fake.fake.hits["POST /v1/chat/completions"] == chats  # nothing sealed or served


def test_a_code_pin_must_be_a_sha256_digest(ek_ca: EkCa) -> None:
    with pytest.raises(ValueError, match="code digest"):
        AttestationPolicy(code_digests=frozenset({"sha256:ABC"}))
    with pytest.warns(UserWarning, match="any gateway code"):
        AttestationPolicy()
    result = subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "attest", "verify", "http://127.0.0.1:9",
         "--ek-ca", str(ek_ca.chain_pem), "--code-digest", "md5:00"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--code-digest takes sha256" in result.stderr
