"""TPM 2.0 evidence: what the appliance produces (needs the TPM) and what a verifier checks (pure).

Appliance side (:class:`TpmAttester`, over an open :class:`~enclave.keys.tpm.TpmKey`):

* the EK certificates from NV (0x01c00002 RSA-2048, 0x01c0000a P-256, 0x01c00016 P-384);
* TPM2_ActivateCredential: the verifier's MakeCredential blob, opened by the EK and checked by
  the TPM against the attestation key's Name: only a TPM holding both the certified EK and that
  AK recovers the secret;
* TPM2_Quote by the AK over the sha256 PCRs with the verifier's qualifying data;
* TPM2_Certify by the AK of the sealing (ECDH) key, the receipt key and the transparency log
  key, once at start;
* the application PCR (23): reset, then extended once with the application digest.

Verifier side (no TPM, no tpm2-pytss: a client needs only ``cryptography``): parsing of
TPM2B_PUBLIC and TPMS_ATTEST, a key's Name, MakeCredential (TPM 2.0 Part 1 §24, KDFa/KDFe of
Part 1 §11.4.10), the EK certificate chain, the quote and the certifications, run in order by
:class:`TpmVerifier` (sans-IO: it yields the one credential challenge the appliance must answer
and returns a :class:`~enclave.attestation.base.Verdict` like the TEE verifiers). Each check
fails with a :class:`TpmEvidenceError` carrying one of this module's codes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from enclave import p256
from enclave.attestation.base import Checks, Code, EvidenceError, Verdict
from enclave.attestation.certs import load_certificates
from enclave.errors import EnclaveError, KeyBackendError

if TYPE_CHECKING:
    from enclave.attestation.binding import Binding, LogIdentity
    from enclave.keys.tpm import TpmAccess, TpmKey

# --- constants of the TPM 2.0 specification (Part 2) --------------------------------------
TPM_GENERATED_VALUE = 0xFF544347  # "\xffTCG": only the TPM writes this magic
ST_ATTEST_CERTIFY = 0x8017
ST_ATTEST_QUOTE = 0x8018
ALG_RSA, ALG_SHA256, ALG_NULL, ALG_ECDSA, ALG_ECC = 0x0001, 0x000B, 0x0010, 0x0018, 0x0023
ECC_NIST_P256 = 0x0003
ATTR_FIXED_TPM = 0x00000002
ATTR_FIXED_PARENT = 0x00000010
ATTR_SENSITIVE_DATA_ORIGIN = 0x00000020
ATTR_RESTRICTED = 0x00010000
ATTR_DECRYPT = 0x00020000
ATTR_SIGN = 0x00040000
NON_DUPLICABLE = ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_SENSITIVE_DATA_ORIGIN

# EK certificate NV indices and the persistent handles of the keys they certify (TCG EK
# Credential Profile). Only the low-range templates (SHA-256 name, AES-128) take part in
# credential activation here; the P-384 certificate is still carried for the verifier's record.
EK_NV_INDICES = {"rsa2048": 0x01C00002, "p256": 0x01C0000A, "p384": 0x01C00016}
EK_HANDLES = {"rsa2048": 0x81010001, "p256": 0x81010002}
EK_ACTIVATION_ORDER = ("p256", "rsa2048")  # the verifier's preference

APP_PCR = 23  # resettable at locality 0 (PC Client profile): the application's own PCR
DEFAULT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7, APP_PCR)
CREDENTIAL_SECRET_LEN = 32
SIGNING_KEYS_CERTIFIED = ("receipt", "log")  # beside the sealing key, in the evidence's certify
_MAX_NV_CHUNK = 512  # below every TPM's MAX_NV_BUFFER_SIZE
_MAX_EK_CERT = 4096
_MAX_BLOB = 4096

# --- failure codes (also the client's error codes) -----------------------------------------
EK_UNTRUSTED = "ek_untrusted"
AK_INVALID = "ak_invalid"
QUOTE_INVALID = "quote_invalid"
PCR_MISMATCH = "pcr_mismatch"
KEY_NOT_CERTIFIED = "key_not_certified"
EVIDENCE_MALFORMED = "evidence_malformed"
ACTIVATION_FAILED = "activation_failed"
EVIDENCE_UNAVAILABLE = "evidence_unavailable"


class TpmEvidenceError(EnclaveError, ValueError):
    """One check failed; ``code`` says which (stable), the message says why (no secrets)."""

    code = EVIDENCE_MALFORMED
    message = "the TPM evidence does not verify"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- marshalling (TPM 2.0 Part 2: big-endian, TPM2B = u16 size + bytes) --------------------


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._at = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if self._at + n > len(self._data):
            raise TpmEvidenceError(EVIDENCE_MALFORMED, f"{self._what} is truncated")
        out = self._data[self._at : self._at + n]
        self._at += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self._at != len(self._data):
            raise TpmEvidenceError(EVIDENCE_MALFORMED, f"{self._what} has trailing bytes")


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


@dataclass(frozen=True, slots=True)
class TpmPublic:
    """An ECC P-256 key's TPMT_PUBLIC, as the verifier needs it."""

    area: bytes  # the marshalled TPMT_PUBLIC (what the Name hashes)
    name_alg: int
    attributes: int
    scheme: int
    scheme_hash: int
    curve: int
    point: bytes  # 65-byte uncompressed

    @property
    def name(self) -> bytes:
        """TPM Name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + hashlib.sha256(self.area).digest()

    @property
    def non_duplicable(self) -> bool:
        return self.attributes & NON_DUPLICABLE == NON_DUPLICABLE


def parse_public(blob: bytes) -> TpmPublic:
    """A marshalled TPM2B_PUBLIC of an ECC P-256 key with a SHA-256 name."""
    if len(blob) > _MAX_BLOB:
        raise TpmEvidenceError(EVIDENCE_MALFORMED, "the TPM public area is too large")
    outer = _Reader(blob, "TPM2B_PUBLIC")
    area = outer.tpm2b()
    outer.end()
    r = _Reader(area, "TPMT_PUBLIC")
    kind, name_alg, attributes = r.u16(), r.u16(), r.u32()
    if kind != ALG_ECC or name_alg != ALG_SHA256:
        raise TpmEvidenceError(EVIDENCE_MALFORMED, "only ECC keys with a SHA-256 name are accepted")
    r.tpm2b()  # authPolicy
    if r.u16() != ALG_NULL:  # symmetric (only storage keys have one)
        r.u16(), r.u16()
    scheme, scheme_hash = r.u16(), 0
    if scheme != ALG_NULL:
        scheme_hash = r.u16()
    curve = r.u16()
    if r.u16() != ALG_NULL:  # kdf
        r.u16()
    x, y = r.tpm2b(), r.tpm2b()
    r.end()
    if curve != ECC_NIST_P256 or len(x) > 32 or len(y) > 32:
        raise TpmEvidenceError(EVIDENCE_MALFORMED, "only P-256 keys are accepted")
    point = b"\x04" + x.rjust(32, b"\x00") + y.rjust(32, b"\x00")
    try:
        p256.load_public_key(point)
    except ValueError:
        raise TpmEvidenceError(EVIDENCE_MALFORMED, "the key's point is not on P-256") from None
    return TpmPublic(area, name_alg, attributes, scheme, scheme_hash, curve, point)


@dataclass(frozen=True, slots=True)
class Attest:
    """A TPMS_ATTEST (certify or quote)."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    certified_name: bytes = b""  # certify
    pcr_selection: tuple[tuple[int, tuple[int, ...]], ...] = ()  # quote: (hash alg, indices)
    pcr_digest: bytes = b""  # quote


def parse_attest(data: bytes) -> Attest:
    if len(data) > _MAX_BLOB:
        raise TpmEvidenceError(EVIDENCE_MALFORMED, "the TPM attestation is too large")
    r = _Reader(data, "TPMS_ATTEST")
    magic, kind = r.u32(), r.u16()
    signer, extra = r.tpm2b(), r.tpm2b()
    clock, resets, restarts, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware = r.u64()
    fields: dict[str, Any] = {}
    if kind == ST_ATTEST_CERTIFY:
        fields["certified_name"] = r.tpm2b()
        r.tpm2b()  # qualifiedName
    elif kind == ST_ATTEST_QUOTE:
        selection = []
        for _ in range(min(r.u32(), 16)):
            alg, size = r.u16(), r.u8()
            bits = r.take(size)
            indices = tuple(i for i in range(size * 8) if bits[i // 8] >> (i % 8) & 1)
            selection.append((alg, indices))
        fields["pcr_selection"] = tuple(selection)
        fields["pcr_digest"] = r.tpm2b()
    else:
        raise TpmEvidenceError(EVIDENCE_MALFORMED, f"unexpected attestation type 0x{kind:04x}")
    r.end()
    return Attest(
        magic, kind, signer, extra, clock, resets, restarts, bool(safe), firmware, **fields
    )


def verify_signature(point: bytes, message: bytes, signature: bytes) -> bool:
    """ECDSA P-256 / SHA-256 over ``message`` with a raw 64-byte ``r || s``."""
    if len(signature) != 64:
        return False
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        p256.load_public_key(point).verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# --- MakeCredential (verifier side) ---------------------------------------------------------


def _kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with HMAC-SHA256 (SP 800-108 counter mode as TPM 2.0 Part 1 §11.4.10.2 fixes it)."""
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        message = struct.pack(">I", counter) + label + b"\x00" + context_u + context_v
        out += hmac.new(key, message + struct.pack(">I", bits), hashlib.sha256).digest()
        counter += 1
    return out[: bits // 8]


def _kdfe(z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe with SHA-256 (SP 800-56A concatenation KDF, TPM 2.0 Part 1 §11.4.10.3)."""
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        out += hashlib.sha256(
            struct.pack(">I", counter) + z + label + b"\x00" + party_u + party_v
        ).digest()
        counter += 1
    return out[: bits // 8]


def make_credential(
    ek_public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, ak_name: bytes, secret: bytes
) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software for a low-range TCG EK (SHA-256 name, AES-128-CFB).

    Returns the marshalled TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET. Only the TPM holding the
    EK's private key can recover the seed, and it releases ``secret`` only if the loaded object
    it is asked to activate has the Name ``ak_name``.
    """
    if len(secret) > 32:
        raise ValueError("the credential is at most 32 bytes")
    if isinstance(ek_public_key, rsa.RSAPublicKey):
        seed = os.urandom(32)
        encrypted = ek_public_key.encrypt(
            seed,
            padding.OAEP(
                mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\x00"
            ),
        )
    elif isinstance(ek_public_key, ec.EllipticCurvePublicKey) and isinstance(
        ek_public_key.curve, ec.SECP256R1
    ):
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        z = ephemeral.exchange(ec.ECDH(), ek_public_key)
        e_point = p256.encode_public_key(ephemeral.public_key())
        ek_point = p256.encode_public_key(ek_public_key)
        seed = _kdfe(z, b"IDENTITY", e_point[1:33], ek_point[1:33], 256)
        encrypted = _tpm2b(e_point[1:33]) + _tpm2b(e_point[33:])
    else:
        raise ValueError("credential activation supports RSA-2048 and P-256 EKs")
    sym_key = _kdfa(seed, b"STORAGE", ak_name, b"", 128)
    # AES-CFB with a zero IV: the TPM's fixed choice for credential protection (the key is
    # fresh per credential, derived from a random seed).
    encryptor = Cipher(algorithms.AES(sym_key), CFB(b"\x00" * 16)).encryptor()
    enc_identity = encryptor.update(_tpm2b(secret)) + encryptor.finalize()
    hmac_key = _kdfa(seed, b"INTEGRITY", b"", b"", 256)
    outer = hmac.new(hmac_key, enc_identity + ak_name, hashlib.sha256).digest()
    return _tpm2b(_tpm2b(outer) + enc_identity), _tpm2b(encrypted)


# --- EK certificates (verifier side) -------------------------------------------------------


def verify_ek_chain(
    ek_der: bytes, trusted: Sequence[x509.Certificate], at: datetime
) -> x509.Certificate:
    """The EK certificate, once it chains to a self-signed certificate in ``trusted`` through
    CA certificates in ``trusted`` (the operator's file: root plus intermediates), every link
    valid at ``at``. Nothing from the evidence other than the leaf is trusted."""
    try:
        # One parser for every certificate of the evidence: it reads the lazily parsed fields
        # now, so a corrupt one (a duplicated extension, say) is malformed, not a crash later.
        (leaf,) = load_certificates(ek_der)
    except (EvidenceError, ValueError):
        raise TpmEvidenceError(EVIDENCE_MALFORMED, "an EK certificate is not DER X.509") from None
    cert = leaf
    for _ in range(6):  # depth bound: EK chains are 2-3 links
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise TpmEvidenceError(EK_UNTRUSTED, "a certificate of the EK chain is not valid now")
        issuer = next((ca for ca in trusted if _signed_by(cert, ca) and _is_ca(ca)), None)
        if issuer is None:
            raise TpmEvidenceError(
                EK_UNTRUSTED, "the EK certificate does not chain to a trusted CA"
            )
        if not issuer.not_valid_before_utc <= at <= issuer.not_valid_after_utc:
            raise TpmEvidenceError(
                EK_UNTRUSTED, "a CA certificate of the EK chain is not valid now"
            )
        if _signed_by(issuer, issuer):
            return leaf
        cert = issuer
    raise TpmEvidenceError(EK_UNTRUSTED, "the EK chain is too long")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


# --- evidence (both sides) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedAttest:
    """A TPMS_ATTEST and the AK's raw ECDSA signature over it."""

    attest: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class CertifiedKey:
    """A key's TPM2B_PUBLIC and the AK's TPM2_Certify of it."""

    public: bytes
    certify: SignedAttest


def check_ak(ak_public: bytes) -> TpmPublic:
    """The AK must be a restricted, non-duplicable ECDSA-SHA256 signing key."""
    ak = parse_public(ak_public)
    if (
        not ak.non_duplicable
        or ak.attributes & (ATTR_RESTRICTED | ATTR_SIGN) != ATTR_RESTRICTED | ATTR_SIGN
        or ak.attributes & ATTR_DECRYPT
        or ak.scheme != ALG_ECDSA
        or ak.scheme_hash != ALG_SHA256
    ):
        raise TpmEvidenceError(AK_INVALID, "the attestation key is not a restricted fixed signer")
    return ak


def check_signed(ak: TpmPublic, signed: SignedAttest, kind: int, what: str) -> Attest:
    """The AK signed ``signed``, and it is a TPM-generated attestation of ``kind``."""
    code = QUOTE_INVALID if kind == ST_ATTEST_QUOTE else KEY_NOT_CERTIFIED
    if not verify_signature(ak.point, signed.attest, signed.signature):
        raise TpmEvidenceError(code, f"the {what} is not signed by the attestation key")
    attest = parse_attest(signed.attest)
    if attest.magic != TPM_GENERATED_VALUE or attest.type != kind:
        raise TpmEvidenceError(code, f"the {what} is not a TPM-generated attestation of its kind")
    return attest


def check_quote(
    ak: TpmPublic, quote: SignedAttest, pcrs: Mapping[int, bytes], qualifying_data: bytes
) -> Attest:
    """Signature, magic, qualifying data, and the PCR values against the quoted digest."""
    attest = check_signed(ak, quote, ST_ATTEST_QUOTE, "quote")
    if not hmac.compare_digest(attest.extra_data, qualifying_data):
        raise TpmEvidenceError(QUOTE_INVALID, "the quote does not cover this binding document")
    if len(attest.pcr_selection) != 1 or attest.pcr_selection[0][0] != ALG_SHA256:
        raise TpmEvidenceError(QUOTE_INVALID, "the quote is not over the sha256 PCR bank")
    indices = attest.pcr_selection[0][1]
    if set(indices) != set(pcrs):
        raise TpmEvidenceError(QUOTE_INVALID, "the PCR values given are not the PCRs quoted")
    digest = hashlib.sha256(b"".join(pcrs[i] for i in sorted(indices))).digest()
    if not hmac.compare_digest(digest, attest.pcr_digest):
        raise TpmEvidenceError(QUOTE_INVALID, "the PCR values do not match the quoted digest")
    return attest


def check_certified(ak: TpmPublic, key: CertifiedKey, expected_point: bytes, what: str) -> None:
    """The AK certified this key: its Name, non-duplicable, and it is the key expected."""
    attest = check_signed(ak, key.certify, ST_ATTEST_CERTIFY, f"certification of the {what}")
    public = parse_public(key.public)
    if not hmac.compare_digest(attest.certified_name, public.name):
        raise TpmEvidenceError(KEY_NOT_CERTIFIED, f"the {what} is not the key the AK certified")
    if not public.non_duplicable:
        raise TpmEvidenceError(
            KEY_NOT_CERTIFIED, f"the {what} could leave the TPM (fixedTPM/fixedParent clear)"
        )
    if not hmac.compare_digest(public.point, expected_point):
        raise TpmEvidenceError(KEY_NOT_CERTIFIED, f"the certified {what} is not the key offered")


def app_pcr_value(app_digest: bytes) -> bytes:
    """PCR 23 after a reset and one extend: SHA-256(32 zero bytes || app_digest)."""
    return hashlib.sha256(b"\x00" * 32 + app_digest).digest()


def app_digest(code_digest: bytes, config_digest: bytes) -> bytes:
    """What the service extends into PCR 23: SHA-256(code digest || configuration digest)."""
    return hashlib.sha256(code_digest + config_digest).digest()


# --- the verifier: every check of a TPM evidence, sans-IO ------------------------------------


@dataclass(frozen=True, slots=True)
class CredentialChallenge:
    """What the appliance's TPM must open (TPM2_ActivateCredential) to prove it holds the AK
    beside the certified EK; the caller carries it to the appliance and back."""

    ek: str  # which EK: a key of EK_HANDLES
    credential_blob: bytes
    encrypted_secret: bytes


@dataclass(frozen=True, slots=True)
class ActivationAnswer:
    """How the appliance answered a :class:`CredentialChallenge`."""

    secret: bytes | None  # what its TPM recovered; None when it sent none
    detail: str = ""  # how it answered (e.g. "HTTP 500"), for the check's detail
    busy: bool = False  # rate-limited or busy: says nothing about the AK, ask again later


class TpmVerifier:
    """TPM evidence (the attestation document's ``tpm`` entry) against the trusted EK CAs, the
    binding document and the expected PCRs. Like the other verifiers it never raises on bad
    evidence and stops at the first failed check; unlike them it needs one round trip, so
    :meth:`verify` is a generator: it yields one :class:`CredentialChallenge`, is sent the
    :class:`ActivationAnswer` and returns the :class:`~enclave.attestation.base.Verdict`.

    Checks, in order: ek_chain, ak, activation, quote, app_pcr, pcrs, then certify_<name>_key for
    the sealing and receipt keys (or each key epoch's two) and the log key.
    """

    kind: ClassVar[str] = "tpm"

    def __init__(
        self, trusted_ek_cas: Sequence[x509.Certificate], pcrs: Mapping[int, bytes] | None = None
    ) -> None:
        self.trusted_ek_cas = tuple(trusted_ek_cas)
        self.pcrs = pcrs  # expected sha256 PCR values by index; None accepts any boot state

    def verify(
        self, evidence: Any, *, at: datetime, binding: Binding
    ) -> Generator[CredentialChallenge, ActivationAnswer, Verdict]:
        """``evidence`` is the ``tpm`` entry as parsed JSON, of any shape (a wrong one fails
        the check that reads it, as ``evidence_malformed``)."""
        checks = Checks()
        state: dict[str, Any] = {}

        def step(name: str, call: Callable[[], str]) -> bool:
            try:
                detail = call()
            except TpmEvidenceError as exc:
                checks.failed(name, exc.code, str(exc))
                return False
            except (KeyError, TypeError, ValueError, AttributeError, EnclaveError) as exc:
                # a field is missing or of the wrong type: the evidence's form, not a forgery
                detail = str(exc) if isinstance(exc, EnclaveError) else type(exc).__name__
                checks.failed(name, Code.EVIDENCE_MALFORMED, detail)
                return False
            checks.passed(name, detail)
            return True

        def ek_chain() -> str:
            certs = evidence["ek_certificates"]
            failure: TpmEvidenceError | None = None
            for kind in EK_ACTIVATION_ORDER:
                if kind not in certs:
                    continue
                try:
                    state["ek"] = verify_ek_chain(_unb64(certs[kind]), self.trusted_ek_cas, at)
                except TpmEvidenceError as exc:
                    failure = exc
                    continue
                state["ek_kind"] = kind
                return f"{kind} EK certificate chains to a trusted CA"
            raise failure or TpmEvidenceError(EK_UNTRUSTED, "no usable EK certificate")

        def ak() -> str:
            state["ak"] = check_ak(_unb64(evidence["ak_public"]))
            return "restricted, fixedTPM signing key"

        if not (step("ek_chain", ek_chain) and step("ak", ak)):
            return checks.verdict(self.kind, {})
        secret = os.urandom(CREDENTIAL_SECRET_LEN)
        try:
            blob, encrypted = make_credential(state["ek"].public_key(), state["ak"].name, secret)
        except ValueError as exc:  # an EK of a kind activation does not support
            checks.failed("activation", Code.EVIDENCE_MALFORMED, str(exc))
            return checks.verdict(self.kind, {})
        answer = yield CredentialChallenge(state["ek_kind"], blob, encrypted)
        if answer.busy:
            checks.failed("activation", EVIDENCE_UNAVAILABLE, answer.detail)
            return checks.verdict(self.kind, {})
        if answer.secret is None or not hmac.compare_digest(answer.secret, secret):
            checks.failed(
                "activation",
                ACTIVATION_FAILED,
                f"the AK is not in the TPM of the certified EK ({answer.detail})",
            )
            return checks.verdict(self.kind, {})
        checks.passed("activation", f"the TPM of the {state['ek_kind']} EK holds the AK")

        def quote() -> str:
            pcrs = {int(i): bytes.fromhex(v) for i, v in evidence["pcrs"].items()}
            signed = SignedAttest(
                _unb64(evidence["quote"]["attest"]), _unb64(evidence["quote"]["signature"])
            )
            check_quote(state["ak"], signed, pcrs, binding.digest())
            state["pcrs"] = pcrs
            return "signed by the AK over the binding document's digest"

        def app_pcr() -> str:
            code = bytes.fromhex(binding.code_digest.removeprefix("sha256:"))
            expected = app_pcr_value(app_digest(code, binding.config_digest()))
            if not hmac.compare_digest(state["pcrs"].get(APP_PCR, b""), expected):
                raise TpmEvidenceError(
                    PCR_MISMATCH, "PCR 23 does not measure this code and configuration"
                )
            return "PCR 23 = code digest and configuration digest"

        if not (step("quote", quote) and step("app_pcr", app_pcr)):
            return checks.verdict(self.kind, {})
        expected_pcrs = self.pcrs
        if expected_pcrs is None:
            checks.skipped("pcrs", "policy accepts any boot state")
        else:

            def pcrs() -> str:
                for index, value in sorted(expected_pcrs.items()):
                    if not hmac.compare_digest(state["pcrs"].get(index, b""), value):
                        raise TpmEvidenceError(PCR_MISMATCH, f"PCR {index} differs")
                return f"PCRs {sorted(expected_pcrs)} as expected"

            if not step("pcrs", pcrs):
                return checks.verdict(self.kind, {})
        for name, entry_of, point_of in _certified_keys(evidence, binding):

            def certify(
                name: str = name,
                entry_of: Callable[[], Any] = entry_of,
                point_of: Callable[[], bytes] = point_of,
            ) -> str:
                point = point_of()
                entry = entry_of()
                key = CertifiedKey(
                    _unb64(entry["public"]),
                    SignedAttest(_unb64(entry["attest"]), _unb64(entry["signature"])),
                )
                check_certified(state["ak"], key, point, f"{name} key")
                return "certified by the AK: fixedTPM, fixedParent, sensitiveDataOrigin"

            if not step(f"certify_{name.replace(' ', '_')}_key", certify):
                break
        return checks.verdict(self.kind, {"ek": state["ek_kind"]})


def _certified_keys(
    evidence: Any, binding: Binding
) -> list[tuple[str, Callable[[], Any], Callable[[], bytes]]]:
    """Each key the AK must have certified: its name in the checks, its certification in the
    evidence, the point it must certify (read lazily: a missing entry fails its own check)."""
    keys: list[tuple[str, Callable[[], Any], Callable[[], bytes]]] = []
    if binding.epochs:  # key epochs: each live epoch's two keys, certified when they were made
        for epoch in binding.epochs:
            for part, point in (("sealing", epoch.sealing_key), ("receipt", epoch.receipt_key)):
                keys.append(
                    (
                        f"epoch {epoch.id} {part}",
                        lambda e=epoch.id, p=part: evidence["epochs"][e][p],
                        lambda point=point: point,
                    )
                )
    else:
        keys.append(
            ("sealing", lambda: evidence["certify"]["sealing"], lambda: binding.sealing_key)
        )
        keys.append(
            ("receipt", lambda: evidence["certify"]["receipt"], lambda: binding.receipt_key)
        )
    if binding.log is not None:  # the transparency log's key: certified like the receipt key
        log = binding.log
        keys.append(("log", lambda: evidence["certify"]["log"], lambda: log_key_point(log)))
    return keys


def log_key_point(log: LogIdentity) -> bytes:
    """The P-256 point of a TPM-held log key (a type 0x02 vkey); anything else is not a key the
    TPM could have certified."""
    from cryptography.hazmat.primitives import serialization

    from enclave.tlog import note

    verifier = note.parse_vkey(log.key)
    if not isinstance(verifier, note.EcdsaVerifier):
        raise TpmEvidenceError(KEY_NOT_CERTIFIED, "the log key is not a TPM-held key")
    key = serialization.load_der_public_key(verifier.spki)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TpmEvidenceError(KEY_NOT_CERTIFIED, "the log key is not a P-256 key")
    return p256.encode_public_key(key)


def _unb64(text: object, limit: int = 16 * 1024) -> bytes:
    """A base64url field of the evidence (unpadded), bounded."""
    if not isinstance(text, str) or len(text) > limit:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- appliance side ------------------------------------------------------------------------


class TpmAttester:
    """Evidence from the TPM that holds ``key``. Every call blocks on the TPM (run it in an
    executor) and takes the key's lock, so attestation and ECDH never interleave."""

    def __init__(self, key: TpmKey) -> None:
        self._key = key
        self._ek_certs: dict[str, bytes] | None = None
        self._certified: dict[str, CertifiedKey] | None = None

    @property
    def ak_public(self) -> bytes:
        return self._key.public_blob("ak")

    def ek_certificates(self) -> dict[str, bytes]:
        """DER EK certificates by kind, whichever NV indices exist (read once)."""
        if self._ek_certs is None:
            with self._key.tpm_access() as tpm:
                found = {}
                for kind, index in EK_NV_INDICES.items():
                    cert = _read_nv(tpm, index)
                    if cert is not None:
                        found[kind] = cert
            self._ek_certs = found
        return dict(self._ek_certs)

    def extend_app_pcr(self, digest: bytes, index: int = APP_PCR) -> bool:
        """Make the application PCR hold ``digest`` extended once from zero (at service start).

        Checked first: when it already holds exactly that (a sibling worker or an earlier run
        of this boot measured the same code and configuration), nothing is done — a reset
        there would break the quotes of the processes serving meanwhile. Otherwise it is reset
        and extended. True when it was extended. Several processes must hold one lock around
        this call (the check and the change are separate TPM commands).
        """
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA

        if len(digest) != 32:
            raise ValueError("the application digest is 32 bytes")
        handle = ESYS_TR.PCR0 + index
        value = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
        value.digest.sha256 = digest
        with self._key.tpm_access() as tpm:
            _, _, digests = tpm.run(f"read PCR {index}", tpm.esapi.pcr_read, f"sha256:{index}")
            if bytes(digests[0]) == app_pcr_value(digest):
                return False
            tpm.run(f"reset PCR {index}", tpm.esapi.pcr_reset, handle)
            tpm.run(
                f"extend PCR {index}", tpm.esapi.pcr_extend, handle, TPML_DIGEST_VALUES([value])
            )
        return True

    def certify_keys(self) -> dict[str, CertifiedKey]:
        """TPM2_Certify of the sealing key ("sealing"), the receipt key ("receipt") and the
        transparency log key ("log") by the
        AK, made once and kept (the keys do not change while open)."""
        if self._certified is None:
            from tpm2_pytss import TPM2_ALG, TPMT_SIG_SCHEME

            null = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)  # the AK's own scheme (ECDSA-SHA256)
            with self._key.tpm_access() as tpm:
                # A first load needs the parent (a slot of its own): make the receipt key's
                # saved context now, so that below it loads beside the ECDH key and the AK.
                for name in SIGNING_KEYS_CERTIFIED:
                    with tpm.loaded(name):
                        pass
                made = {}
                with tpm.loaded("ak") as ak:
                    made["sealing"] = tpm.run(
                        "certify the sealing key", tpm.esapi.certify, tpm.ecdh_handle, ak, b"", null
                    )
                    for name in SIGNING_KEYS_CERTIFIED:
                        with tpm.loaded(name) as handle:
                            made[name] = tpm.run(
                                f"certify the {name} key", tpm.esapi.certify, handle, ak, b"", null
                            )
            self._certified = {
                name: CertifiedKey(
                    self._key.public_blob("ecdh" if name == "sealing" else name),
                    _signed(*made[name]),
                )
                for name in made
            }
        return dict(self._certified)

    def quote(
        self, qualifying_data: bytes, pcrs: Iterable[int] = DEFAULT_PCRS
    ) -> tuple[SignedAttest, dict[int, bytes]]:
        """TPM2_Quote by the AK over the sha256 ``pcrs``, and their values."""
        from tpm2_pytss import TPM2_ALG, TPMT_SIG_SCHEME

        indices = sorted(set(pcrs))
        selection = "sha256:" + ",".join(str(i) for i in indices)
        with self._key.tpm_access() as tpm:
            with tpm.loaded("ak") as ak:
                attest, signature = tpm.run(
                    "quote",
                    tpm.esapi.quote,
                    ak,
                    selection,
                    qualifying_data,
                    TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                )
            values: dict[int, bytes] = {}
            for start in range(0, len(indices), 8):  # a PCR read returns at most 8 digests
                part = indices[start : start + 8]
                _, _, digests = tpm.run(
                    "read PCRs", tpm.esapi.pcr_read, "sha256:" + ",".join(str(i) for i in part)
                )
                for i, digest in zip(part, digests, strict=True):
                    values[i] = bytes(digest)
        return _signed(attest, signature), values

    def activate(self, ek: str, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential of the AK with the EK ``ek`` ("p256" or "rsa2048").

        Raises :class:`KeyBackendError` when the TPM refuses (wrong EK, not our AK's Name,
        a tampered blob): the caller answers that as a failed activation.
        """
        from tpm2_pytss import (
            ESYS_TR,
            TPM2_ALG,
            TPM2_SE,
            TPM2B_ENCRYPTED_SECRET,
            TPM2B_ID_OBJECT,
            TPMT_SYM_DEF,
            TSS2_Exception,
        )

        if ek not in EK_HANDLES:
            raise ValueError(f"credential activation takes an EK of kind {sorted(EK_HANDLES)}")
        try:
            blob, used = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            secret, used2 = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        except TSS2_Exception:
            raise ValueError("the credential is not a marshalled TPM2B_ID_OBJECT/SECRET") from None
        if used != len(credential_blob) or used2 != len(encrypted_secret):
            raise ValueError("the credential has trailing bytes")
        with self._key.tpm_access() as tpm, tpm.loaded("ak") as ak:
            ek_handle = _ek_handle(tpm, ek)
            session = tpm.run(
                "start a policy session",
                tpm.esapi.start_auth_session,
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            )
            try:
                # The TCG EK policy: PolicySecret(TPM_RH_ENDORSEMENT), empty endorsement auth.
                tpm.run(
                    "satisfy the EK policy", tpm.esapi.policy_secret, ESYS_TR.ENDORSEMENT, session
                )
                recovered = tpm.run(
                    "activate the credential",
                    tpm.esapi.activate_credential,
                    ak,
                    ek_handle,
                    blob,
                    secret,
                    ESYS_TR.PASSWORD,
                    session,
                )
            finally:
                with contextlib.suppress(Exception):
                    tpm.esapi.flush_context(session)
                with contextlib.suppress(Exception):
                    tpm.esapi.tr_close(ek_handle)
        return bytes(recovered.buffer)


def _signed(attest: Any, signature: Any) -> SignedAttest:
    from enclave.keys.tpm import ecdsa_raw

    return SignedAttest(bytes(attest.attestationData), ecdsa_raw(signature))


def _read_nv(tpm: TpmAccess, index: int) -> bytes | None:
    from tpm2_pytss import TSS2_Exception

    try:
        handle = tpm.esapi.tr_from_tpmpublic(index)
    except TSS2_Exception:
        return None  # no such index on this TPM
    try:
        public, _ = tpm.run("read an EK certificate index", tpm.esapi.nv_read_public, handle)
        size = int(public.nvPublic.dataSize)
        if size > _MAX_EK_CERT:
            raise KeyBackendError(f"NV index 0x{index:08x} is too large for a certificate")
        data = b""
        while len(data) < size:
            chunk = min(_MAX_NV_CHUNK, size - len(data))
            part = tpm.run("read an EK certificate", tpm.esapi.nv_read, handle, chunk, len(data))
            data += bytes(part.buffer)
        return data
    finally:
        with contextlib.suppress(Exception):
            tpm.esapi.tr_close(handle)


def _ek_handle(tpm: TpmAccess, ek: str) -> Any:
    """The persistent EK the manufacturer (or swtpm_setup) made; ESYS_TR only, no slot held."""
    from tpm2_pytss import TSS2_Exception

    try:
        return tpm.esapi.tr_from_tpmpublic(EK_HANDLES[ek])
    except TSS2_Exception:
        raise KeyBackendError(
            f"no persistent {ek} EK at 0x{EK_HANDLES[ek]:08x} (provision it with tpm2_createek "
            "and tpm2_evictcontrol)"
        ) from None
