"""Intel TDX: verify a quote (v4, and v5 with a TDX 1.0 or 1.5 body) against Intel's pinned root.

Order (docs/ATTESTATION.md): quote format → PCK chain carried in the quote ← Intel SGX Root CA →
the PCK key signed the QE report → the QE report binds the attestation key → the attestation key
signed header and TD body → collateral complete → its signer chain, signatures (over the exact
bytes as served) and freshness → CRLs → FMSPC → QE identity → TDX module → TCB status → debug →
MRTD, RTMRs and owner fields → report_data == the expected binding digest.

Layout facts: Intel TDX DCAP Quote Generation Library and Quote Verification Library API
("Quote format"), Intel PCS API (TCB info v3, enclave identity v2).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
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
from enclave.attestation.sev_snp import check_report_data

HEADER_SIZE = 48
TEE_TYPE_TDX = 0x81
AK_TYPE_ECDSA_P256 = 2
QE_REPORT_SIZE = 384
CERT_DATA_QE_REPORT = 6
CERT_DATA_PCK_CHAIN = 5
MAX_QUOTE_SIZE = 64 * 1024
# v5 body descriptor types: 2 = TDX 1.0 body, 3 = TDX 1.5 body.
BODY_SIZES = {2: 584, 3: 648}

TD_BODY_FIELDS = (
    ("tee_tcb_svn", 16), ("mr_seam", 48), ("mr_signer_seam", 48), ("seam_attributes", 8),
    ("td_attributes", 8), ("xfam", 8), ("mr_td", 48), ("mr_config_id", 48), ("mr_owner", 48),
    ("mr_owner_config", 48), ("rtmr0", 48), ("rtmr1", 48), ("rtmr2", 48), ("rtmr3", 48),
    ("report_data", 64), ("tee_tcb_svn2", 16), ("mr_servicetd", 48),  # last two: TDX 1.5
)  # fmt: skip

SGX_EXT = "1.2.840.113741.1.13.1"
STATUSES = (
    "UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
    "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class TdxQuote:
    raw: bytes
    version: int
    signed_len: int  # header (+ v5 descriptor) + body: what the attestation key signs
    qe_vendor_id: bytes
    body: dict[str, bytes]
    signature: bytes  # raw r‖s
    attestation_key: bytes  # raw x‖y
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes

    @property
    def td_attributes(self) -> int:
        return int.from_bytes(self.body["td_attributes"], "little")


def parse_quote(data: bytes) -> TdxQuote:
    try:
        return _parse_quote(data)
    except (struct.error, IndexError) as exc:
        raise EvidenceError(Code.EVIDENCE_MALFORMED, f"truncated TDX quote ({exc})") from None


def _parse_quote(q: bytes) -> TdxQuote:
    if len(q) > MAX_QUOTE_SIZE:
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "the quote is larger than any TDX quote")
    version, ak_type, tee_type = struct.unpack_from("<HHI", q, 0)
    if version not in (4, 5) or ak_type != AK_TYPE_ECDSA_P256 or tee_type != TEE_TYPE_TDX:
        raise EvidenceError(
            Code.UNSUPPORTED_VERSION,
            f"quote version {version}, key type {ak_type}, TEE 0x{tee_type:x} "
            "(accepted: v4/v5, 2 = ECDSA P-256, 0x81 = TDX)",
        )
    if version == 4:
        body_off, body_len = HEADER_SIZE, BODY_SIZES[2]
    else:
        body_type, body_len = struct.unpack_from("<HI", q, HEADER_SIZE)
        if BODY_SIZES.get(body_type) != body_len:
            raise EvidenceError(
                Code.UNSUPPORTED_VERSION, f"v5 body type {body_type} of {body_len} bytes"
            )
        body_off = HEADER_SIZE + 6
    signed_len = body_off + body_len
    raw_body = _take(q, body_off, body_len)
    body, off = {}, 0
    for name, size in TD_BODY_FIELDS:
        if off + size <= body_len:
            body[name] = raw_body[off : off + size]
        off += size
    (sig_len,) = struct.unpack_from("<I", q, signed_len)
    sd = _take(q, signed_len + 4, sig_len)
    cd_type, cd_size = struct.unpack_from("<HI", sd, 128)
    if cd_type != CERT_DATA_QE_REPORT:
        raise EvidenceError(
            Code.EVIDENCE_MALFORMED, f"certification data type {cd_type}, expected 6 (QE report)"
        )
    cd = _take(sd, 134, cd_size)
    (auth_len,) = struct.unpack_from("<H", cd, QE_REPORT_SIZE + 64)
    p = QE_REPORT_SIZE + 66 + auth_len
    inner_type, inner_size = struct.unpack_from("<HI", cd, p)
    if inner_type != CERT_DATA_PCK_CHAIN:
        raise EvidenceError(
            Code.EVIDENCE_MALFORMED, f"inner certification data type {inner_type}, expected 5"
        )
    return TdxQuote(
        raw=q,
        version=version,
        signed_len=signed_len,
        qe_vendor_id=q[12:28],
        body=body,
        signature=sd[0:64],
        attestation_key=sd[64:128],
        qe_report=cd[:QE_REPORT_SIZE],
        qe_report_signature=cd[QE_REPORT_SIZE : QE_REPORT_SIZE + 64],
        qe_auth_data=_take(cd, QE_REPORT_SIZE + 66, auth_len),
        pck_chain_pem=_take(cd, p + 6, inner_size).rstrip(b"\0"),
    )


def _take(buf: bytes, off: int, size: int) -> bytes:
    if off + size > len(buf):
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "a length in the quote runs past its end")
    return buf[off : off + size]


# -- the PCK certificate's SGX extension (a nested DER SEQUENCE of OID/value pairs) ----------


def _der_items(buf: bytes) -> Iterator[tuple[int, bytes]]:
    i = 0
    while i < len(buf):
        tag, n = buf[i], buf[i + 1]
        i += 2
        if n & 0x80:
            width = n & 0x7F
            n = int.from_bytes(buf[i : i + width], "big")
            i += width
        if i + n > len(buf):
            raise EvidenceError(Code.EVIDENCE_MALFORMED, "bad DER in the PCK SGX extension")
        yield tag, buf[i : i + n]
        i += n


def _der_oid(val: bytes) -> str:
    parts, acc = [val[0] // 40, val[0] % 40], 0
    for b in val[1:]:
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(acc)
            acc = 0
    return ".".join(map(str, parts))


@dataclass(frozen=True, slots=True)
class PckTcb:
    fmspc: str  # hex, lower case
    sgx_components: tuple[int, ...]  # 16
    pcesvn: int


def pck_tcb(cert: x509.Certificate) -> PckTcb:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXT)).value
        raw = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
        ((_, seq),) = list(_der_items(raw))
        fmspc, comps = "", {}
        for _, item in _der_items(seq):
            (_, oid), (_, val) = list(_der_items(item))[:2]
            short = _der_oid(oid)[len(SGX_EXT) + 1 :]
            if short == "4":
                fmspc = val.hex()
            elif short == "2":
                for _, comp in _der_items(val):
                    (_, coid), (ctag, cval) = list(_der_items(comp))
                    if ctag == 0x02:
                        comps[int(_der_oid(coid).rsplit(".", 1)[1])] = int.from_bytes(cval, "big")
        return PckTcb(fmspc, tuple(comps[i] for i in range(1, 17)), comps[17])
    except (x509.ExtensionNotFound, ValueError, KeyError, IndexError):
        raise EvidenceError(
            Code.EVIDENCE_MALFORMED, "the PCK certificate has no readable SGX extension"
        ) from None


# -- collateral ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TdxCollateral:
    """What Intel's PCS serves beside a quote, as served (bodies and headers verbatim)."""

    tcb_info: bytes | None = None  # /tdx/certification/v4/tcb body: {"tcbInfo":…,"signature":…}
    qe_identity: bytes | None = None  # /tdx/certification/v4/qe/identity body
    tcb_signing_chain: bytes | None = None  # TCB-Info-Issuer-Chain header, URL-decoded PEM
    pck_crl: bytes | None = None  # /sgx/certification/v4/pckcrl?ca=platform (DER or PEM)
    root_ca_crl: bytes | None = None  # Intel SGX Root CA CRL (DER or PEM)

    FILES: ClassVar[dict[str, str]] = {
        "tcb_info": "tcb_info.json",
        "qe_identity": "qe_identity.json",
        "tcb_signing_chain": "tcb_signing_chain.pem",
        "pck_crl": "pck_crl.der",
        "root_ca_crl": "root_ca_crl.der",
    }

    @classmethod
    def from_dir(cls, directory: Path) -> TdxCollateral:
        """Read the files named in FILES that exist (missing ones stay None)."""
        values: dict[str, bytes | None] = {}
        for name, file in cls.FILES.items():
            path = directory / file
            values[name] = path.read_bytes()[: 1024 * 1024] if path.is_file() else None
        return cls(**values)

    def missing(self) -> list[str]:
        return [self.FILES[n] for n in self.FILES if getattr(self, n) is None]


def signed_json(body: bytes, key: str) -> tuple[dict[str, Any], bytes, bytes]:
    """(parsed object, the exact bytes Intel signed, raw signature) of a PCS collateral body.

    The signature covers the inner object's bytes as served: re-serialising the parsed JSON
    would change whitespace and key order, so the span is cut out of the body itself.
    """
    try:
        text = body.decode()
        whole = json.loads(text)
        start = text.index("{", text.index(f'"{key}"') + len(key) + 2)
        # raw_decode reports where the object ends: the span is exactly the served bytes.
        obj, end = json.JSONDecoder().raw_decode(text, start)
        span = text[start:end]
        if obj != whole[key]:
            raise ValueError("span mismatch")
        return obj, span.encode(), bytes.fromhex(whole["signature"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise EvidenceError(Code.COLLATERAL_INVALID, f"no signed '{key}' object") from None


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def platform_tcb_status(tcb_info: Mapping[str, Any], pck: PckTcb, tee_tcb_svn: bytes) -> str | None:
    """The status of the first TCB level the platform meets (levels run newest first), or None
    when it meets none ("TCB level not supported"). SGX components and PCESVN come from the PCK
    certificate, the TDX components from the TD's tee_tcb_svn; when tee_tcb_svn[1] > 0 the first
    two TDX components are the module's and are judged by tdxModuleIdentities instead."""
    start = 2 if tee_tcb_svn[1] > 0 else 0
    for level in tcb_info["tcbLevels"]:
        tcb = level["tcb"]
        sgx = [c["svn"] for c in tcb["sgxtcbcomponents"]]
        tdx = [c["svn"] for c in tcb["tdxtcbcomponents"]]
        if (
            all(have >= need for have, need in zip(pck.sgx_components, sgx, strict=True))
            and pck.pcesvn >= tcb["pcesvn"]
            and all(tee_tcb_svn[i] >= tdx[i] for i in range(start, 16))
        ):
            return str(level["tcbStatus"])
    return None


def module_tcb_status(tcb_info: Mapping[str, Any], tee_tcb_svn: bytes) -> tuple[str, str | None]:
    """(module id, status) for a TD whose tee_tcb_svn names a TDX module (svn[1] > 0)."""
    module_id = f"TDX_{tee_tcb_svn[1]:02X}"
    for ident in tcb_info.get("tdxModuleIdentities", []):
        if str(ident["id"]).upper() == module_id:
            for level in ident["tcbLevels"]:
                if tee_tcb_svn[0] >= level["tcb"]["isvsvn"]:
                    return module_id, str(level["tcbStatus"])
    return module_id, None


# -- policy and verifier ---------------------------------------------------------------------


def _hexset(values: Any, size: int, what: str) -> frozenset[bytes]:
    out = frozenset(bytes.fromhex(v) for v in values or ())
    if any(len(v) != size for v in out):
        raise ValueError(f"{what}: each value is {size} bytes of hex")
    return out


@dataclass(frozen=True, slots=True)
class TdxPolicy:
    """What a TD must be. Empty allow-lists mean "not checked" (reported as skipped)."""

    accepted_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    mr_td: frozenset[bytes] = frozenset()
    rtmr0: frozenset[bytes] = frozenset()
    rtmr1: frozenset[bytes] = frozenset()
    rtmr2: frozenset[bytes] = frozenset()
    rtmr3: frozenset[bytes] = frozenset()
    mr_config_id: frozenset[bytes] = frozenset()
    mr_owner: frozenset[bytes] = frozenset()
    mr_owner_config: frozenset[bytes] = frozenset()
    allow_debug: bool = False

    MEASURED: ClassVar[tuple[str, ...]] = (
        "mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id", "mr_owner", "mr_owner_config",
    )  # fmt: skip

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> TdxPolicy:
        known = {"accepted_tcb_statuses", "allow_debug", *cls.MEASURED}
        unknown = set(m) - known
        if unknown:
            raise ValueError(f"unknown TDX policy keys: {', '.join(sorted(unknown))}")
        statuses = frozenset(m.get("accepted_tcb_statuses", ("UpToDate",)))
        if not statuses <= set(STATUSES) - {"Revoked"}:
            raise ValueError(f"accepted_tcb_statuses: choose from {', '.join(STATUSES[:-1])}")
        return cls(
            accepted_tcb_statuses=statuses,
            allow_debug=bool(m.get("allow_debug", False)),
            **{n: _hexset(m.get(n), 48, n) for n in cls.MEASURED},
        )


@dataclass(frozen=True, slots=True)
class TdxVerifier:
    """Verifies TDX quotes. The PCK chain comes from the quote; ``collateral`` is what Intel's
    PCS serves (TCB info, QE identity, their signer chain, CRLs). ``roots`` replaces the pinned
    Intel SGX Root CA."""

    kind: ClassVar[str] = "tdx"
    policy: TdxPolicy = field(default_factory=TdxPolicy)
    collateral: TdxCollateral = field(default_factory=TdxCollateral)
    roots: Sequence[x509.Certificate] | None = None

    def verify(self, evidence: bytes, *, at: datetime, binding: ExpectedBinding) -> Verdict:
        checks = Checks()
        claims: dict[str, str] = {}
        try:
            quote = parse_quote(evidence)
        except EvidenceError as exc:
            checks.failed("quote_format", exc.code, str(exc))
            return checks.verdict(self.kind, claims)
        claims.update({"version": str(quote.version)})
        claims.update({k: v.hex() for k, v in quote.body.items()})
        checks.passed(
            "quote_format", f"v{quote.version}, ECDSA P-256, TDX, signed {quote.signed_len} bytes"
        )
        trusted = list(self.roots) if self.roots is not None else [roots.intel_sgx_root()]
        pck_chain = self._quote(checks, quote, at, trusted)
        if pck_chain is not None:
            self._collateral(checks, quote, pck_chain, at, trusted, claims)
        self._td(checks, quote, binding)
        return checks.verdict(self.kind, claims)

    def _quote(
        self, checks: Checks, quote: TdxQuote, at: datetime, trusted: list[x509.Certificate]
    ) -> list[x509.Certificate] | None:
        try:
            chain = load_certificates(quote.pck_chain_pem)
        except EvidenceError as exc:
            checks.failed("pck_chain_signatures", exc.code, f"PCK chain: {exc}")
            return None
        check_chain(checks, "pck_chain", chain, trusted, at)
        leaf_key = ec_public_key(chain[0])
        ok = leaf_key is not None and _verify_raw(
            leaf_key, quote.qe_report_signature, quote.qe_report
        )
        checks.expect(
            "qe_report_signature",
            ok,
            Code.QE_REPORT_INVALID,
            "QE report signed by the PCK key" if ok else "the PCK key did not sign the QE report",
        )
        bound = quote.qe_report[320:384] == hashlib.sha256(
            quote.attestation_key + quote.qe_auth_data
        ).digest() + bytes(32)
        checks.expect(
            "attestation_key_binding",
            bound,
            Code.ATTESTATION_KEY_UNBOUND,
            "QE report_data == SHA-256(attestation key ‖ QE auth data) ‖ 0³²"
            if bound
            else "the QE report does not bind the attestation key",
        )
        try:
            ak = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b"\x04" + quote.attestation_key
            )
            ok = _verify_raw(ak, quote.signature, quote.raw[: quote.signed_len])
        except ValueError:
            ok = False
        checks.expect(
            "quote_signature",
            ok,
            Code.SIGNATURE_INVALID,
            f"attestation key signed bytes 0..{quote.signed_len}"
            if ok
            else "the quote signature does not verify under the attestation key",
        )
        return chain

    def _collateral(
        self,
        checks: Checks,
        quote: TdxQuote,
        pck_chain: list[x509.Certificate],
        at: datetime,
        trusted: list[x509.Certificate],
        claims: dict[str, str],
    ) -> None:
        col = self.collateral
        if (
            col.tcb_info is None
            or col.qe_identity is None
            or col.tcb_signing_chain is None
            or col.pck_crl is None
            or col.root_ca_crl is None
        ):
            checks.failed(
                "collateral",
                Code.COLLATERAL_INCOMPLETE,
                f"missing {', '.join(col.missing())}: the TCB status cannot be decided",
            )
            return
        checks.passed("collateral", "TCB info, QE identity, signer chain and CRLs present")
        try:
            signer_chain = load_certificates(col.tcb_signing_chain)
            tcb_info, tcb_bytes, tcb_sig = signed_json(col.tcb_info, "tcbInfo")
            qe_id, qe_bytes, qe_sig = signed_json(col.qe_identity, "enclaveIdentity")
            pck_crl = _load_crl(col.pck_crl)
            root_crl = _load_crl(col.root_ca_crl)
        except EvidenceError as exc:
            checks.failed("collateral_format", exc.code, str(exc))
            return
        check_chain(checks, "tcb_signing_chain", signer_chain, trusted, at)
        signer = ec_public_key(signer_chain[0])
        for name, signed, sig in (
            ("tcb_info", tcb_bytes, tcb_sig),
            ("qe_identity", qe_bytes, qe_sig),
        ):
            ok = signer is not None and _verify_raw(signer, sig, signed)
            checks.expect(
                f"{name}_signature",
                ok,
                Code.COLLATERAL_INVALID,
                "signed by Intel SGX TCB Signing over the bytes as served"
                if ok
                else "signature does not verify under the TCB signing key",
            )
        stale = [
            f"{name} {obj.get('issueDate')}..{obj.get('nextUpdate')}"
            for name, obj in (("tcbInfo", tcb_info), ("enclaveIdentity", qe_id))
            if not _when(obj["issueDate"]) <= at <= _when(obj["nextUpdate"])
        ] + [
            f"{name} {crl.last_update_utc:%Y-%m-%d}..{crl.next_update_utc:%Y-%m-%d}"
            for name, crl in (("PCK CRL", pck_crl), ("root CA CRL", root_crl))
            if crl.next_update_utc is None or not crl.last_update_utc <= at <= crl.next_update_utc
        ]
        checks.expect(
            "collateral_freshness",
            not stale,
            Code.COLLATERAL_STALE,
            f"all current at {at:%Y-%m-%dT%H:%M:%SZ}"
            if not stale
            else "stale: " + "; ".join(stale),
        )
        self._revocation(checks, pck_chain, signer_chain, pck_crl, root_crl, trusted)
        self._tcb(checks, quote, pck_chain[0], tcb_info, qe_id, claims)

    def _revocation(
        self,
        checks: Checks,
        pck_chain: list[x509.Certificate],
        signer_chain: list[x509.Certificate],
        pck_crl: x509.CertificateRevocationList,
        root_crl: x509.CertificateRevocationList,
        trusted: list[x509.Certificate],
    ) -> None:
        platform_ca = pck_chain[1] if len(pck_chain) > 1 else pck_chain[0]
        signed = (
            pck_crl.issuer == platform_ca.subject
            and _crl_signed(pck_crl, platform_ca)
            and any(_crl_signed(root_crl, r) for r in trusted)
        )
        if not checks.expect(
            "crl_signatures",
            signed,
            Code.COLLATERAL_INVALID,
            "PCK CRL by the PCK's issuer, root CRL by the root"
            if signed
            else "a CRL is not signed by the expected issuer",
        ):
            return
        revoked = [
            cert
            for crl, certs in ((pck_crl, pck_chain[:1]), (root_crl, [platform_ca, signer_chain[0]]))
            for cert in certs
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        ]
        checks.expect(
            "revocation",
            not revoked,
            Code.CERT_REVOKED,
            "PCK, PCK CA and TCB signing certificate not revoked"
            if not revoked
            else f"revoked: {', '.join(c.subject.rfc4514_string() for c in revoked)}",
        )

    def _tcb(
        self,
        checks: Checks,
        quote: TdxQuote,
        pck: x509.Certificate,
        tcb_info: Mapping[str, Any],
        qe_id: Mapping[str, Any],
        claims: dict[str, str],
    ) -> None:
        try:
            pck_svn = pck_tcb(pck)
            self._tcb_checks(checks, quote, pck_svn, tcb_info, qe_id, claims)
        except EvidenceError as exc:
            checks.failed("tcb_status", exc.code, str(exc))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            checks.failed("tcb_status", Code.COLLATERAL_INVALID, f"unexpected TCB info: {exc!r}")

    def _tcb_checks(
        self,
        checks: Checks,
        quote: TdxQuote,
        pck: PckTcb,
        tcb_info: Mapping[str, Any],
        qe_id: Mapping[str, Any],
        claims: dict[str, str],
    ) -> None:
        claims["fmspc"] = pck.fmspc
        checks.expect(
            "fmspc",
            tcb_info["id"] == "TDX" and pck.fmspc == str(tcb_info["fmspc"]).lower(),
            Code.FMSPC_MISMATCH,
            f"PCK FMSPC {pck.fmspc}; TCB info {tcb_info['id']} FMSPC {tcb_info['fmspc']}",
        )
        qe = quote.qe_report
        miscselect, attributes, mrsigner = qe[16:20], qe[48:64], qe[128:160]
        isvprodid, isvsvn = struct.unpack_from("<HH", qe, 256)
        masked_ms = _and(miscselect, bytes.fromhex(qe_id["miscselectMask"]))
        masked_attr = _and(attributes, bytes.fromhex(qe_id["attributesMask"]))
        checks.expect(
            "qe_identity",
            qe_id["id"] == "TD_QE"
            and mrsigner == bytes.fromhex(qe_id["mrsigner"])
            and isvprodid == qe_id["isvprodid"]
            and masked_ms == bytes.fromhex(qe_id["miscselect"])
            and masked_attr == bytes.fromhex(qe_id["attributes"]),
            Code.QE_IDENTITY_MISMATCH,
            f"QE mrsigner {mrsigner.hex()[:16]}…, isvprodid {isvprodid}",
        )
        qe_status = next(
            (str(lv["tcbStatus"]) for lv in qe_id["tcbLevels"] if isvsvn >= lv["tcb"]["isvsvn"]),
            None,
        )
        self._status(checks, "qe_tcb_status", f"QE isvsvn {isvsvn}", qe_status)
        module = tcb_info.get("tdxModule", {})
        seam_attr = _and(
            quote.body["seam_attributes"], bytes.fromhex(module.get("attributesMask", "00" * 8))
        )
        checks.expect(
            "tdx_module",
            quote.body["mr_signer_seam"] == bytes.fromhex(module.get("mrsigner", ""))
            and seam_attr == bytes.fromhex(module.get("attributes", "00" * 8)),
            Code.TDX_MODULE_MISMATCH,
            f"mr_signer_seam {quote.body['mr_signer_seam'].hex()[:16]}… vs TCB info tdxModule",
        )
        svn = quote.body["tee_tcb_svn"]
        status = platform_tcb_status(tcb_info, pck, svn)
        claims["tcb_status"] = status or "TCB level not supported"
        self._status(
            checks,
            "tcb_status",
            f"PCESVN {pck.pcesvn}, SGX {list(pck.sgx_components)}, tee_tcb_svn {svn.hex()}",
            status,
        )
        if svn[1] > 0:
            module_id, module_status = module_tcb_status(tcb_info, svn)
            self._status(
                checks, "tdx_module_tcb_status", f"{module_id} isvsvn {svn[0]}", module_status
            )

    def _status(self, checks: Checks, name: str, what: str, status: str | None) -> None:
        if status is None:
            checks.failed(name, Code.TCB_NOT_SUPPORTED, f"{what}: TCB level not supported")
        else:
            checks.expect(
                name,
                status in self.policy.accepted_tcb_statuses and status != "Revoked",
                Code.TCB_STATUS_NOT_ACCEPTED,
                f"{what}: {status}"
                + ("" if status in self.policy.accepted_tcb_statuses else " (not accepted)"),
            )

    def _td(self, checks: Checks, quote: TdxQuote, binding: ExpectedBinding) -> None:
        debug = bool(quote.td_attributes & 1)
        checks.expect(
            "debug",
            self.policy.allow_debug or not debug,
            Code.DEBUG_NOT_ALLOWED,
            f"td_attributes 0x{quote.td_attributes:016x}: DEBUG={int(debug)}",
        )
        for name in TdxPolicy.MEASURED:
            allowed: frozenset[bytes] = getattr(self.policy, name)
            value = quote.body[name]
            if not allowed:
                checks.skipped(name, f"{value.hex()} (no allow-list in the policy)")
            else:
                checks.expect(
                    name,
                    value in allowed,
                    Code.MEASUREMENT_MISMATCH,
                    f"{value.hex()} " + ("is allowed" if value in allowed else "is not allowed"),
                )
        check_report_data(checks, quote.body["report_data"], binding)


def _and(a: bytes, b: bytes) -> bytes:
    return bytes(x & y for x, y in zip(a, b, strict=True))


def _verify_raw(key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes) -> bool:
    half = len(sig) // 2
    try:
        key.verify(raw_ecdsa_to_der(sig[:half], sig[half:]), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _crl_signed(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = ec_public_key(issuer)
    return key is not None and crl.is_signature_valid(key)


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise EvidenceError(Code.COLLATERAL_INVALID, "a CRL is not DER or PEM") from None
