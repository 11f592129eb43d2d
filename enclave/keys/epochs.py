"""Key epochs: the sealing key (and its receipt key) rotates; retired keys are destroyed.

An *epoch* is one pair of keys generated inside the backend — an ECDH sealing key and an ECDSA
receipt key — named by a key id ``<16 hex of the sealing key's fingerprint>@<replica>``: the
fingerprint part lets a caller check that an id belongs to its key, the replica part says which
replica holds it (keys are never copied between replicas, so a request can only open there).

Life of an epoch: *current* from its creation until the next rotation; then *previous*, still
served until its ``not_after`` (rotation time + grace), so requests sealed just before a rotation
open; then *retired*: its keys are destroyed in the backend (TPM: evicted from NV, PKCS#11:
``C_DestroyObject``, memory: every reference dropped — OpenSSL clears a private scalar when it
frees it) and a request naming it is answered ``key_epoch_retired``. Only the public keys of a
retired epoch are kept (``history``): receipts it signed stay verifiable.

:class:`EpochKeys` is itself a key backend (the current epoch's key), a receipt signer (the key
of the epoch the request being served was sealed to, else the current one) and a log signer (the
long-lived key beside it, which does not rotate), so code written for one key keeps working.
Backends supply an :class:`EpochVault`: create a key pair inside the backend, and sweep what a
previous run left behind (at start every old epoch is destroyed: a restart is a new epoch).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from enclave import p256
from enclave.errors import EnclaveError, KeyBackendError
from enclave.keys.base import ClosingKey, KeyBackend, KeyInfo, LogSigner, ReceiptSigner

KEY_ID_SEPARATOR = "@"
MAX_KEY_ID = 255
HISTORY = 256  # retired epochs whose public keys are kept (receipts they signed stay checkable)


class EpochRetired(EnclaveError):
    message = "the key epoch this request was sealed to is retired: fetch the key again"

    code = "key_epoch_retired"


class WrongReplica(EnclaveError):
    message = "this replica does not hold the key this request was sealed to"

    code = "wrong_replica"

    def __init__(self, replica: str | None) -> None:
        super().__init__(
            f"the key is held by replica {replica}" if replica else "the key is not held here"
        )
        self.replica = replica


@runtime_checkable
class EpochKey(KeyBackend, ReceiptSigner, Protocol):
    """One epoch's keys in the backend: ECDH and receipt signing, and their destruction."""

    def destroy(self) -> None:
        """Destroy both keys in the backend (idempotent); afterwards ``ecdh`` fails."""
        ...


class EpochVault(Protocol):
    """Where epoch keys are made and destroyed: one per backend."""

    backend: str

    def create(self, key_id: str) -> EpochKey:
        """Generate a new epoch's key pair inside the backend."""
        ...

    def evidence(self, key: EpochKey) -> Mapping[str, Any]:
        """What proves where the keys live (TPM: the AK's certifications), or {}."""
        ...

    def sweep(self) -> int:
        """Destroy every epoch key a previous run left in the backend; how many."""
        ...


def key_id_for(public_key: bytes, replica: str) -> str:
    key_id = f"{p256.fingerprint(public_key)[:16]}{KEY_ID_SEPARATOR}{replica}"
    if len(key_id) > MAX_KEY_ID or not key_id.isascii() or not key_id.isprintable():
        raise ValueError("the replica id is too long or not printable ASCII for a key id")
    return key_id


def replica_of(key_id: str) -> str | None:
    """The replica a key id names (None when it names none)."""
    _, separator, replica = key_id.partition(KEY_ID_SEPARATOR)
    return replica if separator and replica else None


@dataclass(eq=False)
class Epoch:
    """One epoch: public facts always, the keys until it is retired."""

    id: str
    number: int
    sealing_key: bytes
    receipt_key: bytes
    created: float
    not_after: float  # the last moment a request sealed to it is served
    key: EpochKey | None = field(default=None, repr=False)
    evidence: Mapping[str, Any] = field(default_factory=dict, repr=False)
    retired: bool = False

    def document(self) -> dict[str, Any]:
        """The public description (key document, evidence, log)."""
        return {
            "id": self.id,
            "sealing_key": self.sealing_key.hex(),
            "receipt_key": self.receipt_key.hex(),
            "not_after": int(self.not_after),
        }


_serving: contextvars.ContextVar[Epoch | None] = contextvars.ContextVar(
    "paygate_epoch", default=None
)


class EpochKeys(ClosingKey):
    """The rotating keys of one replica (see the module docstring). Thread-safe."""

    def __init__(
        self,
        vault: EpochVault,
        *,
        replica: str,
        epoch_seconds: float,
        grace_seconds: float,
        base: KeyBackend | None = None,
        close_base: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if epoch_seconds <= 0 or grace_seconds < 0 or grace_seconds >= epoch_seconds:
            raise ValueError("an epoch is longer than its grace period, both positive")
        self._vault = vault
        self._replica = replica
        self._epoch_seconds = epoch_seconds
        self._grace = grace_seconds
        self._base = base
        self._close_base = close_base
        self._clock = clock
        self._lock = threading.RLock()
        self._live: list[Epoch] = []  # current first, then previous
        self._history: deque[Epoch] = deque(maxlen=HISTORY)
        self._number = 0
        self._closed = False
        self._listeners: list[Callable[[Epoch], None]] = []
        self.swept = 0
        self._begin()

    def _begin(self) -> None:
        """Sweep a previous run's keys (destroyed before anything else), make the first."""
        self.swept = self._vault.sweep()
        self.rotate()

    # --- the epochs ------------------------------------------------------------------------

    @property
    def current(self) -> Epoch:
        with self._lock:
            if self._closed or not self._live:
                raise KeyBackendError("the epoch keys are closed")
            return self._live[0]

    @property
    def replica(self) -> str:
        return self._replica

    @property
    def epoch_seconds(self) -> float:
        return self._epoch_seconds

    @property
    def grace_seconds(self) -> float:
        return self._grace

    def live(self) -> list[Epoch]:
        """The current epoch, then the previous one while it is still served: not once past
        its grace (as :meth:`lookup` refuses it), even before :meth:`expire` has dropped it
        (with workers, another may have destroyed it already)."""
        now = self._clock()
        with self._lock:
            return [e for index, e in enumerate(self._live) if index == 0 or now <= e.not_after]

    def history(self) -> list[Epoch]:
        """Retired epochs (public keys only), oldest first, at most :data:`HISTORY`; with the
        previous one past its grace that :meth:`expire` has not dropped yet (what
        :meth:`live` no longer lists)."""
        now = self._clock()
        with self._lock:
            over = [
                replace(e, key=None, retired=True)
                for index, e in enumerate(self._live)
                if index and now > e.not_after
            ]
            return [*self._history, *over][-HISTORY:]

    def on_rotate(self, listener: Callable[[Epoch], None]) -> None:
        """Call ``listener(new_epoch)`` after every rotation (in the rotating thread)."""
        self._listeners.append(listener)

    def rotation_due(self) -> bool:
        return self._clock() >= self.current.created + self._epoch_seconds

    def rotate(self) -> Epoch:
        """Make a new current epoch in the backend; the current one becomes previous (served
        for the grace period); an older previous one is retired at once. Blocking."""
        now = self._clock()
        number = self._number + 1
        key = self._vault.create(f"{number}")
        try:
            key_id = key_id_for(key.public_key, self._replica)
            evidence = self._vault.evidence(key)
        except BaseException:
            key.destroy()
            raise
        epoch = Epoch(
            id=key_id,
            number=number,
            sealing_key=key.public_key,
            receipt_key=key.receipt_public_key,
            created=now,
            not_after=now + self._epoch_seconds + self._grace,
            key=key,
            evidence=evidence,
        )
        with self._lock:
            if self._closed:
                key.destroy()
                raise KeyBackendError("the epoch keys are closed")
            self._number = number
            older = self._live[1:]
            if self._live:
                self._live[0].not_after = now + self._grace
            self._live = [epoch, *self._live[:1]]
        for old in older:
            self._retire(old)
        for listener in self._listeners:
            listener(epoch)
        return epoch

    def expire(self) -> list[Epoch]:
        """Retire (destroy) every previous epoch past its ``not_after``. Blocking."""
        now = self._clock()
        with self._lock:
            gone = [e for e in self._live[1:] if now > e.not_after]
            self._live = [e for e in self._live if e not in gone]
        for epoch in gone:
            self._retire(epoch)
        return gone

    def _retire(self, epoch: Epoch) -> None:
        key, epoch.key = epoch.key, None
        epoch.retired = True
        with self._lock:
            self._history.append(epoch)
        if key is not None:
            key.destroy()

    def lookup(self, key_id: str) -> Epoch:
        """The live epoch ``key_id`` names; :class:`EpochRetired` for one of this replica's
        retired (or unknown past) epochs, :class:`WrongReplica` for another replica's."""
        now = self._clock()
        with self._lock:
            for index, epoch in enumerate(self._live):
                if epoch.id == key_id:
                    # The current epoch is served until it is replaced, even if a rotation is
                    # late; a previous one only until its not_after.
                    if epoch.key is None or (index and now > epoch.not_after):
                        raise EpochRetired
                    return epoch
        owner = replica_of(key_id)
        if owner != self._replica:
            raise WrongReplica(owner)
        raise EpochRetired

    def unkeyed(self) -> list[Epoch]:
        """The epochs a request without a key id may be sealed to (v1, unkeyed v2): the
        current one first, then the previous one within its grace."""
        now = self._clock()
        with self._lock:
            return [
                e
                for index, e in enumerate(self._live)
                if e.key is not None and (index == 0 or now <= e.not_after)
            ]

    # --- the request being served ---------------------------------------------------------

    def bind(self, epoch: Epoch) -> None:
        """From now on in this task (the request's), receipts are signed by ``epoch``'s key."""
        _serving.set(epoch)

    def signer(self) -> ReceiptSigner:
        """The receipt key of the request being served (its epoch), else the current one: a
        concrete signer to hand to another thread (context variables do not follow)."""
        epoch = _serving.get() or self.current
        key = epoch.key
        if key is None:
            raise KeyBackendError("the epoch's receipt key is retired")
        return key

    # --- KeyBackend (the current epoch) ----------------------------------------------------

    @property
    def public_key(self) -> bytes:
        return self.current.sealing_key

    def ecdh(self, peer_public_key: bytes) -> bytes:
        key = self.current.key
        if key is None:
            raise KeyBackendError("the current epoch has no key")
        return key.ecdh(peer_public_key)

    def info(self) -> KeyInfo:
        current = self.current
        details = {"epoch": current.id, "epoch_seconds": f"{self._epoch_seconds:g}"}
        if self._base is not None:
            details.update({f"base_{k}": v for k, v in self._base.info().details.items()})
        return KeyInfo(
            backend=self._vault.backend,
            public_key=current.sealing_key,
            persistent=False,
            label=current.id,
            details=details,
        )

    def close(self) -> None:
        """Destroy every live epoch (a stopped gateway leaves no key behind) and close the
        long-lived key. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live, self._live = self._live, []
        for epoch in live:
            self._retire(epoch)
        if self._base is not None and self._close_base:
            self._base.close()

    # --- ReceiptSigner ---------------------------------------------------------------------

    @property
    def receipt_public_key(self) -> bytes:
        epoch = _serving.get() or self.current
        return epoch.receipt_key

    def sign_digest(self, digest: bytes) -> bytes:
        return self.signer().sign_digest(digest)

    # --- LogSigner (the long-lived key beside the epochs) ----------------------------------

    @property
    def base(self) -> KeyBackend | None:
        return self._base

    @property
    def log_key_type(self) -> int:
        return self._log().log_key_type

    @property
    def log_public_key(self) -> bytes:
        return self._log().log_public_key

    def sign_log(self, message: bytes) -> bytes:
        return self._log().sign_log(message)

    def _log(self) -> LogSigner:
        if not isinstance(self._base, LogSigner):
            raise KeyBackendError("no long-lived log key beside the epoch keys")
        return self._base

    def __repr__(self) -> str:
        return f"EpochKeys(backend={self._vault.backend}, replica={self._replica!r})"


def request_signer(signer: ReceiptSigner) -> ReceiptSigner:
    """The signer for the request being served: an epoch's own key under :class:`EpochKeys`,
    resolved here because a worker thread does not see the request's context."""
    return signer.signer() if isinstance(signer, EpochKeys) else signer


# --- memory epochs (software and TEE backends) ----------------------------------------------


class MemoryEpochKey:
    """An epoch's keys in this process's memory (the TEE's encrypted memory for tee-memory)."""

    def __init__(self) -> None:
        from enclave.keys.tee_memory import TeeMemoryKey

        self._key: TeeMemoryKey | None = TeeMemoryKey.generate()
        self._public = self._key.public_key
        self._receipt_public = self._key.receipt_public_key

    @property
    def public_key(self) -> bytes:
        return self._public

    @property
    def receipt_public_key(self) -> bytes:
        return self._receipt_public

    def _held(self) -> Any:
        if self._key is None:
            raise KeyBackendError("the epoch key was destroyed")
        return self._key

    def ecdh(self, peer_public_key: bytes) -> bytes:
        return bytes(self._held().ecdh(peer_public_key))

    def sign_digest(self, digest: bytes) -> bytes:
        return bytes(self._held().sign_digest(digest))

    def info(self) -> KeyInfo:
        return KeyInfo("memory-epoch", self._public, persistent=False)

    def destroy(self) -> None:
        key, self._key = self._key, None
        if key is not None:
            key.close()  # drops the last references: OpenSSL clears the scalars on free

    close = destroy


class MemoryEpochVault:
    """Epoch keys generated in memory: for the software and tee-memory backends. Nothing is
    written anywhere, so nothing survives the process and there is nothing to sweep."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def create(self, key_id: str) -> EpochKey:
        return MemoryEpochKey()

    def evidence(self, key: EpochKey) -> Mapping[str, Any]:
        return {}

    def sweep(self) -> int:
        return 0
