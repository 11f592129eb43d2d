"""One protocol and one result shape for every kind of attestation evidence.

A verifier takes evidence as bytes, the time to check at and the binding it expects, and returns a
:class:`Verdict`: every check it ran, in order, each passed, failed (with a stable ``code``) or
skipped (nothing was asked of it). Verifiers never touch the network; collateral (certificates,
CRLs, vendor TCB data) is handed to them, so recorded evidence can be re-verified offline later.
TPM evidence needs one round trip (credential activation): its verifier,
:class:`enclave.attestation.tpm.TpmVerifier`, is a generator that yields the challenge and is
sent the answer, then returns the same :class:`Verdict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from enclave.errors import EnclaveError


class Code(StrEnum):
    """Stable failure codes: one per way evidence can be refused."""

    EVIDENCE_MALFORMED = "evidence_malformed"  # cannot be parsed: wrong size, bad CBOR, bad PEM
    EVIDENCE_STALE = "evidence_stale"  # older than the policy allows, or from the future
    UNSUPPORTED_VERSION = "unsupported_version"  # a format version or algorithm we do not accept
    SIGNATURE_INVALID = "signature_invalid"  # the evidence's own signature does not verify
    CHAIN_INVALID = "chain_invalid"  # a certificate is not signed by its issuer / not a CA
    CHAIN_EXPIRED = "chain_expired"  # a certificate is outside its validity at the check time
    UNTRUSTED_ROOT = "untrusted_root"  # the chain ends at a root we do not pin
    WRONG_PRODUCT = "wrong_product"  # the chain belongs to another CPU product
    CERT_REVOKED = "cert_revoked"  # a certificate is on its issuer's CRL
    HWID_MISMATCH = "hwid_mismatch"  # the signing key's certificate names another chip
    TCB_MISMATCH = "tcb_mismatch"  # the signing key was issued for another TCB than reported
    TCB_TOO_LOW = "tcb_too_low"  # below the policy's minimum TCB
    TCB_NOT_SUPPORTED = "tcb_not_supported"  # the vendor's TCB data has no level for it
    TCB_STATUS_NOT_ACCEPTED = "tcb_status_not_accepted"  # OutOfDate & co. under a strict policy
    DEBUG_NOT_ALLOWED = "debug_not_allowed"  # a debuggable guest/enclave under a no-debug policy
    GUEST_POLICY_NOT_ALLOWED = "guest_policy_not_allowed"  # SMT, migration agent, VMPL ...
    QE_REPORT_INVALID = "qe_report_invalid"  # TDX: the PCK key did not sign the QE report
    ATTESTATION_KEY_UNBOUND = "attestation_key_unbound"  # TDX: QE report does not bind the key
    QE_IDENTITY_MISMATCH = "qe_identity_mismatch"  # TDX: the QE is not Intel's quoting enclave
    TDX_MODULE_MISMATCH = "tdx_module_mismatch"  # TDX: the SEAM module is not the vendor's
    FMSPC_MISMATCH = "fmspc_mismatch"  # TDX: the TCB info is for another platform
    COLLATERAL_INVALID = "collateral_invalid"  # vendor collateral with a bad signature or form
    COLLATERAL_STALE = "collateral_stale"  # collateral outside issueDate..nextUpdate
    COLLATERAL_INCOMPLETE = "collateral_incomplete"  # collateral needed for a verdict is missing
    MEASUREMENT_MISMATCH = "measurement_mismatch"  # launch measurement/MRTD/PCR not allowed
    HOST_DATA_MISMATCH = "host_data_mismatch"
    REPORT_DATA_MISMATCH = "report_data_mismatch"  # not bound to the expected binding digest
    NONCE_MISMATCH = "nonce_mismatch"
    USER_DATA_MISMATCH = "user_data_mismatch"
    PUBLIC_KEY_MISMATCH = "public_key_mismatch"


Status = Literal["pass", "fail", "skip"]


@dataclass(frozen=True, slots=True)
class Check:
    """One step of a verification."""

    name: str  # e.g. "report_signature", "chain", "report_data"
    status: Status
    detail: str = ""
    code: str = ""  # a Code value when status == "fail"

    @property
    def ok(self) -> bool:
        return self.status != "fail"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result every verifier returns: passes only when no check failed."""

    kind: str  # "sev-snp" | "tdx" | "nitro" | ...
    checks: tuple[Check, ...]
    claims: dict[str, str] = field(default_factory=dict)  # what the evidence says (hex, text)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def code(self) -> str | None:
        """The code of the first failed check, or None when the evidence passed."""
        return next((c.code for c in self.checks if not c.ok), None)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(c.code for c in self.checks if not c.ok)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ok": self.ok,
            "code": self.code,
            "checks": [
                {"name": c.name, "status": c.status, "code": c.code or None, "detail": c.detail}
                for c in self.checks
            ],
            "claims": dict(self.claims),
        }


@dataclass(frozen=True, slots=True)
class ExpectedBinding:
    """What this session expects the evidence to carry; None means "not checked" (skipped).

    SEV-SNP and TDX carry 64 bytes of ``report_data`` (paygate puts SHA-512 of the canonical
    binding document there); Nitro carries ``nonce``, ``user_data`` (SHA-256 of the binding
    document) and ``public_key`` (the sealing key, SubjectPublicKeyInfo DER).
    """

    report_data: bytes | None = None
    nonce: bytes | None = None
    user_data: bytes | None = None
    public_key: bytes | None = None


class EvidenceError(EnclaveError, ValueError):
    """Evidence or collateral that cannot be used; a verifier turns it into a failed check.
    (Still a ValueError, as callers that parse evidence catch it.)"""

    message = "the evidence or collateral cannot be used"

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


@runtime_checkable
class EvidenceVerifier(Protocol):
    """Bytes in, verdict out. Built with its policy, roots and collateral; never raises on bad
    evidence (a failed check says why) and never uses the network."""

    kind: ClassVar[str]

    def verify(self, evidence: bytes, *, at: datetime, binding: ExpectedBinding) -> Verdict: ...


class Checks:
    """Collects checks in order while a verifier runs."""

    def __init__(self) -> None:
        self.items: list[Check] = []

    def passed(self, name: str, detail: str = "") -> None:
        self.items.append(Check(name, "pass", detail))

    def failed(self, name: str, code: Code | str, detail: str) -> None:
        self.items.append(Check(name, "fail", detail, str(code)))

    def skipped(self, name: str, detail: str) -> None:
        self.items.append(Check(name, "skip", detail))

    def expect(self, name: str, ok: bool, code: Code, detail: str) -> bool:
        if ok:
            self.passed(name, detail)
        else:
            self.failed(name, code, detail)
        return ok

    @property
    def failed_any(self) -> bool:
        return any(not c.ok for c in self.items)

    def verdict(self, kind: str, claims: dict[str, str]) -> Verdict:
        return Verdict(kind, tuple(self.items), claims)
