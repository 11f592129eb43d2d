"""TEE evidence from a live gateway: PAYGATE_ATTESTATION=sev-snp inside a configfs-tsm-shaped
stand-in (tests/fixtures/attestation_standins.py), verified by the real client and the real
``paygate attest verify``.

No TEE hardware here, so the stand-in firmware signs with a chain the tests make (ARK ← ASK ←
VCEK). What this proves end to end: the appliance puts SHA-512 of the binding document into
report_data and carries the platform's certificates; the client parses the report, derives the
same digest and refuses any other; under the shipped AMD roots the stand-in's chain is refused
with the chain's code, and with the test ARK injected as the trust anchor it is accepted.
"""

from __future__ import annotations

import base64
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
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclave.attestation import binding as binding_doc
from enclave.attestation.sev_snp import (
    GUID_ARK,
    GUID_ASK,
    GUID_VCEK,
    SevSnpPolicy,
    SnpTcb,
    parse_report,
)
from enclave.keys.tee_memory import TeeMemoryKey
from paygate.client.attestation import (
    AttestationPolicy,
    Attested,
    TeePolicy,
    attestation_flow,
    load_tee_policies,
)
from paygate.client.errors import AttestationRefused
from paygate.client.pubkey import MAX_PUBKEY_DOCUMENT, PUBKEY_PATH, parse_pubkey_document
from paygate.config import ConfigError, load_settings
from paygate.server.app import build_app, tee_provider
from tests.fixtures.attestation_standins import (
    StandInAmdPki,
    StandInConfigfsTsm,
    cert_table,
    snp_report,
)
from tests.fixtures.attestation_support import ollama_models_dir
from tests.fixtures.gateway_support import Stack, ThreadedStack

WEIGHTS = b"fake-llama weights"
DIGEST = "sha256:" + hashlib.sha256(WEIGHTS).hexdigest()
PAY_TO = "0x" + "ab" * 20
TCB = SnpTcb(bootloader=3, tee=0, snp=8, microcode=115)
CHIP = bytes(range(64))
DER = serialization.Encoding.DER
# The refusal of a chain that does not end at a pinned AMD ARK (enclave/attestation/base.py).
UNTRUSTED = "untrusted_root"


@pytest.fixture(scope="module")
def amd() -> StandInAmdPki:
    return StandInAmdPki.make()


@pytest.fixture
def snp_stack(amd: StandInAmdPki, tmp_path: Path) -> Iterator[Stack]:
    """A gateway on a tee-memory key whose configfs-tsm is the stand-in SEV-SNP firmware."""
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    vcek = amd.vcek(vcek_key, hwid=CHIP, tcb=TCB)

    def firmware(inblob: bytes) -> tuple[bytes, bytes]:
        report = snp_report(vcek_key, report_data=inblob, chip_id=CHIP, tcb=TCB)
        # The host's certificate table with the whole chain, as hosts may provide it (with
        # the VCEK alone, a foreign chain is refused as collateral_incomplete instead).
        table = {GUID_VCEK: vcek, GUID_ASK: amd.ask, GUID_ARK: amd.ark}
        return report, cert_table({guid: cert.public_bytes(DER) for guid, cert in table.items()})

    standin = StandInConfigfsTsm(tmp_path / "tsm", "sev_guest", firmware)
    with standin.running(), TeeMemoryKey.generate() as key:
        settings = {
            "key_backend": "tee-memory",
            "attestation": "sev-snp",
            "attestation_configfs_root": tmp_path / "tsm",
            "upstream_model_path": ollama_models_dir(
                tmp_path / "models", "fake-llama", "latest", WEIGHTS
            ),
            "payment_mode": "verify-only",
            "pay_to": PAY_TO,
            "network": "base-sepolia",
            "facilitator_url": "http://127.0.0.1:9",
            "attestation_rate_per_minute": 100_000,
            "attestation_global_rate_per_minute": 100_000,
        }
        with ThreadedStack(key=key, **settings) as running:
            yield running


def _attest(
    url: str, policy: AttestationPolicy, edit: Callable[[dict[str, Any]], None] | None = None
) -> Attested:
    """The client's sans-IO flow over httpx (as ``paygate attest verify`` runs it); ``edit``
    rewrites the evidence in transit as an on-path attacker would."""
    with httpx.Client(timeout=30, trust_env=False) as http:
        pubkey = http.get(url + PUBKEY_PATH)
        key = parse_pubkey_document(url, pubkey.status_code, pubkey.content[:MAX_PUBKEY_DOCUMENT])
        flow = attestation_flow(url, policy, key.public_key)
        exchange = next(flow)
        try:
            while True:
                assert exchange.method == "GET"  # TEE kinds have no activation round trip
                response = http.get(exchange.url)
                body = response.content
                if edit is not None:
                    document = json.loads(body)
                    edit(document)
                    body = json.dumps(document).encode()
                exchange = flow.send((response.status_code, body))
        except StopIteration as stop:
            return stop.value


def _policy(**tee: TeePolicy) -> AttestationPolicy:
    return AttestationPolicy(
        model_digests=frozenset({DIGEST}),
        pay_to=PAY_TO,
        tee={k.replace("_", "-"): v for k, v in tee.items()},
    )


def test_the_report_carries_the_binding_and_the_platform_certificates(snp_stack: Stack) -> None:
    nonce = os.urandom(32)
    response = httpx.get(f"{snp_stack.url}/v1/attestation?nonce={nonce.hex()}", timeout=30)
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["kind"] == "sev-snp"
    assert document["tee"]["source"] == "configfs-tsm:sev_guest"
    bound = binding_doc.parse(document["binding"])
    assert bound.nonce == nonce
    assert bound.sealing_key == snp_stack.key.public_key
    raw = base64.urlsafe_b64decode(document["tee"]["evidence"] + "==")
    report = parse_report(raw)  # the verifier's parser reads the binding back
    assert report.report_data == hashlib.sha512(bound.canonical()).digest()
    assert len(document["tee"]["certificates"]) == 3


def test_refused_under_the_amd_roots_accepted_under_the_test_ark(
    snp_stack: Stack, amd: StandInAmdPki
) -> None:
    with pytest.raises(AttestationRefused) as caught:
        _attest(snp_stack.url, _policy(sev_snp=TeePolicy(SevSnpPolicy())))
    assert caught.value.code == UNTRUSTED, (caught.value.code, str(caught.value))
    failed = [c for c in caught.value.checks if c.status == "fail"]  # type: ignore[attr-defined]
    assert failed
    assert failed[0].code == caught.value.code
    # Everything the stand-in can prove still held: parsing and the binding.
    passed = {c.name for c in caught.value.checks if c.status == "pass"}  # type: ignore[attr-defined]
    assert {"nonce", "freshness", "kind", "tee_evidence", "report_data"} <= passed
    assert snp_stack.fake.hits == {} or sum(snp_stack.fake.hits.values()) == 0

    attested = _attest(snp_stack.url, _policy(sev_snp=TeePolicy(SevSnpPolicy(), roots=(amd.ark,))))
    assert attested.kind == "sev-snp"
    assert attested.binding.sealing_key == snp_stack.key.public_key
    names = {c.name for c in attested.checks if c.status == "pass"}
    assert {"report_signature", "report_data", "key_document", "models", "pay_to"} <= names


def test_tampered_binding_and_unaccepted_kinds_are_refused(
    snp_stack: Stack, amd: StandInAmdPki
) -> None:
    trusted = _policy(sev_snp=TeePolicy(SevSnpPolicy(), roots=(amd.ark,)))

    def other_pay_to(document: dict[str, Any]) -> None:
        document["binding"]["payment"]["pay_to"] = "0x" + "cd" * 20

    with pytest.raises(AttestationRefused) as caught:
        _attest(snp_stack.url, trusted, other_pay_to)
    assert caught.value.code == "report_data_mismatch"

    def other_report(document: dict[str, Any]) -> None:
        raw = bytearray(base64.urlsafe_b64decode(document["tee"]["evidence"] + "=="))
        raw[0x90] ^= 1  # the launch measurement: signed, so the signature breaks
        document["tee"]["evidence"] = base64.urlsafe_b64encode(bytes(raw)).decode()

    with pytest.raises(AttestationRefused) as caught:
        _attest(snp_stack.url, trusted, other_report)
    assert caught.value.code == "signature_invalid"

    with pytest.raises(AttestationRefused) as caught:
        _attest(snp_stack.url, AttestationPolicy(tee={"nitro": TeePolicy(SevSnpPolicy())}))
    assert caught.value.code == "kind_not_accepted"
    with pytest.raises(AttestationRefused) as caught:
        _attest(snp_stack.url, AttestationPolicy(allow_unattested=True))
    assert caught.value.code == "kind_not_accepted"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "attest", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_attest_verify_with_a_policy_file(
    snp_stack: Stack, amd: StandInAmdPki, tmp_path: Path
) -> None:
    for bad in (tmp_path / "missing.json", tmp_path):  # usage errors: exit 2, no traceback
        usage = _cli("verify", snp_stack.url, "--policy", str(bad))
        assert usage.returncode == 2, usage.stderr
        assert "Traceback" not in usage.stderr
    vendor = tmp_path / "vendor.json"
    vendor.write_text(json.dumps({"sev-snp": {"allow_debug": False, "products": ["Milan"]}}))
    refused = _cli("verify", snp_stack.url, "--policy", str(vendor), "--json")
    assert refused.returncode == 1, refused.stderr + refused.stdout
    report = json.loads(refused.stdout)
    assert report["ok"] is False
    assert report["code"] == UNTRUSTED, report

    (tmp_path / "ark.pem").write_bytes(amd.ark.public_bytes(serialization.Encoding.PEM))
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"sev-snp": {"roots": "ark.pem"}}))
    accepted = _cli("verify", snp_stack.url, "--policy", str(own), "--model-digest", DIGEST)
    assert accepted.returncode == 0, accepted.stderr + accepted.stdout
    assert "attested" in accepted.stdout
    assert "kind sev-snp" in accepted.stdout


def test_policy_files_and_settings_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    for content in ('{"sgx": {}}', '{"sev-snp": {"debug": true}}', "[]",
                    '{"nitro": {"collateral": "x"}}', "not json"):  # fmt: skip
        bad.write_text(content)
        with pytest.raises(ValueError, match=r"\S"):
            load_tee_policies(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"nitro": {"pcrs": {"0": "11" * 48}}, "sev-snp": {}}))
    policies = load_tee_policies(good)
    assert set(policies) == {"nitro", "sev-snp"}
    assert policies["nitro"].roots is None

    with pytest.raises(ConfigError, match="tee-memory"):
        build_app(load_settings(None, attestation="sev-snp", key_backend="software"))
    settings = load_settings(
        None, attestation="tdx", key_backend="tee-memory", attestation_configfs_root=tmp_path
    )
    with pytest.raises(ConfigError, match="configfs-tsm"):
        tee_provider(settings, "tdx")
