"""Builds the configured key backend (software file, PKCS#11 token, TPM, TEE memory).

The hardware modules are imported only when chosen, so a software-key appliance never loads
python-pkcs11 or tpm2-pytss.
"""

from __future__ import annotations

from enclave import KeyBackend, SoftwareKey
from paygate.config import ConfigError, Settings


def _passphrase(settings: Settings) -> bytes | None:
    secret = settings.secret("key_passphrase")
    return secret.get_secret_value().encode() if secret else None


def _pin(settings: Settings) -> str:
    secret = settings.secret("pkcs11_pin")
    if secret is None:
        raise ConfigError("pkcs11 backend needs PAYGATE_PKCS11_PIN or PAYGATE_PKCS11_PIN_FILE")
    return secret.get_secret_value()


def open_key_backend(settings: Settings) -> KeyBackend:
    """Open the existing key the settings name. Raises enclave KeyBackendError subclasses."""
    return _key(settings, create=False)


def create_key(settings: Settings) -> KeyBackend:
    """Generate a new key where the settings say; refuses to replace an existing one."""
    return _key(settings, create=True)


def _key(settings: Settings, *, create: bool) -> KeyBackend:
    if settings.key_backend == "software":
        software = SoftwareKey.create_file if create else SoftwareKey.load_file
        return software(settings.key_file, _passphrase(settings))
    if settings.key_backend == "pkcs11":
        from enclave.keys.pkcs11 import Pkcs11Key

        pkcs11 = Pkcs11Key.generate if create else Pkcs11Key.open
        return pkcs11(
            str(settings.pkcs11_module),
            settings.pkcs11_token_label,
            _pin(settings),
            settings.pkcs11_key_label,
        )
    if settings.key_backend == "tee-memory":
        from enclave.keys.tee_memory import TeeMemoryKey

        if create:
            raise ConfigError("a tee-memory key is generated at start and never stored")
        return TeeMemoryKey.generate()
    from enclave.keys.tpm import TpmKey

    tpm = TpmKey.generate if create else TpmKey.open
    return tpm(settings.tpm_tcti, settings.tpm_key_dir)
