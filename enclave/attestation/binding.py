"""The binding document: what one piece of attestation evidence vouches for, in one digest.

A JSON object, serialised canonically per RFC 8785 (JSON Canonicalization Scheme, with the
``rfc8785`` package by Trail of Bits) so that the verifier re-derives the exact bytes the
appliance hashed. Its SHA-256 is the TPM quote's ``qualifyingData`` (TEE kinds put their own
digest of it into their report data). Fields (docs/ATTESTATION.md):

``version`` 2; ``nonce`` the verifier's 32 random bytes (hex); ``sealing_key`` and
``receipt_key`` (65-byte points, hex); ``models`` [{``name``, ``digest`` "sha256:<hex>"}];
``payment`` the whole payment terms (:class:`PaymentTerms`: who is paid, in which asset on which
network, every price and, with `batch-settlement`, each network's channel terms,
:class:`ChannelTerms`) or null when the appliance does not charge; ``gateway`` {``version``,
``code_digest``}; ``issued_at`` (Unix seconds); ``replica`` (optional) the identity of the
replica that answered; ``log`` (optional, present when the appliance keeps a
transparency log) {``origin``, ``key``}: the log's checkpoint origin line and its signed-note
verifier key (docs/TRANSPARENCY.md); ``epochs`` (optional, present with key epochs) the live key
epochs, current first: [{``id``, ``sealing_key``, ``receipt_key``, ``not_after``}], the first
being ``sealing_key``/``receipt_key``; ``gpu`` (optional, present with GPU evidence)
{``kind`` "nvidia", ``evidence_digest``, ``certificates_digest``}: SHA-256 of the GPU's SPDM
measurement exchange (requested with this document's nonce) and of its certificate chain, as the
evidence document carries them.

The payment terms are carried whole, not as a digest, so that a client can hold every 402 it
receives against them before it signs anything: a middlebox that rewrites payTo, the network,
the asset or an amount is caught by the client, not by a later dispute.

The *configuration digest* is the SHA-256 of the same document without ``nonce`` and
``issued_at`` (and ``replica``, ``gpu``): what the appliance measured into its application PCR at
start, so replicas that share one key and configuration share one configuration digest. With
key epochs the keys rotate after the measurement, so the configuration digest leaves out
``sealing_key``, ``receipt_key`` and ``epochs``: each epoch's keys are certified on their own.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography.hazmat.primitives import serialization

from enclave import jcs, p256
from enclave.attestation.base import ExpectedBinding
from enclave.errors import EnclaveError, InvalidPublicKey

VERSION = 2
NONCE_LEN = 32
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_MAX_MODELS = 256
_MAX_TEXT = 256
_MAX_PRICES = 256  # route, model and token price entries each
_MAX_ACCEPTS = 32
_DECIMAL = re.compile(r"[0-9]{1,30}(\.[0-9]{1,36})?")  # a non-negative amount in whole tokens


class BindingInvalid(EnclaveError):
    message = "the binding document is malformed"

    code = "evidence_malformed"


def canonical(document: Any) -> bytes:
    """RFC 8785 canonical JSON bytes."""
    try:
        return jcs.dumps(document)  # rfc8785's bytes; the common documents by a faster path
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise BindingInvalid(f"not canonicalisable JSON: {type(exc).__name__}") from None


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>``, the one spelling of digests in documents."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class ModelDigest:
    name: str
    digest: str  # sha256:<hex> of the weights
    upstream: str | None = None  # which model server serves it (a gateway with several)

    def document(self) -> dict[str, str]:
        out = {"name": self.name, "digest": self.digest}
        if self.upstream is not None:
            out["upstream"] = self.upstream
        return out


@dataclass(frozen=True, slots=True)
class AcceptedAsset:
    """One way to pay: a token on a network, as the 402's requirements must name it."""

    network: str  # CAIP-2, e.g. eip155:8453
    asset: str  # the token contract
    name: str  # its EIP-712 domain name and version (what an EIP-3009 signature covers)
    version: str
    decimals: int
    upto_facilitator: str | None = None  # who may settle metered payments (upto), if offered

    def document(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "asset": self.asset,
            "name": self.name,
            "version": self.version,
            "decimals": self.decimals,
            "upto_facilitator": self.upto_facilitator,
        }


@dataclass(frozen=True, slots=True)
class TokenPriceTerms:
    """A model's metered prices: whole tokens per million input/output tokens, a minimum."""

    input: str
    output: str
    minimum: str


@dataclass(frozen=True, slots=True)
class ChannelTerms:
    """The `batch-settlement` channel a payer may open on one network: every field of its
    ``ChannelConfig`` the seller decides (receiver, receiver authorizer, token, withdraw delay),
    the contract that holds the deposit (the vouchers' EIP-712 ``verifyingContract``) and where
    an EIP-3009 deposit is authorized to. The payer adds only itself and a salt."""

    network: str  # CAIP-2: the chain the channel id is bound to
    contract: str  # the x402BatchSettlement contract
    deposit_collector: str  # the EIP-3009 deposit's recipient (it forwards to the contract)
    receiver: str  # who claims (and is swept the claims)
    receiver_authorizer: str  # who signs claims and refunds
    token: str
    withdraw_delay: int  # seconds between a payer's withdrawal request and its completion
    asset_transfer_method: str = "eip3009"

    def document(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "contract": self.contract,
            "deposit_collector": self.deposit_collector,
            "receiver": self.receiver,
            "receiver_authorizer": self.receiver_authorizer,
            "token": self.token,
            "withdraw_delay": self.withdraw_delay,
            "asset_transfer_method": self.asset_transfer_method,
        }


@dataclass(frozen=True, slots=True)
class PaymentTerms:
    """Everything a 402 from this appliance may ask: payTo, the accepted assets, the schemes,
    the exact prices (default, per route, per model, per million tokens on an estimate) and
    the metered ones (token prices per model, the output cap). Amounts are decimal strings."""

    pay_to: str
    accepts: tuple[AcceptedAsset, ...]
    schemes: tuple[str, ...] = ("exact",)
    price: str = "0"
    route_prices: tuple[tuple[str, str], ...] = ()
    model_prices: tuple[tuple[str, str], ...] = ()
    per_million_tokens: str | None = None
    token_estimate: int = 1000
    token_prices: tuple[tuple[str, TokenPriceTerms], ...] = ()
    max_tokens_cap: int | None = None
    max_timeout_seconds: int = 300
    # batch-settlement's channel terms per network (absent from the document when none: the
    # documents of appliances without channels, and of older ones, are as before).
    channels: tuple[ChannelTerms, ...] = ()

    def document(self) -> dict[str, Any]:
        document = {
            "pay_to": self.pay_to,
            "accepts": [a.document() for a in self.accepts],
            "schemes": list(self.schemes),
            "prices": {
                "default": self.price,
                "routes": dict(self.route_prices),
                "models": dict(self.model_prices),
                "per_million_tokens": self.per_million_tokens,
                "token_estimate": self.token_estimate,
            },
            "token_prices": {
                model: {"input": p.input, "output": p.output, "minimum": p.minimum}
                for model, p in self.token_prices
            },
            "max_tokens_cap": self.max_tokens_cap,
            "max_timeout_seconds": self.max_timeout_seconds,
        }
        if self.channels:
            document["channels"] = [c.document() for c in self.channels]
        return document

    def accepted(self, network: str) -> AcceptedAsset | None:
        return next((a for a in self.accepts if a.network == network), None)

    def channel(self, network: str) -> ChannelTerms | None:
        return next((c for c in self.channels if c.network == network), None)


@dataclass(frozen=True, slots=True)
class LogIdentity:
    """The transparency log this appliance appends to: its origin and checkpoint key (vkey)."""

    origin: str
    key: str


@dataclass(frozen=True, slots=True)
class EpochEntry:
    """One live key epoch: its id, its two keys, the last moment it is served."""

    id: str
    sealing_key: bytes
    receipt_key: bytes
    not_after: int

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sealing_key": self.sealing_key.hex(),
            "receipt_key": self.receipt_key.hex(),
            "not_after": self.not_after,
        }


@dataclass(frozen=True, slots=True)
class GpuBinding:
    """The GPU evidence this document vouches for, by digest."""

    evidence_digest: str
    certificates_digest: str
    kind: str = "nvidia"

    def document(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "evidence_digest": self.evidence_digest,
            "certificates_digest": self.certificates_digest,
        }


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
    epochs: tuple[EpochEntry, ...] = ()  # key epochs, current first (absent without epochs)
    gpu: GpuBinding | None = None  # GPU evidence (absent without it)

    def document(self) -> dict[str, Any]:
        document = {
            "version": VERSION,
            "nonce": self.nonce.hex(),
            **self._static(),
            "issued_at": self.issued_at,
        }
        if self.replica is not None:
            document["replica"] = self.replica
        if self.epochs:
            document["epochs"] = [e.document() for e in self.epochs]
        if self.gpu is not None:
            document["gpu"] = self.gpu.document()
        return document

    def epoch(self, key_id: str) -> EpochEntry | None:
        return next((e for e in self.epochs if e.id == key_id), None)

    def _static(self) -> dict[str, Any]:
        payment = self.payment.document() if self.payment is not None else None
        static = {
            "sealing_key": self.sealing_key.hex(),
            "receipt_key": self.receipt_key.hex(),
            "models": [m.document() for m in self.models],
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
            rotating=bool(self.epochs),
        )

    def model_digest(self, name: str) -> str | None:
        return next((m.digest for m in self.models if m.name == name), None)

    def model_digests(self, name: str) -> frozenset[str]:
        """Every digest ``name`` is served with (several upstreams may serve one name)."""
        return frozenset(m.digest for m in self.models if m.name == name)


def config_digest(
    sealing_key: bytes,
    receipt_key: bytes,
    models: Sequence[ModelDigest],
    payment: PaymentTerms | None,
    gateway_version: str,
    code_digest: str,
    *,
    log: LogIdentity | None = None,
    rotating: bool = False,
) -> bytes:
    """The configuration digest; ``rotating`` (key epochs): without the keys, which change
    after the measurement and are certified epoch by epoch."""
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
    if rotating:
        del static["sealing_key"], static["receipt_key"]
    return hashlib.sha256(canonical({"version": VERSION, **static})).digest()


def parse(document: Any) -> Binding:
    """A binding document from JSON, every field checked; :class:`BindingInvalid` otherwise."""
    if not isinstance(document, Mapping) or document.get("version") != VERSION:
        raise BindingInvalid(f"the binding document is not a version {VERSION} object")
    expected = {
        "version", "nonce", "sealing_key", "receipt_key", "models", "payment", "gateway",
        "issued_at",
    }  # fmt: skip
    if set(document) - {"replica", "log", "epochs", "gpu"} != expected:
        raise BindingInvalid("the binding document has missing or unknown fields")
    nonce = _hex(document["nonce"], "nonce")
    if len(nonce) != NONCE_LEN:
        raise BindingInvalid("the nonce is not 32 bytes")
    models = document["models"]
    if not isinstance(models, list) or len(models) > _MAX_MODELS:
        raise BindingInvalid("models is not a list")
    parsed_models = []
    for item in models:
        if not isinstance(item, Mapping) or set(item) - {"upstream"} != {"name", "digest"}:
            raise BindingInvalid("a model entry is not {name, digest[, upstream]}")
        parsed_models.append(model_digest(item["name"], item["digest"], item.get("upstream")))
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
        epochs=_epochs(document, "epochs" in document),
        gpu=_gpu(document["gpu"]) if "gpu" in document else None,
    )


_MAX_EPOCHS = 4


def _epochs(document: Mapping[str, Any], present: bool) -> tuple[EpochEntry, ...]:
    if not present:
        return ()
    value = document["epochs"]
    if not isinstance(value, list) or not 0 < len(value) <= _MAX_EPOCHS:
        raise BindingInvalid("epochs is not a list of one to four epochs")
    entries = []
    for item in value:
        if not isinstance(item, Mapping) or set(item) != {
            "id", "sealing_key", "receipt_key", "not_after",
        }:  # fmt: skip
            raise BindingInvalid("an epoch is not {id, sealing_key, receipt_key, not_after}")
        not_after = item["not_after"]
        if not isinstance(not_after, int) or isinstance(not_after, bool) or not_after < 0:
            raise BindingInvalid("an epoch's not_after is not a Unix time")
        entries.append(
            EpochEntry(
                _text(item["id"]),
                _point(item["sealing_key"]),
                _point(item["receipt_key"]),
                not_after,
            )
        )
    if len({e.id for e in entries}) != len(entries):
        raise BindingInvalid("an epoch id is listed twice")
    first = entries[0]
    if first.sealing_key != _point(document["sealing_key"]) or (
        first.receipt_key != _point(document["receipt_key"])
    ):
        raise BindingInvalid("the current epoch is not the document's sealing and receipt key")
    return tuple(entries)


def _gpu(value: Any) -> GpuBinding:
    if not isinstance(value, Mapping) or set(value) != {
        "kind", "evidence_digest", "certificates_digest",
    }:  # fmt: skip
        raise BindingInvalid("gpu is not {kind, evidence_digest, certificates_digest}")
    if value["kind"] != "nvidia":
        raise BindingInvalid("the GPU evidence is not of a known kind")
    return GpuBinding(_digest(value["evidence_digest"]), _digest(value["certificates_digest"]))


def _log(value: Any) -> LogIdentity:
    if not isinstance(value, Mapping) or set(value) != {"origin", "key"}:
        raise BindingInvalid("log is not {origin, key}")
    key = value["key"]
    if not isinstance(key, str) or not 0 < len(key) <= 1024:
        raise BindingInvalid("the log key is not a verifier key")
    return LogIdentity(_text(value["origin"]), key)


def model_digest(name: Any, digest: Any, upstream: Any = None) -> ModelDigest:
    """One checked model entry (a name, ``sha256:<64 lower-case hex>``, maybe its upstream)."""
    return ModelDigest(_text(name), _digest(digest), None if upstream is None else _text(upstream))


_PAYMENT_FIELDS = {
    "pay_to", "accepts", "schemes", "prices", "token_prices", "max_tokens_cap",
    "max_timeout_seconds",
}  # fmt: skip
_PRICE_FIELDS = {"default", "routes", "models", "per_million_tokens", "token_estimate"}
_ACCEPT_FIELDS = {"network", "asset", "name", "version", "decimals", "upto_facilitator"}
_CHANNEL_FIELDS = {
    "network", "contract", "deposit_collector", "receiver", "receiver_authorizer", "token",
    "withdraw_delay", "asset_transfer_method",
}  # fmt: skip


def _payment(value: Any) -> PaymentTerms | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) - {"channels"} != _PAYMENT_FIELDS:
        raise BindingInvalid("payment is not the payment terms object")
    accepts = value["accepts"]
    if not isinstance(accepts, list) or not 0 < len(accepts) <= _MAX_ACCEPTS:
        raise BindingInvalid("accepts is not a list of assets")
    parsed_accepts = tuple(_accepted(item) for item in accepts)
    if len({a.network for a in parsed_accepts}) != len(parsed_accepts):
        raise BindingInvalid("accepts names a network twice")
    schemes = value["schemes"]
    if not isinstance(schemes, list) or not 0 < len(schemes) <= 8:
        raise BindingInvalid("schemes is not a list")
    prices = value["prices"]
    if not isinstance(prices, Mapping) or set(prices) != _PRICE_FIELDS:
        raise BindingInvalid("prices is not {default, routes, models, per_million_tokens, ...}")
    token_prices = value["token_prices"]
    if not isinstance(token_prices, Mapping) or len(token_prices) > _MAX_PRICES:
        raise BindingInvalid("token_prices is not an object")
    parsed_token_prices = []
    for model, entry in token_prices.items():
        if not isinstance(entry, Mapping) or set(entry) != {"input", "output", "minimum"}:
            raise BindingInvalid("a token price is not {input, output, minimum}")
        parsed_token_prices.append(
            (
                _text(model),
                TokenPriceTerms(
                    _amount(entry["input"]), _amount(entry["output"]), _amount(entry["minimum"])
                ),
            )
        )
    per_million = prices["per_million_tokens"]
    cap = value["max_tokens_cap"]
    return PaymentTerms(
        pay_to=_address(value["pay_to"], "pay_to"),
        accepts=parsed_accepts,
        schemes=tuple(_text(s) for s in schemes),
        price=_amount(prices["default"]),
        route_prices=_price_table(prices["routes"]),
        model_prices=_price_table(prices["models"]),
        per_million_tokens=None if per_million is None else _amount(per_million),
        token_estimate=_count(prices["token_estimate"], "token_estimate"),
        token_prices=tuple(parsed_token_prices),
        max_tokens_cap=None if cap is None else _count(cap, "max_tokens_cap"),
        max_timeout_seconds=_count(value["max_timeout_seconds"], "max_timeout_seconds"),
        channels=_channels(value["channels"], parsed_accepts) if "channels" in value else (),
    )


def _channels(value: Any, accepts: Sequence[AcceptedAsset]) -> tuple[ChannelTerms, ...]:
    # Present only when channels are offered: an empty list is not a document this code makes.
    if not isinstance(value, list) or not 0 < len(value) <= _MAX_ACCEPTS:
        raise BindingInvalid("channels is not a list of channel terms")
    channels = []
    for item in value:
        if not isinstance(item, Mapping) or set(item) != _CHANNEL_FIELDS:
            raise BindingInvalid("a channel is not {network, contract, receiver, ...}")
        delay = item["withdraw_delay"]
        if not isinstance(delay, int) or isinstance(delay, bool) or not 0 < delay < 2**40:
            raise BindingInvalid("a channel's withdraw_delay is not a uint40 of seconds")
        channels.append(
            ChannelTerms(
                network=_text(item["network"]),
                contract=_address(item["contract"], "contract"),
                deposit_collector=_address(item["deposit_collector"], "deposit_collector"),
                receiver=_address(item["receiver"], "receiver"),
                receiver_authorizer=_address(item["receiver_authorizer"], "receiver_authorizer"),
                token=_address(item["token"], "token"),
                withdraw_delay=delay,
                asset_transfer_method=_text(item["asset_transfer_method"]),
            )
        )
    networks = {c.network for c in channels}
    if len(networks) != len(channels):
        raise BindingInvalid("channels names a network twice")
    if not networks <= {a.network for a in accepts}:
        raise BindingInvalid("a channel is on a network the terms do not accept")
    return tuple(channels)


def _accepted(item: Any) -> AcceptedAsset:
    if not isinstance(item, Mapping) or set(item) != _ACCEPT_FIELDS:
        raise BindingInvalid("an accepted asset is not {network, asset, name, version, ...}")
    decimals = item["decimals"]
    if not isinstance(decimals, int) or isinstance(decimals, bool) or not 0 <= decimals <= 36:
        raise BindingInvalid("decimals is not 0..36")
    facilitator = item["upto_facilitator"]
    return AcceptedAsset(
        network=_text(item["network"]),
        asset=_address(item["asset"], "asset"),
        name=_text(item["name"]),
        version=_text(item["version"]),
        decimals=decimals,
        upto_facilitator=None if facilitator is None else _address(facilitator, "facilitator"),
    )


def _price_table(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping) or len(value) > _MAX_PRICES:
        raise BindingInvalid("a price table is not an object")
    return tuple((_text(key), _amount(price)) for key, price in value.items())


def _amount(value: Any) -> str:
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        raise BindingInvalid("an amount is not a plain non-negative decimal string")
    return value


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 10**9:
        raise BindingInvalid(f"{what} is not a positive integer")
    return value


def _address(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise BindingInvalid(f"{what} is not an address")
    return value


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
