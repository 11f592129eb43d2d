"""Pkcs11Key against a real SoftHSM2 token: what operators and the envelopes rely on."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from paygate_dev.stack import SoftHsmToken

from enclave import p256
from enclave.envelope_v1 import open_v1, seal_v1
from enclave.errors import (
    BackendUnavailable,
    DecryptionError,
    InvalidPublicKey,
    KeyBackendError,
    KeyExists,
    KeyNotFound,
    ModuleNotFound,
    PinIncorrect,
    TokenNotFound,
)
from enclave.keys.base import KeyBackend
from enclave.keys.pkcs11 import Pkcs11Key, _unwrap_ec_point
from tests.fixtures.components import require_binary

LABEL = "paygate-ecdh"
REPO = Path(__file__).resolve().parents[4]


def _generate(t: SoftHsmToken, label: str = LABEL) -> Pkcs11Key:
    return Pkcs11Key.generate(t.module_path, t.token_label, t.pin, label)


def _open(t: SoftHsmToken, label: str = LABEL) -> Pkcs11Key:
    return Pkcs11Key.open(t.module_path, t.token_label, t.pin, label)


def _peer(first_x_byte: int | None = None) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A software key pair; optionally one whose X starts with a given byte."""
    while True:
        private = ec.generate_private_key(p256.CURVE)
        point = p256.encode_public_key(private.public_key())
        if first_x_byte is None or point[1] == first_x_byte:
            return private, point


@pytest.fixture
def key(softhsm_token: SoftHsmToken):
    with _generate(softhsm_token) as k:
        yield k


def test_generated_key_persists_and_reopens_with_the_same_public_key(softhsm_token):
    with _generate(softhsm_token) as generated:
        public = generated.public_key
    # Closing the last key finalises the module, so this open reads the token from disk again.
    with _open(softhsm_token) as reopened:
        assert reopened.public_key == public
        assert isinstance(reopened, KeyBackend)
        info = reopened.info()
    assert len(public) == 65
    assert public[0] == 0x04
    p256.load_public_key(public)
    assert info.backend == "pkcs11"
    assert info.persistent is True
    assert info.public_key == public
    assert info.label == LABEL
    assert info.details["token"] == softhsm_token.token_label
    assert info.details["mechanism"] == "CKM_ECDH1_DERIVE"
    assert os.path.samefile(info.details["module"], softhsm_token.module_path)


def test_ecdh_equals_software_ecdh(key):
    public = p256.load_public_key(key.public_key)
    # 0x41/0x81/0x82 first X bytes make a raw point look like a DER OCTET STRING header.
    peers = [_peer() for _ in range(16)] + [_peer(b) for b in (0x41, 0x81, 0x82, 0x04, 0x00)]
    for private, point in peers:
        shared = key.ecdh(point)
        assert len(shared) == 32
        assert shared == private.exchange(ec.ECDH(), public)


def test_private_key_is_sensitive_and_the_token_refuses_to_export_it(softhsm_token):
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

    _generate(softhsm_token).close()
    # An independent client holding the PIN: python-pkcs11 directly, on the same loaded library.
    lib = pkcs11.lib(os.path.realpath(softhsm_token.module_path))
    try:
        token = lib.get_token(token_label=softhsm_token.token_label)
        with token.open(user_pin=softhsm_token.pin) as session:
            private = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label=LABEL)
            assert private[Attribute.TOKEN] is True
            assert private[Attribute.PRIVATE] is True
            assert private[Attribute.SENSITIVE] is True
            assert private[Attribute.EXTRACTABLE] is False
            assert private[Attribute.ALWAYS_SENSITIVE] is True
            assert private[Attribute.NEVER_EXTRACTABLE] is True
            assert private[Attribute.LOCAL] is True  # generated in the token, never imported
            assert private[Attribute.DERIVE] is True
            assert private[Attribute.SIGN] is False
            with pytest.raises(pkcs11.AttributeSensitive):
                private[Attribute.VALUE]
            # Wrapping is the other way out of a token: refused for a non-extractable key.
            wrapper = session.generate_key(
                KeyType.AES, 256, store=False, capabilities=MechanismFlag.WRAP
            )
            with pytest.raises(pkcs11.KeyUnextractable):
                wrapper.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            wrapper.destroy()
    finally:
        lib.finalize()  # let the next open re-read SOFTHSM2_CONF


def test_derived_secrets_do_not_linger_in_the_token(softhsm_token, key):
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    for _ in range(5):
        key.ecdh(_peer()[1])
    # Session objects are visible to every session of this application; this one shares the
    # backend's login (PKCS#11 login is per application and token).
    lib = pkcs11.lib(os.path.realpath(softhsm_token.module_path))
    token = lib.get_token(token_label=softhsm_token.token_label)
    with token.open() as session:
        # The ECDH key, the receipt-signing key and the log-signing key, nothing else.
        assert len(list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))) == 3
        assert list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})) == []


def test_generate_refuses_an_existing_label_and_keeps_the_key(softhsm_token, key):
    public = key.public_key
    with pytest.raises(KeyExists):
        _generate(softhsm_token)
    peer_private, peer_point = _peer()
    assert key.ecdh(peer_point) == peer_private.exchange(ec.ECDH(), p256.load_public_key(public))
    with _open(softhsm_token) as again:
        assert again.public_key == public


def test_wrong_pin_is_refused_and_never_shown(softhsm_token):
    _generate(softhsm_token).close()
    wrong = "wrong-pin-5550123"
    with pytest.raises(PinIncorrect) as caught:
        Pkcs11Key.open(softhsm_token.module_path, softhsm_token.token_label, wrong, LABEL)
    exc = caught.value
    assert exc.code == "pkcs11_pin_incorrect"
    rendered = "".join(traceback.format_exception(exc))
    for pin in (wrong, softhsm_token.pin):
        assert pin not in str(exc)
        assert pin not in repr(exc)
        assert pin not in rendered


def test_wrong_pin_is_refused_while_another_key_holds_the_login(softhsm_token, key):
    # The token does not re-check a PIN while logged in; the backend must not wave it through.
    wrong = "wrong-pin-5550123"
    with pytest.raises(PinIncorrect) as caught:
        Pkcs11Key.open(softhsm_token.module_path, softhsm_token.token_label, wrong, LABEL)
    assert wrong not in repr(caught.value)
    assert softhsm_token.pin not in repr(caught.value)
    _, point = _peer()
    assert len(key.ecdh(point)) == 32


def test_pin_is_not_kept_or_shown_by_the_key(key, softhsm_token):
    pin = softhsm_token.pin
    assert pin not in repr(key)
    assert pin not in str(key.info())
    assert all(pin not in repr(value) for value in vars(key).values())


def test_keys_on_one_token_share_the_login(softhsm_token, key):
    _generate(softhsm_token, "second").close()
    second = _open(softhsm_token, "second")
    third = _open(softhsm_token)
    # PKCS#11 login is per token, not per session: closing one key must not log out the others.
    second.close()
    private, point = _peer()
    expected = private.exchange(ec.ECDH(), p256.load_public_key(key.public_key))
    assert key.ecdh(point) == expected
    assert third.ecdh(point) == expected
    third.close()
    assert key.ecdh(point) == expected


def test_missing_module_path(softhsm_token, tmp_path):
    missing = tmp_path / "no-such-module.so"
    with pytest.raises(ModuleNotFound) as caught:
        Pkcs11Key.open(str(missing), softhsm_token.token_label, softhsm_token.pin, LABEL)
    assert str(missing) in str(caught.value)
    assert softhsm_token.pin not in repr(caught.value)


def test_file_that_is_not_a_pkcs11_module(softhsm_token, tmp_path):
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"\x7fELF not really a library")
    with pytest.raises(ModuleNotFound) as caught:
        Pkcs11Key.open(str(bogus), softhsm_token.token_label, softhsm_token.pin, LABEL)
    assert str(bogus) in str(caught.value)


def test_unknown_token(softhsm_token):
    with pytest.raises(TokenNotFound) as caught:
        Pkcs11Key.open(softhsm_token.module_path, "no-such-token", softhsm_token.pin, LABEL)
    assert "no-such-token" in str(caught.value)


def test_unknown_key_label(softhsm_token, key):
    with pytest.raises(KeyNotFound) as caught:
        _open(softhsm_token, "no-such-key")
    assert "no-such-key" in str(caught.value)


def test_token_initialised_after_first_use_is_found(softhsm_token):
    # SoftHSM2 lists tokens only at C_Initialize; the module is finalised when its last key
    # closes, so a token an operator initialises later is found by the next open.
    _generate(softhsm_token).close()
    subprocess.run(
        [
            require_binary("softhsm2-util", "softhsm2"),
            "--init-token",
            "--free",
            "--label",
            "later",
            "--so-pin",
            softhsm_token.so_pin,
            "--pin",
            softhsm_token.pin,
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )
    with Pkcs11Key.generate(softhsm_token.module_path, "later", softhsm_token.pin, LABEL) as k:
        assert len(k.public_key) == 65


@pytest.mark.parametrize(
    "point",
    [
        b"",
        b"\x00",  # the point at infinity
        b"\x04" + b"\x00" * 64,  # (0, 0) is not on P-256
        b"\x04" + b"\x01" * 64,
        b"\x05" + b"\x01" * 64,
        b"\x04" + b"\x01" * 63,
    ],
    ids=["empty", "infinity", "zero", "off-curve", "bad-prefix", "short"],
)
def test_invalid_peer_point(key, point):
    with pytest.raises(InvalidPublicKey):
        key.ecdh(point)


def test_compressed_peer_point_is_refused(key):
    _, point = _peer()
    compressed = bytes([0x02 | (point[64] & 1)]) + point[1:33]
    with pytest.raises(InvalidPublicKey):
        key.ecdh(compressed)


def test_close_is_idempotent_and_final(softhsm_token):
    k = _generate(softhsm_token)
    _, point = _peer()
    k.close()
    k.close()
    assert k.closed
    with pytest.raises(KeyBackendError):
        k.ecdh(point)
    with _open(softhsm_token) as again:
        pass
    assert again.closed
    again.close()
    assert k.public_key == again.public_key  # still answerable: it is public


def test_concurrent_ecdh_from_8_threads(key):
    public = p256.load_public_key(key.public_key)
    peers = [_peer() for _ in range(8 * 25)]
    start = threading.Barrier(8)

    def work(chunk: list[tuple[ec.EllipticCurvePrivateKey, bytes]]) -> list[bool]:
        start.wait(timeout=30)
        return [key.ecdh(point) == private.exchange(ec.ECDH(), public) for private, point in chunk]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, [peers[i::8] for i in range(8)]))
    assert [all(r) for r in results] == [True] * 8
    assert sum(len(r) for r in results) == 200


def test_envelope_v1_opens_with_the_token_key(key):
    plaintext = b'{"prompt": "hello from a client"}'
    blob = seal_v1(key.public_key, plaintext)
    assert open_v1(key, blob) == plaintext
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionError):
        open_v1(key, bytes(tampered))


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("raw", True),
        ("der", True),
        ("ber-long-form", True),
        ("der-wrong-length", False),
        ("wrong-tag", False),
        ("der-off-curve", False),
    ],
)
def test_ec_point_unwrapping(value, ok):
    _, point = _peer()
    encoded = {
        "raw": point,
        "der": b"\x04\x41" + point,
        "ber-long-form": b"\x04\x81\x41" + point,
        "der-wrong-length": b"\x04\x42" + point,
        "wrong-tag": b"\x03\x41" + point,
        "der-off-curve": b"\x04\x41\x04" + b"\x01" * 64,
    }[value]
    if ok:
        assert _unwrap_ec_point(encoded) == point
    else:
        with pytest.raises(KeyBackendError):
            _unwrap_ec_point(encoded)


def test_missing_binding_is_reported_and_the_module_still_imports(softhsm_token):
    # Blocking the import (sys.modules entry None) is how a missing python-pkcs11 looks.
    code = (
        "import sys; sys.modules['pkcs11'] = None\n"
        "from enclave.keys.pkcs11 import Pkcs11Key\n"
        "from enclave.errors import BackendUnavailable\n"
        "try:\n"
        f"    Pkcs11Key.open({softhsm_token.module_path!r}, 't', 'p', 'k')\n"
        "except BackendUnavailable as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == str(
        BackendUnavailable("python-pkcs11 is not installed: pip install 'paygate[pkcs11]'")
    )


def test_receipt_key_signs_in_the_token_and_is_added_to_an_old_token(softhsm_token, key):
    import hashlib

    import pkcs11
    from pkcs11 import Attribute

    from enclave.attestation.tpm import verify_signature

    digest = hashlib.sha256(b"receipt").digest()
    assert verify_signature(key.receipt_public_key, b"receipt", key.sign_digest(digest))
    assert key.receipt_public_key != key.public_key
    # A key made before receipts (no "-receipt" pair): opening adds one, once.
    key.close()  # python-pkcs11 below logs in on its own (one login per application)
    lib = pkcs11.lib(os.path.realpath(softhsm_token.module_path))
    try:
        token = lib.get_token(token_label=softhsm_token.token_label)
        with token.open(rw=True, user_pin=softhsm_token.pin) as session:
            for obj in list(session.get_objects({Attribute.LABEL: LABEL + "-receipt"})):
                obj.destroy()
    finally:
        lib.finalize()
    with _open(softhsm_token) as first, _open(softhsm_token) as second:
        assert first.receipt_public_key == second.receipt_public_key != key.receipt_public_key
