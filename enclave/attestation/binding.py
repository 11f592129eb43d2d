"""The binding document: what one piece of attestation evidence vouches for, in one digest.

A JSON object, serialised canonically per RFC 8785 (JSON Canonicalization Scheme, with the
``rfc8785`` package by Trail of Bits) so that the verifier re-derives the exact bytes the
appliance hashed. Its SHA-256 is the TPM quote's ``qualifyingData`` (TEE kinds put their own
digest of it into their report data). Fields (docs/ATTESTATION.md):

``version`` 1; ``nonce`` the verifier's 32 random bytes (hex); ``sealing_key`` and
``receipt_key`` (65-byte points, hex); ``models`` [{``name``, ``digest`` "sha256:<hex>"}];
``payment`` {``pay_to``, ``networks``, ``asset``, ``price_digest``} or null when the appliance
does not charge; ``gateway`` {``version``, ``code_digest``}; ``issued_at`` (Unix seconds);
``replica`` (optional) the identity of the replica that answered; ``log`` (optional, present when
the appliance keeps a transparency log) {``origin``, ``key``}: the log's checkpoint origin line
and its signed-note verifier key (docs/TRANSPARENCY.md).

The *configuration digest* is the SHA-256 of the same document without ``nonce`` and
``issued_at`` (and ``replica``): what the appliance measured into its application PCR at start,
so replicas that share one key and configuration share one configuration digest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography.hazmat.primitives import serialization

from enclave import p256
from enclave.attestation.base import ExpectedBinding
from enclave.errors import EnclaveError, InvalidPublicKey

VERSION = 1
NONCE_LEN = 32
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_MAX_MODELS = 256
_MAX_TEXT = 256


class BindingInvalid(EnclaveError):
    """the binding document is malformed"""

    code = "evidence_malformed"


def canonical(document: Any) -> bytes:
    """RFC 8785 canonical JSON bytes."""
    try:
        return rfc8785.dumps(document)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise BindingInvalid(f"not canonicalisable JSON: {type(exc).__name__}") from None


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>``, the one spelling of digests in documents."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class ModelDigest:
    name: str
    digest: str  # sha256:<hex> of the weights


@dataclass(frozen=True, slots=True)
class PaymentTerms:
    pay_to: str
    networks: tuple[str, ...]
    asset: str
    price_digest: str  # sha256 of the canonical price table


@dataclass(frozen=True, slots=True)
class LogIdentity:
    """The transparency log this appliance appends to: its origin and checkpoint key (vkey)."""

    origin: str
    key: str


@dataclass(frozen=True, slots=True)
class Binding:
    nonce: bytes
    sealing_key: bytes
    receipt_key: bytes
    models: tuple[ModelDigest, ...]
    payment: PaymentTerms | None
    gateway_version: str
    code_digest: str
    issued_at: int
    replica: str | None = None  # which replica answered (behind a load balancer)
    log: LogIdentity | None = None  # the transparency log (absent when none is kept)

    def document(self) -> dict[str, Any]:
        document = {
            "version": VERSION,
            "nonce": self.nonce.hex(),
            **self._static(),
            "issued_at": self.issued_at,
        }
        if self.replica is not None:
            document["replica"] = self.replica
        return document

    def _static(self) -> dict[str, Any]:
        payment = None
        if self.payment is not None:
            payment = {
                "pay_to": self.payment.pay_to,
                "networks": list(self.payment.networks),
                "asset": self.payment.asset,
                "price_digest": self.payment.price_digest,
            }
        static = {
            "sealing_key": self.sealing_key.hex(),
            "receipt_key": self.receipt_key.hex(),
            "models": [{"name": m.name, "digest": m.digest} for m in self.models],
            "payment": payment,
            "gateway": {"version": self.gateway_version, "code_digest": self.code_digest},
        }
        if self.log is not None:
            static["log"] = {"origin": self.log.origin, "key": self.log.key}
        return static

    def canonical(self) -> bytes:
        return canonical(self.document())

    def digest(self) -> bytes:
        """SHA-256 of the canonical document: the quote's qualifying data."""
        return hashlib.sha256(self.canonical()).digest()

    def config_digest(self) -> bytes:
        """SHA-256 of the document without nonce and time (measured into PCR 23)."""
        return config_digest(
            self.sealing_key,
            self.receipt_key,
            self.models,
            self.payment,
            self.gateway_version,
            self.code_digest,
            log=self.log,
        )

    def model_digest(self, name: str) -> str | None:
        return next((m.digest for m in self.models if m.name == name), None)


def config_digest(
    sealing_key: bytes,
    receipt_key: bytes,
    models: Sequence[ModelDigest],
    payment: PaymentTerms | None,
    gateway_version: str,
    code_digest: str,
    *,
    log: LogIdentity | None = None,
) -> bytes:
    static = Binding(
        b"",
        sealing_key,
        receipt_key,
        tuple(models),
        payment,
        gateway_version,
        code_digest,
        0,
        log=log,
    )._static()
    return hashlib.sha256(canonical({"version": VERSION, **static})).digest()


def parse(document: Any) -> Binding:
    """A binding document from JSON, every field checked; :class:`BindingInvalid` otherwise."""
    if not isinstance(document, Mapping) or document.get("version") != VERSION:
        raise BindingInvalid("the binding document is not a version 1 object")
    expected = {
        "version", "nonce", "sealing_key", "receipt_key", "models", "payment", "gateway",
        "issued_at",
    }  # fmt: skip
    if set(document) - {"replica", "log"} != expected:
        raise BindingInvalid("the binding document has missing or unknown fields")
    nonce = _hex(document["nonce"], "nonce")
    if len(nonce) != NONCE_LEN:
        raise BindingInvalid("the nonce is not 32 bytes")
    models = document["models"]
    if not isinstance(models, list) or len(models) > _MAX_MODELS:
        raise BindingInvalid("models is not a list")
    parsed_models = []
    for item in models:
        if not isinstance(item, Mapping) or set(item) != {"name", "digest"}:
            raise BindingInvalid("a model entry is not {name, digest}")
        parsed_models.append(model_digest(item["name"], item["digest"]))
    gateway = document["gateway"]
    if not isinstance(gateway, Mapping) or set(gateway) != {"version", "code_digest"}:
        raise BindingInvalid("gateway is not {version, code_digest}")
    issued_at = document["issued_at"]
    if not isinstance(issued_at, int) or isinstance(issued_at, bool) or issued_at < 0:
        raise BindingInvalid("issued_at is not a Unix time")
    return Binding(
        nonce=nonce,
        sealing_key=_point(document["sealing_key"]),
        receipt_key=_point(document["receipt_key"]),
        models=tuple(parsed_models),
        payment=_payment(document["payment"]),
        gateway_version=_text(gateway["version"]),
        code_digest=_digest(gateway["code_digest"]),
        issued_at=issued_at,
        replica=_text(document["replica"]) if "replica" in document else None,
        log=_log(document["log"]) if "log" in document else None,
    )


def _log(value: Any) -> LogIdentity:
    if not isinstance(value, Mapping) or set(value) != {"origin", "key"}:
        raise BindingInvalid("log is not {origin, key}")
    key = value["key"]
    if not isinstance(key, str) or not 0 < len(key) <= 1024:
        raise BindingInvalid("the log key is not a verifier key")
    return LogIdentity(_text(value["origin"]), key)


def model_digest(name: Any, digest: Any) -> ModelDigest:
    """One checked model entry (a name and ``sha256:<64 lower-case hex>``)."""
    return ModelDigest(_text(name), _digest(digest))


def _payment(value: Any) -> PaymentTerms | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {
        "pay_to", "networks", "asset", "price_digest",
    }:  # fmt: skip
        raise BindingInvalid("payment is not {pay_to, networks, asset, price_digest}")
    pay_to = value["pay_to"]
    if not isinstance(pay_to, str) or not _ADDRESS.fullmatch(pay_to):
        raise BindingInvalid("pay_to is not an address")
    networks = value["networks"]
    if not isinstance(networks, list) or not 0 < len(networks) <= 32:
        raise BindingInvalid("networks is not a list")
    return PaymentTerms(
        pay_to=pay_to,
        networks=tuple(_text(n) for n in networks),
        asset=_text(value["asset"]),
        price_digest=_digest(value["price_digest"]),
    )


def _text(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_TEXT:
        raise BindingInvalid("a text field is empty, too long or not a string")
    return value


def _digest(value: Any) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise BindingInvalid("a digest is not sha256:<64 lower-case hex digits>")
    return value


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 256:
        raise BindingInvalid(f"{what} is not hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise BindingInvalid(f"{what} is not hex") from None


def _point(value: Any) -> bytes:
    raw = _hex(value, "a public key")
    try:
        p256.load_public_key(raw)
    except InvalidPublicKey:
        raise BindingInvalid("a public key is not a P-256 point") from None
    return raw


TEE_KINDS = ("sev-snp", "tdx", "nitro")


def tee_expected(kind: str, bound: Binding) -> ExpectedBinding:
    """What TEE evidence of ``kind`` carries for ``bound``: SEV-SNP and TDX report_data =
    SHA-512 of the canonical document; Nitro nonce, user_data = its SHA-256 and public_key = the
    sealing key (SPKI DER). The appliance asks its TEE for this; the client expects it."""
    document = bound.canonical()
    if kind in ("sev-snp", "tdx"):
        return ExpectedBinding(report_data=hashlib.sha512(document).digest())
    if kind == "nitro":
        spki = p256.load_public_key(bound.sealing_key).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return ExpectedBinding(
            nonce=bound.nonce, user_data=hashlib.sha256(document).digest(), public_key=spki
        )
    raise ValueError(f"not a TEE evidence kind: {kind!r}")
