"""AWS Nitro Enclaves: verify an attestation document (COSE_Sign1 over CBOR) against AWS's root.

Order (docs/ATTESTATION.md): COSE_Sign1 form and ES384 header → payload fields → leaf ←
cabundle[-1] ← … ← cabundle[0] == the pinned AWS Nitro root, every certificate valid at the
document's own timestamp → the COSE signature → the document's age at ``at`` → debug (PCR0..2
all zero) → PCRs against the allow-lists → nonce, user_data and public_key against the binding.

Format facts: AWS Nitro Enclaves "Verifying the root of trust" and RFC 9052 (COSE_Sign1,
Sig_structure). cbor2 is the CBOR codec; the Sig_structure is built here.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import cbor2
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

MAX_DOCUMENT_SIZE = 64 * 1024
COSE_SIGN1_TAG = 18
COSE_ALG = 1
ES384 = -35
CLOCK_SKEW = timedelta(minutes=5)
DEBUG_PCRS = (0, 1, 2)


@dataclass(frozen=True, slots=True)
class NitroDocument:
    protected: bytes  # the protected header as a bstr, signed as is
    payload: bytes  # the payload bstr, signed as is
    signature: bytes
    module_id: str
    digest: str
    timestamp: datetime
    pcrs: dict[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    @property
    def debug(self) -> bool:
        """Nitro zeroes PCR0..2 of an enclave started in debug mode."""
        return all(self.pcrs.get(i, b"") == bytes(len(self.pcrs.get(i, b"x"))) for i in DEBUG_PCRS)


def parse_document(data: bytes) -> NitroDocument:
    if len(data) > MAX_DOCUMENT_SIZE:
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "larger than any attestation document")
    try:
        outer = cbor2.loads(data)
        if isinstance(outer, cbor2.CBORTag) and outer.tag == COSE_SIGN1_TAG:
            outer = outer.value
        if not (isinstance(outer, list) and len(outer) == 4):
            raise EvidenceError(Code.EVIDENCE_MALFORMED, "not a COSE_Sign1 array of four")
        protected, _unprotected, payload, signature = outer
        if not all(isinstance(x, bytes) for x in (protected, payload, signature)):
            raise EvidenceError(Code.EVIDENCE_MALFORMED, "COSE_Sign1 fields are not byte strings")
        header = cbor2.loads(protected)
        if not isinstance(header, dict) or header.get(COSE_ALG) != ES384:
            raise EvidenceError(
                Code.UNSUPPORTED_VERSION, f"protected header {header!r}: expected alg ES384 (-35)"
            )
        doc = cbor2.loads(payload)
    except cbor2.CBORDecodeError as exc:
        raise EvidenceError(Code.EVIDENCE_MALFORMED, f"bad CBOR: {exc}") from None
    if not isinstance(doc, dict):
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "the payload is not a CBOR map")
    try:
        return NitroDocument(
            protected=protected,
            payload=payload,
            signature=signature,
            module_id=_typed(doc, "module_id", str),
            digest=_typed(doc, "digest", str),
            timestamp=datetime.fromtimestamp(_typed(doc, "timestamp", int) / 1000, UTC),
            pcrs={int(k): bytes(v) for k, v in _typed(doc, "pcrs", dict).items()},
            certificate=_typed(doc, "certificate", bytes),
            cabundle=tuple(_typed(doc, "cabundle", list)),
            public_key=_optional(doc, "public_key"),
            user_data=_optional(doc, "user_data"),
            nonce=_optional(doc, "nonce"),
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise EvidenceError(Code.EVIDENCE_MALFORMED, f"bad payload field: {exc}") from None


def _typed(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind):
        raise EvidenceError(
            Code.EVIDENCE_MALFORMED, f"payload field {key!r} missing or not {kind.__name__}"
        )
    return value


def _optional(doc: Mapping[str, Any], key: str) -> bytes | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, bytes):
        raise EvidenceError(Code.EVIDENCE_MALFORMED, f"payload field {key!r} is not bytes")
    return value


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 §4.4 Sig_structure for COSE_Sign1 with no external AAD."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


@dataclass(frozen=True, slots=True)
class NitroPolicy:
    """What an enclave must be. ``pcrs`` maps a PCR index to its allowed values; an index not in
    it is not checked. ``max_age_seconds`` bounds the document's age at the check time."""

    pcrs: Mapping[int, frozenset[bytes]] = field(default_factory=dict)
    allow_debug: bool = False
    max_age_seconds: int | None = None

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> NitroPolicy:
        unknown = set(m) - {"pcrs", "allow_debug", "max_age_seconds"}
        if unknown:
            raise ValueError(f"unknown Nitro policy keys: {', '.join(sorted(unknown))}")
        pcrs = {
            int(k): frozenset(bytes.fromhex(v) for v in ([vals] if isinstance(vals, str) else vals))
            for k, vals in (m.get("pcrs") or {}).items()
        }
        age = m.get("max_age_seconds")
        return cls(
            pcrs=pcrs,
            allow_debug=bool(m.get("allow_debug", False)),
            max_age_seconds=int(age) if age is not None else None,
        )


@dataclass(frozen=True, slots=True)
class NitroVerifier:
    """Verifies Nitro attestation documents; the chain is in the document, the root pinned
    (``roots`` replaces it)."""

    kind: ClassVar[str] = "nitro"
    policy: NitroPolicy = field(default_factory=NitroPolicy)
    roots: tuple[x509.Certificate, ...] | None = None

    def verify(self, evidence: bytes, *, at: datetime, binding: ExpectedBinding) -> Verdict:
        checks = Checks()
        try:
            doc = parse_document(evidence)
        except EvidenceError as exc:
            checks.failed("document_format", exc.code, str(exc))
            return checks.verdict(self.kind, {})
        claims = {
            "module_id": doc.module_id,
            "timestamp": doc.timestamp.isoformat(),
            "debug": str(doc.debug).lower(),
            **{f"pcr{i}": v.hex() for i, v in sorted(doc.pcrs.items()) if i in (0, 1, 2, 3, 4, 8)},
            **{k: v.hex() for k, v in (("nonce", doc.nonce), ("user_data", doc.user_data),
                                        ("public_key", doc.public_key)) if v is not None},
        }  # fmt: skip
        if not checks.expect(
            "document_format",
            doc.digest == "SHA384",
            Code.UNSUPPORTED_VERSION,
            f"COSE_Sign1, ES384, PCR digest {doc.digest}, {doc.module_id}",
        ):
            return checks.verdict(self.kind, claims)
        leaf = self._chain(checks, doc)
        if leaf is not None:
            self._signature(checks, doc, leaf)
        self._freshness(checks, doc, at)
        self._enclave(checks, doc)
        self._binding(checks, doc, binding)
        return checks.verdict(self.kind, claims)

    def _chain(self, checks: Checks, doc: NitroDocument) -> x509.Certificate | None:
        try:
            leaf = load_certificates(doc.certificate)[0]
            bundle = [load_certificates(c)[0] for c in doc.cabundle]
        except (EvidenceError, TypeError) as exc:
            checks.failed("chain_signatures", Code.EVIDENCE_MALFORMED, f"certificates: {exc}")
            return None
        if not bundle:
            checks.failed("chain_signatures", Code.EVIDENCE_MALFORMED, "empty cabundle")
            return None
        trusted = self.roots if self.roots is not None else (roots.aws_nitro_root(),)
        # The chain is checked at the document's own time: leaves live three hours.
        check_chain(checks, "chain", [leaf, *reversed(bundle)], trusted, doc.timestamp)
        return leaf

    def _signature(self, checks: Checks, doc: NitroDocument, leaf: x509.Certificate) -> None:
        key = ec_public_key(leaf)
        ok = False
        if key is not None and len(doc.signature) == 96:
            try:
                key.verify(
                    raw_ecdsa_to_der(doc.signature[:48], doc.signature[48:]),
                    sig_structure(doc.protected, doc.payload),
                    ec.ECDSA(hashes.SHA384()),
                )
                ok = True
            except InvalidSignature:
                ok = False
        checks.expect(
            "document_signature",
            ok,
            Code.SIGNATURE_INVALID,
            "COSE_Sign1 ES384 signature by the leaf"
            if ok
            else "the COSE signature does not verify",
        )

    def _freshness(self, checks: Checks, doc: NitroDocument, at: datetime) -> None:
        if doc.timestamp > at + CLOCK_SKEW:
            checks.failed(
                "freshness",
                Code.EVIDENCE_STALE,
                f"document time {doc.timestamp.isoformat()} is after {at.isoformat()}",
            )
        elif self.policy.max_age_seconds is None:
            checks.skipped("freshness", f"document time {doc.timestamp.isoformat()}; no max age")
        else:
            age = at - doc.timestamp
            checks.expect(
                "freshness",
                age <= timedelta(seconds=self.policy.max_age_seconds),
                Code.EVIDENCE_STALE,
                f"document age {age.total_seconds():.0f} s; max {self.policy.max_age_seconds} s",
            )

    def _enclave(self, checks: Checks, doc: NitroDocument) -> None:
        checks.expect(
            "debug",
            self.policy.allow_debug or not doc.debug,
            Code.DEBUG_NOT_ALLOWED,
            "PCR0..2 all zero: debug-mode enclave"
            if doc.debug
            else "PCR0..2 set: production enclave",
        )
        if not self.policy.pcrs:
            checks.skipped("pcrs", "no PCR allow-list in the policy")
        for index, allowed in sorted(self.policy.pcrs.items()):
            value = doc.pcrs.get(index, b"")
            checks.expect(
                f"pcr{index}",
                value in allowed,
                Code.MEASUREMENT_MISMATCH,
                f"{value.hex()} " + ("is allowed" if value in allowed else "is not allowed"),
            )

    def _binding(self, checks: Checks, doc: NitroDocument, binding: ExpectedBinding) -> None:
        for name, have, want, code in (
            ("nonce", doc.nonce, binding.nonce, Code.NONCE_MISMATCH),
            ("user_data", doc.user_data, binding.user_data, Code.USER_DATA_MISMATCH),
            ("public_key", doc.public_key, binding.public_key, Code.PUBLIC_KEY_MISMATCH),
        ):
            shown = have.hex()[:64] if have is not None else "absent"
            if want is None:
                checks.skipped(name, f"{shown} (no expected value given)")
            else:
                ok = have is not None and hmac.compare_digest(have, want)
                checks.expect(
                    name, ok, code, f"{shown} " + ("== expected" if ok else "!= expected")
                )
