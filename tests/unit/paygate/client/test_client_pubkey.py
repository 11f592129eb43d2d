"""The appliance key on the client: its document, pins in every accepted form, wallet key files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from enclave import SoftwareKey, p256
from paygate.client import KeyPin, PinMismatch, PubkeyUnavailable
from paygate.client.errors import WalletKeyError
from paygate.client.pubkey import parse_pubkey_document
from paygate.client.wallet import load_wallet

ORIGIN = "http://appliance.example:8402"
KEY = SoftwareKey.generate().public_key
OTHER = SoftwareKey.generate().public_key


def _doc(**fields: object) -> bytes:
    return json.dumps({"pubkey": KEY.hex(), **fields}).encode()


def test_document_gives_the_key_and_our_own_fingerprint() -> None:
    key = parse_pubkey_document(ORIGIN, 200, _doc(fingerprint=p256.fingerprint(KEY)))
    assert key.public_key == KEY
    assert key.fingerprint == p256.fingerprint(KEY)
    assert key.origin == ORIGIN
    assert KEY.hex() not in repr(key)  # the document stays out of reprs and logs


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (404, _doc(), "HTTP 404"),
        (200, b"<html>", "did not answer JSON"),
        (200, b"[]", "no 'pubkey'"),
        (200, json.dumps({"pubkey": "04" + "00" * 64}).encode(), "not a P-256 point"),
        (200, json.dumps({"pubkey": KEY.hex()[:-2]}).encode(), "not a P-256 point"),
        (200, _doc(fingerprint="00" * 32), "does not match"),
    ],
)
def test_bad_documents_are_refused(status: int, body: bytes, message: str) -> None:
    with pytest.raises(PubkeyUnavailable, match=message):
        parse_pubkey_document(ORIGIN, status, body)


@pytest.mark.parametrize(
    "pin",
    [
        KEY,
        KEY.hex(),
        "0x" + KEY.hex().upper(),
        p256.fingerprint(KEY),
        "sha256:" + p256.fingerprint(KEY),
    ],
)
def test_every_pin_form_accepts_its_key_and_refuses_another(pin: str | bytes) -> None:
    key = parse_pubkey_document(ORIGIN, 200, _doc())
    KeyPin(pin).check(key)
    other = parse_pubkey_document(ORIGIN, 200, json.dumps({"pubkey": OTHER.hex()}).encode())
    with pytest.raises(PinMismatch) as mismatch:
        KeyPin(pin).check(other)
    assert mismatch.value.code == "pin_mismatch"
    assert p256.fingerprint(KEY)[:16] in str(mismatch.value)


@pytest.mark.parametrize("pin", ["", "abc", "zz" * 32, "04" + "00" * 64, b"\x04" * 65])
def test_malformed_pins_are_refused(pin: str | bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - several messages
        KeyPin(pin)


def _key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "wallet.key"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_wallet_key_file_loads_with_or_without_prefix(tmp_path: Path) -> None:
    secret = "11" * 32
    plain = load_wallet(_key_file(tmp_path, secret + "\n"))
    prefixed = load_wallet(_key_file(tmp_path, "0x" + secret))
    assert plain.address == prefixed.address


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("11" * 32, 0o644, "group or others"),
        ("11" * 31, 0o600, "32-byte hex"),
        ("zz" * 32, 0o600, "valid private key"),
        ("00" * 32, 0o600, "valid private key"),
        ("", 0o600, "32-byte hex"),
    ],
)
def test_unusable_wallet_key_files_never_echo_the_key(
    tmp_path: Path, text: str, mode: int, message: str
) -> None:
    with pytest.raises(WalletKeyError, match=message) as error:
        load_wallet(_key_file(tmp_path, text, mode))
    assert error.value.code == "wallet_key_invalid"
    if text:
        assert text not in str(error.value)


def test_missing_wallet_key_file(tmp_path: Path) -> None:
    with pytest.raises(WalletKeyError, match="cannot read"):
        load_wallet(tmp_path / "absent")
