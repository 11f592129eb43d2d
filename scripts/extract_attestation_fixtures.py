#!/usr/bin/env python3
"""Copy the published TEE evidence samples the attestation tests use into the repository.

    python3 scripts/extract_attestation_fixtures.py SOURCE [--roots]

SOURCE is a directory holding the published samples (the files and projects listed in
tests/fixtures/attestation/README.md). The tests read only tests/fixtures/attestation/, never
SOURCE. ``--roots`` also refreshes the vendor roots shipped in enclave/attestation/roots/ (their
fingerprints are pinned in enclave/attestation/roots.py, so a changed root fails the tests
instead of being trusted silently). Provenance and licences of every file are in
tests/fixtures/attestation/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "attestation"
ROOTS = REPO / "enclave" / "attestation" / "roots"

# source path -> path under tests/fixtures/attestation
SAMPLES = {
    "sev-snp/gsg_report.bin": "sev-snp/gsg_report.bin",
    "sev-snp/gsg_vcek.der": "sev-snp/gsg_vcek.der",
    "sev-snp/virtee_report_milan.hex": "sev-snp/virtee_report_milan.hex",
    "sev-snp/virtee_vcek_milan.der": "sev-snp/virtee_vcek_milan.der",
    "sev-snp/azure_genoa_report.bin": "sev-snp/azure_genoa_report.bin",
    "sev-snp/azure_genoa_vcek.pem": "sev-snp/azure_genoa_vcek.pem",
    "sev-snp/azure_genoa_hcl_report.bin": "sev-snp/azure_genoa_hcl_report.bin",
    "sev-snp/amd_milan_ask_ark.pem": "sev-snp/amd_milan_ask_ark.pem",
    "sev-snp/amd_genoa_ask_ark.pem": "sev-snp/amd_genoa_ask_ark.pem",
    "sev-snp/amd_milan_asvk_ark.pem": "sev-snp/amd_milan_asvk_ark.pem",
    "tdx/quote_v4_spr_e4.dat": "tdx/quote_v4_spr_e4.dat",
    "tdx/quote_v5_sample.dat": "tdx/quote_v5_sample.dat",
    # The complete 2023 collateral of the v4 quote, under the names the verifier reads.
    "tdx/tcb_info.json": "tdx/collateral-2023/tcb_info.json",
    "tdx/qe_identity.json": "tdx/collateral-2023/qe_identity.json",
    "tdx/tcb_signing_chain.pem": "tdx/collateral-2023/tcb_signing_chain.pem",
    "tdx/pck_platform_crl.der": "tdx/collateral-2023/pck_crl.der",
    "tdx/pck_crl_issuer_chain.pem": "tdx/collateral-2023/pck_crl_issuer_chain.pem",
    "tdx/root_ca_crl.der": "tdx/collateral-2023/root_ca_crl.der",
    # What exists for the v5 quote: a 2026 tcbInfo only (no QE identity, no CRLs, and the
    # TCB Signing certificate we have expired before the tcbInfo was issued).
    "tdx/tcb_info_v5.json": "tdx/collateral-v5/tcb_info.json",
    "nitro/evervault_prod_2022-10-13.cbor": "nitro/evervault_prod_2022-10-13.cbor",
    "nitro/evervault_debug_2022-10-12.cbor": "nitro/evervault_debug_2022-10-12.cbor",
    "nvidia-gpu/hopper_attestation_report.hex": "nvidia-gpu/hopper_attestation_report.hex",
    "nvidia-gpu/hopper_cert_chain.pem": "nvidia-gpu/hopper_cert_chain.pem",
}

# source path -> file name under enclave/attestation/roots (trust anchors shipped as package data)
ROOT_FILES = {
    "sev-snp/amd_milan_ask_ark.pem": "amd_milan_ask_ark.pem",
    "sev-snp/amd_genoa_ask_ark.pem": "amd_genoa_ask_ark.pem",
    "sev-snp/amd_milan_asvk_ark.pem": "amd_milan_asvk_ark.pem",
    "tdx/intel_sgx_root_ca.pem": "intel_sgx_root_ca.pem",
    "nitro/aws_nitro_root_g1.pem": "aws_nitro_root_g1.pem",
    "nvidia-gpu/nvidia_device_identity_ca.pem": "nvidia_device_identity_ca.pem",
}


def copy(source: Path, pairs: dict[str, str], target: Path) -> None:
    for src, dst in pairs.items():
        out = target / dst
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / src, out)
        print(f"{src} -> {out.relative_to(REPO)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="directory of the published samples")
    parser.add_argument("--roots", action="store_true", help="also refresh the shipped roots")
    args = parser.parse_args()
    if not (args.source / "README.md").is_file():
        print(f"no attestation samples at {args.source}", file=sys.stderr)
        return 2
    copy(args.source, SAMPLES, FIXTURES)
    if args.roots:
        copy(args.source, ROOT_FILES, ROOTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
