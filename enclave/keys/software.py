"""A P-256 key held in process memory, optionally persisted as a PKCS#8 PEM file.

For development, tests and hosts without hardware. The file is created atomically with mode 0600
and never overwritten; a file readable by group or others, or owned by another user, is refused
(as OpenSSH does for its keys), because a leaked appliance key opens every recorded request.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclave import p256
from enclave._files import fsync_dir, write_new_file
from enclave.errors import KeyExists, KeyFileInsecure, KeyFileInvalid, KeyNotFound
from enclave.keys.base import ClosingKey, KeyInfo


class SoftwareKey(ClosingKey):
    """A software P-256 key. ``repr`` and errors never show the scalar."""

    def __init__(
        self, private_key: ec.EllipticCurvePrivateKey, *, path: Path | None = None
    ) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise KeyFileInvalid("the key is not on P-256")
        self._private_key = private_key
        self._public = p256.encode_public_key(private_key.public_key())
        self._path = path

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
        pem = key._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption(),
        )
        directory = target.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            write_new_file(target, pem)
        except FileExistsError:
            raise KeyExists(f"key file already exists: {target}") from None
        fsync_dir(directory)
        key._path = target
        return key

    @classmethod
    def load_file(
        cls, path: str | os.PathLike[str], passphrase: bytes | None = None
    ) -> SoftwareKey:
        """Load a PKCS#8 PEM key, refusing a file others could read."""
        source = Path(path)
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
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise KeyFileInvalid(f"{source} does not hold a P-256 private key")
        return cls(key, path=source)

    @property
    def public_key(self) -> bytes:
        return self._public

    def ecdh(self, peer_public_key: bytes) -> bytes:
        return p256.software_ecdh(self._private_key, peer_public_key)

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
