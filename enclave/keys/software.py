"""A P-256 key held in process memory, optionally persisted as a PKCS#8 PEM file.

For development, tests and hosts without hardware. The file is created atomically with mode 0600
and never overwritten; a file readable by group or others, or owned by another user, is refused
(as OpenSSH does for its keys), because a leaked appliance key opens every recorded request.

The receipt-signing key (:class:`~enclave.keys.base.ReceiptSigner`) is a second P-256 key in a
file beside it, ``<name>.receipt.pem`` (same rules, same passphrase). Loading a key directory
made before receipts existed creates that file once: the upgrade path. The transparency log's
key (:class:`~enclave.keys.base.LogSigner`, Ed25519) is a third file, ``<name>.log.pem``, kept
and added the same way.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from enclave import p256
from enclave._files import fsync_dir, write_new_file
from enclave.errors import KeyExists, KeyFileInsecure, KeyFileInvalid, KeyNotFound
from enclave.keys.base import LOG_ED25519, ClosingKey, KeyInfo


class SoftwareKey(ClosingKey):
    """A software P-256 key. ``repr`` and errors never show the scalar."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        path: Path | None = None,
        receipt_key: ec.EllipticCurvePrivateKey | None = None,
        log_key: ed25519.Ed25519PrivateKey | None = None,
    ) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise KeyFileInvalid("the key is not on P-256")
        self._private_key = private_key
        self._public = p256.encode_public_key(private_key.public_key())
        self._path = path
        # An in-memory key gets an in-memory receipt key: both live as long as this object.
        self._receipt = receipt_key or ec.generate_private_key(p256.CURVE)
        self._receipt_public = p256.encode_public_key(self._receipt.public_key())
        self._log = log_key or ed25519.Ed25519PrivateKey.generate()
        self._log_public = self._log.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> SoftwareKey:
        """A fresh key that lives only as long as this object (not persistent)."""
        return cls(ec.generate_private_key(p256.CURVE))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> SoftwareKey:
        """A key from its 32-byte big-endian private scalar."""
        if len(raw) != p256.SCALAR_LEN:
            raise KeyFileInvalid("a P-256 private scalar is 32 bytes")
        try:
            key = ec.derive_private_key(int.from_bytes(raw, "big"), p256.CURVE)
        except ValueError:
            raise KeyFileInvalid("the scalar is not a valid P-256 private key") from None
        return cls(key)

    @classmethod
    def create_file(
        cls, path: str | os.PathLike[str], passphrase: bytes | None = None
    ) -> SoftwareKey:
        """Generate a key and write it to ``path`` (PKCS#8 PEM, mode 0600), never overwriting.

        The PEM is written to a private temporary file in the same directory, synced, then
        hard-linked into place: the key appears whole or not at all, and an existing file wins.
        """
        target = Path(path)
        key = cls.generate()
        directory = target.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for companion in (receipt_key_path(target), log_key_path(target)):
            if companion.exists():
                raise KeyExists(f"key file already exists: {companion}")
        _write_pem(target, key._private_key, passphrase)
        _write_pem(receipt_key_path(target), key._receipt, passphrase)
        _write_pem(log_key_path(target), key._log, passphrase)
        fsync_dir(directory)
        key._path = target
        return key

    @classmethod
    def load_file(
        cls, path: str | os.PathLike[str], passphrase: bytes | None = None
    ) -> SoftwareKey:
        """Load a PKCS#8 PEM key, refusing a file others could read."""
        source = Path(path)
        key = _read_pem(source, passphrase)
        receipt_path = receipt_key_path(source)
        if receipt_path.exists():
            receipt = _read_pem(receipt_path, passphrase)
        else:  # a key made before receipts existed: add its receipt key once
            receipt = ec.generate_private_key(p256.CURVE)
            try:
                _write_pem(receipt_path, receipt, passphrase)
                fsync_dir(receipt_path.parent)
            except KeyExists:  # another process added it first: use theirs
                receipt = _read_pem(receipt_path, passphrase)
            except OSError as exc:
                raise KeyFileInvalid(
                    f"cannot create the receipt key {receipt_path}: {exc.strerror}"
                ) from None
        log_path = log_key_path(source)
        if log_path.exists():
            log_key = _read_pem(log_path, passphrase, ed25519.Ed25519PrivateKey)
        else:  # a key made before the transparency log existed: add its log key once
            log_key = ed25519.Ed25519PrivateKey.generate()
            try:
                _write_pem(log_path, log_key, passphrase)
                fsync_dir(log_path.parent)
            except KeyExists:
                log_key = _read_pem(log_path, passphrase, ed25519.Ed25519PrivateKey)
            except OSError as exc:
                raise KeyFileInvalid(
                    f"cannot create the log key {log_path}: {exc.strerror}"
                ) from None
        assert isinstance(log_key, ed25519.Ed25519PrivateKey)
        return cls(key, path=source, receipt_key=receipt, log_key=log_key)

    @property
    def public_key(self) -> bytes:
        return self._public

    def ecdh(self, peer_public_key: bytes) -> bytes:
        return p256.software_ecdh(self._private_key, peer_public_key)

    @property
    def receipt_public_key(self) -> bytes:
        return self._receipt_public

    def sign_digest(self, digest: bytes) -> bytes:
        return p256.sign_digest(self._receipt, digest)

    @property
    def log_key_type(self) -> int:
        return LOG_ED25519

    @property
    def log_public_key(self) -> bytes:
        return self._log_public

    def sign_log(self, message: bytes) -> bytes:
        return self._log.sign(message)

    def info(self) -> KeyInfo:
        details = {"file": str(self._path)} if self._path else {}
        return KeyInfo(
            backend="software",
            public_key=self._public,
            persistent=self._path is not None,
            label=self._path.name if self._path else "ephemeral",
            details=details,
        )

    def close(self) -> None:
        """Nothing to release: the key object is dropped with this instance."""

    def __repr__(self) -> str:
        return f"SoftwareKey(public_key={self._public.hex()[:18]}…, file={self._path})"


def receipt_key_path(key_file: Path) -> Path:
    """Where the receipt-signing key of ``key_file`` lives: ``key.pem`` → ``key.receipt.pem``."""
    return key_file.with_name(f"{key_file.stem}.receipt.pem")


def log_key_path(key_file: Path) -> Path:
    """Where the transparency log key of ``key_file`` lives: ``key.pem`` → ``key.log.pem``."""
    return key_file.with_name(f"{key_file.stem}.log.pem")


def _write_pem(
    target: Path,
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    passphrase: bytes | None,
) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption(),
    )
    try:
        write_new_file(target, pem)
    except FileExistsError:
        raise KeyExists(f"key file already exists: {target}") from None


def _read_pem(
    source: Path,
    passphrase: bytes | None,
    kind: type[ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey] = ec.EllipticCurvePrivateKey,
) -> Any:
    """Read a PKCS#8 PEM key (P-256, or ``kind``), refusing a file others could read."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyNotFound(f"no key file at {source}") from None
    except OSError as exc:
        raise KeyFileInvalid(f"cannot open key file {source}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_mode & 0o077:
            raise KeyFileInsecure(
                f"key file {source} has mode {stat.S_IMODE(st.st_mode):04o}; "
                "it must not be accessible by group or others (chmod 600)"
            )
        if st.st_uid != os.geteuid():
            raise KeyFileInsecure(f"key file {source} is owned by another user")
        pem = fh.read(64 * 1024)  # a P-256 PEM is a few hundred bytes; bound the read
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except (ValueError, TypeError):
        # Wrong or missing passphrase and malformed files alike; the message names neither.
        raise KeyFileInvalid(
            f"{source} is not a readable PKCS#8 P-256 key (or the passphrase is wrong)"
        ) from None
    if kind is ed25519.Ed25519PrivateKey:
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyFileInvalid(f"{source} does not hold an Ed25519 private key")
        return key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileInvalid(f"{source} does not hold a P-256 private key")
    return key
