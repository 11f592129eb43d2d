"""Time to verify one piece of TEE evidence, per kind, on the recorded samples.

Run: ``.venv/bin/python -m bench.attestation`` (prints a table, writes
bench/results/attestation.json). Each figure is the median of a bounded number of runs (at most
``--max-runs``, at most about ``--budget`` seconds per row) of a full ``verify`` call: parsing,
every certificate link, the evidence signature, collateral and policy checks.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from enclave.attestation.base import ExpectedBinding, Verdict
from enclave.attestation.nitro import NitroPolicy, NitroVerifier
from enclave.attestation.nvidia import NvidiaGpuVerifier
from enclave.attestation.sev_snp import SevSnpPolicy, SevSnpVerifier
from enclave.attestation.tdx import TdxCollateral, TdxVerifier

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "attestation"
OUT = Path(__file__).resolve().parent / "results" / "attestation.json"


def cases() -> dict[str, Callable[[], Verdict]]:
    sev, tdx, nitro = FIX / "sev-snp", FIX / "tdx", FIX / "nitro"
    none = ExpectedBinding()
    milan = SevSnpVerifier(SevSnpPolicy(), [(sev / "virtee_vcek_milan.der").read_bytes()])
    genoa = SevSnpVerifier(SevSnpPolicy(), [(sev / "azure_genoa_vcek.pem").read_bytes()])
    v4 = TdxVerifier(collateral=TdxCollateral.from_dir(tdx / "collateral-2023"))
    v5 = TdxVerifier(collateral=TdxCollateral.from_dir(tdx / "collateral-v5"))
    nv = NitroVerifier(NitroPolicy())
    r_milan = (sev / "virtee_report_milan.hex").read_bytes()
    r_genoa = (sev / "azure_genoa_report.bin").read_bytes()
    q4 = (tdx / "quote_v4_spr_e4.dat").read_bytes()
    q5 = (tdx / "quote_v5_sample.dat").read_bytes()
    doc = (nitro / "evervault_prod_2022-10-13.cbor").read_bytes()
    gpu = FIX / "nvidia-gpu"
    nvidia = NvidiaGpuVerifier(certificates=(gpu / "hopper_cert_chain.pem").read_bytes())
    spdm = (gpu / "hopper_attestation_report.hex").read_bytes()
    at_sev = datetime(2025, 6, 1, tzinfo=UTC)
    return {
        "sev-snp Milan (VCEK←ASK←ARK, RSA-4096 PSS)": lambda: milan.verify(
            r_milan, at=at_sev, binding=none
        ),
        "sev-snp Genoa": lambda: genoa.verify(r_genoa, at=at_sev, binding=none),
        "tdx v4 + full collateral (2 chains, 2 CRLs)": lambda: v4.verify(
            q4, at=datetime(2023, 7, 1, tzinfo=UTC), binding=none
        ),
        "tdx v5 (quote and PCK chain only)": lambda: v5.verify(
            q5, at=datetime(2026, 2, 15, tzinfo=UTC), binding=none
        ),
        "nitro (COSE ES384, 5-cert chain)": lambda: nv.verify(
            doc, at=datetime(2022, 10, 13, 9, tzinfo=UTC), binding=none
        ),
        "nvidia H100 SPDM (5-cert chain)": lambda: nvidia.verify(
            spdm, at=datetime(2024, 1, 1, tzinfo=UTC), binding=none
        ),
    }


def median_ms(fn: Callable[[], object], max_runs: int, budget: float) -> tuple[float, int]:
    fn()  # warm-up
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    while len(samples) < max_runs and (len(samples) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-runs", type=int, default=200)
    parser.add_argument("--budget", type=float, default=3.0)
    args = parser.parse_args()
    rows = []
    print(f"{'evidence':48} {'median ms':>10} {'runs':>6}  verdict")
    for name, fn in cases().items():
        ms, runs = median_ms(fn, args.max_runs, args.budget)
        verdict = fn()
        code = verdict.code or "ok"
        print(f"{name:48} {ms:10.2f} {runs:6d}  {code}")
        rows.append({"evidence": name, "median_ms": round(ms, 3), "runs": runs, "verdict": code})
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(
        json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                    "rows": rows}, indent=2) + "\n"
    )  # fmt: skip


if __name__ == "__main__":
    main()
