"""``paygate attest verify-file`` as an operator runs it: a subprocess on the recorded samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.attestation_standins import FIXTURES

SEV = FIXTURES / "sev-snp"
TDX = FIXTURES / "tdx"
NITRO = FIXTURES / "nitro"
VIRTEE_MEASUREMENT = (
    "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb424"
    "64bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
)


def paygate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "attest", "verify-file", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_sev_snp_sample_passes_with_a_policy_file(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"measurements": [VIRTEE_MEASUREMENT], "vmpl": 0}))
    run = paygate(
        SEV / "virtee_report_milan.hex",
        "--kind",
        "sev-snp",
        "--cert",
        SEV / "virtee_vcek_milan.der",
        "--at",
        "2025-06-01T00:00Z",
        "--policy",
        policy,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASS report_signature" in run.stdout
    assert "PASS measurement" in run.stdout
    assert run.stdout.rstrip().endswith(": OK")


def test_debug_report_fails_with_its_code_as_json() -> None:
    run = paygate(
        SEV / "gsg_report.bin",
        "--kind",
        "sev-snp",
        "--cert",
        SEV / "gsg_vcek.der",
        "--at",
        "2025-06-01T00:00:00+00:00",
        "--json",
    )
    assert run.returncode == 1, run.stderr
    out = json.loads(run.stdout)
    assert (out["ok"], out["code"], out["kind"]) == (False, "debug_not_allowed", "sev-snp")
    assert {c["name"]: c["status"] for c in out["checks"]}["report_signature"] == "pass"


def test_tdx_quote_with_its_collateral_dir_is_tcb_not_supported() -> None:
    run = paygate(
        TDX / "quote_v4_spr_e4.dat",
        "--kind",
        "tdx",
        "--collateral",
        TDX / "collateral-2023",
        "--at",
        "2023-07-01T00:00Z",
    )
    assert run.returncode == 1
    assert "FAIL tcb_status [tcb_not_supported]" in run.stdout
    assert "REFUSED [tcb_not_supported]" in run.stdout


def test_nitro_document_with_its_nonce_passes_and_an_expired_time_is_refused() -> None:
    doc = NITRO / "evervault_prod_2022-10-13.cbor"
    nonce = "cb3dc2eb76c0c1344adf10cc4868591e5bb7fa4b4a8069e144762f71ea1d0017"
    run = paygate(doc, "--kind", "nitro", "--at", "2022-10-13T09:00Z", "--nonce", nonce)
    assert run.returncode == 1  # the nonce is 256 bytes; a prefix is not the nonce
    assert "nonce_mismatch" in run.stdout
    run = paygate(doc, "--kind", "nitro", "--at", "2022-10-13T09:00Z")
    assert run.returncode == 0, run.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("--kind", "tpm"),
        ("--kind", "tdx", "--at", "yesterday"),
        ("--kind", "nitro", "--cert", "x.der"),
        ("--kind", "sev-snp", "--report-data", "zz"),
        ("--kind", "sev-snp", "--policy", "/nonexistent/policy.json"),
    ],
)
def test_usage_errors_exit_2_without_a_traceback(args: tuple[str, ...]) -> None:
    run = paygate(SEV / "gsg_report.bin", *args)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
