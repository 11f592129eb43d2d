"""Builds the configured key backend (software file, PKCS#11 token, TPM, TEE memory), and with
``key_epoch`` the rotating epoch keys beside it (enclave.keys.epochs).

The hardware modules are imported only when chosen, so a software-key appliance never loads
python-pkcs11 or tpm2-pytss.
"""

from __future__ import annotations

from enclave import KeyBackend, SoftwareKey
from enclave.keys.epochs import EpochKeys, EpochVault, MemoryEpochVault
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


SHARED_EPOCHS_REFUSED = (
    "workers > 1 with key_epoch needs key_backend pkcs11 or tpm: {backend} epoch keys live "
    "only in one process's memory, and every worker must serve the same epoch keys (run one "
    "worker, or a token or TPM shared by the workers; docs/SCALING.md)"
)


def epoch_keys(
    settings: Settings, base: KeyBackend, replica: str, *, close_base: bool = True
) -> EpochKeys:
    """Key epochs over the long-lived key ``base`` (which keeps the AK and the log key): each
    epoch's keys are made in the same backend. Sweeps a previous run's epochs, makes the first.
    With ``workers > 1`` one set of epochs per host, shared by every worker through
    ``key_epoch_dir`` (enclave.keys.shared_epochs); ``replica`` is then the host's, not the
    worker's, since every worker holds the same keys.
    """
    vault: EpochVault
    if settings.key_backend == "tpm":
        from enclave.keys.tpm import TpmKey
        from enclave.keys.tpm_epochs import TpmEpochVault

        if not isinstance(base, TpmKey):
            raise ConfigError("key epochs in the TPM need the TPM key backend's key")
        vault = TpmEpochVault(base)
    elif settings.key_backend == "pkcs11":
        from enclave.keys.pkcs11_epochs import Pkcs11EpochVault

        vault = Pkcs11EpochVault(
            str(settings.pkcs11_module),
            settings.pkcs11_token_label,
            _pin(settings),
            settings.pkcs11_key_label,
        )
    else:
        if settings.workers > 1:
            raise ConfigError(SHARED_EPOCHS_REFUSED.format(backend=settings.key_backend))
        vault = MemoryEpochVault(settings.key_backend)
    try:
        if settings.workers > 1:
            from enclave.keys.shared_epochs import SharedEpochKeys

            return SharedEpochKeys(
                vault,  # type: ignore[arg-type]  # the TPM and PKCS#11 vaults share
                settings.key_epoch_dir,
                replica=replica,
                epoch_seconds=settings.key_epoch,
                grace_seconds=settings.key_epoch_grace,
                base=base,
                close_base=close_base,
                load_inline=False,  # a worker's event loop awaits caught_up() instead
            )
        return EpochKeys(
            vault,
            replica=replica,
            epoch_seconds=settings.key_epoch,
            grace_seconds=settings.key_epoch_grace,
            base=base,
            close_base=close_base,
        )
    except ValueError as exc:
        raise ConfigError(f"key_epoch: {exc}") from None
