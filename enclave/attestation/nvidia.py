"""NVIDIA Hopper GPU evidence: an SPDM GET_MEASUREMENTS exchange signed by the GPU's identity.

A second piece beside a CPU TEE (a confidential VM with an H100 in CC mode): it says which GPU
firmware measured itself and that the GPU answered this nonce. Order: SPDM request/response
format → the GPU's certificate chain ← the pinned NVIDIA Device Identity CA → the signature
(ECDSA P-384, SHA-384, over request ‖ response without the signature) → the request nonce
against the binding → measurements, driver and VBIOS against the policy.

Format facts: DMTF DSP0274 (SPDM 1.1) GET_MEASUREMENTS / MEASUREMENTS; NVIDIA's opaque data
fields (type/length/value, field 3 driver version, 6 VBIOS version).
"""

from __future__ import annotations

import binascii
import hmac
import itertools
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from enclave.attestation import roots
from enclave.attestation.base import Checks, Code, EvidenceError, ExpectedBinding, Verdict
from enclave.attestation.certs import (
    check_chain,
    ec_public_key,
    load_certificates,
    raw_ecdsa_to_der,
)

REQUEST_SIZE = 37  # version, 0xE0, param1, param2, nonce[32], slot
GET_MEASUREMENTS = 0xE0
MEASUREMENTS = 0x60
SIGNATURE_SIZE = 96  # raw r‖s, P-384
OPAQUE_DRIVER_VERSION = 3
OPAQUE_VBIOS_VERSION = 6
MAX_EVIDENCE = 64 * 1024


@dataclass(frozen=True, slots=True)
class GpuEvidence:
    request: bytes
    response: bytes  # without the signature
    signature: bytes
    nonce: bytes  # the requester's (verifier's) nonce
    measurements: dict[int, bytes]
    driver_version: str
    vbios_version: str


def parse_evidence(data: bytes) -> GpuEvidence:
    if len(data) > 2 * MAX_EVIDENCE:
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "larger than any SPDM measurement exchange")
    try:
        raw = binascii.unhexlify(b"".join(data.split()))
    except (binascii.Error, ValueError):
        raw = data
    try:
        return _parse(raw)
    except (struct.error, IndexError):
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "truncated SPDM exchange") from None


def _parse(raw: bytes) -> GpuEvidence:
    req, resp = raw[:REQUEST_SIZE], raw[REQUEST_SIZE:]
    if len(req) < REQUEST_SIZE or req[1] != GET_MEASUREMENTS or len(resp) < 8:
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "not an SPDM GET_MEASUREMENTS request")
    if resp[1] != MEASUREMENTS or resp[0] != req[0]:
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "not the MEASUREMENTS response to it")
    record_len = int.from_bytes(resp[5:8], "little")
    p = 8 + record_len
    (opaque_len,) = struct.unpack_from("<H", resp, p + 32)
    sig_off = p + 34 + opaque_len
    if sig_off + SIGNATURE_SIZE != len(resp):
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "the lengths do not add up to the response")
    measurements, i = {}, 8
    while i < p:
        index, size = resp[i], int.from_bytes(resp[i + 2 : i + 4], "little")
        if i + 4 + size > p or size < 3:
            raise EvidenceError(Code.EVIDENCE_MALFORMED, "a measurement block runs past its end")
        measurements[index] = resp[i + 7 : i + 4 + size]  # after DMTF type (1) and size (2)
        i += 4 + size
    opaque, fields, j = resp[p + 34 : sig_off], {}, 0
    while j + 4 <= len(opaque):
        ftype, fsize = struct.unpack_from("<HH", opaque, j)
        fields[ftype] = opaque[j + 4 : j + 4 + fsize]
        j += 4 + fsize
    return GpuEvidence(
        request=req,
        response=resp[:sig_off],
        signature=resp[sig_off:],
        nonce=req[4:36],
        measurements=measurements,
        driver_version=fields.get(OPAQUE_DRIVER_VERSION, b"")
        .rstrip(b"\0")
        .decode("ascii", "replace"),
        vbios_version=fields.get(OPAQUE_VBIOS_VERSION, b"").hex(),
    )


def version_tuple(text: str) -> tuple[int, ...]:
    """``"550.90.07"`` → (550, 90, 7); hex parts for VBIOS ``"96.00.9f.00.01"``."""
    parts = text.strip().split(".")
    try:
        if len(parts) == 5:  # a VBIOS version: hex bytes
            return tuple(int(p, 16) for p in parts)
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a dotted version") from None


def vbios_display(raw_hex: str) -> str:
    """NVIDIA's spelling of the VBIOS version from the opaque field's 8 little-endian bytes:
    bytes 3.2.1.0.4 (``"96.00.9f.00.01"``)."""
    raw = bytes.fromhex(raw_hex)
    if len(raw) < 5:
        return raw_hex
    return ".".join(f"{raw[i]:02x}" for i in (3, 2, 1, 0, 4))


@dataclass(frozen=True, slots=True)
class NvidiaGpuPolicy:
    """Allow-lists (from NVIDIA's reference integrity manifests); empty means not checked.
    ``driver_min`` / ``vbios_min``: the lowest driver and VBIOS versions accepted."""

    measurements: Mapping[int, frozenset[bytes]] = field(default_factory=dict)
    driver_versions: frozenset[str] = frozenset()
    vbios_versions: frozenset[str] = frozenset()
    driver_min: tuple[int, ...] | None = None
    vbios_min: tuple[int, ...] | None = None

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> NvidiaGpuPolicy:
        known = {"measurements", "driver_versions", "vbios_versions", "driver_min", "vbios_min"}
        unknown = set(m) - known
        if unknown:
            raise ValueError(f"unknown NVIDIA policy keys: {', '.join(sorted(unknown))}")
        return cls(
            measurements={
                int(k): frozenset(bytes.fromhex(v) for v in ([vs] if isinstance(vs, str) else vs))
                for k, vs in (m.get("measurements") or {}).items()
            },
            driver_versions=frozenset(m.get("driver_versions", ())),
            vbios_versions=frozenset(m.get("vbios_versions", ())),
            driver_min=version_tuple(m["driver_min"]) if m.get("driver_min") else None,
            vbios_min=version_tuple(m["vbios_min"]) if m.get("vbios_min") else None,
        )


OcspCheck = Callable[[x509.Certificate, x509.Certificate], str]
"""Online revocation status of a certificate given its issuer: "good", "revoked" or "unknown";
any exception means the responder could not be asked (recorded as a skip, with the reason)."""


@dataclass(frozen=True, slots=True)
class NvidiaGpuVerifier:
    """Verifies an H100 SPDM measurement exchange; ``certificates`` is the GPU's chain (PEM,
    leaf first) as the driver returns it; ``roots`` replaces the pinned NVIDIA CA."""

    kind: ClassVar[str] = "nvidia"
    policy: NvidiaGpuPolicy = field(default_factory=NvidiaGpuPolicy)
    certificates: bytes = b""
    roots: Sequence[x509.Certificate] | None = None
    ocsp: OcspCheck | None = None  # None: offline, revocation is a visible skip

    def verify(self, evidence: bytes, *, at: datetime, binding: ExpectedBinding) -> Verdict:
        checks = Checks()
        try:
            gpu = parse_evidence(evidence)
        except EvidenceError as exc:
            checks.failed("spdm_format", exc.code, str(exc))
            return checks.verdict(self.kind, {})
        claims = {
            "nonce": gpu.nonce.hex(),
            "driver_version": gpu.driver_version,
            "vbios_version": gpu.vbios_version,
            "measurements": str(len(gpu.measurements)),
        }
        checks.passed("spdm_format", f"SPDM 0x{gpu.request[0]:x}, {len(gpu.measurements)} blocks")
        try:
            chain = load_certificates(self.certificates) if self.certificates else []
        except EvidenceError as exc:
            checks.failed("chain_signatures", exc.code, f"GPU chain: {exc}")
            chain = []
        if not chain:
            checks.failed(
                "chain_signatures", Code.COLLATERAL_INCOMPLETE, "no GPU certificate chain"
            )
        else:
            trusted = self.roots if self.roots is not None else [roots.nvidia_device_identity_ca()]
            check_chain(checks, "chain", chain, trusted, at)
            self._signature(checks, gpu, chain[0])
        self._revocation(checks, chain)
        self._policy(checks, gpu, binding)
        return checks.verdict(self.kind, claims)

    def _revocation(self, checks: Checks, chain: Sequence[x509.Certificate]) -> None:
        if self.ocsp is None:
            checks.skipped("revocation", "offline: OCSP not asked (the policy names no responder)")
            return
        if len(chain) < 2:
            checks.skipped("revocation", "no issuer to ask OCSP about")
            return
        statuses = []
        for cert, issuer in itertools.pairwise(chain):
            try:
                statuses.append(self.ocsp(cert, issuer))
            except Exception as exc:  # the responder is unreachable: say so, do not guess
                checks.skipped("revocation", f"OCSP unreachable: {type(exc).__name__}")
                return
        revoked = "revoked" in statuses
        checks.expect(
            "revocation",
            not revoked,
            Code.CERT_REVOKED,
            "OCSP: " + ", ".join(statuses),
        )

    def _signature(self, checks: Checks, gpu: GpuEvidence, leaf: x509.Certificate) -> None:
        key = ec_public_key(leaf)
        ok = False
        if key is not None:
            try:
                sig = raw_ecdsa_to_der(gpu.signature[:48], gpu.signature[48:])
                key.verify(sig, gpu.request + gpu.response, ec.ECDSA(hashes.SHA384()))
                ok = True
            except InvalidSignature:
                ok = False
        checks.expect(
            "spdm_signature",
            ok,
            Code.SIGNATURE_INVALID,
            "signed by the GPU's attestation key" if ok else "the SPDM signature does not verify",
        )

    def _policy(self, checks: Checks, gpu: GpuEvidence, binding: ExpectedBinding) -> None:
        pol = self.policy
        if not pol.measurements:
            checks.skipped("measurements", "no reference measurements (RIMs) in the policy")
        for index, allowed in sorted(pol.measurements.items()):
            value = gpu.measurements.get(index, b"")
            checks.expect(
                f"measurement{index}",
                value in allowed,
                Code.MEASUREMENT_MISMATCH,
                f"{value.hex()[:32]}… " + ("allowed" if value in allowed else "not allowed"),
            )
        for name, value, allowed in (
            ("driver_version", gpu.driver_version, pol.driver_versions),
            ("vbios_version", gpu.vbios_version, pol.vbios_versions),
        ):
            if not allowed:
                checks.skipped(name, f"{value} (no allow-list)")
            else:
                checks.expect(name, value in allowed, Code.MEASUREMENT_MISMATCH, value)
        vbios = vbios_display(gpu.vbios_version)
        for name, shown, minimum in (
            ("driver_min", gpu.driver_version, pol.driver_min),
            ("vbios_min", vbios, pol.vbios_min),
        ):
            if minimum is None:
                continue
            try:
                ok = version_tuple(shown) >= minimum
            except ValueError:
                ok = False
            spell = "{:02x}" if name == "vbios_min" else "{}"
            wanted = ".".join(spell.format(p) for p in minimum)
            checks.expect(
                name, ok, Code.TCB_TOO_LOW, f"{shown} {'>=' if ok else '<'} {wanted} (minimum)"
            )
        if binding.nonce is None:
            checks.skipped("nonce", f"{gpu.nonce.hex()} (no expected nonce given)")
        else:
            ok = hmac.compare_digest(gpu.nonce, binding.nonce)
            checks.expect(
                "nonce",
                ok,
                Code.NONCE_MISMATCH,
                f"{gpu.nonce.hex()} " + ("== expected" if ok else "!= expected"),
            )
