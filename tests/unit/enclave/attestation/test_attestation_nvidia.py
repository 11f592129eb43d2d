"""NVIDIA H100 SPDM measurement evidence (NVIDIA's published sample) and its mutations."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from enclave.attestation.base import ExpectedBinding, Verdict
from enclave.attestation.nvidia import NvidiaGpuPolicy, NvidiaGpuVerifier, parse_evidence
from tests.fixtures.attestation_standins import FIXTURES, StandInNitroPki

GPU = FIXTURES / "nvidia-gpu"
REPORT = bytes.fromhex((GPU / "hopper_attestation_report.hex").read_text())
CHAIN = (GPU / "hopper_cert_chain.pem").read_bytes()
AT = datetime(2024, 1, 1, tzinfo=UTC)
NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
M2 = bytes.fromhex(
    "8048dfd18fe229bf16eb9d30cca0f11a24dafe6eb731de14"
    "62984645a0b189b77c4e4e17de727a5e19e3d07de51da338"
)


def verify(
    report: bytes = REPORT,
    *,
    chain: bytes = CHAIN,
    policy: NvidiaGpuPolicy | None = None,
    binding: ExpectedBinding | None = None,
    roots: list | None = None,
) -> Verdict:
    verifier = NvidiaGpuVerifier(policy or NvidiaGpuPolicy(), chain, roots)
    return verifier.verify(report, at=AT, binding=binding or ExpectedBinding())


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1
    return bytes(out)


def test_sample_passes_with_its_nonce_and_measurements() -> None:
    gpu = parse_evidence(REPORT)
    assert (gpu.driver_version, len(gpu.measurements)) == ("550.90.07", 64)
    assert gpu.measurements[2] == M2
    policy = NvidiaGpuPolicy(measurements={2: frozenset({M2})},
                             driver_versions=frozenset({"550.90.07"}))  # fmt: skip
    v = verify(policy=policy, binding=ExpectedBinding(nonce=NONCE))
    assert v.ok, v.to_json()
    assert {c.name: c.status for c in v.checks}["spdm_signature"] == "pass"


def test_the_hex_file_is_read_as_is() -> None:
    assert verify((GPU / "hopper_attestation_report.hex").read_bytes()).ok


@pytest.mark.parametrize(
    ("report", "code"),
    [
        (flip(REPORT, len(REPORT) - 20), "signature_invalid"),  # the signature
        (flip(REPORT, 37 + 8 + 60), "signature_invalid"),  # a measurement
        (flip(REPORT, 10), "signature_invalid"),  # the request nonce
        (REPORT[:-1], "evidence_malformed"),
        (REPORT[:30], "evidence_malformed"),
    ],
)
def test_mutations_are_refused(report: bytes, code: str) -> None:
    assert verify(report).code == code


def test_nonce_measurement_and_root_refusals() -> None:
    assert verify(binding=ExpectedBinding(nonce=bytes(32))).codes == ("nonce_mismatch",)
    bad = NvidiaGpuPolicy(measurements={2: frozenset({bytes(48)})})
    assert verify(policy=bad).codes == ("measurement_mismatch",)
    assert verify(roots=[StandInNitroPki.make().root]).code == "untrusted_root"
    assert verify(chain=b"").code == "collateral_incomplete"
