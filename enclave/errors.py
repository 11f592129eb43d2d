"""Exception family of the enclave library.

Every error carries a stable machine ``code``. Messages never contain key material, PINs,
passphrases, plaintext or ciphertext: callers may log them and show them to users.
"""

from __future__ import annotations


class EnclaveError(Exception):
    """Base of every error raised by :mod:`enclave`."""

    code = "enclave_error"
    #: The message when none is given (each error states its own).
    message = "the enclave library failed"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)


class DecryptionError(EnclaveError):
    message = "decryption failed"

    # One uniform error for every way a sealed message can be wrong (truncated, flipped, wrong
    # version, wrong key, wrong route, bad point ...): callers must not learn which check failed.
    code = "decryption_failed"

    def __init__(self) -> None:
        super().__init__("decryption failed")


class InvalidPublicKey(EnclaveError):
    message = "the public key is not a valid uncompressed P-256 point"

    code = "invalid_public_key"


class KeyBackendError(EnclaveError):
    message = "the key backend failed"

    code = "key_backend_error"


class KeyNotFound(KeyBackendError):
    message = "no key with that label or file was found"

    code = "key_not_found"


class KeyExists(KeyBackendError):
    message = "a key with that label or file already exists"

    code = "key_exists"


class KeyFileInsecure(KeyBackendError):
    message = "the key file is readable by group or others (expected mode 0600)"

    code = "key_file_insecure"


class KeyFileInvalid(KeyBackendError):
    message = "the key file is not a P-256 private key in PKCS#8 PEM, or the passphrase is wrong"

    code = "key_file_invalid"


class ModuleNotFound(KeyBackendError):
    message = "the PKCS#11 module could not be loaded"

    code = "pkcs11_module_missing"


class TokenNotFound(KeyBackendError):
    message = "no PKCS#11 token with that label"

    code = "pkcs11_token_missing"


class PinIncorrect(KeyBackendError):
    message = "the PKCS#11 PIN was refused"

    code = "pkcs11_pin_incorrect"


class TpmUnreachable(KeyBackendError):
    message = "the TPM could not be reached through the configured TCTI"

    code = "tpm_unreachable"


class BackendUnavailable(KeyBackendError):
    message = "the optional Python binding for this backend is not installed"

    code = "backend_unavailable"
