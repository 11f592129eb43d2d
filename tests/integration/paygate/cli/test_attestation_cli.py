"""``paygate attest verify`` and ``show`` as subprocesses against the real gateway on swtpm.

Exit 0 against the genuine appliance; 1 against each refusal (a real tampering proxy on
127.0.0.1 in front of the gateway, a TPM under an untrusted CA, a policy the evidence fails);
2 for usage errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from paygate_dev.stack import Swtpm

from enclave import p256
from enclave.keys.tpm import TpmKey
from tests.fixtures.attestation_support import (
    TAMPER_CASES,
    TamperProxy,
    edit_evidence,
    ollama_models_dir,
    tamper_for,
)
from tests.fixtures.gateway_support import Stack, ThreadedStack
from tests.fixtures.swtpm import EkCa

MODEL = "fake-llama:latest"
WEIGHTS = b"fake-llama weights"
DIGEST = "sha256:" + hashlib.sha256(WEIGHTS).hexdigest()
PAY_TO = "0x" + "ab" * 20


def _attest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "attest", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TSS2_LOG": "all+none", **(env or {})},
        check=False,
    )


@pytest.fixture(scope="module")
def tpm_key(
    ek_swtpm_factory: Callable[[EkCa], Swtpm], ek_ca: EkCa, tmp_path_factory: Any
) -> Iterator[TpmKey]:
    tpm = ek_swtpm_factory(ek_ca)
    with TpmKey.generate(tpm.tcti, tmp_path_factory.mktemp("tpm") / "key") as key:
        yield key


def _settings(key: TpmKey | None, models: Path) -> dict[str, Any]:
    # Payments in verify-only mode: the evidence binds payTo without a chain behind it.
    return {
        "key_backend": "tpm" if key is not None else "software",
        "upstream_model_path": ollama_models_dir(models, "fake-llama", "latest", WEIGHTS),
        "payment_mode": "verify-only",
        "pay_to": PAY_TO,
        "network": "base-sepolia",
        "facilitator_url": "http://127.0.0.1:9",
        # Every test here attests from 127.0.0.1: no per-address limit in the way.
        "attestation_rate_per_minute": 100_000,
        "attestation_global_rate_per_minute": 100_000,
    }


@pytest.fixture(scope="module")
def stack(tpm_key: TpmKey, tmp_path_factory: Any) -> Iterator[Stack]:
    models = tmp_path_factory.mktemp("models")
    with ThreadedStack(key=tpm_key, **_settings(tpm_key, models)) as running:
        yield running


def _verify(url: str, ek_ca: EkCa, *extra: str) -> subprocess.CompletedProcess[str]:
    return _attest(
        "verify", url, "--ek-ca", str(ek_ca.chain_pem), "--model-digest", DIGEST,
        "--pay-to", PAY_TO, "--json", *extra,
    )  # fmt: skip


def test_verify_exits_0_against_the_genuine_gateway(stack: Stack, ek_ca: EkCa) -> None:
    result = _verify(stack.url, ek_ca)
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["kind"] == "tpm"
    assert {c["name"] for c in report["checks"] if c["status"] == "pass"} >= {
        "ek_chain", "activation", "quote", "app_pcr", "certify_sealing_key",
        "certify_receipt_key", "key_document", "models", "pay_to",
    }  # fmt: skip
    assert report["binding"]["sealing_key"] == stack.key.public_key.hex()
    human = _attest("verify", stack.url, "--ek-ca", str(ek_ca.chain_pem))
    assert human.returncode == 0
    assert "ok   activation" in human.stdout


@pytest.mark.parametrize("case", TAMPER_CASES)
def test_verify_exits_1_through_a_tampering_proxy(
    stack: Stack, tpm_key: TpmKey, ek_ca: EkCa, case: str
) -> None:
    with TamperProxy(stack.url, tamper_for(case, stack.url, tpm_key)) as proxy:
        result = _verify(proxy, ek_ca)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert (
        report["code"]
        == {
            "key_document_swapped": "key_not_certified",
            "evidence_key_swapped": "quote_invalid",
            "old_nonce": "nonce_mismatch",
            "certify_of_another_key": "key_not_certified",
            "duplicable_key_certified": "key_not_certified",
            "evidence_deeply_nested": "evidence_malformed",
            "evidence_without_tpm_part": "evidence_malformed",
        }[case]
    )


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (("--model-digest", "sha256:" + "00" * 32), "model_not_accepted"),
        (("--pay-to", "0x" + "12" * 20), "pay_to_mismatch"),
        (("--pcr", "0=" + "11" * 32), "pcr_mismatch"),
    ],
)
def test_verify_exits_1_when_the_policy_is_not_met(
    stack: Stack, ek_ca: EkCa, extra: tuple[str, str], code: str
) -> None:
    args = ["verify", stack.url, "--ek-ca", str(ek_ca.chain_pem), "--json", *extra]
    result = _attest(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert json.loads(result.stdout)["code"] == code


def test_verify_exits_1_for_an_untrusted_ek_and_a_failed_activation(
    stack: Stack,
    ek_swtpm_factory: Callable[[EkCa], Swtpm],
    rogue_ek_ca: EkCa,
    ek_ca: EkCa,
    tmp_path: Path,
) -> None:
    rogue_tpm = ek_swtpm_factory(rogue_ek_ca)
    with (
        TpmKey.generate(rogue_tpm.tcti, tmp_path / "rogue") as rogue_key,
        ThreadedStack(key=rogue_key, **_settings(rogue_key, tmp_path / "models")) as rogue,
    ):
        result = _verify(rogue.url, ek_ca)
        assert result.returncode == 1
        assert json.loads(result.stdout)["code"] == "ek_untrusted"
        # The rogue TPM's evidence under the genuine TPM's EK certificates.
        genuine = httpx.get(f"{stack.url}/v1/attestation?nonce={'cd' * 32}", timeout=10).json()

        def splice(document: dict[str, Any]) -> None:
            document["tpm"]["ek_certificates"] = genuine["tpm"]["ek_certificates"]

        with TamperProxy(stack.url, edit_evidence(splice), reroute=rogue.url) as proxy:
            result = _verify(proxy, ek_ca)
        assert result.returncode == 1
        assert json.loads(result.stdout)["code"] == "activation_failed"


def test_verify_usage_errors_exit_2(stack: Stack, ek_ca: EkCa, tmp_path: Path) -> None:
    for args in (
        ["verify", stack.url],  # no --ek-ca
        ["verify", stack.url, "--ek-ca", str(tmp_path / "missing.pem")],
        ["verify", stack.url, "--ek-ca", str(ek_ca.chain_pem), "--pcr", "24=00"],
        ["verify", stack.url, "--ek-ca", str(ek_ca.chain_pem), "--model-digest", "md5:1"],
        ["verify", "ftp://example", "--ek-ca", str(ek_ca.chain_pem)],
        ["verify"],
    ):
        result = _attest(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr


def test_show_prints_what_the_appliance_would_attest(
    ek_swtpm_factory: Callable[[EkCa], Swtpm], ek_ca: EkCa, tmp_path: Path
) -> None:
    tpm = ek_swtpm_factory(ek_ca)
    with TpmKey.generate(tpm.tcti, tmp_path / "key") as key:
        sealing, receipt = key.public_key, key.receipt_public_key
    env = {
        "PAYGATE_KEY_BACKEND": "tpm",
        "PAYGATE_TPM_TCTI": tpm.tcti,
        "PAYGATE_TPM_KEY_DIR": str(tmp_path / "key"),
        "PAYGATE_UPSTREAM_MODEL_PATH": str(
            ollama_models_dir(tmp_path / "models", "fake-llama", "latest", WEIGHTS)
        ),
    }
    result = _attest("show", "--json", env=env)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["kind"] == "tpm"
    assert facts["sealing_key"] == p256.fingerprint(sealing)
    assert facts["receipt_key"] == p256.fingerprint(receipt)
    assert facts["models"] == [{"name": MODEL, "digest": DIGEST}]
    assert facts["payment"] is None
    assert facts["ek_certificates"] == ["p256", "p384", "rsa2048"]
    assert len(facts["pcr23"]) == 64
