"""AMD SEV-SNP: verify an attestation report (v2, v3, v5) against AMD's pinned ARKs.

Order (docs/ATTESTATION.md): report format → signing-key certificate present → product →
VCEK/VLEK ← ASK/ASVK ← ARK (RSASSA-PSS, pinned, valid at ``at``) → report signature (ECDSA P-384,
SHA-384 over bytes 0x000..0x29F, r and s little-endian) → chip id == VCEK hwID → reported TCB ==
the VCEK's TCB extensions → minimum TCB → guest policy (debug, SMT, migration agent) → VMPL →
measurement, host data, ID key → report_data == the expected binding digest.

Layout facts: AMD SEV-SNP ABI specification (56860), table "ATTESTATION_REPORT structure".
"""

from __future__ import annotations

import binascii
import hmac
import struct
import uuid
from collections.abc import Mapping, Sequence
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
    common_name,
    ec_public_key,
    is_ca,
    load_certificates,
    raw_ecdsa_to_der,
    signed_by,
)

REPORT_SIZE = 1184
SIGNED_SIZE = 0x2A0
ACCEPTED_VERSIONS = (2, 3, 5)
SIG_ALGO_ECDSA_P384_SHA384 = 1

# Guest policy bits (ABI spec, "GUEST_POLICY").
POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17  # must be 1
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20

# AMD's X.509 extensions on VCEK/VLEK certificates (OID arc 1.3.6.1.4.1.3704.1).
_OID = "1.3.6.1.4.1.3704.1."
OID_PRODUCT_NAME = _OID + "2"
OID_BLSPL, OID_TEESPL, OID_SNPSPL, OID_UCODESPL = (_OID + f"3.{n}" for n in (1, 2, 3, 8))
OID_HWID = _OID + "4"
OID_CSP_ID = _OID + "5"

# Certificate table GUIDs of the extended report (SNP_GET_EXT_REPORT, configfs-tsm auxblob).
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")


@dataclass(frozen=True, slots=True, order=True)
class SnpTcb:
    """A TCB version as Milan and Genoa encode it (byte 0 boot loader, 1 TEE, 6 SNP, 7 ucode)."""

    bootloader: int
    tee: int
    snp: int
    microcode: int

    @classmethod
    def from_u64(cls, raw: int) -> SnpTcb:
        b = raw.to_bytes(8, "little")
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def at_least(self, other: SnpTcb) -> bool:
        return (
            self.bootloader >= other.bootloader
            and self.tee >= other.tee
            and self.snp >= other.snp
            and self.microcode >= other.microcode
        )

    def __str__(self) -> str:
        return f"bl={self.bootloader} tee={self.tee} snp={self.snp} ucode={self.microcode}"


@dataclass(frozen=True, slots=True)
class SnpReport:
    """The fields of an attestation report a verifier uses."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: SnpTcb
    platform_info: int
    signing_key: int  # 0 VCEK, 1 VLEK
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    reported_tcb: SnpTcb
    chip_id: bytes
    signature_r: bytes
    signature_s: bytes

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)


def read_report(data: bytes) -> bytes:
    """The 1184 report bytes from a binary file or hex text (as virtee's samples hold them)."""
    if len(data) == REPORT_SIZE:
        return data
    if len(data) < 4 * REPORT_SIZE:
        try:
            raw = binascii.unhexlify(b"".join(data.split()))
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == REPORT_SIZE:
            return raw
    raise EvidenceError(
        Code.EVIDENCE_MALFORMED,
        f"an SEV-SNP report is {REPORT_SIZE} bytes (binary or hex), got {len(data)} bytes",
    )


def parse_report(data: bytes) -> SnpReport:
    raw = read_report(data)
    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0x00)
    vmpl, sig_algo, current_tcb, platform_info, flags = struct.unpack_from("<IIQQI", raw, 0x30)
    (reported_tcb,) = struct.unpack_from("<Q", raw, 0x180)
    return SnpReport(
        raw=raw,
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=vmpl,
        signature_algo=sig_algo,
        current_tcb=SnpTcb.from_u64(current_tcb),
        platform_info=platform_info,
        signing_key=(flags >> 2) & 0b111,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        reported_tcb=SnpTcb.from_u64(reported_tcb),
        chip_id=raw[0x1A0:0x1E0],
        signature_r=raw[0x2A0:0x2E8],
        signature_s=raw[0x2E8:0x330],
    )


def parse_cert_table(table: bytes) -> dict[uuid.UUID, bytes]:
    """The certificates of an extended report: GUID, offset, length entries ended by zeros."""
    out: dict[uuid.UUID, bytes] = {}
    for pos in range(0, min(len(table), 64 * 24), 24):
        entry = table[pos : pos + 24]
        if len(entry) < 24 or entry == bytes(24):
            break
        offset, length = struct.unpack_from("<II", entry, 16)
        if offset + length > len(table):
            raise EvidenceError(Code.EVIDENCE_MALFORMED, "certificate table entry out of range")
        out[uuid.UUID(bytes=entry[:16])] = table[offset : offset + length]
    return out


def _der_small_int(value: bytes) -> int:
    # AMD's TCB extensions are DER INTEGERs (tag 2, short length).
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2:
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "an AMD TCB extension is not an INTEGER")
    return int.from_bytes(value[2:], "big")


def _ext(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    return ext.value if isinstance(ext, x509.UnrecognizedExtension) else None


def product_of(cert: x509.Certificate) -> str:
    """'Milan' from a VCEK's productName 'Milan-B0' (a DER IA5String); VLEKs name it too."""
    raw = _ext(cert, OID_PRODUCT_NAME)
    if raw is None or len(raw) < 2 or raw[0] != 0x16 or raw[1] != len(raw) - 2:
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "the key certificate has no productName")
    return raw[2:].decode("ascii", "replace").split("-", 1)[0]


def cert_tcb(cert: x509.Certificate) -> SnpTcb:
    values = [_ext(cert, oid) for oid in (OID_BLSPL, OID_TEESPL, OID_SNPSPL, OID_UCODESPL)]
    if any(v is None for v in values):
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "the key certificate lacks TCB extensions")
    bl, tee, snp, ucode = (_der_small_int(v) for v in values if v is not None)
    return SnpTcb(bootloader=bl, tee=tee, snp=snp, microcode=ucode)


def _hexset(values: Any, size: int, what: str) -> frozenset[bytes]:
    out = frozenset(bytes.fromhex(v) for v in values or ())
    if any(len(v) != size for v in out):
        raise ValueError(f"{what}: each value is {size} bytes of hex")
    return out


@dataclass(frozen=True, slots=True)
class SevSnpPolicy:
    """What an SEV-SNP guest must be. Empty allow-lists mean "not checked" (reported as skipped)."""

    measurements: frozenset[bytes] = frozenset()
    host_data: bytes | None = None
    id_key_digests: frozenset[bytes] = frozenset()
    minimum_tcb: SnpTcb | None = None
    allow_debug: bool = False
    allow_smt: bool = True
    allow_migration_agent: bool = False
    vmpl: int | None = 0
    products: frozenset[str] = frozenset({"Milan", "Genoa"})
    allow_vlek: bool = True

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> SevSnpPolicy:
        """From a policy file's JSON object (hex strings, see docs/ATTESTATION.md)."""
        known = {f.name for f in cls.__dataclass_fields__.values()}
        unknown = set(m) - known
        if unknown:
            raise ValueError(f"unknown SEV-SNP policy keys: {', '.join(sorted(unknown))}")
        tcb = m.get("minimum_tcb")
        return cls(
            measurements=_hexset(m.get("measurements"), 48, "measurements"),
            host_data=bytes.fromhex(m["host_data"]) if m.get("host_data") else None,
            id_key_digests=_hexset(m.get("id_key_digests"), 48, "id_key_digests"),
            minimum_tcb=SnpTcb(**tcb) if tcb else None,
            allow_debug=bool(m.get("allow_debug", False)),
            allow_smt=bool(m.get("allow_smt", True)),
            allow_migration_agent=bool(m.get("allow_migration_agent", False)),
            vmpl=m.get("vmpl", 0),
            products=frozenset(m.get("products", ("Milan", "Genoa"))),
            allow_vlek=bool(m.get("allow_vlek", True)),
        )


@dataclass(frozen=True, slots=True)
class SevSnpVerifier:
    """Verifies SEV-SNP reports. ``certificates`` holds what the platform gave with the report
    (VCEK or VLEK, optionally ASK/ASVK and ARK; DER or PEM); missing intermediates come from the
    shipped AMD bundle. ``roots`` replaces the pinned ARKs (tests, private PKIs)."""

    kind: ClassVar[str] = "sev-snp"
    policy: SevSnpPolicy = field(default_factory=SevSnpPolicy)
    certificates: Sequence[bytes] = ()
    roots: Sequence[x509.Certificate] | None = None

    def verify(self, evidence: bytes, *, at: datetime, binding: ExpectedBinding) -> Verdict:
        checks = Checks()
        claims: dict[str, str] = {}
        try:
            report = parse_report(evidence)
        except EvidenceError as exc:
            checks.failed("report_format", exc.code, str(exc))
            return checks.verdict(self.kind, claims)
        claims.update(_claims(report))
        if not self._format(checks, report):
            return checks.verdict(self.kind, claims)
        key_cert = self._chain(checks, report, at, claims)
        if key_cert is not None:
            self._signature(checks, report, key_cert)
            self._platform(checks, report, key_cert)
        self._guest(checks, report)
        self._binding(checks, report, binding)
        return checks.verdict(self.kind, claims)

    def _format(self, checks: Checks, report: SnpReport) -> bool:
        ok = checks.expect(
            "report_version",
            report.version in ACCEPTED_VERSIONS,
            Code.UNSUPPORTED_VERSION,
            f"version {report.version} (accepted: {', '.join(map(str, ACCEPTED_VERSIONS))})",
        )
        return ok and checks.expect(
            "signature_algorithm",
            report.signature_algo == SIG_ALGO_ECDSA_P384_SHA384,
            Code.UNSUPPORTED_VERSION,
            f"signature_algo {report.signature_algo} (1 = ECDSA P-384 with SHA-384)",
        )

    def _chain(
        self, checks: Checks, report: SnpReport, at: datetime, claims: dict[str, str]
    ) -> x509.Certificate | None:
        """Check the product and VCEK/VLEK ← ASK/ASVK ← ARK; return the key certificate."""
        try:
            supplied = [c for blob in self.certificates for c in load_certificates(blob)]
        except EvidenceError as exc:
            checks.failed("key_certificate", exc.code, str(exc))
            return None
        want = "SEV-VLEK" if report.signing_key == 1 else "SEV-VCEK"
        if report.signing_key not in (0, 1):
            checks.failed(
                "key_certificate",
                Code.UNSUPPORTED_VERSION,
                f"signing_key {report.signing_key} (0 = VCEK, 1 = VLEK)",
            )
            return None
        leaf = next((c for c in supplied if common_name(c.subject) == want), None)
        if leaf is None:
            checks.failed(
                "key_certificate",
                Code.COLLATERAL_INCOMPLETE,
                f"the report is signed by a {want[4:]} and no {want[4:]} certificate was given",
            )
            return None
        if report.signing_key == 1 and not self.policy.allow_vlek:
            checks.failed("key_certificate", Code.GUEST_POLICY_NOT_ALLOWED, "VLEK not allowed")
            return None
        checks.passed("key_certificate", f"{want[4:]} {common_name(leaf.issuer)}")
        try:
            product = product_of(leaf)
        except EvidenceError as exc:
            checks.failed("product", exc.code, str(exc))
            return leaf
        claims["product"] = product
        trusted = list(self.roots) if self.roots is not None else list(roots.amd_arks())
        cas = [c for c in supplied if c is not leaf and is_ca(c)]
        # The intermediate the platform gave wins; else the one AMD publishes for the product.
        intermediate = next((c for c in cas if not signed_by(c, c)), None)
        if intermediate is None:
            intermediate = next(
                (c for c in roots.amd_intermediates() if c.subject == leaf.issuer), None
            )
        ark = next((c for c in cas if signed_by(c, c)), None)
        if intermediate is not None and ark is None:
            # A trusted root of that name, else AMD's own (then refused as not pinned).
            known = (*trusted, *roots.amd_arks())
            ark = next((c for c in known if c.subject == intermediate.issuer), None)
        names = [common_name(c.subject) for c in (intermediate, ark) if c is not None]
        expected = {f"SEV-{product}", f"SEV-VLEK-{product}", f"ARK-{product}"}
        if not checks.expect(
            "product",
            product in self.policy.products and all(n in expected for n in names),
            Code.WRONG_PRODUCT,
            f"key certificate for {product}; chain {' <- '.join(names) or '(none)'}"
            + ("" if product in self.policy.products else " (product not allowed by policy)"),
        ):
            return leaf
        if intermediate is None or ark is None:
            checks.failed(
                "chain_signatures",
                Code.COLLATERAL_INCOMPLETE,
                f"no AMD intermediate/root for {common_name(leaf.issuer)}",
            )
            return leaf
        check_chain(checks, "chain", [leaf, intermediate, ark], trusted, at)
        return leaf

    def _signature(self, checks: Checks, report: SnpReport, key_cert: x509.Certificate) -> None:
        key = ec_public_key(key_cert)
        if key is None or key.curve.name != "secp384r1":
            checks.failed("report_signature", Code.CHAIN_INVALID, "the key is not ECDSA P-384")
            return
        sig = raw_ecdsa_to_der(report.signature_r, report.signature_s, little_endian=True)
        try:
            key.verify(sig, report.raw[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            checks.failed(
                "report_signature",
                Code.SIGNATURE_INVALID,
                "the report signature does not verify under the key certificate",
            )
            return
        checks.passed("report_signature", "ECDSA P-384/SHA-384 over bytes 0x000..0x29F")

    def _platform(self, checks: Checks, report: SnpReport, key_cert: x509.Certificate) -> None:
        if report.signing_key == 0:
            hwid = _ext(key_cert, OID_HWID)
            # AMD stores the 64 raw bytes, no OCTET STRING around them.
            checks.expect(
                "chip_id",
                hwid == report.chip_id,
                Code.HWID_MISMATCH,
                f"report chip_id {report.chip_id[:8].hex()}… "
                + ("== VCEK hwID" if hwid == report.chip_id else "!= VCEK hwID"),
            )
        else:
            checks.skipped("chip_id", "VLEK: the certificate names the cloud provider, not a chip")
        try:
            tcb = cert_tcb(key_cert)
        except EvidenceError as exc:
            checks.failed("reported_tcb", exc.code, str(exc))
        else:
            checks.expect(
                "reported_tcb",
                tcb == report.reported_tcb,
                Code.TCB_MISMATCH,
                f"report {report.reported_tcb}; certificate {tcb}",
            )
        minimum = self.policy.minimum_tcb
        if minimum is None:
            checks.skipped("minimum_tcb", "no minimum TCB in the policy")
        else:
            checks.expect(
                "minimum_tcb",
                report.reported_tcb.at_least(minimum),
                Code.TCB_TOO_LOW,
                f"reported {report.reported_tcb}; minimum {minimum}",
            )

    def _guest(self, checks: Checks, report: SnpReport) -> None:
        p, pol = report.policy, self.policy
        checks.expect(
            "debug",
            pol.allow_debug or not report.debug,
            Code.DEBUG_NOT_ALLOWED,
            f"guest policy 0x{p:x}: DEBUG={int(report.debug)}"
            + (" (allowed by policy)" if pol.allow_debug and report.debug else ""),
        )
        refused = [
            why
            for why, bad in (
                ("reserved bit 17 is not 1", not p & POLICY_RESERVED_ONE),
                ("SMT allowed", bool(p & POLICY_SMT) and not pol.allow_smt),
                (
                    "migration agent allowed",
                    bool(p & POLICY_MIGRATE_MA) and not pol.allow_migration_agent,
                ),
            )
            if bad
        ]
        checks.expect(
            "guest_policy",
            not refused,
            Code.GUEST_POLICY_NOT_ALLOWED,
            f"guest policy 0x{p:x}" + (f": {', '.join(refused)}" if refused else ""),
        )
        if pol.vmpl is None:
            checks.skipped("vmpl", f"vmpl {report.vmpl}; any allowed")
        else:
            checks.expect(
                "vmpl",
                report.vmpl == pol.vmpl,
                Code.GUEST_POLICY_NOT_ALLOWED,
                f"vmpl {report.vmpl}; required {pol.vmpl}",
            )
        _allow(
            checks, "measurement", report.measurement, pol.measurements, Code.MEASUREMENT_MISMATCH
        )
        if pol.host_data is None:
            checks.skipped("host_data", "no host_data in the policy")
        else:
            checks.expect(
                "host_data",
                report.host_data == pol.host_data,
                Code.HOST_DATA_MISMATCH,
                f"host_data {report.host_data.hex()}",
            )
        _allow(
            checks,
            "id_key_digest",
            report.id_key_digest,
            pol.id_key_digests,
            Code.MEASUREMENT_MISMATCH,
        )

    def _binding(self, checks: Checks, report: SnpReport, binding: ExpectedBinding) -> None:
        check_report_data(checks, report.report_data, binding)


def _allow(checks: Checks, name: str, value: bytes, allowed: frozenset[bytes], code: Code) -> None:
    if not allowed:
        checks.skipped(name, f"{value.hex()} (no allow-list in the policy)")
    else:
        checks.expect(
            name,
            value in allowed,
            code,
            f"{value.hex()} " + ("is allowed" if value in allowed else "is not allowed"),
        )


def check_report_data(checks: Checks, report_data: bytes, binding: ExpectedBinding) -> None:
    """SEV-SNP and TDX: the 64 report_data bytes equal the expected binding digest."""
    if binding.report_data is None:
        checks.skipped("report_data", f"{report_data.hex()} (no expected binding given)")
        return
    expected = binding.report_data.ljust(64, b"\0")
    checks.expect(
        "report_data",
        len(binding.report_data) <= 64 and hmac.compare_digest(report_data, expected),
        Code.REPORT_DATA_MISMATCH,
        f"{report_data.hex()} " + ("== expected" if report_data == expected else "!= expected"),
    )


def _claims(r: SnpReport) -> dict[str, str]:
    return {
        "version": str(r.version),
        "policy": f"0x{r.policy:x}",
        "debug": str(r.debug).lower(),
        "vmpl": str(r.vmpl),
        "signing_key": "VLEK" if r.signing_key == 1 else "VCEK",
        "measurement": r.measurement.hex(),
        "report_data": r.report_data.hex(),
        "host_data": r.host_data.hex(),
        "id_key_digest": r.id_key_digest.hex(),
        "chip_id": r.chip_id.hex(),
        "reported_tcb": str(r.reported_tcb),
        "guest_svn": str(r.guest_svn),
    }
