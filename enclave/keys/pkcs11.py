"""A P-256 key held in a PKCS#11 token (SoftHSM2, a USB HSM, a network HSM).

The private key is generated inside the token as SENSITIVE and non-EXTRACTABLE: this process only
ever holds object handles. ECDH runs in the token (``CKM_ECDH1_DERIVE``, KDF NULL) into a
short-lived session secret whose value is read once and destroyed.

PKCS#11 has two process-wide quirks this module absorbs:

* Login state belongs to the application and token, not to a session: ``C_Logout`` on any session
  logs out all of them, and a second ``C_Login`` fails with USER_ALREADY_LOGGED_IN. Keys on one
  token therefore share one counted login session; their own sessions never log in or out.
* A module reads its configuration and token list at ``C_Initialize`` (SoftHSM2 does not see a
  token initialised later), so a module is finalised when the last key using it closes.

The receipt-signing key (:class:`~enclave.keys.base.ReceiptSigner`) is a second P-256 pair in
the same token, labelled ``<key label>-receipt``, SIGN-only (CKM_ECDSA over a SHA-256 digest:
SoftHSM2 has no CKM_ECDSA_SHA256). A token whose key predates receipts gets it on first open.
The transparency log's checkpoint key (:class:`~enclave.keys.base.LogSigner`, ECDSA P-256) is a
third pair, ``<key label>-log``, made and added the same way.

python-pkcs11 is an optional dependency (``paygate[pkcs11]``): it is imported lazily so that this
module, and everything importing it, works without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec

from enclave import p256
from enclave.errors import (
    BackendUnavailable,
    InvalidPublicKey,
    KeyBackendError,
    KeyExists,
    KeyNotFound,
    ModuleNotFound,
    PinIncorrect,
    TokenNotFound,
)
from enclave.keys.base import LOG_ECDSA, ClosingKey, KeyInfo, der_signature, spki_of_point

if TYPE_CHECKING:
    from pkcs11 import PrivateKey, Session, Token

__all__ = ["MECHANISM", "Pkcs11Key"]

MECHANISM = "CKM_ECDH1_DERIVE"
RECEIPT_SUFFIX = "-receipt"  # label of the receipt-signing pair: <key label>-receipt
LOG_SUFFIX = "-log"  # label of the transparency log's checkpoint key
# DER of the namedCurve OID 1.2.840.10045.3.1.7 (prime256v1 / secp256r1): the EC_PARAMS value.
P256_EC_PARAMS = bytes.fromhex("06082a8648ce3d030107")
_INSTALL_HINT = "python-pkcs11 is not installed: pip install 'paygate[pkcs11]'"
_ID_LEN = 16
# Later opens on an already logged-in token are checked against a keyed hash of the PIN that
# logged in (a token will not re-check a PIN while logged in); the key lives only in memory.
_PIN_TAG_KEY = secrets.token_bytes(32)


def _binding() -> ModuleType:
    """The python-pkcs11 package, or BackendUnavailable when it is not installed."""
    try:
        import pkcs11
    except ImportError:
        raise BackendUnavailable(_INSTALL_HINT) from None
    return pkcs11


def _pin_tag(pin: str) -> bytes:
    return hmac.new(_PIN_TAG_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


def _unwrap_ec_point(value: bytes) -> bytes:
    """The raw 65-byte point from an EC_POINT value, DER OCTET STRING wrapped or not.

    PKCS#11 says EC_POINT is DER-wrapped; some tokens return the raw point. For P-256 the two are
    told apart by length alone (65 raw, 67 wrapped), and the result is validated on the curve.
    """
    value = bytes(value)
    raw: bytes | None = None
    if len(value) == p256.POINT_LEN and value[0] == 0x04:
        raw = value
    elif len(value) > 2 and value[0] == 0x04:  # OCTET STRING tag
        length, offset = value[1], 2
        if length & 0x80:  # long form: BER tolerance, DER would use the short form here
            offset += length & 0x7F
            length = int.from_bytes(value[2:offset], "big")
        if offset + length == len(value):
            raw = value[offset:]
    if raw is None or len(raw) != p256.POINT_LEN:
        raise KeyBackendError("the token's EC_POINT is not an uncompressed P-256 point")
    try:
        p256.load_public_key(raw)
    except InvalidPublicKey:
        raise KeyBackendError("the token's EC_POINT is not a valid P-256 point") from None
    return raw


@dataclass(eq=False)
class _Login:
    """The session whose C_Login every session of this application on the token shares."""

    session: Session
    pin_tag: bytes
    users: int = 0


@dataclass(eq=False)
class _Module:
    """One initialised PKCS#11 module, shared by every key that uses it."""

    path: str
    lib: Any  # pkcs11.lib (a Cython class without usable typing)
    # PKCS#11 modules are initialised without locking callbacks (C_Initialize(NULL)), so the
    # application must not call into one from two threads at once: every call holds this lock.
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0
    logins: dict[int, _Login] = field(default_factory=dict)


_modules: dict[str, _Module] = {}
_modules_lock = threading.Lock()


def _acquire_module(module_path: str) -> _Module:
    pkcs11 = _binding()
    # One entry per file: two spellings of one path would C_Initialize the same library twice.
    real = os.path.realpath(module_path)
    with _modules_lock:
        module = _modules.get(real)
        if module is None:
            if not os.path.isfile(real):
                raise ModuleNotFound(f"PKCS#11 module not found: {module_path}")
            try:
                lib = pkcs11.lib(real)
            except pkcs11.PKCS11Error as exc:
                # The binding's reason (dlerror text or a CKR_ name) names files, never secrets.
                reason = str(exc) or type(exc).__name__
                raise ModuleNotFound(
                    f"cannot load PKCS#11 module {module_path}: {reason}"
                ) from None
            module = _modules[real] = _Module(path=real, lib=lib)
        module.users += 1
        return module


def _release_module(module: _Module) -> None:
    with _modules_lock:
        module.users -= 1
        if module.users > 0:
            return
        del _modules[module.path]
        # Finalise rather than unload: a stale python-pkcs11 object then fails with a CKR error
        # instead of calling into an unmapped library, and the next open re-reads the config.
        with contextlib.suppress(Exception):
            module.lib.finalize()


def _find_token(module: _Module, token_label: str) -> Token:
    pkcs11 = _binding()
    try:
        return module.lib.get_token(token_label=token_label)
    except pkcs11.NoSuchToken:
        raise TokenNotFound(f"no PKCS#11 token labelled {token_label!r}") from None
    except pkcs11.MultipleTokensReturned:
        raise KeyBackendError(f"more than one PKCS#11 token is labelled {token_label!r}") from None
    except pkcs11.PKCS11Error as exc:
        raise KeyBackendError(f"cannot list PKCS#11 tokens: {type(exc).__name__}") from None


def _login(module: _Module, token: Token, token_label: str, pin: str) -> _Login:
    """Log in to ``token`` or join the existing login after checking the PIN. Holds module.lock."""
    pkcs11 = _binding()
    slot_id: int = token.slot.slot_id
    login = module.logins.get(slot_id)
    if login is not None:
        if not hmac.compare_digest(login.pin_tag, _pin_tag(pin)):
            raise PinIncorrect(f"the user PIN for PKCS#11 token {token_label!r} was refused")
        login.users += 1
        return login
    # No message below may include the PIN; `from None` keeps the binding's frames out too.
    try:
        session = token.open(user_pin=pin)
    except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
        raise PinIncorrect(f"the user PIN for PKCS#11 token {token_label!r} was refused") from None
    except pkcs11.PinLocked:
        raise PinIncorrect(
            f"the user PIN for PKCS#11 token {token_label!r} is locked after too many wrong "
            "attempts; the token's security officer must reset it"
        ) from None
    except pkcs11.PinExpired:
        raise PinIncorrect(f"the user PIN for PKCS#11 token {token_label!r} has expired") from None
    except pkcs11.UserPinNotInitialized:
        raise KeyBackendError(f"PKCS#11 token {token_label!r} has no user PIN set") from None
    except pkcs11.PKCS11Error as exc:
        raise KeyBackendError(
            f"login to PKCS#11 token {token_label!r} failed: {type(exc).__name__}"
        ) from None
    login = module.logins[slot_id] = _Login(session=session, pin_tag=_pin_tag(pin), users=1)
    return login


def _logout(module: _Module, login: _Login) -> None:
    """Leave a login; the last key out logs the token out. Holds module.lock."""
    login.users -= 1
    if login.users > 0:
        return
    for slot_id, known in list(module.logins.items()):
        if known is login:
            del module.logins[slot_id]
    with contextlib.suppress(Exception):
        login.session.close()  # C_Logout + C_CloseSession


def _find_key(session: Session, token_label: str, key_label: str) -> tuple[PrivateKey, bytes]:
    """The EC private key labelled ``key_label`` and its public point, checked to be P-256."""
    pkcs11 = _binding()
    attr, object_class, key_type = pkcs11.Attribute, pkcs11.ObjectClass, pkcs11.KeyType
    where = f"labelled {key_label!r} on PKCS#11 token {token_label!r}"
    try:
        private = session.get_key(object_class.PRIVATE_KEY, key_type.EC, label=key_label)
    except pkcs11.NoSuchKey:
        raise KeyNotFound(f"no EC private key {where}") from None
    except pkcs11.MultipleObjectsReturned:
        raise KeyBackendError(f"more than one EC private key {where}") from None

    # The pair is linked by CKA_ID (what generate sets); fall back to the label for keys made by
    # tools that leave the ID empty.
    key_id = private.id
    try:
        if key_id:
            public = session.get_key(object_class.PUBLIC_KEY, key_type.EC, id=key_id)
        else:
            public = session.get_key(object_class.PUBLIC_KEY, key_type.EC, label=key_label)
    except pkcs11.NoSuchKey:
        raise KeyNotFound(f"the EC public key object is missing for the key {where}") from None
    except pkcs11.MultipleObjectsReturned:
        raise KeyBackendError(
            f"more than one EC public key object matches the key {where}"
        ) from None

    if public[attr.EC_PARAMS] != P256_EC_PARAMS:
        raise KeyBackendError(f"the key {where} is not on P-256")
    with contextlib.suppress(pkcs11.AttributeTypeInvalid):  # optional on private keys
        if private[attr.EC_PARAMS] != P256_EC_PARAMS:
            raise KeyBackendError(f"the key {where} is not on P-256")
    return private, _unwrap_ec_point(public[attr.EC_POINT])


class Pkcs11Key(ClosingKey):
    """A P-256 private key inside a PKCS#11 token. Thread-safe; close it (or use ``with``).

    Neither ``repr`` nor any error shows the PIN; the object does not even keep it.
    """

    def __init__(
        self,
        *,
        _module: _Module,
        _login: _Login,
        _session: Session,
        _private: PrivateKey,
        _public_key: bytes,
        _receipt: tuple[PrivateKey, bytes],
        _log: tuple[PrivateKey | None, bytes],
        token_label: str,
        key_label: str,
    ) -> None:
        # Built by open()/generate(), which hold _module.lock while calling this.
        self._module = _module
        self._login: _Login | None = _login
        self._session: Session | None = _session
        self._private: PrivateKey | None = _private
        self._public = _public_key
        self._receipt_private: PrivateKey | None = _receipt[0]
        self._receipt_public = _receipt[1]
        self._log_private: PrivateKey | None = _log[0]
        self._log_public = _log[1]
        self._token_label = token_label
        self._key_label = key_label
        self._check_pair()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def open(
        cls, module_path: str, token_label: str, pin: str, key_label: str, *, log_key: bool = True
    ) -> Pkcs11Key:
        """Open an existing key by token label and key label (``log_key=False``: an epoch key,
        which has no log key beside it and must not get one).

        Raises ModuleNotFound, TokenNotFound, PinIncorrect, KeyNotFound or BackendUnavailable.
        """
        return cls._connect(
            module_path, token_label, pin, key_label, generate=False, log_key=log_key
        )

    @classmethod
    def generate(
        cls, module_path: str, token_label: str, pin: str, key_label: str, *, log_key: bool = True
    ) -> Pkcs11Key:
        """Generate a persistent P-256 key pair inside the token and open it.

        Raises KeyExists when any object on the token already carries ``key_label``.
        ``log_key=False``: no transparency log key beside it (an epoch key needs none).
        """
        return cls._connect(
            module_path, token_label, pin, key_label, generate=True, log_key=log_key
        )

    @classmethod
    def _connect(
        cls,
        module_path: str,
        token_label: str,
        pin: str,
        key_label: str,
        *,
        generate: bool,
        log_key: bool = True,
    ) -> Pkcs11Key:
        pkcs11 = _binding()
        module = _acquire_module(module_path)
        try:
            with module.lock:
                token = _find_token(module, token_label)
                login = _login(module, token, token_label, pin)
                try:
                    # No PIN here: the session inherits the shared login, so closing it never
                    # logs out the other keys on this token. Read-only unless creating objects.
                    session = token.open(rw=generate)
                except pkcs11.PKCS11Error as exc:
                    _logout(module, login)
                    raise KeyBackendError(
                        f"cannot open a session on PKCS#11 token {token_label!r}: "
                        f"{type(exc).__name__}"
                    ) from None
                try:
                    receipt_label = key_label + RECEIPT_SUFFIX
                    if generate:
                        _generate_pair(session, token_label, key_label)
                        _generate_pair(session, token_label, receipt_label, sign=True)
                    private, public = _find_key(session, token_label, key_label)
                    receipt = _find_or_add_receipt_key(token, session, token_label, receipt_label)
                    log = (
                        _find_or_add_receipt_key(
                            token, session, token_label, key_label + LOG_SUFFIX
                        )
                        if log_key
                        else (None, b"")
                    )
                    return cls(
                        _module=module,
                        _login=login,
                        _session=session,
                        _private=private,
                        _public_key=public,
                        _receipt=receipt,
                        _log=log,
                        token_label=token_label,
                        key_label=key_label,
                    )
                except BaseException:
                    with contextlib.suppress(Exception):
                        session.close()
                    _logout(module, login)
                    raise
        except BaseException:
            _release_module(module)
            raise

    def _check_pair(self) -> None:
        # A public object that does not belong to the private key would make every envelope
        # sealed to it undecryptable: prove the pair with one ECDH against a throwaway key.
        probe = ec.generate_private_key(p256.CURVE)
        expected = probe.exchange(ec.ECDH(), p256.load_public_key(self._public))
        if not hmac.compare_digest(
            self._derive(p256.encode_public_key(probe.public_key())), expected
        ):
            raise KeyBackendError(
                f"the public key object of {self._key_label!r} does not match its private key"
            )

    # -- KeyBackend ---------------------------------------------------------------------------

    @property
    def public_key(self) -> bytes:
        """The 65-byte uncompressed SEC1 point (0x04 || X || Y)."""
        return self._public

    def ecdh(self, peer_public_key: bytes) -> bytes:
        """ECDH in the token with a peer's 65-byte point: the 32-byte X coordinate."""
        # Validate in software first: an off-curve point never reaches the token.
        p256.load_public_key(peer_public_key)
        with self._module.lock:
            return self._derive(bytes(peer_public_key))

    def _derive(self, peer: bytes) -> bytes:
        """CKM_ECDH1_DERIVE into a session secret, read and destroyed. Holds module.lock."""
        pkcs11 = _binding()
        attr = pkcs11.Attribute
        if self._private is None:
            raise KeyBackendError("the PKCS#11 key is closed")
        derived = None
        try:
            derived = self._private.derive_key(
                pkcs11.KeyType.GENERIC_SECRET,
                p256.SCALAR_LEN * 8,
                mechanism=pkcs11.Mechanism.ECDH1_DERIVE,
                # KDF NULL: the raw X coordinate, which the envelopes feed to HKDF themselves.
                mechanism_param=(pkcs11.KDF.NULL, None, peer),
                store=False,
                template={attr.TOKEN: False, attr.SENSITIVE: False, attr.EXTRACTABLE: True},
            )
            secret = bytes(derived[attr.VALUE])
        except pkcs11.PKCS11Error as exc:
            raise KeyBackendError(f"PKCS#11 ECDH failed: {type(exc).__name__}") from None
        finally:
            if derived is not None:
                # A session object would vanish with the session anyway; do not keep it that long.
                with contextlib.suppress(pkcs11.PKCS11Error):
                    derived.destroy()
        if len(secret) != p256.SCALAR_LEN:
            raise KeyBackendError("PKCS#11 ECDH returned a secret of the wrong length")
        return secret

    @property
    def receipt_public_key(self) -> bytes:
        return self._receipt_public

    def sign_digest(self, digest: bytes) -> bytes:
        """CKM_ECDSA in the token over a SHA-256 digest: the 64-byte ``r || s``."""
        return self._sign(digest, log=False)

    @property
    def log_key_type(self) -> int:
        return LOG_ECDSA

    @property
    def log_public_key(self) -> bytes:
        return spki_of_point(self._log_public)

    def sign_log(self, message: bytes) -> bytes:
        """CKM_ECDSA in the token with the log key over SHA-256(message), as ASN.1 DER."""
        return der_signature(self._sign(hashlib.sha256(message).digest(), log=True))

    def _sign(self, digest: bytes, *, log: bool) -> bytes:
        pkcs11 = _binding()
        if len(digest) != 32:
            raise ValueError("a SHA-256 digest is 32 bytes")
        with self._module.lock:
            key = self._log_private if log else self._receipt_private
            if key is None:
                raise KeyBackendError("the PKCS#11 key is closed")
            try:
                signature = bytes(key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA))
            except pkcs11.PKCS11Error as exc:
                raise KeyBackendError(f"PKCS#11 signing failed: {type(exc).__name__}") from None
        if len(signature) != 64:
            raise KeyBackendError("the token returned a malformed ECDSA signature")
        return signature

    def info(self) -> KeyInfo:
        """The public key, labels and module path (no PIN, no handles)."""
        return KeyInfo(
            backend="pkcs11",
            public_key=self._public,
            persistent=True,
            label=self._key_label,
            details={
                "module": self._module.path,
                "token": self._token_label,
                "mechanism": MECHANISM,
            },
        )

    def close(self) -> None:
        """Close this key's session; the last key on a token logs out. Idempotent."""
        with self._module.lock:
            if self._session is None or self._login is None:
                return
            session, login = self._session, self._login
            self._session = self._login = self._private = self._receipt_private = None
            self._log_private = None
            with contextlib.suppress(Exception):
                session.close()
            _logout(self._module, login)
        _release_module(self._module)

    def destroy(self) -> None:
        """``C_DestroyObject`` on every object of this key (ECDH, receipt and log pairs, private
        and public halves), then close. The token keeps no copy: the key is gone for good."""
        pkcs11 = _binding()
        attr = pkcs11.Attribute
        labels = {self._key_label, self._key_label + RECEIPT_SUFFIX, self._key_label + LOG_SUFFIX}
        failed = 0
        with self._module.lock:
            if self._session is None:
                raise KeyBackendError("the PKCS#11 key is closed")
            try:
                writer = self._session.token.open(rw=True)
            except pkcs11.PKCS11Error as exc:
                raise KeyBackendError(
                    f"cannot open a session to destroy {self._key_label!r}: {type(exc).__name__}"
                ) from None
            try:
                for label in sorted(labels):
                    for obj in list(writer.get_objects({attr.LABEL: label})):
                        try:
                            obj.destroy()
                        except pkcs11.PKCS11Error:
                            failed += 1
            finally:
                with contextlib.suppress(Exception):
                    writer.close()
        self.close()
        if failed:
            raise KeyBackendError(f"{failed} objects of {self._key_label!r} were not destroyed")

    # -- conveniences -------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return self._key_label

    @property
    def closed(self) -> bool:
        return self._session is None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"Pkcs11Key(module={self._module.path!r}, token={self._token_label!r}, "
            f"label={self._key_label!r}, {state})"
        )


def _generate_pair(
    session: Session, token_label: str, key_label: str, *, sign: bool = False
) -> None:
    """Generate the P-256 pair in the token (derive-only, or sign-only with ``sign``).
    Holds module.lock."""
    pkcs11 = _binding()
    attr = pkcs11.Attribute
    flag = pkcs11.MechanismFlag.SIGN if sign else pkcs11.MechanismFlag.DERIVE
    # Any object with the label would make later lookups by label ambiguous.
    if next(iter(session.get_objects({attr.LABEL: key_label})), None) is not None:
        raise KeyExists(f"an object labelled {key_label!r} exists on PKCS#11 token {token_label!r}")
    # A random CKA_ID links the two halves even if another tool later reuses the label.
    key_id = secrets.token_bytes(_ID_LEN)
    try:
        session.generate_keypair(
            pkcs11.KeyType.EC,
            id=key_id,
            label=key_label,
            store=True,
            # One job per key: the ECDH key derives only, the receipt key signs only.
            capabilities=flag,
            # EC_PARAMS belongs in the public template only (SoftHSM2 rejects it on the
            # private one with CKR_ATTRIBUTE_READ_ONLY and copies it there itself).
            public_template={attr.EC_PARAMS: P256_EC_PARAMS, attr.TOKEN: True},
            private_template={
                attr.TOKEN: True,
                attr.PRIVATE: True,
                attr.SENSITIVE: True,
                attr.EXTRACTABLE: False,
                attr.DERIVE: not sign,
                attr.SIGN: sign,
            },
        )
    except pkcs11.PKCS11Error as exc:
        raise KeyBackendError(
            f"P-256 key generation on PKCS#11 token {token_label!r} failed: {type(exc).__name__}"
        ) from None


def _find_or_add_receipt_key(
    token: Token, session: Session, token_label: str, label: str
) -> tuple[PrivateKey, bytes]:
    """A signing pair (the receipt or the log key); generated (read-write session) if the token
    lacks it.
    Holds module.lock."""
    pkcs11 = _binding()
    try:
        return _find_key(session, token_label, label)
    except KeyNotFound:
        pass
    try:
        writer = token.open(rw=True)
    except pkcs11.PKCS11Error as exc:
        raise KeyBackendError(
            f"cannot add the signing key {label!r} to PKCS#11 token {token_label!r}: "
            f"{type(exc).__name__}"
        ) from None
    try:
        _generate_pair(writer, token_label, label, sign=True)
    finally:
        with contextlib.suppress(Exception):
            writer.close()
    return _find_key(session, token_label, label)
