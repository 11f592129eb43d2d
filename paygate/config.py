"""Settings: a TOML file and ``PAYGATE_*`` environment variables (pydantic-settings).

Precedence, highest first: explicit arguments, the environment, the TOML file, defaults.
Names are flat (``key_backend`` in TOML is ``PAYGATE_KEY_BACKEND`` in the environment) because
operators script against the environment names; docs/CONFIG.md lists every one.
Secrets (PINs, passphrases) are ``SecretStr`` and may come from a file (``*_file``), which suits
systemd credentials; they never appear in ``repr``, logs or errors.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from paygate.errors import PaygateError

KeyBackendName = Literal["software", "pkcs11", "tpm"]
PaymentMode = Literal["off", "facilitator", "chain", "verify-only"]


class Settings(BaseSettings):
    """Everything the appliance can be told. See docs/CONFIG.md."""

    model_config = SettingsConfigDict(env_prefix="PAYGATE_", extra="forbid", validate_default=True)

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

    # --- gateway (paygate serve) ---
    listen: str = "127.0.0.1:8402"
    upstream_url: str = "http://127.0.0.1:11434"
    payment_mode: PaymentMode = "off"
    require_encryption: bool = False
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    max_sealed_reply_bytes: PositiveInt = 16 * 1024 * 1024
    max_header_bytes: PositiveInt = 8190
    max_headers: PositiveInt = 100
    max_concurrent_requests: PositiveInt = 64
    retry_after_seconds: PositiveInt = 1
    body_read_timeout: PositiveFloat = 30.0
    connect_timeout: PositiveFloat = 5.0
    first_byte_timeout: PositiveFloat = 300.0
    idle_timeout: PositiveFloat = 120.0
    total_timeout: PositiveFloat = 1800.0
    ready_probe_timeout: PositiveFloat = 2.0
    shutdown_grace_seconds: PositiveFloat = 30.0
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @field_validator("upstream_url")
    @classmethod
    def _check_upstream(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must not carry a query, fragment or credentials")
        return value.rstrip("/")

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        # The environment gives one string: accept "10.0.0.1, 10.1.0.0/16" as well as a JSON list.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad entry
        return value

    @property
    def listen_host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_listen(self.listen)[1]

    @field_validator("key_passphrase", "pkcs11_pin", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    def secret(self, name: Literal["key_passphrase", "pkcs11_pin"]) -> SecretStr | None:
        """A secret from its variable, or else from its ``*_file`` (first line, stripped)."""
        value: SecretStr | None = getattr(self, name)
        if value is not None:
            return value
        file: Path | None = getattr(self, f"{name}_file")
        if file is None:
            return None
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {name}_file {file}: {exc.strerror}") from None
        return SecretStr(text.splitlines()[0].strip() if text else "")

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


def split_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as host and port; ValueError if malformed."""
    host, sep, port = value.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port, e.g. 127.0.0.1:8402")
    return host, int(port)


class ConfigError(PaygateError):
    """The configuration is unusable; the message says which setting and why (never a secret)."""

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
