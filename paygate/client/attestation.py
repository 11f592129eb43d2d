"""Verify the appliance before the first prompt: an :class:`AttestationPolicy` and the checks.

With a policy, the transports fetch ``GET /v1/attestation?nonce=<fresh>``, run credential
activation (``POST /v1/attestation/activate``) and check, in order (docs/ATTESTATION.md):
the evidence's form, the nonce, its age, the EK certificate chain to the trusted CA, the AK,
the activation, the quote (signature, qualifying data = SHA-256 of the binding document, PCR
digest), the application PCR, the policy's PCRs, the certifications of the sealing and receipt
keys, that the key document's key is the certified one, the model digests and payTo. Any
failure raises its own :class:`AttestationRefused` subclass before anything is sealed or paid.
The TPM evidence's own checks (EK chain to the quote and certifications) are
:class:`enclave.attestation.tpm.TpmVerifier`'s; this module carries its credential challenge.

Sans-IO: :func:`attestation_flow` yields :class:`Exchange` requests; the sync and async
transports (and ``paygate attest verify``) carry them out.

TEE kinds (``sev-snp``, ``tdx``, ``nitro``) are accepted only with a :class:`TeePolicy` for the
kind: the evidence is checked by the verifier of ``enclave.attestation`` against the vendor roots
the project ships (or the policy's own roots), with the binding it must carry derived from the
binding document (:func:`enclave.attestation.binding.tee_expected`).
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Collection, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography import x509

from enclave import receipts
from enclave.attestation import binding as binding_doc
from enclave.attestation import tpm
from enclave.attestation.base import Check, EvidenceVerifier, ExpectedBinding, Verdict
from enclave.attestation.nitro import NitroPolicy, NitroVerifier
from enclave.attestation.nvidia import NvidiaGpuPolicy, NvidiaGpuVerifier, OcspCheck
from enclave.attestation.sev_snp import SevSnpPolicy, SevSnpVerifier
from enclave.attestation.tdx import TdxCollateral, TdxPolicy, TdxVerifier
from paygate import jsonsafe, wire
from paygate.client.errors import (
    ActivationFailed,
    AkInvalid,
    AttestationRefused,
    CodeNotAccepted,
    EkUntrusted,
    EvidenceMalformed,
    EvidenceStale,
    EvidenceUnavailable,
    GpuEvidenceMismatch,
    GpuEvidenceMissing,
    KeyNotCertified,
    KindNotAccepted,
    LogInconsistent,
    LogUnverified,
    ModelNotAccepted,
    NonceMismatch,
    PayToMismatch,
    PcrMismatch,
    QuoteInvalid,
    ReceiptInvalid,
    ReceiptMismatch,
    Unattested,
)
from paygate.client.pubkey import key_id_matches
from paygate.client.tlog import LogPolicy, log_flow

ATTESTATION_PATH = wire.ATTESTATION_PATH
ACTIVATE_PATH = wire.ATTESTATION_ACTIVATE_PATH
MAX_EVIDENCE_BYTES = 256 * 1024  # EK certificates and a quote: a few KB

_ERRORS: dict[str, type[AttestationRefused]] = {
    cls.code: cls
    for cls in (
        EvidenceUnavailable, EvidenceMalformed, EvidenceStale, NonceMismatch, Unattested,
        EkUntrusted, AkInvalid, ActivationFailed, QuoteInvalid, PcrMismatch, KeyNotCertified,
        ModelNotAccepted, PayToMismatch, KindNotAccepted, CodeNotAccepted,
        LogInconsistent, LogUnverified, GpuEvidenceMissing, GpuEvidenceMismatch,
    )
}  # fmt: skip


MAX_POLICY_FILE = 256 * 1024
_CODE_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class UnpinnedCode(UserWarning):
    """An attestation policy without code_digests: any self-consistent gateway code passes."""


TeeKindPolicy = SevSnpPolicy | TdxPolicy | NitroPolicy
_TEE_POLICY_TYPES: dict[str, type[TeeKindPolicy]] = {
    "sev-snp": SevSnpPolicy,
    "tdx": TdxPolicy,
    "nitro": NitroPolicy,
}


@dataclass(frozen=True, slots=True)
class TeePolicy:
    """What one TEE kind must satisfy.

    Args:
        policy: the verifier's own policy object (measurements, minimum TCB, debug, ...).
        roots: trust anchors replacing the vendor roots shipped in enclave/attestation/roots
            (None: the vendor's, pinned by fingerprint). For private PKIs and tests only.
        collateral: TDX only: Intel's TCB info, QE identity and CRLs (the quote carries the
            PCK chain but not these; without them a TDX verdict is ``collateral_incomplete``).
    """

    policy: TeeKindPolicy
    roots: tuple[x509.Certificate, ...] | None = None
    collateral: TdxCollateral | None = None

    def verifier(self, kind: str, certificates: tuple[bytes, ...]) -> EvidenceVerifier:
        if kind == "sev-snp" and isinstance(self.policy, SevSnpPolicy):
            return SevSnpVerifier(self.policy, certificates, self.roots)
        if kind == "tdx" and isinstance(self.policy, TdxPolicy):
            return TdxVerifier(self.policy, self.collateral or TdxCollateral(), self.roots)
        if kind == "nitro" and isinstance(self.policy, NitroPolicy):
            return NitroVerifier(self.policy, self.roots)
        raise ValueError(f"the policy for {kind} is a {type(self.policy).__name__}")


def _policy_file(file: Path) -> Any:
    """A policy file's JSON, bounded."""
    try:
        raw = file.read_bytes()
        if len(raw) > MAX_POLICY_FILE:
            raise ValueError(f"larger than {MAX_POLICY_FILE} bytes")
        return jsonsafe.loads(raw, max_bytes=MAX_POLICY_FILE)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the policy file {file}: {exc}") from None


def load_tee_policies(path: str | os.PathLike[str]) -> dict[str, TeePolicy]:
    """A policy file: a JSON object keyed by kind (``sev-snp``, ``tdx``, ``nitro``), each the
    verifier's policy object (docs/ATTESTATION.md) plus optional ``roots`` (a PEM file) and, for
    tdx, ``collateral`` (a directory as ``paygate attest verify-file --collateral`` reads).
    Relative paths are relative to the policy file. A kind not in the file is refused."""
    file = Path(path)
    data = _policy_file(file)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{file}: a JSON object keyed by sev-snp, tdx or nitro")
    policies: dict[str, TeePolicy] = {}
    for kind, entry in data.items():
        if kind == "gpu":  # the GPU's entry (load_gpu_policy), beside the TEE kinds
            continue
        if kind not in _TEE_POLICY_TYPES or not isinstance(entry, dict):
            raise ValueError(f"{file}: {kind!r} is not a TEE kind with a policy object")
        options = dict(entry)
        roots_file, collateral_dir = options.pop("roots", None), options.pop("collateral", None)
        if collateral_dir is not None and kind != "tdx":
            raise ValueError(f"{file}: collateral is for tdx")
        try:
            policy = _TEE_POLICY_TYPES[kind].from_mapping(options)
            roots = None
            if roots_file is not None:
                pem = (file.parent / str(roots_file)).read_bytes()
                roots = tuple(x509.load_pem_x509_certificates(pem))
            collateral = None
            if collateral_dir is not None:
                collateral = TdxCollateral.from_dir(file.parent / str(collateral_dir))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{file}: {kind}: {exc}") from None
        policies[kind] = TeePolicy(policy, roots, collateral)
    return policies


@dataclass(frozen=True, slots=True)
class GpuPolicy:
    """What the appliance's GPU must show (NVIDIA Hopper CC; docs/ATTESTATION.md).

    Args:
        required: refuse an appliance that sends no GPU evidence (``gpu: required``).
        policy: the measurement allow-list (RIM values by index), driver and VBIOS allow-lists
            and minimums.
        roots: replaces the shipped NVIDIA Device Identity CA (private PKIs and tests only).
        ocsp: asks a responder about the GPU's chain when online (None: a visible skip).
    """

    required: bool = True
    policy: NvidiaGpuPolicy = field(default_factory=NvidiaGpuPolicy)
    roots: tuple[x509.Certificate, ...] | None = None
    ocsp: OcspCheck | None = None

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | str, base: Path | None = None) -> GpuPolicy:
        """A policy file's ``gpu`` entry: ``"required"``, ``"optional"``, or ``{"mode":
        "required"|"optional", "measurements", "driver_versions", "vbios_versions",
        "driver_min", "vbios_min", "roots": "<PEM file>"}``."""
        options = {"mode": m} if isinstance(m, str) else dict(m)
        mode = options.pop("mode", "required")
        if mode not in ("required", "optional"):
            raise ValueError("gpu is 'required' or 'optional'")
        roots_file = options.pop("roots", None)
        roots = None
        if roots_file is not None:
            pem = ((base or Path(".")) / str(roots_file)).read_bytes()
            roots = tuple(x509.load_pem_x509_certificates(pem))
        return cls(mode == "required", NvidiaGpuPolicy.from_mapping(options), roots)


def load_gpu_policy(path: str | os.PathLike[str]) -> GpuPolicy | None:
    """The ``gpu`` entry of a policy file (see :meth:`GpuPolicy.from_mapping`), or None."""
    file = Path(path)
    data = _policy_file(file)
    if not isinstance(data, dict) or "gpu" not in data:
        return None
    try:
        return GpuPolicy.from_mapping(data["gpu"], file.parent)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{file}: gpu: {exc}") from None


@dataclass(frozen=True, slots=True)
class AttestationPolicy:
    """What this client requires of an appliance before it seals anything to it.

    Args:
        trusted_ek_cas: the TPM manufacturers' CA certificates (root and intermediates).
        model_digests: accepted weights digests (``sha256:<hex>``); empty accepts any model
            the evidence lists. The model a request asks for must be listed with one of them.
        pay_to: the wallet the evidence must name (None: not checked).
        code_digests: accepted gateway code digests (``sha256:<hex>``, what ``paygate release
            digest`` prints for a release); empty accepts any code, with a warning. With TPM
            evidence, PCR 23 must measure the accepted code (the app_pcr check).
        pcrs: expected sha256 PCR values by index, or ``"any"``.
        max_age_seconds: how far the evidence's time may be from this client's clock.
        allow_unattested: accept kind ``none`` (software/PKCS#11 keys, nothing proven).
        tee: the TEE kinds accepted, each with its :class:`TeePolicy` (empty: none accepted).
        log: the transparency log checks (:class:`paygate.client.tlog.LogPolicy`), or None.
        gpu: the GPU evidence checks (:class:`GpuPolicy`), or None (GPU evidence not checked).
    """

    trusted_ek_cas: tuple[x509.Certificate, ...] = ()
    model_digests: frozenset[str] = frozenset()
    pay_to: str | None = None
    pcrs: Mapping[int, bytes] | Literal["any"] = "any"
    max_age_seconds: int = 300
    allow_unattested: bool = False
    tee: Mapping[str, TeePolicy] = field(default_factory=dict)
    code_digests: frozenset[str] = frozenset()
    log: LogPolicy | None = None
    gpu: GpuPolicy | None = None

    def __post_init__(self) -> None:
        for digest in self.code_digests:
            if not isinstance(digest, str) or not _CODE_DIGEST.fullmatch(digest):
                raise ValueError(f"a code digest is sha256:<64 lower-case hex>, not {digest!r}")
        if not self.code_digests:
            warnings.warn(
                "AttestationPolicy accepts any gateway code: pin the release with code_digests",
                UnpinnedCode,
                stacklevel=3,
            )

    @classmethod
    def from_files(
        cls,
        ek_ca: str | os.PathLike[str] | None,
        *,
        model_digests: Collection[str] = (),
        pay_to: str | None = None,
        pcrs: Mapping[int, bytes] | Literal["any"] = "any",
        max_age_seconds: int = 300,
        allow_unattested: bool = False,
        tee_policy: str | os.PathLike[str] | None = None,
        code_digests: Collection[str] = (),
    ) -> AttestationPolicy:
        """A policy trusting the certificates of a PEM file (one or more) for TPM evidence and
        accepting the TEE kinds of ``tee_policy`` (see :func:`load_tee_policies`)."""
        certs: tuple[x509.Certificate, ...] = ()
        if ek_ca is not None:
            try:
                certs = tuple(x509.load_pem_x509_certificates(Path(ek_ca).read_bytes()))
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read EK CA certificates from {ek_ca}: {exc}") from None
        return cls(
            trusted_ek_cas=certs,
            model_digests=frozenset(model_digests),
            pay_to=pay_to,
            pcrs=pcrs,
            max_age_seconds=max_age_seconds,
            allow_unattested=allow_unattested,
            tee=load_tee_policies(tee_policy) if tee_policy is not None else {},
            code_digests=frozenset(code_digests),
            gpu=load_gpu_policy(tee_policy) if tee_policy is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Exchange:
    """One HTTP exchange the flow needs → ``(status, body)``."""

    method: Literal["GET", "POST"]
    url: str
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Attested:
    """A verified appliance: what the evidence bound, and every check that passed."""

    origin: str
    kind: str
    binding: binding_doc.Binding
    checks: tuple[Check, ...] = field(repr=False)


class _Checks:
    """Runs named checks in order; the first failure raises its error with the list so far."""

    def __init__(self) -> None:
        self.done: list[Check] = []

    def passed(self, name: str, detail: str = "") -> None:
        self.done.append(Check(name, "pass", detail))

    def skipped(self, name: str, detail: str) -> None:
        self.done.append(Check(name, "skip", detail))

    def fail(self, name: str, code: str, detail: str) -> AttestationRefused:
        self.done.append(Check(name, "fail", detail, code))
        return self._refusal(code, name, detail)

    def _refusal(self, code: str, where: str, detail: str) -> AttestationRefused:
        refusal = _ERRORS.get(code, AttestationRefused)(f"attestation refused ({where}): {detail}")
        refusal.checks = tuple(self.done)
        return refusal

    def adopt(self, verdict: Verdict, kind: str = "") -> None:
        """A verifier's checks, in order; its first failure refuses with its own code. ``kind``
        prefixes the failed check's name in the message (the TPM's checks are named alone)."""
        self.done.extend(verdict.checks)
        if not verdict.ok:
            failed = next(c for c in verdict.checks if not c.ok)
            where = f"{kind} {failed.name}" if kind else failed.name
            refusal = self._refusal(verdict.code or "", where, failed.detail)
            refusal.code = verdict.code  # the verifier's stable code (docs/ATTESTATION.md)
            raise refusal

    def run(self, name: str, call: Callable[[], str | None]) -> None:
        try:
            detail = call() or ""
        except tpm.TpmEvidenceError as exc:
            raise self.fail(name, exc.code, str(exc)) from None
        except binding_doc.BindingInvalid as exc:
            raise self.fail(name, "evidence_malformed", str(exc)) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise self.fail(name, "evidence_malformed", f"{type(exc).__name__}") from None
        self.passed(name, detail)


def attestation_flow(
    origin: str,
    policy: AttestationPolicy,
    offered_key: bytes | None,
    *,
    clock: Callable[[], float] = time.time,
) -> Generator[Exchange, tuple[int, bytes], Attested]:
    """Fetch, activate and verify; returns :class:`Attested` or raises its refusal.

    ``offered_key`` is the key the appliance's key document offered (None: not compared).
    """
    checks = _Checks()
    nonce = os.urandom(binding_doc.NONCE_LEN)
    status, body = yield Exchange("GET", f"{origin}{ATTESTATION_PATH}?nonce={nonce.hex()}")
    if status != 200:
        raise checks.fail(
            "evidence", "evidence_unavailable", f"{ATTESTATION_PATH} answered HTTP {status}"
        )
    ev: dict[str, Any] = {}

    def parse() -> str:
        document = jsonsafe.loads(body, max_bytes=MAX_EVIDENCE_BYTES)
        kinds = ("tpm", "none", *binding_doc.TEE_KINDS)
        if not isinstance(document, dict) or document.get("kind") not in kinds:
            raise ValueError("unknown evidence kind")
        ev["doc"] = document
        ev["binding"] = binding_doc.parse(document.get("binding"))
        return f"kind {document['kind']}"

    checks.run("evidence_form", parse)
    document, bound = ev["doc"], ev["binding"]
    if not hmac.compare_digest(bound.nonce, nonce):
        raise checks.fail("nonce", "nonce_mismatch", "the evidence is not for this nonce")
    checks.passed("nonce")
    age = abs(clock() - bound.issued_at)
    if age > policy.max_age_seconds:
        raise checks.fail("freshness", "evidence_stale", f"issued {age:.0f} s from now")
    checks.passed("freshness", f"{age:.0f} s")
    if document["kind"] == "none":
        if not policy.allow_unattested:
            raise checks.fail(
                "kind", "unattested", "the appliance offers no hardware attestation (kind none)"
            )

        def signed() -> str:
            raw = _unb64(document["none"]["signature"])
            if not tpm.verify_signature(bound.receipt_key, bound.canonical(), raw):
                raise tpm.TpmEvidenceError("quote_invalid", "the binding is not signed")
            return "signed by the (unattested) receipt key"

        checks.run("binding_signature", signed)
    elif document["kind"] in binding_doc.TEE_KINDS:
        _tee_checks(checks, policy, document, bound, clock)
    else:
        yield from _tpm_checks(checks, origin, policy, document.get("tpm"), bound, clock)
    _gpu_checks(checks, policy, document, bound, nonce, clock)
    _binding_checks(checks, policy, bound, offered_key)
    if policy.log is not None:
        flow = log_flow(origin, policy.log, bound)
        try:
            request = next(flow)
            while True:
                request = flow.send((yield Exchange("GET", request.url)))
        except StopIteration as stop:
            checks.passed("transparency_log", stop.value)
        except (LogInconsistent, LogUnverified) as exc:
            raise checks.fail("transparency_log", exc.code, str(exc)) from None
    return Attested(origin, document["kind"], bound, tuple(checks.done))


def _tpm_checks(
    checks: _Checks,
    origin: str,
    policy: AttestationPolicy,
    evidence: Any,
    bound: binding_doc.Binding,
    clock: Callable[[], float],
) -> Generator[Exchange, tuple[int, bytes], None]:
    """The TPM verifier's checks; this side only carries its credential challenge over HTTP."""
    verifier = tpm.TpmVerifier(policy.trusted_ek_cas, None if policy.pcrs == "any" else policy.pcrs)
    flow = verifier.verify(evidence, at=datetime.fromtimestamp(clock(), UTC), binding=bound)
    try:
        challenge = next(flow)
        while True:
            request = json.dumps(
                {
                    "ek": challenge.ek,
                    "credential_blob": _b64(challenge.credential_blob),
                    "encrypted_secret": _b64(challenge.encrypted_secret),
                }
            ).encode()
            status, body = yield Exchange("POST", f"{origin}{ACTIVATE_PATH}", request)
            challenge = flow.send(_activation_answer(status, body))
    except StopIteration as stop:
        checks.adopt(stop.value)


def _activation_answer(status: int, body: bytes) -> tpm.ActivationAnswer:
    if status in (429, 503):  # rate-limited or busy: says nothing about the AK, try later
        return tpm.ActivationAnswer(None, f"{ACTIVATE_PATH} answered HTTP {status}", busy=True)
    secret = None
    if status == 200:
        try:
            secret = _unb64(jsonsafe.loads(body, max_bytes=64 * 1024, max_depth=2)["secret"])
        except (ValueError, KeyError, TypeError):
            secret = None
    return tpm.ActivationAnswer(secret, f"HTTP {status}")


def _tee_checks(
    checks: _Checks,
    policy: AttestationPolicy,
    document: Mapping[str, Any],
    bound: binding_doc.Binding,
    clock: Callable[[], float],
) -> None:
    kind: str = document["kind"]
    tee = policy.tee.get(kind)
    if tee is None:
        raise checks.fail("kind", "kind_not_accepted", f"the policy accepts no {kind} evidence")
    checks.passed("kind", kind)
    parts: dict[str, Any] = {}

    def form() -> str:
        raw = document["tee"]
        parts["evidence"] = _unb64(raw["evidence"], MAX_EVIDENCE_BYTES)
        certificates = raw.get("certificates", [])
        if not isinstance(certificates, list) or len(certificates) > 8:
            raise ValueError("certificates")
        parts["certificates"] = tuple(_unb64(c) for c in certificates)
        return f"{len(parts['evidence'])} bytes from {str(raw.get('source', ''))[:64]}"

    checks.run("tee_evidence", form)
    verifier = tee.verifier(kind, parts["certificates"])
    verdict = verifier.verify(
        parts["evidence"],
        at=datetime.fromtimestamp(clock(), UTC),
        binding=binding_doc.tee_expected(kind, bound),
    )
    checks.adopt(verdict, kind)


def _gpu_checks(
    checks: _Checks,
    policy: AttestationPolicy,
    document: Mapping[str, Any],
    bound: binding_doc.Binding,
    nonce: bytes,
    clock: Callable[[], float],
) -> None:
    """The GPU's evidence: the one the binding names (by digest), for this nonce, from a GPU
    the policy accepts; missing under ``gpu: required`` is a refusal."""
    gpu_policy = policy.gpu
    sent = document.get("gpu")
    if sent is None and bound.gpu is None:
        if gpu_policy is not None and gpu_policy.required:
            raise checks.fail("gpu", "gpu_evidence_missing", "the policy requires GPU evidence")
        checks.skipped("gpu", "no GPU evidence (none required)")
        return
    parts: dict[str, bytes] = {}

    def bound_to_document() -> str:
        if not isinstance(sent, Mapping) or bound.gpu is None:
            raise tpm.TpmEvidenceError(
                "gpu_evidence_mismatch", "GPU evidence and the binding document disagree"
            )
        parts["evidence"] = _unb64(sent["evidence"], MAX_EVIDENCE_BYTES)
        parts["certificates"] = _unb64(sent["certificates"], MAX_EVIDENCE_BYTES)
        for name, digest in (
            ("evidence", bound.gpu.evidence_digest),
            ("certificates", bound.gpu.certificates_digest),
        ):
            if not hmac.compare_digest(binding_doc.sha256_digest(parts[name]), digest):
                raise tpm.TpmEvidenceError(
                    "gpu_evidence_mismatch", f"the GPU {name} is not the one the binding names"
                )
        return f"{bound.gpu.kind}: the evidence and chain the binding names"

    checks.run("gpu_binding", bound_to_document)
    if gpu_policy is None:
        checks.skipped("gpu", "the policy does not check GPU evidence")
        return
    verifier = NvidiaGpuVerifier(
        gpu_policy.policy, parts["certificates"], gpu_policy.roots, gpu_policy.ocsp
    )
    verdict = verifier.verify(
        parts["evidence"],
        at=datetime.fromtimestamp(clock(), UTC),
        binding=ExpectedBinding(nonce=nonce),  # the GPU answered this very nonce
    )
    checks.adopt(verdict, "gpu")


def _binding_checks(
    checks: _Checks,
    policy: AttestationPolicy,
    bound: binding_doc.Binding,
    offered_key: bytes | None,
) -> None:
    if policy.code_digests:
        if bound.code_digest not in policy.code_digests:
            raise checks.fail(
                "code",
                "code_not_accepted",
                f"the gateway runs code {bound.code_digest}, not an accepted release",
            )
        checks.passed("code", bound.code_digest)
    else:
        checks.skipped("code", "policy accepts any code")
    if bound.epochs:
        for epoch in bound.epochs:
            if not key_id_matches(epoch.id, epoch.sealing_key):
                raise checks.fail(
                    "epochs", "evidence_malformed", "an epoch's id does not name its key"
                )
        checks.passed("epochs", ", ".join(e.id for e in bound.epochs))
    if offered_key is not None:
        bound_keys = [e.sealing_key for e in bound.epochs] or [bound.sealing_key]
        if not any(hmac.compare_digest(offered_key, k) for k in bound_keys):
            raise checks.fail(
                "key_document",
                "key_not_certified",
                "the key document offers a key the evidence does not bind",
            )
        checks.passed("key_document", "the offered key is an attested sealing key")
    if policy.model_digests:
        served = {m.digest for m in bound.models}
        if not served & policy.model_digests:
            raise checks.fail(
                "models", "model_not_accepted", "no model served with an accepted digest"
            )
        checks.passed("models", ", ".join(m.name for m in bound.models))
    else:
        checks.skipped("models", "policy accepts any model")
    if policy.pay_to is not None:
        named = bound.payment.pay_to if bound.payment else None
        if named is None or named.lower() != policy.pay_to.lower():
            raise checks.fail("pay_to", "pay_to_mismatch", f"the evidence names {named}")
        checks.passed("pay_to", named)
    else:
        checks.skipped("pay_to", "policy accepts any payTo")


def check_model(attested: Attested, policy: AttestationPolicy, model: str | None) -> None:
    """Before sealing a request for ``model``: it must be served with an accepted digest."""
    if not policy.model_digests or model is None:
        return
    # Every digest the name is served with: the gateway may route to any of them.
    digests = attested.binding.model_digests(model)
    if not digests or not digests <= policy.model_digests:
        raise ModelNotAccepted(
            f"model {model[:64]!r} is not attested with an accepted digest (nothing was sealed)"
        )


def check_receipt(
    attested: Attested,
    token: str,
    *,
    request_digest: str | None,
    reply_digest: str,
) -> dict[str, Any]:
    """A reply's signed receipt: signed by the attested receipt key, for this request and
    exactly this reply, with the attested digest of its model."""
    try:
        claims = receipts.verify(token, attested.binding.receipt_key)
    except receipts.ReceiptTokenInvalid as exc:
        raise ReceiptInvalid(f"signed receipt refused: {exc}") from None
    if request_digest is not None and claims["request_digest"] != request_digest:
        raise ReceiptMismatch("the signed receipt is for another request")
    if claims["reply_digest"] != reply_digest:
        raise ReceiptMismatch("the signed receipt's reply digest does not match the reply")
    model = claims["model"]
    # One of the digests the binding states for the name (several upstreams may serve it), or
    # none when it states none.
    attested_digests = attested.binding.model_digests(model) if model is not None else ()
    if model is not None and claims["model_digest"] not in (attested_digests or {None}):
        raise ReceiptMismatch("the signed receipt's model digest is not the attested one")
    return claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: object, limit: int = 16 * 1024) -> bytes:
    if not isinstance(text, str) or len(text) > limit:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
