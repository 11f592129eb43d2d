"""Software key files: 0600, atomic, never overwritten, refused when others can read them."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from enclave import SoftwareKey, open_v1, open_v2, seal_v1, seal_v2
from enclave.errors import KeyExists, KeyFileInsecure, KeyFileInvalid, KeyNotFound


def test_create_file_writes_pkcs8_pem_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "envelope.pem"
    key = SoftwareKey.create_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = SoftwareKey.load_file(path)
    assert loaded.public_key == key.public_key
    assert loaded.info().persistent is True
    # The key, its receipt-signing key and its transparency log key; no temp file left.
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "envelope.log.pem",
        "envelope.pem",
        "envelope.receipt.pem",
    ]


def test_create_file_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    first = SoftwareKey.create_file(path)
    with pytest.raises(KeyExists):
        SoftwareKey.create_file(path)
    assert SoftwareKey.load_file(path).public_key == first.public_key


def test_concurrent_creates_leave_exactly_one_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    results: list[object] = []

    def create() -> None:
        try:
            results.append(SoftwareKey.create_file(path).public_key)
        except KeyExists as exc:
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    winners = [r for r in results if isinstance(r, bytes)]
    assert len(winners) == 1
    assert SoftwareKey.load_file(path).public_key == winners[0]


def test_passphrase_protected_file(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    key = SoftwareKey.create_file(path, passphrase=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    assert SoftwareKey.load_file(path, passphrase=b"correct horse").public_key == key.public_key
    with pytest.raises(KeyFileInvalid) as info:
        SoftwareKey.load_file(path, passphrase=b"wrong battery")
    assert "wrong battery" not in str(info.value)
    with pytest.raises(KeyFileInvalid):
        SoftwareKey.load_file(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.pem"
    SoftwareKey.create_file(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileInsecure, match="chmod 600"):
        SoftwareKey.load_file(path)


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.pem"
    SoftwareKey.create_file(real)
    link = tmp_path / "link.pem"
    link.symlink_to(real)
    with pytest.raises(KeyFileInvalid):
        SoftwareKey.load_file(link)


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(KeyNotFound):
        SoftwareKey.load_file(tmp_path / "absent.pem")
    garbage = tmp_path / "g.pem"
    garbage.write_bytes(b"not a key")
    os.chmod(garbage, 0o600)
    with pytest.raises(KeyFileInvalid):
        SoftwareKey.load_file(garbage)


def test_other_curves_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    other = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "p384.pem"
    path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileInvalid, match="P-256"):
        SoftwareKey.load_file(path)


def test_from_private_bytes_validates_scalar() -> None:
    with pytest.raises(KeyFileInvalid):
        SoftwareKey.from_private_bytes(b"\x00" * 32)
    with pytest.raises(KeyFileInvalid):
        SoftwareKey.from_private_bytes(b"\x01" * 31)
    with pytest.raises(KeyFileInvalid):
        SoftwareKey.from_private_bytes(b"\xff" * 32)  # above the group order


def test_repr_does_not_show_the_scalar() -> None:
    scalar = bytes.fromhex("616ea970f944bb4dd30c8b0194ac6aa0e16ca4bc53da72a2b2467b64d8dd92dc")
    key = SoftwareKey.from_private_bytes(scalar)
    assert scalar.hex() not in repr(key)
    assert scalar.hex()[:16] not in repr(key)


def test_envelopes_round_trip_through_a_loaded_file_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    SoftwareKey.create_file(path)
    key = SoftwareKey.load_file(path)
    assert open_v1(key, seal_v1(key.public_key, b"hello")) == b"hello"
    sealed = seal_v2(key.public_key, b"hello", method="POST", path="/api/chat")
    assert open_v2(key, sealed.blob, method="POST", path="/api/chat").body == b"hello"
