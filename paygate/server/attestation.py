"""The attestation endpoints: ``GET /v1/attestation?nonce=`` and ``POST /v1/attestation/activate``.

Free and local (they answer before any payment or opening), rate-limited per caller address,
and each quote holds one slot of a small global cap, so a flood of attestation requests cannot
starve paid requests of the TPM: past the cap the answer is 503 at once, never a queue.

Evidence kinds (docs/ATTESTATION.md): ``tpm`` (the TPM key backend: EK certificates, AK,
quote over the binding digest, certifications of the sealing and receipt keys) and ``none``
(software and PKCS#11 keys: the binding document signed by the receipt key, which proves
nothing about where the keys live and says so), and the TEE kinds ``sev-snp``, ``tdx`` and
``nitro`` (the key is generated in the guest's encrypted memory; the TEE's report, quote or
document carries the binding, with the certificates the platform provides). A nonce is
mandatory: nothing is cached.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from enclave import KeyBackend, KeyBackendError
from enclave.attestation import binding
from enclave.attestation.gpu import GpuEvidenceProvider, GpuUnavailable
from enclave.attestation.providers import EvidenceProvider
from enclave.attestation.providers import EvidenceUnavailable as TeeUnavailable
from enclave.attestation.tpm import (
    APP_PCR,
    DEFAULT_PCRS,
    EK_HANDLES,
    CertifiedKey,
    TpmAttester,
    app_digest,
)
from enclave.keys.base import ReceiptSigner
from enclave.keys.epochs import Epoch, EpochKeys
from paygate import jsonsafe, release
from paygate.config import ConfigError
from paygate.server.epochs import caught_up
from paygate.server.errors import BodyTooLarge, GatewayError
from paygate.server.forwarded import DEFAULT_IPV6_PREFIX, Network, address_key, client_address
from paygate.server.limits import read_body
from paygate.x402.metering import TokenPricing
from paygate.x402.offers import PaymentTerms
from paygate.x402.pricing import PricePolicy
from paygate.x402.processor import PaymentProcessor
from paygate.x402.schemes import SCHEMES
from paygate.x402.schemes.batch_settlement.bound import BoundBatchSettlement
from paygate.x402.schemes.batch_settlement.channel import (
    ERC3009_COLLECTOR_ADDRESS,
    SETTLEMENT_ADDRESS,
)
from paygate.x402.schemes.batch_settlement.channel import NAME as CHANNEL_SCHEME
from paygate.x402.schemes.batch_settlement.offer import DEPOSIT_METHOD
from paygate.x402.schemes.upto.offer import FACILITATOR_EXTRA

EvidenceKind = Literal["tpm", "none", "sev-snp", "tdx", "nitro"]
MAX_ACTIVATION_BODY = 16 * 1024  # two marshalled TPM2B blobs of a few hundred bytes
ACTIVATION_READ_TIMEOUT = 10.0  # seconds for that small body
_MAX_TRACKED_CALLERS = 10_000  # bound of the per-address rate table (least recently seen go)
# Exactly the digits: bytes.fromhex alone would skip spaces and accept a shorter nonce.
_NONCE = re.compile(rf"[0-9a-fA-F]{{{2 * binding.NONCE_LEN}}}")


class InvalidNonce(GatewayError):
    message = "nonce must be 64 hexadecimal digits (32 random bytes), given as ?nonce="

    status = 400
    code = "invalid_nonce"


class InvalidActivation(GatewayError):
    message = (
        "the activation request must be JSON {ek, credential_blob, encrypted_secret} (base64url)"
    )

    status = 400
    code = "invalid_activation"


class CredentialNotActivated(GatewayError):
    message = "the TPM refused to activate this credential for its attestation key"

    status = 400
    code = "activation_failed"


class ActivationUnsupported(GatewayError):
    message = "this appliance's evidence kind has no credential activation"

    status = 400
    code = "activation_unsupported"


class AttestationBusy(GatewayError):
    message = "too many attestations in progress; retry shortly"

    status = 503
    code = "attestation_busy"


class AttestationRateLimited(GatewayError):
    message = "too many attestation requests from this address; retry later"

    status = 429
    code = "rate_limited"


class AttestationUnavailable(GatewayError):
    message = "the TPM or TEE could not produce evidence"

    status = 503
    code = "attestation_unavailable"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: object, limit: int = 4096) -> bytes:
    if not isinstance(text, str) or len(text) > limit:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class AttestationConfig:
    """What the endpoints need, built once in the app factory (never the whole Settings)."""

    kind: EvidenceKind
    models: tuple[binding.ModelDigest, ...]
    payment: binding.PaymentTerms | None
    gateway_version: str
    code_digest: str
    pcrs: tuple[int, ...] = DEFAULT_PCRS
    max_concurrent: int = 2
    rate_per_minute: int = 30
    retry_after_seconds: int = 1
    replica: str | None = None  # PAYGATE_REPLICA_ID: named in every evidence document
    # Whose X-Forwarded-For names the caller (the per-address limit's key), as in admission.
    trusted_proxies: tuple[Network, ...] = ()
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX  # per-address keys as admission's (address_key)
    # All callers together: quotes and activations a minute (the TPM's share for free work).
    global_rate_per_minute: int = 120
    log: binding.LogIdentity | None = None  # the transparency log (PAYGATE_LOG)


class RateLimiter:
    """A token bucket per caller address, with a bounded table."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(max(per_minute // 4, 2))
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, caller: str) -> bool:
        now = self._clock()
        tokens, last = self._buckets.pop(caller, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        self._buckets[caller] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > _MAX_TRACKED_CALLERS:
            self._buckets.popitem(last=False)
        return allowed


class AttestationService:
    """Makes evidence documents and answers credential activation for one key."""

    def __init__(
        self,
        config: AttestationConfig,
        key: KeyBackend,
        *,
        clock: Callable[[], float] = time.time,
        provider: EvidenceProvider | None = None,
        gpu: GpuEvidenceProvider | None = None,
    ) -> None:
        if not isinstance(key, ReceiptSigner):
            raise TypeError("the key backend has no receipt-signing key")
        self._config = config
        self._key = key
        self._signer: ReceiptSigner = key
        self._clock = clock
        self._attester: TpmAttester | None = None
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self._in_progress = 0
        self._rate = RateLimiter(config.rate_per_minute)
        self._global = RateLimiter(config.global_rate_per_minute)
        self._tpm_static: dict[str, Any] = {}
        self._provider = provider
        self._gpu = gpu
        # Key epochs: the live epochs are read at each evidence; the long-lived key beside
        # them holds the TPM's AK and the log key.
        self._epochs = key if isinstance(key, EpochKeys) else None

    @property
    def kind(self) -> EvidenceKind:
        return self._config.kind

    def _tpm_key(self) -> Any:
        from enclave.keys.tpm import TpmKey

        key = self._epochs.base if self._epochs is not None else self._key
        return key if isinstance(key, TpmKey) else None

    @property
    def receipt_public_key(self) -> bytes:
        return self._signer.receipt_public_key

    def ek_certificate_kinds(self) -> list[str]:
        """The EK certificates this TPM holds (reads NV; blocking)."""
        key = self._tpm_key()
        if key is None:
            return []
        return sorted(TpmAttester(key).ek_certificates())

    def config_digest(self) -> bytes:
        c = self._config
        return binding.config_digest(
            self._key.public_key,
            self._signer.receipt_public_key,
            c.models,
            c.payment,
            c.gateway_version,
            c.code_digest,
            log=c.log,
            rotating=self._epochs is not None,
        )

    def start(self) -> None:
        """At service start (blocking; run in an executor): measure the application into
        PCR 23 and certify the sealing and receipt keys once."""
        if self._config.kind != "tpm":
            return
        tpm_key = self._tpm_key()
        if tpm_key is None:
            raise TypeError("tpm attestation needs the tpm key backend")
        attester = TpmAttester(tpm_key)
        code = bytes.fromhex(self._config.code_digest.removeprefix("sha256:"))
        digest = app_digest(code, self.config_digest())
        # Once per boot: the first worker measures, the others (and a restarted one) find the
        # value there and leave it alone (enclave.attestation.tpm.TpmAttester.extend_app_pcr).
        with _locked(tpm_key.key_dir / APP_PCR_LOCK):
            attester.extend_app_pcr(digest)
        certified = attester.certify_keys()
        self._tpm_static = {
            "ek_certificates": {k: b64(v) for k, v in attester.ek_certificates().items()},
            "ak_public": b64(attester.ak_public),
            "certify": {name: _certified(c) for name, c in certified.items()},
            "app_pcr": {
                "index": APP_PCR,
                "code_digest": self._config.code_digest,
                "config_digest": "sha256:" + self.config_digest().hex(),
            },
        }
        self._attester = attester

    def _binding(
        self, nonce: bytes, live: Sequence[Epoch] = (), gpu: binding.GpuBinding | None = None
    ) -> binding.Binding:
        c = self._config
        epochs = tuple(
            binding.EpochEntry(e.id, e.sealing_key, e.receipt_key, int(e.not_after)) for e in live
        )
        return binding.Binding(
            nonce=nonce,
            sealing_key=epochs[0].sealing_key if epochs else self._key.public_key,
            receipt_key=epochs[0].receipt_key if epochs else self._signer.receipt_public_key,
            models=c.models,
            payment=c.payment,
            gateway_version=c.gateway_version,
            code_digest=c.code_digest,
            issued_at=int(self._clock()),
            replica=c.replica,
            log=c.log,
            epochs=epochs,
            gpu=gpu,
        )

    def evidence(self, nonce: bytes) -> dict[str, Any]:
        """The evidence document for ``nonce`` (blocking: one TPM quote or one signature; with
        a GPU, first the GPU's measurements for the same nonce)."""
        live = self._epochs.live() if self._epochs is not None else []  # one snapshot
        gpu = self._gpu.attest(nonce) if self._gpu is not None else None
        bound = self._binding(nonce, live, gpu.binding() if gpu is not None else None)
        document: dict[str, Any] = {"kind": self._config.kind, "binding": bound.document()}
        if self._config.replica is not None:
            # Also unsigned beside the evidence: a reader need not parse the binding to see it.
            document["replica"] = self._config.replica
        if gpu is not None:
            document["gpu"] = {
                "kind": gpu.kind,
                "evidence": b64(gpu.evidence),
                "certificates": b64(gpu.certificates),
                "source": gpu.source,
            }
        if self._config.kind == "tpm":
            assert self._attester is not None  # start() ran
            quote, pcrs = self._attester.quote(bound.digest(), self._config.pcrs)
            document["tpm"] = {
                **self._tpm_static,
                "quote": {"attest": b64(quote.attest), "signature": b64(quote.signature)},
                "pcrs": {str(i): v.hex() for i, v in sorted(pcrs.items())},
            }
            if live:
                # Each epoch's two keys, certified by the AK when they were made.
                document["tpm"]["epochs"] = {
                    e.id: {name: _certified(c) for name, c in e.evidence.items()} for e in live
                }
        elif self._config.kind in binding.TEE_KINDS:
            if self._provider is None:  # `paygate attest show` builds the service without one
                raise TeeUnavailable("no TEE evidence provider")
            tee = self._provider.attest(binding.tee_expected(self._config.kind, bound))
            if tee.kind != self._config.kind:
                raise TeeUnavailable(f"the platform produced {tee.kind} evidence")
            document["tee"] = {
                "evidence": b64(tee.evidence),
                "certificates": [b64(c) for c in tee.certificates],
                "source": tee.source,
            }
        else:
            # Honest, not attested: the receipt key vouches for the binding, nothing vouches
            # for the receipt key.
            current = live[0].key if live else None
            signer = current if current is not None else self._signer
            signature = signer.sign_digest(bound.digest())
            document["none"] = {"signature": b64(signature)}
        return document

    def activate(self, ek: str, blob: bytes, secret: bytes) -> bytes:
        if self._attester is None:
            raise ActivationUnsupported
        return self._attester.activate(ek, blob, secret)

    # --- HTTP ---------------------------------------------------------------------------

    def _admit(self, request: web.Request) -> None:
        caller = client_address(
            request.remote,
            request.headers.getall("X-Forwarded-For", []),
            self._config.trusted_proxies,
        )
        if not self._rate.allow(address_key(caller, self._config.ipv6_prefix) or "unknown"):
            raise AttestationRateLimited(retry_after=60)
        # Then everyone's: many addresses together still get a bounded rate of TPM work.
        if not self._global.allow(""):
            raise AttestationBusy(retry_after=self._config.retry_after_seconds)

    async def _blocking(self, call: Callable[..., Any], *args: object) -> Any:
        # The global cap: a quote holds the TPM (shared with every paid request's ECDH).
        if self._in_progress >= self._config.max_concurrent:
            raise AttestationBusy(retry_after=self._config.retry_after_seconds)
        self._in_progress += 1
        try:
            async with self._slots:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(None, call, *args)
        finally:
            self._in_progress -= 1

    async def handle_evidence(self, request: web.Request) -> web.Response:
        values = request.query.getall("nonce", [])
        if len(values) != 1 or _NONCE.fullmatch(values[0]) is None:
            raise InvalidNonce
        nonce = bytes.fromhex(values[0])
        self._admit(request)
        await caught_up(self._epochs)  # the epochs another worker made: attested here too
        try:
            document = await self._blocking(self.evidence, nonce)
        except (KeyBackendError, TeeUnavailable, GpuUnavailable):
            raise AttestationUnavailable from None
        return web.json_response(document, headers={"Cache-Control": "no-store"})

    async def handle_activate(self, request: web.Request) -> web.Response:
        if self._config.kind != "tpm":
            raise ActivationUnsupported
        self._admit(request)  # before reading anything
        try:
            # Bounded in size and time like every body (413/408 past the bounds).
            raw = await read_body(
                request, limit=MAX_ACTIVATION_BODY, timeout=ACTIVATION_READ_TIMEOUT
            )
        except BodyTooLarge:
            raise InvalidActivation("the activation request is larger than 16 KiB") from None
        try:
            body = jsonsafe.loads(raw, max_bytes=MAX_ACTIVATION_BODY, max_depth=2)
            ek = body["ek"]
            blob = unb64(body["credential_blob"])
            secret = unb64(body["encrypted_secret"])
        except (ValueError, KeyError, TypeError):  # UntrustedJSONError is a ValueError
            raise InvalidActivation from None
        if ek not in EK_HANDLES:
            raise InvalidActivation(f"ek must be one of {', '.join(sorted(EK_HANDLES))}")
        try:
            recovered = await self._blocking(self.activate, ek, blob, secret)
        except ValueError:
            raise InvalidActivation from None
        except KeyBackendError:
            raise CredentialNotActivated from None
        return web.json_response({"secret": b64(recovered)}, headers={"Cache-Control": "no-store"})


def _certified(c: CertifiedKey) -> dict[str, str]:
    return {
        "public": b64(c.public),
        "attest": b64(c.certify.attest),
        "signature": b64(c.certify.signature),
    }


APP_PCR_LOCK = "app-pcr.lock"  # in the TPM key's directory: one per appliance, every worker
PCR_LOCK_TIMEOUT = 60.0  # seconds a worker waits for a sibling that is measuring PCR 23


@contextlib.contextmanager
def _locked(path: Path, timeout: float = PCR_LOCK_TIMEOUT) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes; KeyBackendError past ``timeout``."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the PCR 23 lock {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise KeyBackendError(f"{path} stayed locked for {timeout:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- what the app factory measures ----------------------------------------------------------


def gateway_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("paygate")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def code_digest() -> str:
    """The code digest of the installed paygate and enclave packages (paygate.release): what
    PCR 23 measures and the binding document names, as ``paygate release digest`` prints it."""
    return release.code_digest()


def payment_document(
    terms: PaymentTerms,
    prices: PricePolicy,
    pricing: TokenPricing | None,
    schemes: Sequence[str],
    max_tokens_cap: int | None = None,
    channels: Sequence[binding.ChannelTerms] = (),
) -> binding.PaymentTerms:
    """The whole payment terms for the binding document: what every 402 of this appliance
    may ask (a client refuses any offer outside them before it signs). ``channels``: the
    batch-settlement channel terms (:func:`channel_terms`), known once the scheme is bound."""
    # Token prices bound every metered offer: upto's maximum, and a channel offer's on a
    # metered route (batch-settlement charges what was used, up to it).
    metered = pricing is not None and any(s in SCHEMES and SCHEMES[s].metered for s in schemes)
    return binding.PaymentTerms(
        pay_to=terms.pay_to,
        accepts=tuple(
            binding.AcceptedAsset(
                network=a.network.caip2,
                asset=a.asset.address,
                name=a.asset.name,
                version=a.asset.version,
                decimals=a.asset.decimals,
                upto_facilitator=(
                    terms.upto_extra.get(a.network.caip2, {}).get(FACILITATOR_EXTRA)
                    if metered and "upto" in schemes
                    else None
                ),
            )
            for a in terms.accepted
        ),
        schemes=tuple(dict.fromkeys(schemes)),
        price=_plain(prices.default),
        route_prices=tuple((k, _plain(v)) for k, v in sorted(prices.routes.items())),
        model_prices=tuple((k, _plain(v)) for k, v in sorted(prices.models.items())),
        per_million_tokens=(
            None if prices.per_million_tokens is None else _plain(prices.per_million_tokens)
        ),
        token_estimate=prices.token_estimate,
        token_prices=tuple(
            (model, binding.TokenPriceTerms(_plain(p.input), _plain(p.output), _plain(p.minimum)))
            for model, p in sorted(pricing.prices.items())
        )
        if metered and pricing is not None
        else (),
        # The output cap the shaper bounds every metered request by (paygate.upstream.shaping).
        max_tokens_cap=max_tokens_cap if metered else None,
        max_timeout_seconds=terms.max_timeout_seconds,
        channels=tuple(channels),
    )


def channel_terms(
    terms: PaymentTerms, *, receiver_authorizer: str, withdraw_delay: int
) -> tuple[binding.ChannelTerms, ...]:
    """batch-settlement's channel terms, one per accepted asset, as its offers state them
    (``batch_settlement.offer``: payTo the receiver, the asset the token, the bound scheme's
    receiver authorizer and withdraw delay, EIP-3009 deposits) with the contracts the money goes
    to: what a verifying client holds a channel offer against before it deposits."""
    return tuple(
        binding.ChannelTerms(
            network=a.network.caip2,
            contract=SETTLEMENT_ADDRESS,
            deposit_collector=ERC3009_COLLECTOR_ADDRESS,
            receiver=terms.pay_to,
            receiver_authorizer=receiver_authorizer,
            token=a.asset.address,
            withdraw_delay=withdraw_delay,
            asset_transfer_method=DEPOSIT_METHOD,
        )
        for a in terms.accepted
    )


def offered_channels(processor: PaymentProcessor) -> tuple[binding.ChannelTerms, ...]:
    """The channel terms of the processor's bound batch-settlement scheme (none without it)."""
    scheme = processor.scheme(CHANNEL_SCHEME) if CHANNEL_SCHEME in processor.schemes else None
    if not isinstance(scheme, BoundBatchSettlement) or scheme.channels is None:
        return ()
    return channel_terms(
        processor.terms,
        receiver_authorizer=scheme.channels.receiver_authorizer,
        withdraw_delay=scheme.channels.withdraw_delay,
    )


def _plain(amount: Decimal) -> str:
    """A decimal as the binding document spells amounts: fixed point, never an exponent."""
    return format(amount, "f")


def parse_models(models: Sequence[Mapping[str, str]]) -> tuple[binding.ModelDigest, ...]:
    """``[{"name", "digest"[, "upstream"]}]`` of the weights served, checked for the binding
    document."""
    return tuple(
        binding.model_digest(item["name"], item["digest"], item.get("upstream")) for item in models
    )
