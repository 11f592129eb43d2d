"""Settings: a TOML file and ``PAYGATE_*`` environment variables (pydantic-settings).

Precedence, highest first: explicit arguments, the environment, the TOML file, defaults.
Names are flat (``key_backend`` in TOML is ``PAYGATE_KEY_BACKEND`` in the environment) because
operators script against the environment names; docs/CONFIG.md lists every one. The fields are
declared in one section class per concern (``KeySection``, ``GatewaySection``, ``PaymentSection``,
…, each with its own checks); ``Settings`` joins them and keeps the checks that span sections.
Secrets (PINs, passphrases) are ``SecretStr`` and may come from a file (``*_file``), which suits
systemd credentials; they never appear in ``repr``, logs or errors.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from paygate import jsonsafe
from paygate.errors import PaygateError
from paygate.upstream.config import UpstreamConfig, UpstreamMode
from paygate.upstream.engines.base import EngineKind
from paygate.upstream.fleet import UpstreamEntry
from paygate.upstream.names import (
    deployment_containers,
    member_deployment,
    previous_member_deployment,
)

if TYPE_CHECKING:
    from paygate.x402.facilitator_auth import FacilitatorAuth
    from paygate.x402.ledger_store import LedgerLocation

KeyBackendName = Literal["software", "pkcs11", "tpm", "tee-memory"]
# A rate of key operations a second: finite and above 0 (inf would be no bound at all).
OpsPerSecond = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeDecimal = Annotated[Decimal, Field(ge=0, max_digits=40, decimal_places=18)]
PaymentMode = Literal["off", "facilitator", "chain", "verify-only"]
PaymentScheme = Literal["exact", "upto", "batch-settlement"]
# What schemes ask of the other settings (checked in Settings; docs/PAYMENTS.md): the schemes
# token_prices drive, and those that charge a channel after each reply, every deposit, claim and
# refund proven on chain (the configuration does not import the payment code's registry).
METERED_SCHEMES = ("upto", "batch-settlement")
CHANNEL_SCHEMES = ("batch-settlement",)


class RateLimitSetting(BaseModel):
    """``PAYGATE_RATE_LIMITS`` entry: requests per minute per client address / per payer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_ip: PositiveFloat | None = None
    per_payer: PositiveFloat | None = None
    burst: Annotated[int, Field(ge=1, le=1_000_000)] = 10


class TokenPriceSetting(BaseModel):
    """``PAYGATE_TOKEN_PRICES`` entry: USDC per million input/output tokens, minimum per request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: NonNegativeDecimal
    output: NonNegativeDecimal
    minimum: NonNegativeDecimal = Decimal(0)


class TokenLimitSetting(BaseModel):
    """``PAYGATE_TOKEN_LIMITS`` entry: weighted tokens per minute (paygate.economics)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_payer: PositiveInt | None = None
    per_model: PositiveInt | None = None
    input_weight: NonNegativeDecimal = Decimal(1)
    output_weight: NonNegativeDecimal = Decimal(1)
    shadow: bool = False


class BudgetSetting(BaseModel):
    """``PAYGATE_BUDGETS`` entry: USDC one payer may commit per UTC day or month."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_payer: NonNegativeDecimal
    shadow: bool = False


def _upstream_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not carry a query, fragment or credentials")
    return value.rstrip("/")


def _health_path(value: str) -> str:
    if not value.startswith("/") or "?" in value or "#" in value:
        raise ValueError("must be an absolute path without query, e.g. /health")
    return value


def _split_list(value: Any) -> Any:
    # The environment gives one string: accept "10.0.0.1, 10.1.0.0/16" as well as a JSON list.
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            return jsonsafe.loads(value, max_bytes=64 * 1024)  # ValueError when not JSON
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# The secret settings: each also read from its ``*_file`` or a systemd credential (secret()).
SecretName = Literal[
    "key_passphrase",
    "pkcs11_pin",
    "gas_key",
    "upstream_api_key",
    "alert_webhook_secret",
    "console_secret",
    "cache_salt_secret",
]
SECRET_NAMES: tuple[SecretName, ...] = get_args(SecretName)

_Item = TypeVar("_Item")
# A list setting: a list in the TOML file, one string ("a, b" or a JSON list) in the environment.
SplitList = Annotated[list[_Item], NoDecode, BeforeValidator(_split_list)]


def _checked_secret(check: Callable[[str], object]) -> BeforeValidator:
    """A secret URL setting (it may carry a token) whose text ``check`` validates before it is
    hidden, raising a ValueError that never quotes it; unset or empty is None."""

    def validate(value: Any) -> Any:
        if value in ("", None):
            return None
        check(value.get_secret_value() if isinstance(value, SecretStr) else str(value))
        return value

    return BeforeValidator(validate)


def _webhook_url(text: str) -> None:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError("must be https:// (http:// only on loopback)")


def _ledger_url(text: str) -> None:
    from paygate.x402.ledger_store import parse_ledger_url

    parse_ledger_url(text)  # ValueError says what is wrong, never quoting the URL


_View = TypeVar("_View")


def settings_view(settings: BaseModel, view: type[_View], prefix: str = "", **given: Any) -> _View:
    """The dataclass ``view`` of the settings: each of its fields not ``given`` is the setting
    of its name, ``prefix`` + name where there is one (``upstream_port`` for ``port``). Dicts
    are copied: a view never shares a mutable value with the settings."""
    names = type(settings).model_fields
    values = dict(given)
    for field in dataclasses.fields(view):  # type: ignore[arg-type]
        if field.init and field.name not in values:
            name = prefix + field.name if prefix + field.name in names else field.name
            value = getattr(settings, name)
            values[field.name] = dict(value) if isinstance(value, dict) else value
    return view(**values)


def _matching(pattern: str, message: str) -> AfterValidator:
    """A text setting that must match ``pattern`` whole (an unset one is not checked)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


def _memory(value: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*[bkmg]?", value.lower()):
        raise ValueError("must be a size like 512m or 8g")
    return value.lower()


def _gpus(value: str) -> str | None:
    if value and not re.fullmatch(r"all|[A-Za-z0-9-]+(,[A-Za-z0-9-]+)*", value.strip()):
        raise ValueError("must be 'all' or comma-separated device ids")
    return value.strip() if value else None


# The checks a global ``upstream_*`` setting and an ``[[upstream]]`` entry's field share.
UpstreamUrl = Annotated[str, AfterValidator(_upstream_url)]
HealthPath = Annotated[str, AfterValidator(_health_path)]
DockerRef = Annotated[
    str,
    _matching(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}", "must be a docker image or volume name"),
]
ReplicaId = Annotated[
    str, _matching(r"[A-Za-z0-9._:@-]{1,80}", "must be 1-80 characters of [A-Za-z0-9._:@-]")
]
Sha256Digest = Annotated[
    str, _matching(r"sha256:[0-9a-f]{64}", "must be sha256:<64 lower-case hex digits>")
]
LogOrigin = Annotated[
    str,
    _matching(r"[!-*,-~]{1,255}", "must be 1-255 printable characters without spaces or '+'"),
]
MemorySize = Annotated[str, AfterValidator(_memory)]
GpuDevices = Annotated[str, AfterValidator(_gpus)]
HomePath = Annotated[Path, AfterValidator(Path.expanduser)]


class UpstreamSetting(BaseModel):
    """One ``[[upstream]]`` table / ``PAYGATE_UPSTREAMS`` entry (docs/UPSTREAM.md, "Several model
    servers"). Unset fields take the global ``upstream_*`` settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")]
    kind: EngineKind | None = None
    mode: UpstreamMode | None = None
    url: UpstreamUrl | None = None
    models: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=256)]],
        Field(min_length=1, max_length=200),
    ]
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    model_path: HomePath | None = None
    health_path: HealthPath | None = None
    api_key_file: Path | None = None
    image: DockerRef | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    cpus: PositiveFloat | None = None
    memory: MemorySize | None = None
    gpus: GpuDevices | None = None


class KeySection(BaseModel):
    """The enclave key backend and its epochs."""

    # --- keys (enclave backends) ---
    key_backend: KeyBackendName = "software"
    key_file: Path = Field(default=Path("/var/lib/paygate/key.pem"))
    key_passphrase: SecretStr | None = None
    key_passphrase_file: Path | None = None
    pkcs11_module: Path = Path("/usr/lib/softhsm/libsofthsm2.so")
    pkcs11_token_label: str = "paygate"  # noqa: S105 - a label, not a secret
    pkcs11_key_label: str = "paygate-envelope"
    pkcs11_pin: SecretStr | None = None
    pkcs11_pin_file: Path | None = None
    tpm_tcti: str = "device:/dev/tpmrm0"
    tpm_key_dir: Path = Path("/var/lib/paygate/tpm-key")
    # Key epochs (docs/ATTESTATION.md): seconds (or "90s", "30m", "24h", "7d") between rotations
    # of the sealing and receipt keys; 0 keeps one long-lived key. The grace period serves the
    # previous epoch after a rotation, then its keys are destroyed.
    key_epoch: Annotated[float, Field(ge=0)] = 0.0
    key_epoch_grace: Annotated[float, Field(ge=0)] = 300.0
    # Where `paygate keys rotate` asks the running gateway to rotate (a request file).
    key_epoch_dir: Path = Path("/var/lib/paygate/epochs")
    # GPU evidence beside the CPU's (docs/ATTESTATION.md): off, or nvml (NVIDIA H100 CC mode).
    gpu_evidence: Literal["off", "nvml"] = "off"

    @field_validator("key_epoch", "key_epoch_grace", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_key_epoch(self) -> Settings:
        if self.key_epoch and self.key_epoch_grace >= self.key_epoch:
            raise ValueError("key_epoch_grace must be shorter than key_epoch")
        if self.key_epoch and self.key_epoch < 10:
            raise ValueError("key_epoch is at least 10 seconds (0: no rotation)")
        return self


class AttestationSection(BaseModel):
    """What evidence the appliance gives and how often callers may ask."""

    # --- attestation (docs/ATTESTATION.md) ---
    attestation: Literal["auto", "tpm", "none", "sev-snp", "tdx", "nitro"] = "auto"
    # Where the TEE kinds get their evidence (enclave.attestation.providers).
    attestation_configfs_root: Path = Path("/sys/kernel/config/tsm")
    attestation_sev_guest_device: Path = Path("/dev/sev-guest")
    attestation_nsm_device: Path = Path("/dev/nsm")
    attestation_max_concurrent: PositiveInt = 2
    attestation_rate_per_minute: PositiveInt = 30
    # All callers together (quotes and activations use the TPM, shared with paid requests).
    attestation_global_rate_per_minute: PositiveInt = 120


class GatewaySection(BaseModel):
    """The listener, body and reply bounds, timeouts, slot pools and proxies."""

    # --- gateway (paygate serve) ---
    listen: str = "127.0.0.1:8402"
    upstream_url: UpstreamUrl = "http://127.0.0.1:11434"
    payment_mode: PaymentMode = "off"
    require_encryption: bool = False
    # The gateway's log level; dependencies' RPC tracing stays at WARNING (server.logs).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    max_sealed_reply_bytes: PositiveInt = 16 * 1024 * 1024
    max_plain_reply_bytes: PositiveInt = 16 * 1024 * 1024
    max_header_bytes: PositiveInt = 8190
    max_headers: PositiveInt = 100
    max_concurrent_requests: PositiveInt = 64
    retry_after_seconds: PositiveInt = 1
    body_read_timeout: PositiveFloat = 30.0
    body_first_byte_timeout: PositiveFloat = 5.0
    body_slots: PositiveInt = 256
    unpaid_body_slots: PositiveInt = 16
    per_ip_body_slots: PositiveInt = 8
    unpaid_open_slots: PositiveInt = 4
    # Opening a sealed body before its payment is verified (body-priced routes): per address at
    # once, and at most this many a second in all (a key operation each, on the TPM/HSM), for
    # callers without a payment and, in a gate of their own, those with one (a claim, not yet
    # verified: paygate.server.claims).
    per_ip_open_slots: PositiveInt = 1
    unpaid_opens_per_second: OpsPerSecond = 10.0
    claimed_opens_per_second: OpsPerSecond = 50.0
    connect_timeout: PositiveFloat = 5.0
    first_byte_timeout: PositiveFloat = 300.0
    idle_timeout: PositiveFloat = 120.0
    total_timeout: PositiveFloat = 1800.0
    ready_probe_timeout: PositiveFloat = 2.0
    shutdown_grace_seconds: PositiveFloat = 30.0
    trusted_proxies: SplitList[str] = Field(default_factory=list)
    # Per-address limits and slot pools key an IPv6 caller by this prefix (a host gets a /64).
    ipv6_prefix_length: Annotated[int, Field(ge=32, le=128)] = 64
    # uvloop where it is installed (a dependency on Linux): the same behaviour, a cheaper loop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # fast: the forwarding routes parsed and answered below aiohttp's web.Request
    # (paygate.server.frontend); aiohttp: every request through aiohttp's server.
    http_frontend: Literal["fast", "aiohttp"] = "fast"

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_slots(self) -> Settings:
        # One address must never be able to hold a whole pool (and so refuse everyone else).
        if self.per_ip_body_slots > min(self.unpaid_body_slots, self.body_slots):
            raise ValueError("per_ip_body_slots must not exceed unpaid_body_slots nor body_slots")
        if self.per_ip_open_slots > self.unpaid_open_slots:
            raise ValueError("per_ip_open_slots must not exceed unpaid_open_slots")
        return self

    @property
    def listen_host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_listen(self.listen)[1]


class PaymentSection(BaseModel):
    """x402 prices, schemes, limits, the facilitator or chain, alerts."""

    # --- payments (x402); docs/PAYMENTS.md ---
    pay_to: str | None = None
    network: SplitList[str] = Field(default_factory=lambda: ["base"])
    price: NonNegativeDecimal = Decimal("0.001")
    route_prices: dict[str, NonNegativeDecimal] = Field(default_factory=dict)
    model_prices: dict[str, NonNegativeDecimal] = Field(default_factory=dict)
    price_per_million_tokens: NonNegativeDecimal | None = None
    token_estimate: PositiveInt = 1000
    # Metered payments (upto): docs/PAYMENTS.md "Token pricing".
    payment_schemes: Annotated[list[PaymentScheme], NoDecode] = Field(
        default_factory=lambda: ["exact"]
    )
    token_prices: dict[str, TokenPriceSetting] = Field(default_factory=dict)
    # batch-settlement (docs/PAYMENTS.md "Batch settlement"): how often owed channels are
    # claimed on chain, the most channels (each its latest voucher) per claim transaction,
    # and the withdraw delay a payer's channel must name.
    batch_claim_interval: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    batch_max_vouchers_per_claim: Annotated[int, Field(ge=1, le=500)] = 100
    batch_withdraw_delay: Annotated[int, Field(ge=900, le=2_592_000)] = 900
    # Every generation request's output bound (free, exact, upto, batch items, payments off).
    max_tokens_cap: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    # A metered reply nothing could count: charge the prompt bound (default), an estimate, max.
    usage_fallback: Literal["prompt", "estimate", "max"] = "prompt"
    # Ask the engine for usage on every streamed chunk (llama-server, vLLM) when metering.
    running_usage: bool = True
    # Load-time engine options callers may send (docs/PAYMENTS.md "Engine options").
    engine_options_allowed: SplitList[str] = Field(default_factory=list)
    # Limits and budgets: docs/PAYMENTS.md "Budgets and rate limits".
    rate_limits: dict[str, RateLimitSetting] = Field(default_factory=dict)
    payer_daily_budget: NonNegativeDecimal | None = None
    free_requests_per_day: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    # Economics controls, shared through the ledger: docs/CONSOLE.md "Economics controls".
    token_limits: dict[str, TokenLimitSetting] = Field(default_factory=dict)
    budgets: dict[Literal["day", "month"], BudgetSetting] = Field(default_factory=dict)
    # Webhook alerts (review needed, model server down, attestation failed, budget reached).
    # A URL; may carry a token: never shown.
    alert_webhook: Annotated[SecretStr | None, _checked_secret(_webhook_url)] = None
    alert_webhook_secret: SecretStr | None = None
    alert_webhook_secret_file: Path | None = None
    alert_interval_seconds: Annotated[float, Field(ge=1, le=3600)] = 10.0
    # Free requests one client address (IPv6: its prefix) may take a day; None: as many as
    # one wallet (free_requests_per_day).
    free_requests_per_address_per_day: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    # POST /v1/batch/chat/completions: items per batch, items forwarded at once.
    batch_max_items: Annotated[int, Field(ge=1, le=256)] = 16
    batch_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    asset_address: str | None = None
    asset_name: str | None = None
    asset_version: str | None = None
    asset_decimals: Annotated[int, Field(ge=0, le=36)] = 6
    max_timeout_seconds: PositiveInt = 300
    clock_skew_seconds: Annotated[int, Field(ge=0, le=600)] = 5
    payment_description: str = "paygate inference"
    # Each 402 declares its route's input/output (x402's bazaar discovery extension).
    bazaar_discovery: bool = True
    public_url: str | None = None
    facilitator_url: str | None = None
    # A hosted facilitator's credentials: one ``Name: value`` header per line (secret file).
    facilitator_headers_file: Path | None = None
    # "cdp-jwt": a short-lived JWT per call (Coinbase CDP style) signed with the API key below,
    # beside any headers above (paygate.x402.facilitator_auth).
    facilitator_auth: Literal["headers", "cdp-jwt"] = "headers"
    facilitator_api_key_id: str | None = None
    # The key's private half: PEM EC P-256 or base64 Ed25519 (else the systemd credential).
    facilitator_api_key_secret_file: Path | None = None
    facilitator_jwt_lifetime_seconds: Annotated[int, Field(ge=10, le=300)] = 120
    facilitator_timeout: PositiveFloat = 10.0
    settle_timeout: PositiveFloat = 60.0
    settle_timing: Literal["after", "upfront"] = "after"
    settle_on_disconnect: bool = True
    settle_margin_seconds: Annotated[float, Field(ge=0, le=3600)] = 15.0
    require_payment_identifier: bool = False
    # How long an ended payment's payment-identifier answers retries with its outcome.
    payment_identifier_ttl_seconds: Annotated[float, Field(ge=60, le=90 * 86_400)] = 86_400.0
    reconcile_interval_seconds: PositiveFloat = 30.0
    # How often the keeper deletes the day-keyed ledger rows of days before yesterday.
    ledger_prune_interval_seconds: Annotated[float, Field(gt=0, le=86_400)] = 3600.0
    chain_rpc_url: str | None = None
    # Chain mode: exact settlements due within the window share one Multicall3 transaction, at
    # most chain_batch_max each (x402.schemes.exact.multicall); 1: one transaction per payment.
    chain_batch_max: Annotated[int, Field(ge=1, le=200)] = 1
    chain_batch_window_ms: Annotated[int, Field(ge=0, le=10_000)] = 50
    # ERC-6492 factories trusted to deploy a counterfactual smart-wallet payer (chain-mode
    # settlement, smart-wallet sign-ins); empty: such wallets pay once deployed.
    erc6492_factories: SplitList[str] = Field(default_factory=list)
    gas_key: SecretStr | None = None
    gas_key_file: Path | None = None

    @field_validator("payment_schemes", mode="before")
    @classmethod
    def _split_schemes(cls, value: Any) -> Any:
        value = _split_list(value)
        if isinstance(value, list) and not value:
            raise ValueError("name at least one scheme: exact, upto, batch-settlement")
        return value

    @field_validator("pay_to", "asset_address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"0x[0-9a-fA-F]{40}", value.strip()):
            raise ValueError("must be a 0x-prefixed 20-byte hex address")
        return value.strip()

    @field_validator("facilitator_url", "chain_rpc_url", "public_url")
    @classmethod
    def _check_service_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials")
        return value.rstrip("/")

    @field_validator("token_limits")
    @classmethod
    def _check_token_limits(
        cls, value: dict[str, TokenLimitSetting]
    ) -> dict[str, TokenLimitSetting]:
        for key, rule in value.items():
            if key != "*" and not (key.startswith("model:") and len(key) > len("model:")):
                raise ValueError(f"token_limits keys are '*' or 'model:NAME', not {key[:80]!r}")
            if rule.per_payer is None and rule.per_model is None:
                raise ValueError(f"token_limits {key[:80]!r}: set per_payer and/or per_model")
            if rule.input_weight == 0 and rule.output_weight == 0:
                raise ValueError(f"token_limits {key[:80]!r}: a weight must be above 0")
        return value


class LedgerSection(BaseModel):
    """Where payments are recorded and how replicas share them."""

    # --- payments: ledger; docs/SCALING.md ---
    ledger_path: Path = Path("/var/lib/paygate/payments.db")
    # postgresql://… or sqlite:////abs/path; wins over ledger_path. A secret: never shown.
    ledger_url: Annotated[SecretStr | None, _checked_secret(_ledger_url)] = None
    ledger_password_file: Path | None = None  # else the systemd credential "ledger_password"
    ledger_pool_size: Annotated[int, Field(ge=1, le=100)] = 10
    replica_id: ReplicaId | None = None  # default: kept in the state dir (server.replica_name)
    lease_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    workers: Annotated[int, Field(ge=1, le=64)] = 1

    def ledger_password(self) -> str | None:
        """The PostgreSQL password: ``ledger_password_file``, else the systemd credential
        ``ledger_password`` ($CREDENTIALS_DIRECTORY), else none (the URL or libpq's own)."""
        file = self.ledger_password_file
        if file is None:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            candidate = Path(directory) / "ledger_password" if directory else None
            if candidate is None or not candidate.is_file():
                return None
            file = candidate
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read the ledger password file {file}: {exc.strerror}"
            ) from None
        return text.splitlines()[0].strip() if text else ""

    def ledger_location(self, url: str | None = None) -> LedgerLocation:
        """Where the ledger is: ``url`` (a CLI flag), else ledger_url, else ledger_path."""
        from paygate.x402.ledger_store import ledger_location

        if url is None and self.ledger_url is not None:
            url = self.ledger_url.get_secret_value()
        try:
            return ledger_location(url=url, path=self.ledger_path, password=self.ledger_password)
        except ValueError as exc:
            raise ConfigError(f"ledger_url: {exc}") from None


class TransparencySection(BaseModel):
    """The transparency log and the log format."""

    # --- transparency log (paygate.tlog; docs/TRANSPARENCY.md) ---
    transparency_log: bool = False
    log_origin: LogOrigin | None = None  # default: public_url without the scheme, + "/v1/log"
    log_receipt_period: Annotated[float, Field(ge=1, le=31 * 86400)] = 3600.0
    # "<add-checkpoint URL prefix> <witness vkey>" items (comma-separated or a JSON list).
    log_witnesses: SplitList[str] = Field(default_factory=list)
    log_witness_timeout: PositiveFloat = 10.0
    # Receipts the ledger kept that the log lacks (paygate.tlog.recovery): read per pass, left
    # to the process recording them for, and a first pass's reach before the newest kept one.
    log_recovery_batch: Annotated[int, Field(ge=1, le=1000)] = 500
    log_recovery_grace: Annotated[float, Field(ge=0, le=86400)] = 120.0
    log_recovery_window: Annotated[float, Field(ge=0, le=31 * 86400)] = 900.0
    log_wheel_sha256: Sha256Digest | None = None  # of the installed wheel, when known
    log_image_digest: Sha256Digest | None = None  # of the appliance image, when known
    # --- operations (docs/OPERATIONS.md) ---
    log_format: Literal["json", "text"] = "text"


class ConsoleSection(BaseModel):
    """The operator console."""

    # --- the operator console (docs/CONSOLE.md): off unless console_listen is set ---
    console_listen: str | None = None  # e.g. 127.0.0.1:8403; never the public port
    console_wallets: SplitList[str] = Field(default_factory=list)
    console_secret: SecretStr | None = None  # signs session cookies: the same on every replica
    console_secret_file: Path | None = None
    console_session_seconds: Annotated[float, Field(ge=60, le=7 * 86_400)] = 8 * 3600.0
    console_url: str | None = None  # how operators reach it (login links, sign-in domain)
    console_tls: bool = False  # behind a TLS proxy: cookies get Secure

    @field_validator("console_listen")
    @classmethod
    def _check_console_listen(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        split_listen(value)
        return value


class UpstreamSection(BaseModel):
    """The model server(s): attach or container mode, health, limits, isolation."""

    # --- upstream (paygate.upstream; docs/UPSTREAM.md) ---
    upstream_mode: UpstreamMode = "attach"
    upstream_kind: EngineKind = "ollama"
    upstream_health_path: HealthPath | None = None
    upstream_api_key: SecretStr | None = None
    upstream_api_key_file: Path | None = None
    upstream_monitor: bool = True
    upstream_health_interval: PositiveFloat = 5.0
    upstream_failure_threshold: PositiveInt = 3
    upstream_ready_timeout: PositiveFloat = 120.0
    upstream_restart_backoff_max: PositiveFloat = 30.0
    upstream_max_retries: Annotated[int, Field(ge=0, le=10)] = 3
    # The served weights (a GGUF file; Ollama: its models directory) and the name they are
    # served under; their digest is shown in /health/ready and checked against
    # expected_model_digests (JSON: model name -> "sha256:<hex>") at start.
    upstream_model_path: HomePath | None = None
    upstream_model_name: str | None = None
    expected_model_digests: dict[str, str] = Field(default_factory=dict)
    docker_host: str | None = None
    # Container mode: None means the engine profile's default for upstream_kind.
    upstream_name: str | None = None
    upstream_image: DockerRef | None = None
    upstream_relay_image: DockerRef = "python:3-slim"
    upstream_volume: DockerRef | None = None
    upstream_models_dir: str | None = None
    upstream_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    upstream_cpus: PositiveFloat | None = None
    upstream_memory: MemorySize | None = None
    upstream_pids_limit: PositiveInt = 512
    upstream_gpus: GpuDevices | None = None
    upstream_tmpfs: dict[str, str] = Field(
        default_factory=lambda: {"/tmp": "rw,nosuid,nodev,noexec,size=512m"}  # noqa: S108
    )
    upstream_socket_dir: HomePath = Path("/run/paygate/upstream")
    upstream_pull_network: str = "paygate-pull"
    upstream_pull_timeout: PositiveFloat = 3600.0
    # Several model servers (PAYGATE_UPSTREAMS, JSON list; [[upstream]] tables in the file).
    # Empty: the upstream_* settings above are the one upstream.
    upstreams: list[UpstreamSetting] = Field(
        default_factory=list,
        validation_alias=AliasChoices("upstreams", "upstream", "PAYGATE_UPSTREAMS"),
    )
    # Per-payer prefix-cache isolation (docs/UPSTREAM.md "Cache isolation"): the HMAC key of
    # the salts; a random one per process when unset (then salts change at restart).
    cache_salt_secret: SecretStr | None = None
    cache_salt_secret_file: Path | None = None
    deployments_dir: HomePath = Path("~/.config/paygate/inference")
    discover_ports: SplitList[int] = Field(default_factory=list)
    discover_timeout: PositiveFloat = 2.0

    @field_validator("expected_model_digests")
    @classmethod
    def _check_digests(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest.strip().lower()):
                raise ValueError(f"the digest for {name[:80]!r} must be sha256:<64 hex digits>")
        return {name: digest.strip().lower() for name, digest in value.items()}

    @field_validator("upstream_tmpfs")
    @classmethod
    def _check_tmpfs(cls, value: dict[str, str]) -> dict[str, str]:
        for path in value:
            if not path.startswith("/"):
                raise ValueError("tmpfs mount points must be absolute paths")
        return value

    @field_validator("discover_ports")
    @classmethod
    def _check_ports(cls, value: list[int]) -> list[int]:
        if any(not 1 <= port <= 65535 for port in value):
            raise ValueError("ports must be 1..65535")
        return value


class Settings(
    KeySection,
    AttestationSection,
    GatewaySection,
    PaymentSection,
    LedgerSection,
    TransparencySection,
    ConsoleSection,
    UpstreamSection,
    BaseSettings,
):
    """Everything the appliance can be told. See docs/CONFIG.md."""

    model_config = SettingsConfigDict(env_prefix="PAYGATE_", extra="forbid", validate_default=True)

    @field_validator("erc6492_factories", "console_wallets")
    @classmethod
    def _check_addresses(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for address in value:
            if not re.fullmatch(r"0x[0-9a-fA-F]{40}", address):
                raise ValueError(f"{info.field_name} must be 0x-prefixed 20-byte hex addresses")
        return value

    @model_validator(mode="after")
    def _check_upstream_key(self) -> Settings:
        # A key sent over plain HTTP to another host is a key given away on the path.
        upstream = urlsplit(self.upstream_url)
        has_key = self.upstream_api_key is not None or self.upstream_api_key_file is not None
        if has_key and upstream.scheme == "http" and not _is_loopback(upstream.hostname or ""):
            raise ValueError(
                "upstream_api_key needs an https:// upstream_url (http only on loopback)"
            )
        names = [entry.name for entry in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstreams: every entry needs its own name")
        # One deployment's relay or pull container must never be another's serving one:
        # starting either would replace the other's as a leftover.
        owners: dict[str, str] = {}
        for entry in self.upstreams:
            if (entry.mode or self.upstream_mode) != "container":
                continue
            deployment = member_deployment(entry.name, self.upstream_name or None)
            for container in deployment_containers(deployment):
                owner = owners.setdefault(container, entry.name)
                if owner != entry.name:
                    raise ValueError(
                        f"upstreams {owner} and {entry.name} both need the container"
                        f" {container}: rename one"
                    )
        for entry in self.upstreams:
            parts = urlsplit(entry.url or self.upstream_url)
            if (
                entry.api_key_file is not None
                and parts.scheme == "http"
                and not _is_loopback(parts.hostname or "")
            ):
                raise ValueError(
                    f"upstream {entry.name}: an API key needs an https:// url"
                    " (http only on loopback)"
                )
        return self

    def upstream_entries(self) -> tuple[UpstreamEntry, ...]:
        """The upstreams as a set: the ``upstreams`` entries, else the ``upstream_*`` settings as
        a set of one (serving every model name: what it does with one is its own business)."""
        base = self.upstream()
        if not self.upstreams:
            return (UpstreamEntry("default", base, models=()),)
        out = []
        for item in self.upstreams:
            mode = item.mode or base.mode
            kind = item.kind or base.kind
            api_key = None
            if mode == "attach" and item.api_key_file is not None:
                text = _read_secret_file("upstream_api_key", item.api_key_file)
                api_key = SecretStr(text.splitlines()[0].strip() if text else "")
            config = dataclasses.replace(
                base,
                mode=mode,
                kind=kind,
                url=item.url or base.url,
                health_path=item.health_path,
                api_key=api_key if item.api_key_file is not None else None,
                # The one model a file-serving engine is named by; Ollama serves its volume.
                model_name=item.models[0] if len(item.models) == 1 else None,
                model_path=item.model_path,
                name=member_deployment(item.name, self.upstream_name or None),
                previous_name=previous_member_deployment(item.name, self.upstream_name or None),
                image=item.image or (base.image if kind == base.kind else None),
                port=item.port,
                cpus=item.cpus if item.cpus is not None else base.cpus,
                memory=item.memory or base.memory,
                gpus=item.gpus or base.gpus,
                volume=None,
                models_dir=None if kind != base.kind else base.models_dir,
            )
            out.append(UpstreamEntry(item.name, config, tuple(item.models), item.weight))
        return tuple(out)

    @model_validator(mode="after")
    def _check_payments(self) -> Settings:
        # Verification results decide whether we serve: never take them over plain HTTP
        # unless the facilitator is on this host.
        facilitator = urlsplit(self.facilitator_url or "")
        if facilitator.scheme == "http" and not _is_loopback(facilitator.hostname or ""):
            raise ValueError("facilitator_url must be https:// (http:// only on loopback)")
        custom = (self.asset_address, self.asset_name, self.asset_version)
        if any(custom) and not all(custom):
            raise ValueError("a custom asset needs asset_address, asset_name and asset_version")
        if self.asset_address and len(self.network) != 1:
            raise ValueError("a custom asset is on one chain: configure exactly one network")
        if self.token_prices and self.price_per_million_tokens is not None:
            raise ValueError(
                "price_per_million_tokens (exact's estimate) and token_prices (upto's metering)"
                " contradict each other: set one"
            )
        if "upto" in self.payment_schemes:
            if not self.token_prices:
                raise ValueError("payment_schemes upto needs token_prices (PAYGATE_TOKEN_PRICES)")
            if self.settle_timing == "upfront":
                raise ValueError(
                    "upto settles what was used, after the reply: not settle_timing upfront"
                )
        elif self.token_prices and not set(METERED_SCHEMES) & set(self.payment_schemes):
            raise ValueError(
                "token_prices drive metered schemes only: add upto or batch-settlement to"
                " payment_schemes"
            )
        for name in sorted(set(CHANNEL_SCHEMES) & set(self.payment_schemes)):
            if self.payment_mode == "verify-only":
                raise ValueError(
                    f"{name} charges a channel after each reply: not payment_mode verify-only"
                )
            if self.payment_mode != "off" and not self.chain_rpc_url:
                raise ValueError(
                    f"{name} needs chain_rpc_url (PAYGATE_CHAIN_RPC_URL): every deposit, claim"
                    " and refund is proven on chain"
                )
            if self.settle_timing == "upfront":
                raise ValueError(
                    f"{name} charges a channel after the reply: not settle_timing upfront"
                )
        if self.free_requests_per_day > 0 and self.payment_mode != "off" and not self.public_url:
            # A sign-in names the site it is for: without our own URL the only check left
            # would be the caller's Host header, which the caller writes.
            raise ValueError("free_requests_per_day needs public_url (PAYGATE_PUBLIC_URL)")
        return self

    def upstream(self) -> UpstreamConfig:
        """The upstream's typed view (secrets resolved from their files)."""
        return settings_view(
            self,
            UpstreamConfig,
            prefix="upstream_",
            api_key=self.secret("upstream_api_key") if self.upstream_mode == "attach" else None,
            previous_name=None,  # a set's members only (upstream_entries)
        )

    @field_validator(*SECRET_NAMES, mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    def secret(
        self,
        name: SecretName,
    ) -> SecretStr | None:
        """A secret from its variable, else its ``*_file``, else the systemd credential of the
        same name (first line, stripped)."""
        value: SecretStr | None = getattr(self, name)
        if value is not None:
            return value
        file = self.secret_file(name)
        if file is None:
            return None
        text = _read_secret_file(name, file)
        return SecretStr(text.splitlines()[0].strip() if text else "")

    def secret_file(self, name: str) -> Path | None:
        """Where the secret ``name`` is read from: its ``*_file`` setting when given, else
        ``$CREDENTIALS_DIRECTORY/name`` when systemd passed such a credential, else None."""
        file: Path | None = getattr(self, f"{name}_file", None)
        return file if file is not None else credential_path(name)

    def log_secrets(self) -> list[str]:
        """Every configured secret value, for the log formatter to redact: keys, PINs, API
        keys, facilitator header values, and the credential-bearing parts of service URLs."""
        found: list[str] = []
        for name in SECRET_NAMES:
            value = self.secret(name)
            if value is not None:
                found.append(value.get_secret_value())
        found += [value.get_secret_value() for value in self.facilitator_headers().values()]
        found += self._facilitator_key_lines()
        found += [value.removeprefix("0x") for value in found if value.startswith("0x")]
        found += url_secrets(self.chain_rpc_url)
        if self.alert_webhook is not None:
            found += url_secrets(self.alert_webhook.get_secret_value())
        facilitator = urlsplit(self.facilitator_url or "")
        found += [part for part in (facilitator.query, facilitator.password) if part]
        return found

    def facilitator_headers(self) -> dict[str, SecretStr]:
        """Headers sent on every facilitator call, from ``facilitator_headers_file`` or the
        ``facilitator_headers`` credential; empty when neither exists."""
        file = self.secret_file("facilitator_headers")
        if file is None:
            return {}
        return parse_header_lines(_read_secret_file("facilitator_headers", file))

    def facilitator_auth_provider(self) -> FacilitatorAuth:
        """How facilitator calls authenticate: the headers file alone, or a CDP-style JWT per
        call beside it. ConfigError when the JWT's key id or key is missing or unreadable."""
        from paygate.x402.facilitator_auth import CdpJwt, StaticHeaders

        headers = self.facilitator_headers()
        if self.facilitator_auth == "headers":
            if self.facilitator_api_key_id or self.facilitator_api_key_secret_file:
                raise ConfigError(
                    "facilitator_api_key_id/_secret_file are used by facilitator_auth = cdp-jwt "
                    "only: set it, or remove them"
                )
            return StaticHeaders(headers)
        secret = self._facilitator_key()
        if not self.facilitator_api_key_id or secret is None:
            raise ConfigError(
                "facilitator_auth cdp-jwt needs facilitator_api_key_id and "
                "facilitator_api_key_secret_file (or the facilitator_api_key_secret credential)"
            )
        try:
            return CdpJwt(
                self.facilitator_api_key_id,
                secret,
                lifetime=self.facilitator_jwt_lifetime_seconds,
                extra=headers,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _facilitator_key(self) -> SecretStr | None:
        file = self.secret_file("facilitator_api_key_secret")
        if file is None:
            return None
        return SecretStr(_read_secret_file("facilitator_api_key_secret", file).strip())

    def _facilitator_key_lines(self) -> list[str]:
        """The JWT key's text and its longer lines (a PEM body), for the log redactor."""
        if self.facilitator_auth != "cdp-jwt":
            return []
        secret = self._facilitator_key()
        if secret is None:
            return []
        text = secret.get_secret_value()
        return [text, *(line.strip() for line in text.splitlines() if len(line.strip()) >= 16)]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file comes from model_config, set per call by load_settings.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


CREDENTIALS = (
    "gas_key",
    "pkcs11_pin",
    "key_passphrase",
    "upstream_api_key",
    "facilitator_headers",
    "facilitator_api_key_secret",
    "ledger_password",
    "alert_webhook_secret",
    "console_secret",
    "cache_salt_secret",
)
"""systemd credential names (``LoadCredential=NAME:...``), each matching a ``NAME_file`` setting."""

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_HOP_OR_FRAMING = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "te", "upgrade"}
)


def url_secrets(url: str | None) -> list[str]:
    """The parts of a service URL that may be credentials: userinfo, path, query."""
    if not url:
        return []
    parts = urlsplit(url)
    found = [p for p in (parts.username, parts.password, parts.query) if p]
    found += [segment for segment in parts.path.split("/") if len(segment) >= 6]
    return found


def credential_path(name: str) -> Path | None:
    """``$CREDENTIALS_DIRECTORY/name`` if systemd handed the service that credential."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory or name not in CREDENTIALS:
        return None
    path = Path(directory) / name
    try:
        return path if path.is_file() else None
    except OSError:
        return path  # there but not ours to read: the read reports it as a ConfigError


def _read_secret_file(name: str, file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"cannot read the {name} secret file {file}: {reason}") from None


def parse_header_lines(text: str) -> dict[str, SecretStr]:
    """``Name: value`` lines (blank lines and ``#`` comments skipped) as headers.

    Errors name the line number only: a line may hold the secret itself.
    """
    headers: dict[str, SecretStr] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not _HEADER_NAME.fullmatch(name) or not value:
            raise ConfigError(f"facilitator_headers line {number}: want 'Name: value'")
        if name.lower() in _HOP_OR_FRAMING:
            raise ConfigError(f"facilitator_headers line {number}: {name} is set by the gateway")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ConfigError(f"facilitator_headers line {number}: control characters in value")
        headers[name] = SecretStr(value)
    return headers


def split_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as host and port; ValueError if malformed."""
    host, sep, port = value.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port, e.g. 127.0.0.1:8402")
    return host, int(port)


class ConfigError(PaygateError):
    """The configuration is unusable; the message says which setting and why (never a secret)."""

    message = "the configuration is unusable"

    code = "config_error"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from ``config_file`` (TOML), the environment and ``overrides``."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")

    # pydantic-settings takes the TOML path from class configuration: a subclass per call keeps
    # it out of any module-level state.
    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    try:
        return _FromFile(**overrides)
    except ValueError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return "invalid settings"
    # Only the field names and the reasons, never the offending input: it may be a secret.
    parts = [
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
        for err in errors(include_input=False)
    ]
    return "invalid settings: " + "; ".join(parts)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``"90"``, ``"90s"``, ``"30m"``, ``"24h"`` or ``"7d"``."""
    value = text.strip().lower()
    unit = _DURATION_UNITS.get(value[-1:])
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ValueError("a duration is a number of seconds or like 90s, 30m, 24h, 7d") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError("a duration is a finite number of seconds, at least 0")
    return seconds
