"""Epoch keys in the TPM: persistent objects whose private part never leaves it, evicted to
destroy them.

Each epoch's ECDH key and receipt key are created under the storage parent (the same templates
as the long-lived keys: fixedTPM, fixedParent, sensitiveDataOrigin), loaded, and made persistent
with TPM2_EvictControl at a free handle of :data:`HANDLE_BASE` ... (+ :data:`HANDLE_COUNT`). The
wrapped private blob that TPM2_Create returns is dropped, never written: the only copy of the
key is the TPM's own NV object, so evicting it (TPM2_EvictControl again) destroys the key for
good — no file left behind can be loaded back into this TPM. The attestation key certifies both
keys at creation (TPM2_Certify), as it certifies the long-lived keys.

Which handles this key directory's gateway made is kept in ``epochs.json`` beside the long-lived
key's blobs (handles only, nothing secret), so a restart after a crash sweeps exactly its own
leftovers and never another application's persistent objects.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclave import p256
from enclave._files import replace_file
from enclave.errors import KeyBackendError
from enclave.keys.base import KeyInfo

if TYPE_CHECKING:
    from tpm2_pytss import ESYS_TR

    from enclave.keys.tpm import TpmAccess, TpmKey

HANDLE_BASE = 0x81000100  # owner persistent range (TCG: 0x81000000-0x817FFFFF)
HANDLE_COUNT = 32
STATE_FILE = "epochs.json"


class TpmEpochKey:
    """One epoch's ECDH and receipt keys, persistent in the TPM."""

    def __init__(
        self,
        vault: TpmEpochVault,
        handles: dict[str, int],
        trs: dict[str, ESYS_TR],
        points: dict[str, bytes],
        publics: dict[str, bytes],
    ) -> None:
        self._vault = vault
        self.handles = handles  # "sealing" / "receipt" -> persistent handle
        self._trs: dict[str, ESYS_TR] | None = trs
        self._points = points
        self.publics = publics  # marshalled TPM2B_PUBLIC (what a verifier hashes into Names)

    @property
    def public_key(self) -> bytes:
        return self._points["sealing"]

    @property
    def receipt_public_key(self) -> bytes:
        return self._points["receipt"]

    def _tr(self, tpm: TpmAccess, name: str) -> ESYS_TR:
        if self._trs is None:
            raise KeyBackendError("the epoch key was destroyed")
        return self._trs[name]

    def ecdh(self, peer_public_key: bytes) -> bytes:
        peer = bytes(peer_public_key)
        p256.load_public_key(peer)  # an off-curve point never reaches the TPM
        from tpm2_pytss import TPM2B_ECC_POINT, TPMS_ECC_POINT

        point = TPM2B_ECC_POINT(TPMS_ECC_POINT(x=peer[1:33], y=peer[33:65]))
        with self._vault.access() as tpm:
            shared = tpm.run(
                "ECDH with the epoch key", tpm.esapi.ecdh_zgen, self._tr(tpm, "sealing"), point
            )
        x = bytes(shared.point.x.buffer)
        if len(x) > p256.SCALAR_LEN:
            raise KeyBackendError("TPM ECDH failed")
        return x.rjust(p256.SCALAR_LEN, b"\x00")

    def sign_digest(self, digest: bytes) -> bytes:
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

        from enclave.keys.tpm import ecdsa_raw

        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self._vault.access() as tpm:
            signature = tpm.run(
                "sign with the epoch receipt key",
                tpm.esapi.sign,
                self._tr(tpm, "receipt"),
                TPM2B_DIGEST(digest),
                scheme,
                ticket,
            )
        return ecdsa_raw(signature)

    def info(self) -> KeyInfo:
        return KeyInfo(
            "tpm-epoch",
            self.public_key,
            persistent=False,
            details={k: f"0x{v:08x}" for k, v in self.handles.items()},
        )

    def destroy(self) -> None:
        """TPM2_EvictControl: the persistent objects (the only copies) are removed, where the
        handles still hold them (see :meth:`TpmEpochVault.evict`)."""
        trs, self._trs = self._trs, None
        if trs is not None:
            self._vault.evict(self.handles, self.publics, trs)

    close = destroy


class TpmEpochVault:
    """Makes and evicts epoch keys in the TPM of ``base`` (its connection, its lock, its AK)."""

    backend = "tpm"

    def __init__(self, base: TpmKey) -> None:
        self._base = base
        self._state = base.key_dir / STATE_FILE

    @contextlib.contextmanager
    def access(self) -> Iterator[TpmAccess]:
        with self._base.tpm_access() as tpm:
            yield tpm

    # --- the handle list ---------------------------------------------------------------------

    def _read_state(self) -> list[int]:
        try:
            data = json.loads(self._state.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise KeyBackendError(f"{self._state} is unreadable: {exc}") from None
        handles = data.get("handles") if isinstance(data, dict) else None
        if not isinstance(handles, list) or not all(
            isinstance(h, int) and HANDLE_BASE <= h < HANDLE_BASE + HANDLE_COUNT for h in handles
        ):
            raise KeyBackendError(f"{self._state} is not a list of epoch handles")
        return handles

    def _write_state(self, handles: list[int]) -> None:
        replace_file(self._state, json.dumps({"handles": sorted(set(handles))}).encode())

    def _persistent(self, tpm: TpmAccess) -> set[int]:
        from tpm2_pytss import TPM2_CAP

        _, data = tpm.run(
            "list persistent handles",
            tpm.esapi.get_capability,
            TPM2_CAP.HANDLES,
            HANDLE_BASE,
            HANDLE_COUNT,
        )
        return {
            int(h) for h in data.data.handles if HANDLE_BASE <= int(h) < HANDLE_BASE + HANDLE_COUNT
        }

    # --- EpochVault --------------------------------------------------------------------------

    def create(self, key_id: str) -> TpmEpochKey:
        from tpm2_pytss import ESYS_TR

        from enclave.keys.tpm import (
            _check_key_public,
            _check_signing_public,
            _create_primary,
            _flush,
            ecdh_key_template,
            receipt_key_template,
        )

        handles: dict[str, int] = {}
        trs: dict[str, ESYS_TR] = {}
        points: dict[str, bytes] = {}
        publics: dict[str, bytes] = {}
        where = self._base.key_dir / STATE_FILE
        with self.access() as tpm:
            used = self._persistent(tpm)
            free = [h for h in range(HANDLE_BASE, HANDLE_BASE + HANDLE_COUNT) if h not in used]
            if len(free) < 2:
                raise KeyBackendError("no free persistent handle for a new key epoch")
            try:
                for name, template in (
                    ("sealing", ecdh_key_template()),
                    ("receipt", receipt_key_template()),
                ):
                    primary = _create_primary(tpm.esapi, tpm.tcti)
                    try:
                        private, public = tpm.run(
                            f"create the epoch {name} key",
                            tpm.esapi.create,
                            primary,
                            None,
                            template,
                        )[:2]
                        loaded = tpm.run(
                            f"load the epoch {name} key", tpm.esapi.load, primary, private, public
                        )
                    finally:
                        _flush(tpm.esapi, [primary])
                    del private  # the wrapped blob is never kept: the TPM's NV object is the key
                    try:
                        points[name] = (
                            _check_key_public(public, where)
                            if name == "sealing"
                            else _check_signing_public(public, where, restricted=False)
                        )
                        handle = free.pop(0)
                        # Listed before it exists: a crash between the two leaves a name to
                        # sweep, never an object nobody knows.
                        self._write_state([*self._read_state(), handle])
                        trs[name] = tpm.run(
                            f"make the epoch {name} key persistent",
                            tpm.esapi.evict_control,
                            ESYS_TR.OWNER,
                            loaded,
                            handle,
                        )
                        handles[name] = handle
                        publics[name] = bytes(public.marshal())
                    finally:
                        _flush(tpm.esapi, [loaded])
            except BaseException:
                self._close(tpm, trs)
                self._evict_matching(tpm, handles, publics)
                raise
        return TpmEpochKey(self, handles, trs, points, publics)

    def evidence(self, key: Any) -> Mapping[str, Any]:
        """TPM2_Certify of the epoch's two keys by the AK: ``{"sealing"|"receipt":
        CertifiedKey}``."""
        from tpm2_pytss import TPM2_ALG, TPMT_SIG_SCHEME

        from enclave.attestation.tpm import CertifiedKey, _signed

        assert isinstance(key, TpmEpochKey)
        null = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        made = {}
        with self.access() as tpm, tpm.loaded("ak") as ak:
            for name in ("sealing", "receipt"):
                attest, signature = tpm.run(
                    f"certify the epoch {name} key",
                    tpm.esapi.certify,
                    key._tr(tpm, name),
                    ak,
                    b"",
                    null,
                )
                made[name] = CertifiedKey(key.publics[name], _signed(attest, signature))
        return made

    def evict(
        self, handles: Mapping[str, int], publics: Mapping[str, bytes], trs: Mapping[str, ESYS_TR]
    ) -> None:
        """Evict the keys this process made at ``handles``, only where a handle still holds
        the key's public area: with workers sharing the TPM, one taken over while it made them
        (frozen past its lease) finds its handles evicted by the taker, which may have made the
        new epoch's keys at the very handles just freed. An ESYS handle does not tell (no name
        is checked without a session), so each handle is opened afresh and read first."""
        with self.access() as tpm:
            self._close(tpm, trs)
            self._evict_matching(tpm, handles, publics)

    @staticmethod
    def _close(tpm: TpmAccess, trs: Mapping[str, ESYS_TR]) -> None:
        for tr in trs.values():
            with contextlib.suppress(Exception):
                tpm.esapi.tr_close(tr)

    def _evict_locked(
        self, tpm: TpmAccess, handles: Mapping[str, int], trs: Mapping[str, ESYS_TR]
    ) -> None:
        from tpm2_pytss import ESYS_TR

        failed = []
        for name, handle in handles.items():
            try:
                tpm.run(
                    "evict an epoch key", tpm.esapi.evict_control, ESYS_TR.OWNER, trs[name], handle
                )
            except KeyBackendError:
                failed.append(handle)
            else:
                _forget(tpm, trs[name])
        gone = set(handles.values()) - set(failed)
        self._write_state([h for h in self._read_state() if h not in gone])
        if failed:
            raise KeyBackendError(f"could not evict epoch keys at {sorted(failed)}")

    # --- shared between processes (enclave.keys.shared_epochs) -------------------------------

    def reference(self, key: Any, evidence: Mapping[str, Any]) -> dict[str, Any]:
        """The handles, the public areas and the AK's certifications (all public)."""
        assert isinstance(key, TpmEpochKey)
        return {
            "handles": dict(key.handles),
            "publics": {name: public.hex() for name, public in key.publics.items()},
            "certify": {
                name: {"attest": c.certify.attest.hex(), "signature": c.certify.signature.hex()}
                for name, c in evidence.items()
            },
        }

    def load(self, reference: Mapping[str, Any]) -> tuple[TpmEpochKey, Mapping[str, Any]]:
        """ESYS handles to the persistent keys another process made; each must still hold the
        public area the reference names (a reused handle is refused)."""
        from tpm2_pytss import TPM2B_PUBLIC, TSS2_Exception

        from enclave.attestation.tpm import CertifiedKey, SignedAttest
        from enclave.keys.tpm import _check_key_public, _check_signing_public

        try:
            handles = {n: int(reference["handles"][n]) for n in ("sealing", "receipt")}
            publics = {n: bytes.fromhex(reference["publics"][n]) for n in handles}
            certify = {
                n: SignedAttest(
                    bytes.fromhex(reference["certify"][n]["attest"]),
                    bytes.fromhex(reference["certify"][n]["signature"]),
                )
                for n in reference.get("certify", {})
            }
        except (KeyError, TypeError, ValueError):
            raise KeyBackendError("a shared epoch reference is not a TPM epoch") from None
        if not all(HANDLE_BASE <= h < HANDLE_BASE + HANDLE_COUNT for h in handles.values()):
            raise KeyBackendError("a shared epoch reference names a handle outside the range")
        trs: dict[str, ESYS_TR] = {}
        points: dict[str, bytes] = {}
        where = self._state
        with self.access() as tpm:
            try:
                for name, handle in handles.items():
                    try:
                        trs[name] = tpm.esapi.tr_from_tpmpublic(handle)
                    except TSS2_Exception:
                        raise KeyBackendError("a shared epoch key is gone from the TPM") from None
                    public = tpm.run("read an epoch key", tpm.esapi.read_public, trs[name])[0]
                    if bytes(public.marshal()) != publics[name]:
                        raise KeyBackendError("a shared epoch handle holds another key")
                    parsed, _ = TPM2B_PUBLIC.unmarshal(publics[name])
                    points[name] = (
                        _check_key_public(parsed, where)
                        if name == "sealing"
                        else _check_signing_public(parsed, where, restricted=False)
                    )
            except BaseException:
                for tr in trs.values():
                    with contextlib.suppress(Exception):
                        tpm.esapi.tr_close(tr)
                raise
        evidence = {n: CertifiedKey(publics[n], certify[n]) for n in certify}
        return TpmEpochKey(self, handles, trs, points, publics), evidence

    def release(self, key: Any) -> None:
        """Close this process's ESYS handles; the persistent objects stay."""
        assert isinstance(key, TpmEpochKey)
        trs, key._trs = key._trs, None
        if trs:
            with self.access() as tpm:
                for tr in trs.values():
                    with contextlib.suppress(Exception):
                        tpm.esapi.tr_close(tr)

    def destroy_reference(self, reference: Mapping[str, Any]) -> None:
        """Evict the handles the reference names, if they still hold its keys."""
        try:
            handles = {n: int(h) for n, h in reference["handles"].items()}
            publics = {n: bytes.fromhex(p) for n, p in reference["publics"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise KeyBackendError("a shared epoch reference is not a TPM epoch") from None
        with self.access() as tpm:
            self._evict_matching(tpm, handles, publics)

    def _evict_matching(
        self, tpm: TpmAccess, handles: Mapping[str, int], publics: Mapping[str, bytes]
    ) -> None:
        """Evict each of ``handles`` that still holds the public area ``publics`` names."""
        present = self._persistent(tpm)
        trs: dict[str, ESYS_TR] = {}
        for name, handle in handles.items():
            if (tr := self._opened(tpm, present, handle)) is None:
                continue
            public = tpm.run("read an epoch key", tpm.esapi.read_public, tr)[0]
            if bytes(public.marshal()) == publics.get(name):
                trs[name] = tr
            else:
                tpm.esapi.tr_close(tr)
        self._evict_locked(tpm, {n: handles[n] for n in trs}, trs)

    def collect(self, pending: list[str], keep: list[Mapping[str, Any]]) -> int:
        """Evict every handle ``epochs.json`` (this key directory's own) lists but those the
        references ``keep`` name: a handle is listed before its key is made persistent."""
        try:
            kept = {int(h) for reference in keep for h in reference["handles"].values()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise KeyBackendError("a shared epoch reference is not a TPM epoch") from None
        return self.sweep(keep=kept)

    def sweep(self, keep: set[int] | None = None) -> int:
        """Evict every handle ``epochs.json`` lists (but those in ``keep``) that the TPM still
        holds."""
        from tpm2_pytss import ESYS_TR

        kept = keep or set()
        listed = [h for h in self._read_state() if h not in kept]
        if not listed:
            return 0
        swept = 0
        with self.access() as tpm:
            present = self._persistent(tpm)
            for handle in listed:
                if (tr := self._opened(tpm, present, handle)) is None:
                    continue
                tpm.run(
                    "evict a leftover epoch key", tpm.esapi.evict_control, ESYS_TR.OWNER, tr, handle
                )
                _forget(tpm, tr)
                swept += 1
            self._write_state([h for h in self._read_state() if h in kept])
        return swept

    @staticmethod
    def _opened(tpm: TpmAccess, present: set[int], handle: int) -> ESYS_TR | None:
        """An ESYS handle to the persistent object at ``handle`` (``present``: the TPM's
        persistent handles), None when the TPM holds none there."""
        from tpm2_pytss import TSS2_Exception

        if handle not in present:
            return None
        try:
            return tpm.esapi.tr_from_tpmpublic(handle)
        except TSS2_Exception:
            return None

    def present(self, handle: int) -> bool:
        """Whether the TPM still holds a persistent object at ``handle`` (for checks)."""
        with self.access() as tpm:
            return handle in self._persistent(tpm)


def _forget(tpm: TpmAccess, tr: ESYS_TR) -> None:
    """Close the ESYS handle of an object just evicted: the ESAPI keeps it (with the evicted
    key's name) otherwise, and refuses to open the next object made at that persistent handle
    (a later epoch's: "Name mismatch"), so that epoch could be neither loaded nor destroyed by
    this process."""
    with contextlib.suppress(Exception):
        tpm.esapi.tr_close(tr)


def private_blobs(directory: Path) -> list[Path]:
    """Files in ``directory`` that hold wrapped private parts (``*.priv``): the long-lived keys
    only; an epoch key never has one."""
    return sorted(directory.glob("*.priv"))
