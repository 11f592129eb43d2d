"""Signed notes (c2sp.org/signed-note) and witness cosignatures (c2sp.org/tlog-cosignature).

A note is UTF-8 text ending in a newline, a blank line, then one or more signature lines
``— <key name> base64(uint32 key ID || signature)``. A verifier knows keys by (name, key ID):
signatures by unknown keys are ignored, a known key's signature that fails rejects the whole
note, and a note without one verified signature is rejected.

Signature types (the identifier byte hashed into the key ID):

* ``0x01`` Ed25519 over the note text; key ID = SHA-256(name || "\\n" || 0x01 || key)[:4].
* ``0x02`` ECDSA (NIST P-256, SHA-256, ASN.1 DER signature) as transparency-dev/witness
  implements it; key ID = SHA-256(DER SubjectPublicKeyInfo)[:4]. The log key of the hardware
  backends (a TPM or a PKCS#11 token signs ECDSA P-256 only): docs/TRANSPARENCY.md says why.
* ``0x04`` timestamped Ed25519 cosignature/v1: the signature is ``u64 time || Ed25519`` over
  ``"cosignature/v1\\ntime <t>\\n" || note text``.

Verifier keys (vkeys) are ``<name>+<8 hex key ID>+base64(type || public key)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from enclave.errors import EnclaveError

ED25519 = 0x01
ECDSA = 0x02
COSIGNATURE_V1 = 0x04
MAX_NOTE_BYTES = 1 << 20  # post-quantum signatures run to kilobytes; bound the rest
MAX_SIGNATURES = 100  # the spec asks for at least 16
MAX_NAME = 255
DASH = "\u2014"
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
_SPACE = re.compile(r"\s")


class NoteError(EnclaveError, ValueError):
    """A malformed note, vkey or signature, or a note no trusted key verifies."""

    code = "note_malformed"
    message = "the signed note is malformed"


class UnverifiedNote(NoteError):
    """No signature by a known key verifies."""

    code = "note_unverified"
    message = "no known key's signature on the note verifies"


class BadSignature(NoteError):
    """A known key's signature does not verify: the whole note is refused."""

    code = "note_bad_signature"
    message = "a known key's signature on the note does not verify"


def key_id(name: str, key_type: int, public_key: bytes) -> int:
    """The recommended key ID: SHA-256(name || "\\n" || type || public key)[:4], big-endian."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([key_type]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def check_name(name: str) -> str:
    if not name or len(name.encode()) > MAX_NAME or "+" in name or _SPACE.search(name):
        raise NoteError("a key name is empty, too long, or has a space or a '+'")
    if _CONTROL.search(name) or "\n" in name:
        raise NoteError("a key name has a control character")
    return name


class Verifier(Protocol):
    name: str
    key_id: int

    def verify(self, message: bytes, signature: bytes) -> bool: ...


class Signer(Protocol):
    name: str
    key_id: int

    def sign(self, message: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Signature:
    name: str
    key_id: int
    signature: bytes  # without the key ID

    def line(self) -> str:
        raw = struct.pack(">I", self.key_id) + self.signature
        return f"{DASH} {self.name} {base64.b64encode(raw).decode()}\n"


@dataclass(frozen=True, slots=True)
class Note:
    text: str
    signatures: tuple[Signature, ...]

    def encode(self) -> str:
        return self.text + "\n" + "".join(s.line() for s in self.signatures)


def parse(raw: bytes | str) -> Note:
    """The text and signature lines of a note (nothing verified)."""
    if isinstance(raw, bytes):
        if len(raw) > MAX_NOTE_BYTES:
            raise NoteError("the note is too large")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("the note is not UTF-8") from None
    if len(raw) > MAX_NOTE_BYTES:
        raise NoteError("the note is too large")
    if _CONTROL.search(raw):
        raise NoteError("the note has a control character")
    if not raw.endswith("\n"):
        raise NoteError("the note does not end in a newline")
    split = raw.rfind("\n\n")
    if split < 0:
        raise NoteError("the note has no signature block")
    text, block = raw[: split + 1], raw[split + 2 :]
    lines = block.split("\n")[:-1]
    if not lines:
        raise NoteError("the note has no signatures")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"the note has more than {MAX_SIGNATURES} signatures")
    return Note(text, tuple(_signature(line) for line in lines))


def _signature(line: str) -> Signature:
    if not line.startswith(DASH + " "):
        raise NoteError("a signature line does not start with an em dash")
    name, space, encoded = line[2:].partition(" ")
    if not space:
        raise NoteError("a signature line has no signature")
    check_name(name)
    raw = _b64(encoded)
    if len(raw) < 5:
        raise NoteError("a signature is shorter than a key ID")
    return Signature(name, int.from_bytes(raw[:4], "big"), raw[4:])


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise NoteError("not standard base64") from None


def open_note(raw: bytes | str, verifiers: Iterable[Verifier]) -> tuple[Note, list[Signature]]:
    """The note and the signatures by ``verifiers`` that verify; :class:`UnverifiedNote` when
    none does, :class:`BadSignature` when a known key's signature fails."""
    note = parse(raw)
    known = {(v.name, v.key_id): v for v in verifiers}
    message = note.text.encode()
    verified: list[Signature] = []
    for sig in note.signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            continue  # an unknown key: ignored (key rotation, other witnesses)
        if not verifier.verify(message, sig.signature):
            raise BadSignature(f"the signature of {sig.name} does not verify")
        verified.append(sig)
    if not verified:
        raise UnverifiedNote("no signature by a trusted key")
    return note, verified


def sign(text: str, signers: Sequence[Signer]) -> str:
    """``text`` signed by every signer, as a note."""
    if not text.endswith("\n") or _CONTROL.search(text):
        raise NoteError("a note text ends in a newline and has no control character")
    message = text.encode()
    sigs = tuple(Signature(s.name, s.key_id, s.sign(message)) for s in signers)
    return Note(text, sigs).encode()


# --- keys -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ed25519Verifier:
    name: str
    public_key: bytes  # 32 bytes
    key_type: int = ED25519

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.key_type, self.public_key)

    def verify(self, message: bytes, signature: bytes) -> bool:
        if self.key_type == COSIGNATURE_V1:
            return _verify_cosignature(self.public_key, message, signature)
        return _ed25519_ok(self.public_key, message, signature)

    def vkey(self) -> str:
        return encode_vkey(self.name, self.key_id, bytes([self.key_type]) + self.public_key)


@dataclass(frozen=True, slots=True)
class EcdsaVerifier:
    name: str
    spki: bytes  # DER SubjectPublicKeyInfo of a P-256 key

    @property
    def key_id(self) -> int:
        return int.from_bytes(hashlib.sha256(self.spki).digest()[:4], "big")

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            key = serialization.load_der_public_key(self.spki)
            assert isinstance(key, ec.EllipticCurvePublicKey)
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def vkey(self) -> str:
        return encode_vkey(self.name, self.key_id, bytes([ECDSA]) + self.spki)


def encode_vkey(name: str, kid: int, key: bytes) -> str:
    return f"{check_name(name)}+{kid:08x}+{base64.b64encode(key).decode()}"


def parse_vkey(vkey: str) -> Ed25519Verifier | EcdsaVerifier:
    """A verifier from its vkey; the key ID must be the one its type defines."""
    if not isinstance(vkey, str) or len(vkey) > 4096:
        raise NoteError("a vkey is a short string")
    name, _, rest = vkey.strip().partition("+")
    kid_text, _, encoded = rest.partition("+")
    check_name(name)
    if not re.fullmatch(r"[0-9a-f]{8}", kid_text):
        raise NoteError("a vkey's key ID is not 8 lower-case hex digits")
    raw = _b64(encoded)
    if not raw:
        raise NoteError("a vkey has no key")
    key_type, key = raw[0], raw[1:]
    verifier: Ed25519Verifier | EcdsaVerifier
    if key_type in (ED25519, COSIGNATURE_V1):
        if len(key) != 32:
            raise NoteError("an Ed25519 key is 32 bytes")
        verifier = Ed25519Verifier(name, key, key_type)
    elif key_type == ECDSA:
        try:
            loaded = serialization.load_der_public_key(key)
        except ValueError:
            raise NoteError("an ECDSA vkey is not a DER public key") from None
        if not isinstance(loaded, ec.EllipticCurvePublicKey) or not isinstance(
            loaded.curve, ec.SECP256R1
        ):
            raise NoteError("an ECDSA vkey is not a P-256 key")
        verifier = EcdsaVerifier(name, key)
    else:
        raise NoteError(f"signature type {key_type:#04x} is not supported")
    if verifier.key_id != int(kid_text, 16):
        raise NoteError("a vkey's key ID is not the one its key gives")
    return verifier


def _ed25519_ok(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(signature) != 64:
        return False
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def cosigned_message(text: bytes, timestamp: int) -> bytes:
    return b"cosignature/v1\ntime %d\n" % timestamp + text


def cosignature_time(signature: bytes) -> int:
    return int.from_bytes(signature[:8], "big")


def _verify_cosignature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(signature) != 72:
        return False
    timestamp = cosignature_time(signature)
    if timestamp >= 1 << 63:
        return False
    return _ed25519_ok(public_key, cosigned_message(message, timestamp), signature[8:])


class Ed25519Signer:
    """An Ed25519 note signer (type 0x01), or a cosigner (type 0x04, timestamped)."""

    def __init__(
        self,
        name: str,
        private_key: ed25519.Ed25519PrivateKey,
        *,
        key_type: int = ED25519,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if key_type not in (ED25519, COSIGNATURE_V1):
            raise ValueError("an Ed25519 signer signs type 0x01 or 0x04")
        self.name = check_name(name)
        self._key = private_key
        self._type = key_type
        self._clock = clock
        public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.verifier = Ed25519Verifier(name, public, key_type)
        self.key_id = self.verifier.key_id

    def sign(self, message: bytes) -> bytes:
        if self._type == ED25519:
            return self._key.sign(message)
        import time

        timestamp = int((self._clock or time.time)())
        return struct.pack(">Q", timestamp) + self._key.sign(cosigned_message(message, timestamp))


def parse_skey(skey: str) -> Ed25519Signer:
    """``PRIVATE+KEY+<name>+<key ID>+base64(0x01 || seed)`` (golang.org/x/mod/sumdb/note)."""
    parts = skey.strip().split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise NoteError("not a signer key")
    raw = _b64(parts[4])
    if len(raw) != 33 or raw[0] != ED25519:
        raise NoteError("not an Ed25519 signer key")
    signer = Ed25519Signer(parts[2], ed25519.Ed25519PrivateKey.from_private_bytes(raw[1:]))
    if f"{signer.key_id:08x}" != parts[3]:
        raise NoteError("the signer key's ID is not the one its key gives")
    return signer


@dataclass(frozen=True, slots=True)
class RawSigner:
    """A note signer over a key held elsewhere (a key backend's log key): ``sign`` returns the
    signature bytes of the type (Ed25519, or ECDSA DER)."""

    name: str
    key_id: int
    sign: Callable[[bytes], bytes]


def verifier_for(name: str, key_type: int, public_key: bytes) -> Ed25519Verifier | EcdsaVerifier:
    """The verifier of a log key: Ed25519 (32 bytes) or ECDSA P-256 (DER SPKI)."""
    if key_type == ED25519:
        return Ed25519Verifier(check_name(name), public_key)
    if key_type == ECDSA:
        return EcdsaVerifier(check_name(name), public_key)
    raise NoteError(f"signature type {key_type:#04x} is not a log key type")
