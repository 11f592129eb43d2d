"""``paygate attest``: attestation evidence for operators and callers.

``verify-file`` re-verifies a recorded SEV-SNP report, TDX quote, Nitro attestation document
or NVIDIA GPU measurement exchange offline, at a chosen time, against the vendor roots paygate
ships (or ``--roots``), printing every check. Exit status: 0 when every check passed, 1 when one
failed, 2 on a usage error. ``show`` and ``verify`` (the live TPM or unattested evidence of a
gateway) are in :mod:`paygate.cli.attest_live`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

from enclave.attestation.base import EvidenceError, EvidenceVerifier, ExpectedBinding, Verdict
from enclave.attestation.certs import load_certificates
from enclave.attestation.nitro import NitroPolicy, NitroVerifier
from enclave.attestation.nvidia import NvidiaGpuPolicy, NvidiaGpuVerifier
from enclave.attestation.sev_snp import SevSnpPolicy, SevSnpVerifier
from enclave.attestation.tdx import TdxCollateral, TdxPolicy, TdxVerifier
from paygate.cli import attest_live
from paygate.cli.attest_live import AttestUsageError
from paygate.cli.options import add_json, command_actions

KINDS = ("sev-snp", "tdx", "nitro", "nvidia")
MAX_FILE = 1024 * 1024  # evidence, certificates, policies and collateral are a few KiB
CERT_SUFFIXES = (".pem", ".der", ".crt", ".cer")


def register(sub: Any) -> None:
    actions = command_actions(sub, "attest", "show or verify attestation evidence")
    # One function per action adds its parser here.
    attest_live.add_show(actions)
    attest_live.add_verify(actions)
    _add_verify_file(actions)


def _add_verify_file(actions: Any) -> None:
    vf = actions.add_parser(
        "verify-file",
        help="verify a recorded SEV-SNP report, TDX quote or Nitro document offline",
        description="Exit status: 0 all checks passed, 1 a check failed, 2 usage error.",
    )
    vf.add_argument("evidence", type=Path, help="report / quote / document file (binary or hex)")
    vf.add_argument("--kind", required=True, choices=KINDS)
    vf.add_argument(
        "--cert",
        type=Path,
        action="append",
        default=[],
        help="sev-snp: VCEK/VLEK (and ASK/ARK) certificate, DER or PEM; nvidia: the GPU "
        "certificate chain, PEM; repeatable",
    )
    vf.add_argument("--roots", type=Path, help="PEM bundle of roots to trust instead of the pinned")
    vf.add_argument(
        "--collateral",
        type=Path,
        help="tdx: directory with tcb_info.json, qe_identity.json, tcb_signing_chain.pem, "
        "pck_crl.der, root_ca_crl.der; sev-snp: directory of certificates",
    )
    vf.add_argument("--at", help="check time, ISO 8601 (default: now, UTC)")
    vf.add_argument("--policy", type=Path, help="policy file (JSON; see docs/ATTESTATION.md)")
    vf.add_argument("--report-data", help="sev-snp/tdx: expected report_data (hex)")
    vf.add_argument("--nonce", help="nitro, nvidia: expected nonce (hex)")
    vf.add_argument("--user-data", help="nitro: expected user_data (hex)")
    vf.add_argument("--public-key", help="nitro: expected public_key (hex SPKI DER)")
    add_json(vf)
    vf.set_defaults(run=_verify_file)


def _verify_file(args: argparse.Namespace) -> int:
    try:
        verifier = _verifier(args)
        at = _at(args.at)
        binding = _binding(args)
        evidence = _read(args.evidence)
    except (AttestUsageError, EvidenceError) as exc:
        code = getattr(exc, "code", "attest_usage")
        print(f"error [{code}]: {exc}", file=sys.stderr)
        return 2
    verdict = verifier.verify(evidence, at=at, binding=binding)
    _print(verdict, at, args.json)
    return 0 if verdict.ok else 1


def _verifier(args: argparse.Namespace) -> EvidenceVerifier:
    roots = load_certificates(_read(args.roots)) if args.roots else None
    if args.kind in ("tdx", "nitro") and args.cert:
        raise AttestUsageError(f"--cert is for sev-snp and nvidia; {args.kind} carries its chain")
    if args.kind in ("nitro", "nvidia") and args.collateral:
        raise AttestUsageError("--collateral is for tdx and sev-snp")
    if args.kind == "sev-snp":
        certs = [_read(p) for p in args.cert]
        if args.collateral:
            certs += [_read(p) for p in sorted(_dir(args.collateral).iterdir())
                      if p.suffix in CERT_SUFFIXES]  # fmt: skip
        return SevSnpVerifier(_policy(SevSnpPolicy, args.policy), certs, roots)
    if args.kind == "tdx":
        collateral = TdxCollateral.from_dir(_dir(args.collateral)) if args.collateral else None
        return TdxVerifier(_policy(TdxPolicy, args.policy), collateral or TdxCollateral(), roots)
    if args.kind == "nvidia":
        chain = b"".join(_read(p) for p in args.cert)
        return NvidiaGpuVerifier(_policy(NvidiaGpuPolicy, args.policy), chain, roots)
    return NitroVerifier(_policy(NitroPolicy, args.policy), tuple(roots) if roots else None)


class _FromMapping(Protocol):
    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> Self: ...


P = TypeVar("P", bound=_FromMapping)


def _policy(cls: type[P], path: Path | None) -> P:
    if path is None:
        return cls()
    try:
        data = json.loads(_read(path))
        if not isinstance(data, dict):
            raise ValueError("a policy file holds one JSON object")
        return cls.from_mapping(data)
    except (ValueError, TypeError) as exc:
        raise AttestUsageError(f"policy {path}: {exc}") from None


def _at(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise AttestUsageError(f"--at {value!r} is not an ISO 8601 time") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _hex(name: str, value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise AttestUsageError(f"--{name} is not hex") from None


def _binding(args: argparse.Namespace) -> ExpectedBinding:
    report_data = _hex("report-data", args.report_data)
    if report_data is not None and len(report_data) > 64:
        raise AttestUsageError("--report-data is at most 64 bytes")
    nitro_only = {"nonce": args.nonce, "user-data": args.user_data, "public-key": args.public_key}
    if args.kind in ("nitro", "nvidia") and report_data is not None:
        raise AttestUsageError(f"--report-data is for sev-snp and tdx; {args.kind} uses --nonce")
    if args.kind in ("sev-snp", "tdx") and any(v is not None for v in nitro_only.values()):
        raise AttestUsageError("--nonce/--user-data/--public-key are for nitro (and nvidia)")
    return ExpectedBinding(
        report_data=report_data,
        nonce=_hex("nonce", args.nonce),
        user_data=_hex("user-data", args.user_data),
        public_key=_hex("public-key", args.public_key),
    )


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE + 1)
    except OSError as exc:
        raise AttestUsageError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE:
        raise AttestUsageError(f"{path} is larger than {MAX_FILE} bytes")
    return data


def _dir(path: Path) -> Path:
    if not path.is_dir():
        raise AttestUsageError(f"{path} is not a directory")
    return path


def _print(verdict: Verdict, at: datetime, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**verdict.to_json(), "at": at.isoformat()}, indent=2))
        return
    for check in verdict.checks:
        mark = {"pass": "PASS", "fail": "FAIL", "skip": "skip"}[check.status]
        code = f" [{check.code}]" if check.code else ""
        print(f"{mark} {check.name}{code}: {check.detail}")
    result = "OK" if verdict.ok else f"REFUSED [{verdict.code}]"
    print(f"{verdict.kind} evidence at {at:%Y-%m-%dT%H:%M:%SZ}: {result}")
