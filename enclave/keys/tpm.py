"""A P-256 ECDH key that lives in a TPM 2.0 and never leaves it.

Layout
------
* **Parent**: an ECC P-256 storage primary key in the owner hierarchy, created with
  TPM2_CreatePrimary from a fixed template every time it is needed. A primary key is a pure
  function of the hierarchy's seed and its template, so the same TPM always gives the same parent
  and nothing about it is stored. The template is the TCG "ECC NIST P256 SRK" template of the TCG
  TPM 2.0 Provisioning Guidance (:func:`parent_template`, named :data:`PARENT_TEMPLATE`), so the
  parent is the TPM's standard storage root key and tools agree on it.
* **Key**: an ordinary (child) ECC P-256 key created under that parent: scheme ECDH,
  decrypt-only (never sign), fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | noDA
  (:func:`ecdh_key_template`). The TPM generated the scalar and will neither duplicate it nor
  hand it out; ECDH happens inside the TPM (TPM2_ECDH_ZGen).
* **On disk**: the key's wrapped blobs, marshalled TPM2B_PUBLIC (:data:`PUBLIC_BLOB`) and
  TPM2B_PRIVATE (:data:`PRIVATE_BLOB`), in a key directory (mode 0700, files 0600, written
  atomically). The private blob is encrypted and integrity-protected by the parent, i.e. by this
  TPM's owner seed: it is useless on any other TPM and after the owner hierarchy is cleared. The
  files are the same format as ``tpm2_create -u/-r``, so tpm2-tools can load them.

The key has an empty authorization value: whoever can read the blobs *and* send commands to this
TPM can use (not extract) the key, hence the 0600 files. ``noDA`` is set because a key without a
secret gains nothing from dictionary-attack protection, while failed-auth attempts against it
could otherwise lock out the whole TPM.

While a :class:`TpmKey` is open it keeps the key loaded as one transient object; the parent is
flushed as soon as the key is loaded (a loaded key no longer needs it), so one TPM slot serves
each open key.
Without a resource manager (swtpm, ``/dev/tpm0``) transient objects outlive a client that forgets
them and the TPM runs out of object slots (TPM_RC_OBJECT_MEMORY, 0x902; swtpm has three), so
every path that loads something flushes it again: :meth:`TpmKey.close` and every failure path.

Two more keys live beside it, created under the same parent and stored the same way (see
:func:`ak_template`, :func:`receipt_key_template`): the **attestation key** (AK, ``ak.pub`` /
``ak.priv``), a restricted ECDSA P-256 signing key that only signs TPM-made structures (quotes,
certifications), and the **receipt key** (``receipt.pub`` / ``receipt.priv``), an ordinary
ECDSA P-256 signing key for signed receipts; the **log key** (``log.pub`` / ``log.priv``) is
made like the receipt key and signs the transparency log's checkpoints. All are fixedTPM |
fixedParent | sensitiveDataOrigin. They are not kept loaded: each is loaded once, its context
saved, and re-loaded from that context (no parent needed) for each use, then flushed, so an open
key still holds one slot between calls. A key directory made before they existed gets them on
its first open (the upgrade path).

tpm2-pytss is optional (``pip install 'paygate[tpm]'``): it is imported only when a TPM key is
generated or opened, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from enclave import p256
from enclave._files import fsync_dir, write_new_file
from enclave.errors import (
    BackendUnavailable,
    InvalidPublicKey,
    KeyBackendError,
    KeyExists,
    KeyNotFound,
    TpmUnreachable,
)
from enclave.keys.base import LOG_ECDSA, ClosingKey, KeyInfo, der_signature, spki_of_point

if TYPE_CHECKING:
    from tpm2_pytss import (
        ESAPI,
        ESYS_TR,
        TPM2B_PRIVATE,
        TPM2B_PUBLIC,
        TPMS_CONTEXT,
        TPMT_SIGNATURE,
    )

PUBLIC_BLOB = "ecdh.pub"  # marshalled TPM2B_PUBLIC of the key
PRIVATE_BLOB = "ecdh.priv"  # marshalled TPM2B_PRIVATE, wrapped by the parent
AK_PUBLIC_BLOB = "ak.pub"  # the attestation key (restricted signing)
AK_PRIVATE_BLOB = "ak.priv"
RECEIPT_PUBLIC_BLOB = "receipt.pub"  # the receipt-signing key (ordinary signing)
RECEIPT_PRIVATE_BLOB = "receipt.priv"
LOG_PUBLIC_BLOB = "log.pub"  # the transparency log's checkpoint key (ordinary signing)
LOG_PRIVATE_BLOB = "log.priv"
PARENT_TEMPLATE = "tcg-ecc-p256-srk"  # name of parent_template(), shown by info()
INSTALL_HINT = "tpm2-pytss is not installed: pip install 'paygate[tpm]'"

_MAX_BLOB = 4096  # both blobs are a few hundred bytes; bound what we read
_RC_OBJECT_MEMORY = 0x902  # TPM_RC_OBJECT_MEMORY: no free transient object slot
_T = TypeVar("_T")


def _require_binding() -> None:
    # Lazy: the binding needs the native TSS libraries, which hosts without a TPM need not have.
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        raise BackendUnavailable(INSTALL_HINT) from None


def parent_template() -> TPM2B_PUBLIC:
    """The TCG ECC NIST P-256 storage root key template (TCG TPM 2.0 Provisioning Guidance).

    Restricted decrypt, AES-128-CFB, NULL scheme and KDF, SHA-256 name, unique X and Y of 32 zero
    bytes. Changing any field gives a different parent and orphans every stored key blob.
    """
    _require_binding()
    from tpm2_pytss import TPM2_ALG, TPM2_ECC, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_PUBLIC

    public = TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.NODA
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT,
    )
    detail = public.parameters.eccDetail
    detail.symmetric.algorithm = TPM2_ALG.AES
    detail.symmetric.keyBits.aes = 128
    detail.symmetric.mode.aes = TPM2_ALG.CFB
    detail.scheme.scheme = TPM2_ALG.NULL
    detail.curveID = TPM2_ECC.NIST_P256
    detail.kdf.scheme = TPM2_ALG.NULL
    public.unique.ecc.x = b"\x00" * 32
    public.unique.ecc.y = b"\x00" * 32
    return TPM2B_PUBLIC(public)


def _key_attributes() -> int:
    from tpm2_pytss import TPMA_OBJECT

    # fixedTPM + fixedParent: the TPM refuses TPM2_Duplicate, so the scalar cannot be exported
    # even by someone holding the owner authorization. sensitiveDataOrigin: the TPM generated it.
    return int(
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.NODA
        | TPMA_OBJECT.DECRYPT
    )


def ecdh_key_template() -> TPM2B_PUBLIC:
    """The template of the ECDH key: P-256, scheme ECDH (SHA-256), decrypt-only, not movable."""
    _require_binding()
    from tpm2_pytss import TPM2_ALG, TPM2_ECC, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_PUBLIC

    public = TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT(_key_attributes()),
    )
    detail = public.parameters.eccDetail
    detail.symmetric.algorithm = TPM2_ALG.NULL  # required for a non-restricted decrypt key
    detail.scheme.scheme = TPM2_ALG.ECDH
    detail.scheme.details.ecdh.hashAlg = TPM2_ALG.SHA256
    detail.curveID = TPM2_ECC.NIST_P256
    detail.kdf.scheme = TPM2_ALG.NULL
    return TPM2B_PUBLIC(public)


def _signing_attributes(*, restricted: bool) -> int:
    from tpm2_pytss import TPMA_OBJECT

    attrs = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.NODA
        | TPMA_OBJECT.SIGN_ENCRYPT
    )
    # restricted: the key signs only digests the TPM computed itself (quote, certify), never an
    # outside digest that starts like a TPM structure, so its signatures cannot be forged.
    return int(attrs | TPMA_OBJECT.RESTRICTED) if restricted else int(attrs)


def _signing_template(*, restricted: bool) -> TPM2B_PUBLIC:
    _require_binding()
    from tpm2_pytss import TPM2_ALG, TPM2_ECC, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_PUBLIC

    public = TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT(_signing_attributes(restricted=restricted)),
    )
    detail = public.parameters.eccDetail
    detail.symmetric.algorithm = TPM2_ALG.NULL
    detail.scheme.scheme = TPM2_ALG.ECDSA
    detail.scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    detail.curveID = TPM2_ECC.NIST_P256
    detail.kdf.scheme = TPM2_ALG.NULL
    return TPM2B_PUBLIC(public)


def ak_template() -> TPM2B_PUBLIC:
    """The attestation key: restricted ECDSA-SHA256 P-256 signing, fixed to this TPM."""
    return _signing_template(restricted=True)


def receipt_key_template() -> TPM2B_PUBLIC:
    """The receipt key: ordinary (unrestricted) ECDSA-SHA256 P-256 signing, fixed to this TPM."""
    return _signing_template(restricted=False)


def _point_of(public: TPM2B_PUBLIC, source: Path) -> bytes:
    area = public.publicArea
    x = bytes(area.unique.ecc.x.buffer)
    y = bytes(area.unique.ecc.y.buffer)
    if len(x) > p256.SCALAR_LEN or len(y) > p256.SCALAR_LEN:
        raise KeyBackendError(f"{source} holds a malformed public point")
    point = b"\x04" + x.rjust(p256.SCALAR_LEN, b"\x00") + y.rjust(p256.SCALAR_LEN, b"\x00")
    try:
        p256.load_public_key(point)
    except InvalidPublicKey:
        raise KeyBackendError(f"{source} holds a public point that is not on P-256") from None
    return point


def _check_signing_public(public: TPM2B_PUBLIC, source: Path, *, restricted: bool) -> bytes:
    """Refuse a blob that is not our kind of signing key; return its 65-byte point."""
    from tpm2_pytss import TPM2_ALG, TPM2_ECC, TPMA_OBJECT

    area = public.publicArea
    detail = area.parameters.eccDetail
    attrs = int(area.objectAttributes)
    required = _signing_attributes(restricted=restricted)
    if (
        area.type != TPM2_ALG.ECC
        or detail.curveID != TPM2_ECC.NIST_P256
        or detail.scheme.scheme != TPM2_ALG.ECDSA
        or attrs & required != required
        or attrs & int(TPMA_OBJECT.DECRYPT)
        or (not restricted and attrs & int(TPMA_OBJECT.RESTRICTED))
    ):
        raise KeyBackendError(f"{source} is not a fixed P-256 ECDSA TPM signing key")
    return _point_of(public, source)


def _check_key_public(public: TPM2B_PUBLIC, source: Path) -> bytes:
    """Refuse a public blob that is not our kind of key; return its 65-byte point."""
    from tpm2_pytss import TPM2_ALG, TPM2_ECC, TPMA_OBJECT

    area = public.publicArea
    detail = area.parameters.eccDetail
    attrs = int(area.objectAttributes)
    required = _key_attributes()
    # A swapped-in blob for a signing or duplicable key must not be used silently: the
    # non-exportability promise rests on these attributes.
    if (
        area.type != TPM2_ALG.ECC
        or detail.curveID != TPM2_ECC.NIST_P256
        or detail.scheme.scheme != TPM2_ALG.ECDH
        or attrs & required != required
        or attrs & int(TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.RESTRICTED)
    ):
        raise KeyBackendError(f"{source} is not a fixed, decrypt-only P-256 ECDH TPM key")
    return _point_of(public, source)


def _tpm(action: str, tcti: str, call: Callable[..., _T], *args: object) -> _T:
    """Run one TPM command, turning TSS errors into enclave errors that say what failed."""
    from tpm2_pytss import TSS2_RC, TSS2_Exception

    try:
        return call(*args)
    except TSS2_Exception as exc:
        if exc.rc & TSS2_RC.RC_LAYER_MASK == TSS2_RC.TCTI_RC_LAYER:
            raise TpmUnreachable(
                f"lost the TPM at {tcti!r} while trying to {action}: {exc}"
            ) from None
        if exc.rc == _RC_OBJECT_MEMORY:
            raise KeyBackendError(
                f"cannot {action}: the TPM is out of transient object slots (0x902); without a "
                "resource manager another client may have leaked handles (restart swtpm or use "
                "/dev/tpmrm0)"
            ) from None
        raise KeyBackendError(f"cannot {action}: TPM error 0x{exc.rc:x} ({exc})") from None


def _connect(tcti: str) -> ESAPI:
    from tpm2_pytss import ESAPI, TSS2_Exception

    if not tcti:
        # An empty string would make the TSS pick a default TCTI: never guess which TPM.
        raise TpmUnreachable("no TCTI configured (e.g. 'device:/dev/tpmrm0')")
    try:
        return ESAPI(tcti)
    except TSS2_Exception as exc:
        raise TpmUnreachable(f"cannot reach the TPM through TCTI {tcti!r}: {exc}") from None
    except (RuntimeError, ValueError) as exc:  # malformed TCTI string
        raise TpmUnreachable(f"invalid TCTI {tcti!r}: {exc}") from None


def _flush(esapi: ESAPI, handles: list[ESYS_TR]) -> None:
    # Best effort and exhaustive: one failing flush must not keep the others loaded.
    for handle in reversed(handles):
        with contextlib.suppress(Exception):
            esapi.flush_context(handle)


def _release(esapi: ESAPI, handles: list[ESYS_TR]) -> None:
    _flush(esapi, handles)
    with contextlib.suppress(Exception):
        esapi.close()


def _load_under_parent(esapi: ESAPI, tcti: str, load: Callable[[ESYS_TR], ESYS_TR]) -> ESYS_TR:
    """Create the parent, ``load`` the key under it, then flush the parent (a loaded key no
    longer needs it), so an open key holds one transient slot. On any failure everything loaded
    is flushed and the connection closed: without a resource manager nothing may leak."""
    loaded: list[ESYS_TR] = []
    try:
        loaded.append(_create_primary(esapi, tcti))
        child = load(loaded[0])
        loaded.append(child)
        _flush(esapi, [loaded.pop(0)])
    except BaseException:
        _release(esapi, loaded)
        raise
    return child


def _read_blob(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyNotFound(f"no TPM key blob at {path}") from None
    except OSError as exc:
        raise KeyBackendError(f"cannot open TPM key blob {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        return fh.read(_MAX_BLOB + 1)


def _publish(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` whole or not at all, mode 0600, never replacing a file."""
    try:
        write_new_file(directory / name, data)
    except FileExistsError:
        raise KeyExists(f"TPM key blob already exists: {directory / name}") from None


@dataclass(eq=False)
class _SigningKey:
    """One of the two signing keys stored beside the ECDH key (not kept loaded)."""

    name: str  # "ak" | "receipt" | "log"
    public: TPM2B_PUBLIC
    private: TPM2B_PRIVATE
    point: bytes
    context: TPMS_CONTEXT | None = None  # saved after the first load; re-loaded for each use


# name -> (public blob, private blob, restricted, what it is called in errors)
_SIGNING_KEYS = {
    "ak": (AK_PUBLIC_BLOB, AK_PRIVATE_BLOB, True, "attestation key"),
    "receipt": (RECEIPT_PUBLIC_BLOB, RECEIPT_PRIVATE_BLOB, False, "receipt key"),
    "log": (LOG_PUBLIC_BLOB, LOG_PRIVATE_BLOB, False, "log key"),
}


class TpmAccess:
    """The open TPM connection of a :class:`TpmKey`, lent out under its lock (for
    :mod:`enclave.attestation.tpm`): the ECDH key's handle and the signing keys on demand."""

    def __init__(self, key: TpmKey, esapi: ESAPI) -> None:
        self._key = key
        self.esapi = esapi
        self.tcti = key._tcti
        self.ecdh_handle = key._child

    @contextlib.contextmanager
    def loaded(self, name: str) -> Iterator[ESYS_TR]:
        """The signing key ``name`` ("ak" or "receipt") loaded for the block, flushed after."""
        with self._key._loaded(self.esapi, name) as handle:
            yield handle

    def run(self, action: str, call: Callable[..., _T], *args: object) -> _T:
        """One TPM command with this module's error mapping."""
        return _tpm(action, self.tcti, call, *args)


class TpmKey(ClosingKey):
    """A TPM-resident P-256 ECDH key (see the module docstring for the layout), with its
    attestation key and receipt key beside it.

    Create one with :meth:`generate` or :meth:`open`; close it (or use ``with``) to flush its
    transient objects. One TPM connection per instance; calls are serialised by a lock.
    """

    def __init__(
        self,
        *,
        esapi: ESAPI,
        child: ESYS_TR,
        public_key: bytes,
        public_blob: bytes,
        signing: dict[str, _SigningKey],
        tcti: str,
        key_dir: Path,
    ) -> None:
        # Internal: takes ownership of an open ESAPI context and the loaded key handle.
        self._esapi: ESAPI | None = esapi
        self._child = child
        self._public = public_key
        self._public_blob = public_blob
        self._signing = signing
        self._tcti = tcti
        self._key_dir = key_dir
        self._lock = threading.Lock()

    @classmethod
    def generate(cls, tcti: str, key_dir: str | os.PathLike[str]) -> TpmKey:
        """Create the ECDH key, the attestation key and the receipt key in the TPM, store their
        wrapped blobs in ``key_dir`` and open them.

        Raises :class:`KeyExists` when ``key_dir`` already holds a blob (nothing is replaced)
        and :class:`TpmUnreachable` when the TPM cannot be reached.
        """
        _require_binding()
        directory = Path(key_dir)
        names = [PRIVATE_BLOB, PUBLIC_BLOB]
        for public_name, private_name, _, _ in _SIGNING_KEYS.values():
            names += [private_name, public_name]
        for name in names:
            if (directory / name).exists():
                raise KeyExists(f"TPM key blob already exists: {directory / name}")
        esapi = _connect(tcti)
        created: list[tuple[TPM2B_PRIVATE, TPM2B_PUBLIC, bytes]] = []
        signing: dict[str, _SigningKey] = {}

        def create_and_load(primary: ESYS_TR) -> ESYS_TR:
            private, public = _tpm(
                "create the ECDH key", tcti, esapi.create, primary, None, ecdh_key_template()
            )[:2]
            created.append((private, public, _check_key_public(public, directory / PUBLIC_BLOB)))
            signing.update(_create_signing_keys(esapi, tcti, primary, directory, _SIGNING_KEYS))
            return _tpm("load the ECDH key", tcti, esapi.load, primary, private, public)

        child = _load_under_parent(esapi, tcti, create_and_load)
        private, public, point = created[0]
        try:
            # Stored last: a failure above leaves no blobs behind to block a retry.
            _store_blobs(directory, public.marshal(), private.marshal())
            for key in signing.values():
                _store_signing_key(directory, key)
        except BaseException:
            _release(esapi, [child])
            raise
        return cls(
            esapi=esapi,
            child=child,
            public_key=point,
            public_blob=public.marshal(),
            signing=signing,
            tcti=tcti,
            key_dir=directory,
        )._warm()

    @classmethod
    def open(cls, tcti: str, key_dir: str | os.PathLike[str]) -> TpmKey:
        """Load the key stored in ``key_dir`` into the TPM.

        A directory without the attestation and receipt keys (made before they existed) gets
        them now. Raises :class:`KeyNotFound` when an ECDH blob is missing,
        :class:`TpmUnreachable` when the TPM cannot be reached, and :class:`KeyBackendError`
        when the TPM refuses the blobs (another TPM, a cleared owner hierarchy, damaged files).
        """
        _require_binding()
        from tpm2_pytss import TPM2B_PRIVATE, TPM2B_PUBLIC

        directory = Path(key_dir)
        raw_public = _read_blob(directory / PUBLIC_BLOB)
        raw_private = _read_blob(directory / PRIVATE_BLOB)
        public = _unmarshal(TPM2B_PUBLIC, raw_public, directory / PUBLIC_BLOB)
        private = _unmarshal(TPM2B_PRIVATE, raw_private, directory / PRIVATE_BLOB)
        point = _check_key_public(public, directory / PUBLIC_BLOB)
        signing = {name: _read_signing_key(directory, name) for name in _SIGNING_KEYS}
        missing = {name: _SIGNING_KEYS[name] for name, key in signing.items() if key is None}
        esapi = _connect(tcti)
        if missing:  # the upgrade path: add what a pre-attestation directory lacks
            primary: list[ESYS_TR] = []
            try:
                primary.append(_create_primary(esapi, tcti))
                made = _create_signing_keys(esapi, tcti, primary[0], directory, missing)
                _flush(esapi, [primary.pop()])
                for key in made.values():
                    _store_signing_key(directory, key)
            except BaseException:
                _release(esapi, primary)
                raise
            signing.update(made)
        # TPM2_Load checks the private blob's integrity against the parent and the public area:
        # blobs from another TPM, or edited ones, are refused here.
        child = _load_under_parent(
            esapi,
            tcti,
            lambda primary: _tpm(
                "load the ECDH key blobs", tcti, esapi.load, primary, private, public
            ),
        )
        return cls(
            esapi=esapi,
            child=child,
            public_key=point,
            public_blob=raw_public,
            signing={name: key for name, key in signing.items() if key is not None},
            tcti=tcti,
            key_dir=directory,
        )._warm()

    def _warm(self) -> TpmKey:
        # Load each signing key once now (under the parent) and keep its saved context: later
        # uses re-load from the context without a parent, so no operation needs more than three
        # transient slots (the ECDH key, the AK, one more), swtpm's limit.
        try:
            with self.tpm_access() as tpm:
                for name in self._signing:
                    with tpm.loaded(name):
                        pass
        except BaseException:
            self.close()
            raise
        return self

    @property
    def public_key(self) -> bytes:
        return self._public

    def ecdh(self, peer_public_key: bytes) -> bytes:
        """ECDH inside the TPM (TPM2_ECDH_ZGen); returns the 32-byte X of the shared point."""
        peer = bytes(peer_public_key)
        # Validate in software first: an off-curve point never reaches the TPM.
        p256.load_public_key(peer)
        from tpm2_pytss import TPM2B_ECC_POINT, TPMS_ECC_POINT, TSS2_Exception

        in_point = TPM2B_ECC_POINT(TPMS_ECC_POINT(x=peer[1:33], y=peer[33:65]))
        with self._lock:
            if self._esapi is None:
                raise KeyBackendError("the TPM key is closed")
            try:
                shared = self._esapi.ecdh_zgen(self._child, in_point)
            except TSS2_Exception:
                raise KeyBackendError("TPM ECDH failed") from None
        x = bytes(shared.point.x.buffer)
        if len(x) > p256.SCALAR_LEN:
            raise KeyBackendError("TPM ECDH failed")
        # The TPM may drop leading zero bytes of the coordinate.
        return x.rjust(p256.SCALAR_LEN, b"\x00")

    # --- signing keys ---------------------------------------------------------------------

    @property
    def receipt_public_key(self) -> bytes:
        return self._signing["receipt"].point

    def public_blob(self, name: str) -> bytes:
        """The marshalled TPM2B_PUBLIC of "ecdh", "ak" or "receipt" (what a verifier hashes
        into the key's Name)."""
        if name == "ecdh":
            return self._public_blob
        return bytes(self._signing[name].public.marshal())

    def sign_digest(self, digest: bytes) -> bytes:
        """TPM2_Sign with the receipt key (ECDSA-SHA256): the 64-byte ``r || s``."""
        return self._sign("receipt", digest)

    @property
    def log_key_type(self) -> int:
        return LOG_ECDSA

    @property
    def log_public_key(self) -> bytes:
        return spki_of_point(self._signing["log"].point)

    def sign_log(self, message: bytes) -> bytes:
        """TPM2_Sign with the log key over SHA-256(message): an ASN.1 DER ECDSA signature."""
        return der_signature(self._sign("log", hashlib.sha256(message).digest()))

    def _sign(self, name: str, digest: bytes) -> bytes:
        if len(digest) != 32:
            raise ValueError("a SHA-256 digest is 32 bytes")
        from tpm2_pytss import (
            TPM2_ALG,
            TPM2_RH,
            TPM2_ST,
            TPM2B_DIGEST,
            TPMT_SIG_SCHEME,
            TPMT_TK_HASHCHECK,
        )

        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
        # An unrestricted key signs an outside digest with a NULL ticket.
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self.tpm_access() as tpm, tpm.loaded(name) as handle:
            signature = tpm.run(
                f"sign with the {name} key",
                tpm.esapi.sign,
                handle,
                TPM2B_DIGEST(digest),
                scheme,
                ticket,
            )
        return ecdsa_raw(signature)

    @contextlib.contextmanager
    def tpm_access(self) -> Iterator[TpmAccess]:
        """This key's TPM connection for the block, with every other caller kept out."""
        with self._lock:
            if self._esapi is None:
                raise KeyBackendError("the TPM key is closed")
            yield TpmAccess(self, self._esapi)

    @contextlib.contextmanager
    def _loaded(self, esapi: ESAPI, name: str) -> Iterator[ESYS_TR]:
        # Called under self._lock (through TpmAccess).
        key = self._signing[name]
        what = _SIGNING_KEYS[name][3]
        if key.context is None:
            primary = _create_primary(esapi, self._tcti)
            try:
                handle = _tpm(
                    f"load the {what}", self._tcti, esapi.load, primary, key.private, key.public
                )
            finally:
                _flush(esapi, [primary])
            try:
                key.context = _tpm(f"save the {what}", self._tcti, esapi.context_save, handle)
            except BaseException:
                _flush(esapi, [handle])
                raise
        else:
            handle = _tpm(f"load the {what}", self._tcti, esapi.context_load, key.context)
        try:
            yield handle
        finally:
            _flush(esapi, [handle])

    @property
    def key_dir(self) -> Path:
        """The directory of the key's blobs (one per appliance key)."""
        return self._key_dir

    def info(self) -> KeyInfo:
        return KeyInfo(
            backend="tpm",
            public_key=self._public,
            persistent=True,
            label=self._key_dir.name or str(self._key_dir),
            details={
                "tcti": self._tcti,
                "key_dir": str(self._key_dir),
                "parent_template": PARENT_TEMPLATE,
            },
        )

    def close(self) -> None:
        """Flush the key from the TPM and drop the connection. Idempotent."""
        with self._lock:
            esapi, self._esapi = self._esapi, None
            if esapi is not None:
                _release(esapi, [self._child])

    @property
    def closed(self) -> bool:
        return self._esapi is None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"TpmKey(public_key={self._public.hex()[:18]}…, key_dir={self._key_dir}, "
            f"tcti={self._tcti!r}, {state})"
        )


def ecdsa_raw(signature: TPMT_SIGNATURE) -> bytes:
    """The 64-byte ``r || s`` of a TPM ECDSA P-256 signature."""
    r = bytes(signature.signature.ecdsa.signatureR.buffer)
    s = bytes(signature.signature.ecdsa.signatureS.buffer)
    if len(r) > p256.SCALAR_LEN or len(s) > p256.SCALAR_LEN:
        raise KeyBackendError("the TPM returned a malformed ECDSA signature")
    return r.rjust(p256.SCALAR_LEN, b"\x00") + s.rjust(p256.SCALAR_LEN, b"\x00")


def _create_signing_keys(
    esapi: ESAPI,
    tcti: str,
    primary: ESYS_TR,
    directory: Path,
    which: dict[str, tuple[str, str, bool, str]],
) -> dict[str, _SigningKey]:
    made: dict[str, _SigningKey] = {}
    for name, (public_name, _, restricted, what) in which.items():
        template = ak_template() if restricted else receipt_key_template()
        private, public = _tpm(f"create the {what}", tcti, esapi.create, primary, None, template)[
            :2
        ]
        point = _check_signing_public(public, directory / public_name, restricted=restricted)
        made[name] = _SigningKey(name, public, private, point)
    return made


def _store_signing_key(directory: Path, key: _SigningKey) -> None:
    public_name, private_name, _, _ = _SIGNING_KEYS[key.name]
    _publish(directory, private_name, key.private.marshal())
    try:
        _publish(directory, public_name, key.public.marshal())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            (directory / private_name).unlink()
        raise
    fsync_dir(directory)


def _read_signing_key(directory: Path, name: str) -> _SigningKey | None:
    """The stored signing key ``name``, or None when neither of its blobs exists."""
    from tpm2_pytss import TPM2B_PRIVATE, TPM2B_PUBLIC

    public_name, private_name, restricted, _ = _SIGNING_KEYS[name]
    if not (directory / public_name).exists() and not (directory / private_name).exists():
        return None
    public = _unmarshal(TPM2B_PUBLIC, _read_blob(directory / public_name), directory / public_name)
    private = _unmarshal(
        TPM2B_PRIVATE, _read_blob(directory / private_name), directory / private_name
    )
    point = _check_signing_public(public, directory / public_name, restricted=restricted)
    return _SigningKey(name, public, private, point)


def _create_primary(esapi: ESAPI, tcti: str) -> ESYS_TR:
    # Empty owner authorization assumed (the default of a provisioned TPM and of swtpm).
    return _tpm(
        "create the storage primary key", tcti, esapi.create_primary, None, parent_template()
    )[0]


def _unmarshal(kind: type[_T], raw: bytes, source: Path) -> _T:
    from tpm2_pytss import TSS2_Exception

    if len(raw) > _MAX_BLOB:
        raise KeyBackendError(f"{source} is too large to be a TPM key blob")
    try:
        value, used = kind.unmarshal(raw)  # type: ignore[attr-defined]
    except TSS2_Exception:
        raise KeyBackendError(f"{source} is not a marshalled TPM blob") from None
    if used != len(raw):
        raise KeyBackendError(f"{source} has trailing bytes after the TPM blob")
    return value


def _store_blobs(directory: Path, public: bytes, private: bytes) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask and ignored for an existing directory.
    os.chmod(directory, 0o700)
    # Private first, public last: the first no-clobber link decides a race between two
    # generates, and the public blob appears only once the private one is in place.
    _publish(directory, PRIVATE_BLOB, private)
    try:
        _publish(directory, PUBLIC_BLOB, public)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            (directory / PRIVATE_BLOB).unlink()
        raise
    fsync_dir(directory)
