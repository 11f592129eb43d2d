"""Certificate handling shared by the TEE verifiers: loading, one signature link, a pinned chain.

Path validation is done link by link rather than with a generic RFC 5280 validator because the
vendors' chains break its rules on purpose (AMD's VCEKs have serial number 0 and are signed with
RSASSA-PSS; AWS's Nitro leaves last three hours): what matters is that every link is signed by
its issuer, every issuer is a CA, the chain ends at a pinned root and all were valid at ``at``.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from enclave.attestation.base import Checks, Code, EvidenceError

_PEM_MARK = b"-----BEGIN CERTIFICATE-----"
MAX_CERT_BYTES = 64 * 1024  # a bundle bigger than this is not a certificate chain


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """One DER certificate or a PEM bundle, in file order."""
    if len(data) > MAX_CERT_BYTES:
        raise EvidenceError(Code.EVIDENCE_MALFORMED, "certificate data is too large")
    # AMD issues every VCEK and VLEK with serial number 0, which cryptography still loads but
    # warns about (RFC 5280 wants a positive serial). The warning is expected here; pyproject
    # bounds cryptography below the release that turns it into an error, and the SEV-SNP tests
    # load real VCEKs, so that release fails the tests instead of the field.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            if _PEM_MARK in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
            for cert in certs:
                # cryptography parses fields lazily: read the ones the verifiers use now, so a
                # corrupt certificate is refused here rather than failing mid-verification.
                _ = (cert.subject, cert.issuer, cert.extensions, cert.signature_algorithm_oid)
                _ = (cert.not_valid_before_utc, cert.not_valid_after_utc)
        except (
            ValueError,
            x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType,
            x509.InvalidVersion,
        ):
            # The last three are cryptography's own exceptions, not ValueErrors (a version
            # field other than v1 to v3 raises InvalidVersion at load).
            raise EvidenceError(Code.EVIDENCE_MALFORMED, "not a DER or PEM certificate") from None
        return certs


def ec_public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey | None:
    """The certificate's EC key, or None when it holds another kind or an invalid one
    (cryptography parses keys lazily, so a corrupt key only shows here)."""
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lower-case hex: how roots are pinned."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def raw_ecdsa_to_der(r: bytes, s: bytes, *, little_endian: bool = False) -> bytes:
    """Vendors sign with raw r‖s integers; cryptography verifies DER ECDSA-Sig-Value."""
    order = "little" if little_endian else "big"
    return encode_dss_signature(int.from_bytes(r, order), int.from_bytes(s, order))


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """The issuer's key signed ``cert`` (RSA PKCS#1 v1.5 or PSS, ECDSA) and names match."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return bc.ca


def valid_at(cert: x509.Certificate, at: datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def _span(cert: x509.Certificate) -> str:
    return (
        f"{common_name(cert.subject) or cert.subject.rfc4514_string()} "
        f"[{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} .. "
        f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}]"
    )


def check_chain(
    checks: Checks,
    prefix: str,
    chain: Sequence[x509.Certificate],
    trusted: Iterable[x509.Certificate],
    at: datetime,
) -> bool:
    """Record three checks for ``chain`` (leaf first, ending at its root): every link signed by
    the next and the next a CA (``chain_invalid``), the root one of ``trusted``, compared by
    fingerprint (``untrusted_root``), and every certificate valid at ``at`` (``chain_expired``)."""
    pinned = {fingerprint(c) for c in trusted}
    root = chain[-1]
    broken = [
        common_name(cert.subject)
        for cert, issuer in itertools.pairwise(chain)
        if not (signed_by(cert, issuer) and is_ca(issuer))
    ]
    if not signed_by(root, root):
        broken.append(common_name(root.subject) + " (root self-signature)")
    names = " <- ".join(common_name(c.subject) for c in chain)
    ok = checks.expect(
        f"{prefix}_signatures",
        not broken,
        Code.CHAIN_INVALID,
        f"{names}: signed by issuers" if not broken else f"bad signature link: {', '.join(broken)}",
    )
    ok &= checks.expect(
        f"{prefix}_root",
        fingerprint(root) in pinned,
        Code.UNTRUSTED_ROOT,
        f"root {common_name(root.subject)} sha256 {fingerprint(root)}"
        + ("" if fingerprint(root) in pinned else " is not pinned"),
    )
    stale = [_span(c) for c in chain if not valid_at(c, at)]
    ok &= checks.expect(
        f"{prefix}_validity",
        not stale,
        Code.CHAIN_EXPIRED,
        f"all valid at {at:%Y-%m-%dT%H:%M:%SZ}"
        if not stale
        else f"not valid at {at:%Y-%m-%dT%H:%M:%SZ}: {'; '.join(stale)}",
    )
    return ok
