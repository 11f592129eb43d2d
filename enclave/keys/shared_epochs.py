"""Key epochs shared by the gateway processes of one host (``--workers N``).

A caller may attest against one worker and send its request to another, so every worker must
present and accept the same epochs. The epochs therefore live once per host, in the backend,
and every worker holds handles to the same keys:

- The shared state (``shared-epochs.json`` in the epoch directory, mode 0600) lists the live
  epochs, current first: their public facts, the backend's *reference* to their keys (a PKCS#11
  label, TPM persistent handles) and their evidence (the AK's certifications), plus the pids of
  the member processes. It holds nothing secret: a reference only names a key inside the
  backend, which never lets the private part out.
- Every change happens under the host lock, a lease (``shared-epochs.lease``: holder, pid,
  until, fence; :class:`_Lease`): a rotation (the current epoch is over, or ``paygate keys
  rotate`` asked) is made once, by whichever worker gets there first; the others find it in
  the state and load the keys by reference. A previous epoch past its grace period is
  destroyed in the backend once, by reference, and every worker drops its handle. A killed
  holder's lease is free at once (its pid is gone); a frozen holder's (SIGSTOP, a paused VM)
  once it has passed (LEASE_SECONDS), and what the frozen holder writes when it wakes is
  refused (LeaseLost) and the key it made destroyed: the ``flock`` of ``shared-epochs.lock``
  is held only around the lease's reads and the holder's writes, never for a whole change.
- A worker whose view is older than the state (a key id it does not know, an unkeyed request)
  re-reads it first (a ``stat`` when nothing changed), so a rotation made by another worker is
  served at once, not at the next poll. With ``load_inline=False`` (the gateway) that pass runs
  in a background thread (opening keys is a token login and search or a TPM handle read) and
  the event loop awaits it at most REQUEST_WAIT (``paygate.server.epochs.caught_up``); this
  process's view, every key of which it holds, is served until the pass has opened them all.
- What happens once per host is told once, by the process that did it (``made_here``,
  ``destroyed_here``): one key-epoch entry in the transparency log per epoch. Clients seal only
  to a key the log announces, so an epoch whose maker died between writing the state and
  telling must not stay untold until the next rotation: each epoch names its teller (the
  maker's member token) in the state, and once its entry is appended the teller makes the
  epoch's told mark (``shared-epochs.told-<digest of its sealing key>``: a file, not a state
  write, which would have every worker re-read the state and hold the lease once more); a member
  that finds the current epoch untold and its teller gone (its member file
  ``shared-epochs.member-<token>`` no longer locked) becomes the teller (``take_untold``).
- Every member holds a shared ``flock`` of ``shared-epochs.members`` for its life: who is a
  member is decided by that lock, which dies with its process, never by a pid (reused by
  another process, or another pid namespace's). The first member (nobody else holds it) sweeps
  what a previous run left and starts a new epoch; a restarted worker joins the live ones and
  destroys a key a rotation cut short by a crash left unlisted (every rotation does too). The
  last member to stop destroys every epoch.
- The request path (on the event loop) waits at most ``REQUEST_WAIT``: a holder frozen with
  the lock costs one request that wait, then requests are answered from this process's view
  (not waiting) for REQUEST_BACKOFF, rather than each stalled and then failed.

Backends whose keys exist only in one process's memory (software, tee-memory) cannot be shared
this way: :class:`enclave.keys.epochs.MemoryEpochVault` is not a :class:`SharedVault`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import secrets
import stat
import string
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from enclave._files import replace_file
from enclave.errors import KeyBackendError
from enclave.keys.base import KeyBackend
from enclave.keys.epochs import Epoch, EpochKey, EpochKeys, EpochRetired, key_id_for

STATE_FILE = "shared-epochs.json"
LOCK_FILE = "shared-epochs.lock"
MEMBERS_FILE = "shared-epochs.members"
PENDING_FILE = "shared-epochs.pending"
MEMBER_PREFIX = "shared-epochs.member-"  # + the member's token: locked for the member's life
TOLD_PREFIX = "shared-epochs.told-"  # + a digest of the sealing key: its entry is appended
LEASE_FILE = "shared-epochs.lease"
LOCK_TIMEOUT = 30.0  # a TPM rotation holds the lock for well under a second
LEASE_SECONDS = 10.0  # a holder held up longer (frozen, a paused VM) is taken over
LOCK_POLL = 0.01
REQUEST_WAIT = 0.5  # the most a request (on the event loop) waits for the lock
REQUEST_BACKOFF = 5.0  # after a wait in vain, requests only try without waiting this long
VERSION = 1


@runtime_checkable
class SharedVault(Protocol):
    """An :class:`~enclave.keys.epochs.EpochVault` whose keys other processes can open."""

    backend: str

    def create(self, key_id: str) -> EpochKey: ...

    def evidence(self, key: EpochKey) -> Mapping[str, Any]: ...

    def sweep(self) -> int: ...

    def reference(self, key: EpochKey, evidence: Mapping[str, Any]) -> dict[str, Any]:
        """What names ``key`` (and carries its evidence) in the shared state: JSON, public."""
        ...

    def load(self, reference: Mapping[str, Any]) -> tuple[EpochKey, Mapping[str, Any]]:
        """Open the key another process made, and its evidence; KeyBackendError if gone."""
        ...

    def release(self, key: EpochKey) -> None:
        """Drop this process's handle to ``key`` without destroying it."""
        ...

    def destroy_reference(self, reference: Mapping[str, Any]) -> None:
        """Destroy the key ``reference`` names in the backend (idempotent)."""
        ...

    def collect(self, pending: list[str], keep: list[Mapping[str, Any]]) -> int:
        """Destroy what a rotation cut short by a crash (between the key's making and the
        state's writing) left: the keys made as one of ``pending`` (the names given to
        ``create``), or known to this vault only, but none ``keep`` names; how many. Never
        another host's keys in the same token."""
        ...


class LockBusy(KeyBackendError):
    """The shared state stayed locked by another process as long as the caller would wait."""

    message = "the shared key epochs stayed locked by another process"


class LeaseLost(LockBusy):
    """This holder was held up past its lease and another process took the lock over: what it
    was about to write is refused (it decided on a state that may no longer be the state)."""

    message = "another process took the shared key epochs over from this one (held up too long)"


@contextlib.contextmanager
def _flocked(path: Path, *, exclusive: bool, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """``flock`` of ``path``, waited for at most ``timeout`` seconds (0: LockBusy at once)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if timeout <= 0:
                    raise LockBusy(f"the shared key epochs are locked ({path})") from None
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"the shared key epochs stayed locked for {timeout:g} s ({path})"
                    ) from None
                time.sleep(LOCK_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock


MAX_STATE_BYTES = 1 << 20  # a few epochs and members: kilobytes


class _Lease:
    """One hold of the host lock: a lease in ``shared-epochs.lease`` (holder, pid, until,
    fence), not a ``flock`` held for the whole change, so a holder frozen with it (SIGSTOP, a
    paused VM) stops the others only until its lease has passed; a dead holder's (its pid gone)
    is free at once. ``shared-epochs.lock`` is only ever held for the few system calls that
    read and write the lease, or write a file under it: a holder writes only through
    :meth:`fenced`, which checks, under that ``flock``, that the lease is still its own, so a
    holder taken over writes nothing after (LeaseLost). The lease's times are
    ``CLOCK_MONOTONIC``, one clock for every process of the host (a wall clock set back or
    forward moves no lease), which starts again at every boot: a lease further ahead than it
    could have been written on this clock is a previous boot's, and free."""

    def __init__(self, directory: Path, seconds: float) -> None:
        self._guard = directory / LOCK_FILE
        self._path = directory / LEASE_FILE
        self._seconds = seconds
        self._holder = secrets.token_hex(8)
        self.fence = 0

    def _read(self) -> dict[str, Any]:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise KeyBackendError(f"{self._path} is unreadable: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(4096)
        try:
            lease = json.loads(raw)
        except ValueError:
            lease = None
        # A damaged lease is nobody's (its holder's writes are refused: not its own any more).
        return lease if isinstance(lease, dict) else {}

    def _put(self, holder: str | None) -> None:
        lease = {
            "holder": holder,
            "pid": os.getpid(),
            "until": time.monotonic() + self._seconds,
            "seconds": self._seconds,
            "fence": self.fence,
        }
        replace_file(self._path, json.dumps(lease).encode())

    def _free(self, lease: Mapping[str, Any]) -> bool:
        holder, pid, until = lease.get("holder"), lease.get("pid"), lease.get("until")
        if not isinstance(holder, str) or not isinstance(pid, int):
            return True
        if not isinstance(until, int | float) or not math.isfinite(until):
            return True  # damaged
        now = time.monotonic()
        if now >= until:
            return True  # held up past its lease: taken over
        seconds = lease.get("seconds")
        if not isinstance(seconds, int | float) or not math.isfinite(seconds):
            seconds = max(self._seconds, LEASE_SECONDS)
        if until - now > seconds:
            # Never written on this clock (it is renewed to now + seconds at most): a previous
            # boot's (the monotonic clock starts again; its pid may be a new process's now).
            return True
        return pid != os.getpid() and not _alive(pid)  # a killed holder's: free at once

    def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        left = timeout
        while True:
            with _flocked(self._guard, exclusive=True, timeout=left):
                lease = self._read()
                if self._free(lease):
                    fence = lease.get("fence")
                    self.fence = (fence if isinstance(fence, int) else 0) + 1
                    self._put(self._holder)
                    return
            if time.monotonic() >= deadline:
                raise LockBusy(f"the shared key epochs stayed locked for {timeout:g} s")
            left = max(0.0, deadline - time.monotonic())
            time.sleep(LOCK_POLL)

    def held(self) -> bool:
        """Whether the lease is still this holder's (the guard is not taken: a hint)."""
        return self._read().get("holder") == self._holder

    @contextlib.contextmanager
    def fenced(self) -> Iterator[None]:
        """Run the block (a file write) only while the lease is this holder's, and renew it."""
        with _flocked(self._guard, exclusive=True):
            if self._read().get("holder") != self._holder:
                raise LeaseLost(f"the shared key epochs were taken over (fence {self.fence})")
            self._put(self._holder)
            yield

    def release(self) -> None:
        with _flocked(self._guard, exclusive=True):
            if self._read().get("holder") == self._holder:
                self._put(None)


def _trusted(directory: Path) -> None:
    """Make ``directory`` (0700) or check it: whoever can write it decides which keys are
    served and which destroyed (the state), and can hold the locks, so it must be this user's
    own, writable by nobody else, and not a symbolic link."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise KeyBackendError(f"{directory} is not a directory (a symbolic link?)")
    if st.st_uid != os.geteuid():
        raise KeyBackendError(f"{directory} is owned by another user")
    if st.st_mode & 0o022:
        raise KeyBackendError(
            f"{directory} has mode {stat.S_IMODE(st.st_mode):04o}: others could rewrite the "
            "shared key epochs (chmod 700)"
        )


@contextlib.contextmanager
def host_lock(directory: Path, *, lease_seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """The lock every change to the shared epochs holds (a lease: :class:`_Lease`): a worker
    opening the backend takes it too, since a token being written by another process may
    refuse to be listed meanwhile."""
    _trusted(directory)
    lease = _Lease(directory, lease_seconds)
    lease.acquire(LOCK_TIMEOUT)
    try:
        yield
    finally:
        lease.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and not ours to judge
    return True


class SharedEpochKeys(EpochKeys):
    """The epochs of every gateway process on this host (module docstring). Thread-safe."""

    def __init__(
        self,
        vault: SharedVault,
        directory: Path,
        *,
        replica: str,
        epoch_seconds: float,
        grace_seconds: float,
        base: KeyBackend | None = None,
        close_base: bool = True,
        clock: Callable[[], float] = time.time,
        lock_timeout: float = LOCK_TIMEOUT,
        lease_seconds: float = LEASE_SECONDS,
        load_inline: bool = True,
    ) -> None:
        if not isinstance(vault, SharedVault):
            raise TypeError(f"{vault.backend} epoch keys cannot be shared between processes")
        self._shared_vault = vault
        self._dir = directory
        self._state_path = directory / STATE_FILE
        self._state_name = str(self._state_path)
        self._pending_path = directory / PENDING_FILE
        self._lock_timeout = lock_timeout
        self._lease_seconds = lease_seconds
        self._lease: _Lease | None = None  # this process's hold, during a pass
        self._unwritten: list[EpochKey] = []  # made in this pass, not yet in the state
        self._pid = os.getpid()
        # A member is its pid (alive or not) and a token (two members may share a process).
        self._member = [self._pid, secrets.token_hex(4)]
        # Who is a member is decided by a shared flock each holds for its life, not by its pid:
        # a lock dies with its process (a pid may be reused by another, or be another pid
        # namespace's, and look alive or dead wrongly). The pids in the state are information.
        self._membership: int | None = None
        # This member's own lock (its member file), held for its life: whether the teller of an
        # epoch is still there is decided by it (the members lock says only whether anyone is).
        self._member_fd: int | None = None
        self._untold: list[str] = []  # epochs this member took the telling of from a gone one
        self.collected = 0  # keys of a rotation cut short by a crash, destroyed at this start
        self._pass = threading.Lock()  # one shared pass at a time in this process
        self._busy_until = 0.0  # the request path does not wait for the lock until then
        self._seen: tuple[int, int, int] | None = None  # the state file this view was read from
        # The state file the pass under way read or wrote (what its view will be adopted from):
        # not the file there once it is adopted, which another process (having taken the
        # lease over from a slow pass) may have written since.
        self._state_marker: tuple[int, int, int] | None = None
        # load_inline=False (an event loop's process): the request path never opens a key; a
        # background pass does (catch_up), and this view is served until it has.
        self._load_inline = load_inline
        self._loader: ThreadPoolExecutor | None = None  # made on first use: after a fork
        self._loading: Future[bool] | None = None
        self._loading_lock = threading.Lock()
        self._closing = False
        # epoch id -> the handle this process holds, and the epoch's evidence
        self._mine: dict[str, tuple[EpochKey, Mapping[str, Any]]] = {}
        # The epochs this process made and destroyed: what happens once per host is told
        # (logged, a key-epoch entry) once, by the process that did it.
        self._made: set[str] = set()
        self._destroyed: set[str] = set()
        super().__init__(
            vault,
            replica=replica,
            epoch_seconds=epoch_seconds,
            grace_seconds=grace_seconds,
            base=base,
            close_base=close_base,
            clock=clock,
        )

    # --- the shared state ------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        try:
            fd = os.open(self._state_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            self._state_marker = None
            return {"version": VERSION, "number": 0, "members": [], "epochs": []}
        except OSError as exc:  # a symbolic link: ELOOP
            raise KeyBackendError(f"{self._state_path} is unreadable: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise KeyBackendError(f"{self._state_path} is not this user's own file")
                self._state_marker = (st.st_ino, st.st_mtime_ns, st.st_size)
                raw = fh.read(MAX_STATE_BYTES + 1)
            if len(raw) > MAX_STATE_BYTES:
                raise KeyBackendError(f"{self._state_path} is too large")
            data = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise KeyBackendError(f"{self._state_path} is unreadable: {exc}") from None
        if (
            not isinstance(data, dict)
            or data.get("version") != VERSION
            or not isinstance(data.get("epochs"), list)
            or not isinstance(data.get("members"), list)
            or not isinstance(data.get("number"), int)
        ):
            raise KeyBackendError(f"{self._state_path} is not a shared key epoch state")
        for entry in data["epochs"]:
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("id"), str)
                or not isinstance(entry.get("number"), int)
                or not all(isinstance(entry.get(k), str) for k in ("sealing_key", "receipt_key"))
                or not all(isinstance(entry.get(k), int | float) for k in ("created", "not_after"))
                or not isinstance(entry.get("reference"), dict)
                or not isinstance(entry.get("teller", ""), str)
            ):
                raise KeyBackendError(f"{self._state_path} lists an epoch it cannot describe")
        return data

    def _fenced(self) -> contextlib.AbstractContextManager[None]:
        assert self._lease is not None, "written outside the lock"
        return self._lease.fenced()

    def _write(self, state: Mapping[str, Any]) -> None:
        with self._fenced():  # never after another process took the lock over
            replace_file(self._state_path, json.dumps(state).encode())
            self._state_marker = self._marker()  # nobody else writes it meanwhile
        self._unwritten.clear()

    def _marker(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._state_name)  # per request: a plain stat, no Path overhead
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _locked(self, *, timeout: float | None = None) -> Iterator[None]:
        """The state lock (the host's lease), waited for at most ``timeout`` (default: the
        lock timeout), then LockBusy. The lease first: this process's pass lock is only ever
        held with it, so a thread waiting for another process never holds up this process's
        requests. A pass that fails (LeaseLost: taken over) destroys the keys it made and
        never wrote, which nobody else knows of."""
        if timeout is None:
            _trusted(self._dir)  # an lstat; the request path only re-reads
            timeout = self._lock_timeout
        deadline = time.monotonic() + timeout
        lease = _Lease(self._dir, self._lease_seconds)
        lease.acquire(timeout)
        try:
            if not self._pass.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise LockBusy("this process's shared key epoch pass is under way")
            try:
                self._lease = lease
                yield
            except BaseException:
                self._drop_unwritten()
                raise
            finally:
                self._lease = None
                self._pass.release()
        finally:
            lease.release()

    def _drop_unwritten(self) -> None:
        keys, self._unwritten = self._unwritten, []
        for key in keys:
            for key_id, (mine, _) in list(self._mine.items()):
                if mine is key:
                    del self._mine[key_id]
                    self._made.discard(key_id)
            with contextlib.suppress(KeyBackendError):
                key.destroy()  # (a taker may have destroyed it already, by its pending name)

    # --- membership (under the exclusive state lock: nobody joins or leaves meanwhile) -----

    def _join(self) -> bool:
        """Hold the members lock, shared, for this member's life; whether no other holds it."""
        fd = os.open(
            self._dir / MEMBERS_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                alone = False
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self._membership = fd
        path = self._dir / f"{MEMBER_PREFIX}{self._member[1]}"
        own = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        self._member_fd = own
        if alone:  # what members of a previous run left (killed: their files stay)
            for stale in self._dir.glob(f"{MEMBER_PREFIX}*"):
                self._gone(stale.name.removeprefix(MEMBER_PREFIX))
            for mark in self._dir.glob(f"{TOLD_PREFIX}*"):
                mark.unlink(missing_ok=True)  # its epoch is swept
        return alone

    def _gone(self, token: object) -> bool:
        """Whether the member ``token`` names no longer holds its member file (it stopped or
        was killed: the lock died with it; never decided by a pid). Its file goes then."""
        if token == self._member[1]:
            return False
        if not isinstance(token, str) or len(token) != 8 or token.strip(string.hexdigits):
            return True  # not a token this code writes: nobody holds it
        path = self._dir / f"{MEMBER_PREFIX}{token}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        except OSError as exc:
            raise KeyBackendError(f"{path} is unreadable: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink(missing_ok=True)  # tokens are never reused: nobody locks it again
            return True
        finally:
            os.close(fd)

    def _last(self) -> bool:
        """Whether this is the only live member (no other process holds the members lock)."""
        if self._membership is None:
            return False
        try:
            fcntl.flock(self._membership, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _leave(self) -> None:
        own, self._member_fd = self._member_fd, None
        if own is not None:
            with contextlib.suppress(FileNotFoundError):
                (self._dir / f"{MEMBER_PREFIX}{self._member[1]}").unlink()
            os.close(own)  # a member that left tells nothing more: another takes it over
        fd, self._membership = self._membership, None
        if fd is not None:
            os.close(fd)  # releases the members lock

    # --- changes (under the exclusive lock) ------------------------------------------------

    def _create(self, state: dict[str, Any]) -> None:
        """A new current epoch in the backend, written into ``state``; the current one becomes
        previous (served for the grace period), an older previous one is destroyed at once."""
        now = self._clock()
        number = int(state["number"]) + 1
        # Whatever a crashed holder made and never wrote goes first (it holds TPM handles).
        self._collect(state)
        # The key's name is written before the key is made: if this process dies before the
        # state lists the key, the next holder finds the name and destroys what it names.
        name = f"{number}-{secrets.token_hex(4)}"
        self._write_pending([name])
        key = self._shared_vault.create(name)
        self._unwritten.append(key)
        try:
            key_id = key_id_for(key.public_key, self._replica)
            evidence = self._shared_vault.evidence(key)
            reference = self._shared_vault.reference(key, evidence)
        except BaseException:
            self._unwritten.remove(key)
            key.destroy()
            raise
        entries = list(state["epochs"])
        for older in entries[1:]:
            self._destroy(older)
        if entries:
            entries[0]["not_after"] = now + self._grace
        state["epochs"] = [
            {
                "id": key_id,
                "number": number,
                "sealing_key": key.public_key.hex(),
                "receipt_key": key.receipt_public_key.hex(),
                "created": now,
                "not_after": now + self._epoch_seconds + self._grace,
                "reference": reference,
                "teller": self._member[1],  # who appends its key-epoch entry
            },
            *entries[:1],
        ]
        state["number"] = number
        self._mine[key_id] = (key, evidence)
        self._made.add(key_id)

    def _collect(self, state: dict[str, Any]) -> int:
        """Destroy a crashed rotation's unlisted key (under the exclusive lock)."""
        pending = self._read_pending()
        if not pending:
            return 0
        collected = self._shared_vault.collect(pending, [e["reference"] for e in state["epochs"]])
        self._write_pending([])
        return collected

    # The names of keys being made, beside the state (not in it: writing the state would have
    # every worker re-read it, waiting for the rotation under way).

    def _read_pending(self) -> list[str]:
        try:
            fd = os.open(self._pending_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KeyBackendError(f"{self._pending_path} is unreadable: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_STATE_BYTES + 1)
        try:
            names = json.loads(raw)
        except ValueError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise KeyBackendError(f"{self._pending_path} is not a list of key names")
        return names

    def _write_pending(self, names: list[str]) -> None:
        with self._fenced():
            replace_file(self._pending_path, json.dumps(names).encode())

    def _destroy(self, entry: Mapping[str, Any]) -> None:
        # Decided on the state read under this lease: not once another process took it over
        # (checked first: a handle this view still serves is kept then).
        assert self._lease is not None
        if not self._lease.held():
            raise LeaseLost("the shared key epochs were taken over before a destruction")
        mine = self._mine.pop(str(entry["id"]), None)
        if mine is not None:
            self._shared_vault.release(mine[0])  # our handle first: the key is going away
        self._shared_vault.destroy_reference(entry["reference"])
        self._forget_told(entry)
        self._destroyed.add(str(entry["id"]))

    def _due(self, state: Mapping[str, Any]) -> bool:
        epochs = state["epochs"]
        return not epochs or self._clock() >= float(epochs[0]["created"]) + self._epoch_seconds

    def _expire(self, state: dict[str, Any]) -> bool:
        now = self._clock()
        entries = list(state["epochs"])
        gone = [e for e in entries[1:] if now > float(e["not_after"])]
        for entry in gone:
            self._destroy(entry)
        state["epochs"] = [e for e in entries if e not in gone]
        return bool(gone)

    def _members(self, state: Mapping[str, Any]) -> list[list[Any]]:
        """The other members whose process is alive (what the state shows, not who decides:
        see ``_join``)."""
        return [
            m
            for m in state["members"]
            if isinstance(m, list)
            and len(m) == 2
            and isinstance(m[0], int)
            and m != self._member
            and _alive(m[0])
        ]

    def _take_telling(self, state: dict[str, Any]) -> list[str]:
        """Become the teller of the current epoch if it is untold and its teller is gone (killed
        between writing the state and appending its entry): clients seal only to a key the log
        announces. Only the current epoch: the one clients are given; a previous one is
        leaving. The teller is taken in the state (fenced), so two live members never both
        tell (one killed after appending, before its mark: a second entry for the same keys)."""
        if not state["epochs"]:
            return []
        current = state["epochs"][0]
        if "teller" not in current or self._told_path(current).exists():
            return []
        if not self._gone(current["teller"]):
            return []
        current["teller"] = self._member[1]
        return [str(current["id"])]

    def take_untold(self) -> list[Epoch]:
        """The epochs whose telling this member took over from a gone teller since the last
        call (``advance``): the caller appends their entry, then calls :meth:`told`."""
        taken, self._untold = self._untold, []
        with self._lock:
            return [e for e in self._live if e.id in taken]

    def told(self, epoch: Epoch) -> None:
        """The epoch's key-epoch entry is appended: no member tells it again. Called by its
        maker, or by a member that took the telling over. A mark decides nothing about keys,
        so it needs no lease: it is made even while another holder is frozen with it."""
        path = self._told_path({"sealing_key": epoch.sealing_key.hex()})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def _told_path(self, entry: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(str(entry["sealing_key"]).encode()).hexdigest()[:32]
        return self._dir / f"{TOLD_PREFIX}{digest}"

    def _forget_told(self, entry: Mapping[str, Any]) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._told_path(entry).unlink()

    def made_here(self, epoch_id: str) -> bool:
        """Whether this process made the epoch (the others adopted it): the one that tells."""
        return epoch_id in self._made

    def destroyed_here(self, epoch_id: str) -> bool:
        """Whether this process destroyed the epoch's keys (the others dropped their handle)."""
        return epoch_id in self._destroyed

    # --- this process's view ---------------------------------------------------------------

    def _adopt(self, state: Mapping[str, Any]) -> list[Epoch]:
        """Make this process's live epochs the state's: drop (without destroying) those no
        longer listed, then load the keys it lacks. Returns the epochs dropped."""
        listed = {str(entry["id"]) for entry in state["epochs"]}
        with self._lock:
            if self._closed:
                raise KeyBackendError("the epoch keys are closed")
            gone = [e for e in self._live if e.id not in listed]
            self._live = [e for e in self._live if e.id in listed]
            known = {e.id: e for e in self._live}
        # Handles first: a TPM handle freed by a destroyed epoch may hold the next one's key.
        for epoch in gone:
            self._retire(epoch)
        live: list[Epoch] = []
        for entry in state["epochs"]:
            epoch = known.get(entry["id"])
            if epoch is None:
                epoch = self._epoch_of(entry)
            epoch.not_after = float(entry["not_after"])
            live.append(epoch)
        with self._lock:
            self._live = live
            if live:
                self._number = live[0].number
        self._seen = self._state_marker
        return gone

    def _epoch_of(self, entry: Mapping[str, Any]) -> Epoch:
        mine = self._mine.get(entry["id"])
        if mine is None:
            key, evidence = self._shared_vault.load(entry["reference"])
            if key.public_key.hex() != entry["sealing_key"] or (
                key.receipt_public_key.hex() != entry["receipt_key"]
            ):
                self._shared_vault.release(key)
                raise KeyBackendError("a shared epoch's reference names other keys")
            self._mine[entry["id"]] = (key, evidence)
        else:
            key, evidence = mine
        return Epoch(
            id=str(entry["id"]),
            number=int(entry["number"]),
            sealing_key=bytes.fromhex(entry["sealing_key"]),
            receipt_key=bytes.fromhex(entry["receipt_key"]),
            created=float(entry["created"]),
            not_after=float(entry["not_after"]),
            key=key,
            evidence=evidence,
        )

    def _retire(self, epoch: Epoch) -> None:
        # Locally only: the backend's key is destroyed once, by whoever expires it.
        key, epoch.key = epoch.key, None
        epoch.retired = True
        with self._lock:
            self._history.append(epoch)
        if key is not None:
            self._mine.pop(epoch.id, None)
            self._shared_vault.release(key)

    def refresh(self, *, wait: bool = True) -> bool:
        """Re-read the state if another process changed it; whether it was re-read.
        ``wait=False`` (the request path, on an event loop): wait for the lock at most
        REQUEST_WAIT (a rotation under way ends well within it), and after a wait in vain
        (a holder frozen) only try without waiting for REQUEST_BACKOFF: meanwhile this view is
        served, rather than every request of the worker stalled up to the lock timeout."""
        if self._marker() == self._seen:
            return False
        if not wait and not self._load_inline:
            self.catch_up()  # opened off this thread; this view is served meanwhile
            return False
        timeout = None
        if not wait:
            timeout = REQUEST_WAIT if time.monotonic() >= self._busy_until else 0.0
        try:
            with self._locked(timeout=timeout):
                state = self._read()
                self._adopt(state)
        except LockBusy:
            if wait:
                raise
            if timeout:
                self._busy_until = time.monotonic() + REQUEST_BACKOFF
            return False
        return True

    def catch_up(self) -> Future[bool] | None:
        """The request path's catch-up when keys are not loaded inline: None when this view is
        the state's (a ``stat``) or requests should not wait (a holder frozen with the lock, a
        pass that failed: for REQUEST_BACKOFF no new pass is started either), else the
        background pass that reads the state and opens the keys of new epochs (one at a time;
        started if none runs). The view changes only once that pass has opened every key it
        lists, so what is attested is always what this process can open."""
        if self._marker() == self._seen:
            return None
        with self._loading_lock:
            if self._loading is None or self._loading.done():
                if self._closing or time.monotonic() < self._busy_until:
                    return None  # backing off: the rotation loop's pass catches up meanwhile
                if self._loader is None:
                    self._loader = ThreadPoolExecutor(1, thread_name_prefix="epoch-load")
                self._loading = self._loader.submit(self._load_pass)
            loading = self._loading
        return None if time.monotonic() < self._busy_until else loading

    def back_off(self) -> None:
        """A request waited for the background pass in vain: the next ones do not wait for
        REQUEST_BACKOFF (they are served from this view meanwhile)."""
        self._busy_until = time.monotonic() + REQUEST_BACKOFF

    def _load_pass(self) -> bool:
        try:
            caught = self.refresh(wait=True)
            self._busy_until = 0.0  # the backend answered: requests may wait for it again
            return caught
        except KeyBackendError:
            # A holder frozen with the lock, or keys the backend would not open: not tried
            # again by every request (each a token login or TPM read, and a hold of the lease).
            self.back_off()
            raise

    # --- EpochKeys -------------------------------------------------------------------------

    def _begin(self) -> None:
        with self._locked():
            state = self._read()
            try:
                if self._join():
                    # Nobody serves: whatever is listed (or left unlisted) is a previous run's.
                    self.swept = self._shared_vault.sweep()
                    state = {"version": VERSION, "number": state["number"], "epochs": []}
                    state["members"] = [self._member]
                else:
                    # Joining live members (a restarted worker): a rotation its predecessor
                    # was killed in the middle of left a key nobody lists.
                    self.collected = self._collect(state)
                    state["members"] = [*self._members(state), self._member]
                if self._due(state):
                    self._create(state)
                else:
                    self._expire(state)
                self._write(state)
                self._adopt(state)
            except BaseException:
                self._leave()
                raise

    def advance(self, request: Path | None = None) -> tuple[Epoch | None, list[Epoch]]:
        """One pass for every process: rotate when the current epoch is over or ``request``
        (the rotation request file) exists, destroy previous epochs past their grace, adopt.
        Returns (the new current epoch if it changed, the epochs dropped)."""
        with self._locked():
            state = self._read()
            asked = request is not None and request.exists()
            changed = False
            if asked or self._due(state):
                self._create(state)
                changed = True
            if asked:
                assert request is not None
                with self._fenced(), contextlib.suppress(FileNotFoundError):
                    request.unlink()  # inside the lock: one request, one rotation
            changed = self._expire(state) or changed
            members = self._members(state)
            if [*members, self._member] != state["members"]:
                state["members"] = [*members, self._member]  # a killed worker's entry goes
                changed = True
            taken = self._take_telling(state)
            if taken:
                changed = True
            if changed:
                self._write(state)
            self._untold += taken  # once written: this member is the teller now
            with self._lock:
                before = self._live[0].id if self._live else None
            gone = self._adopt(state)
        current = self.current
        return (current if current.id != before else None), gone

    def rotate(self) -> Epoch:
        with self._locked():
            state = self._read()
            self._create(state)
            self._write(state)
            self._adopt(state)
        epoch = self.current
        for listener in self._listeners:
            listener(epoch)
        return epoch

    def expire(self) -> list[Epoch]:
        with self._locked():
            state = self._read()
            if self._expire(state):
                self._write(state)
            return self._adopt(state)

    # The request path (an event loop) waits for the lock briefly at most: refresh(wait=False).

    @property
    def current(self) -> Epoch:
        self.refresh(wait=False)  # a stat when nothing changed: what is attested is served
        return super().current

    def live(self) -> list[Epoch]:
        self.refresh(wait=False)
        return super().live()

    def lookup(self, key_id: str) -> Epoch:
        try:
            return super().lookup(key_id)
        except EpochRetired:
            if not self.refresh(wait=False):  # a rotation another worker made since this view
                raise
        return super().lookup(key_id)

    def unkeyed(self) -> list[Epoch]:
        self.refresh(wait=False)
        return super().unkeyed()

    def close(self) -> None:
        """Leave the group; the last member destroys every epoch. Idempotent."""
        with self._lock:
            if self._closed:
                return
        with self._loading_lock:
            self._closing = True
            loader, self._loader = self._loader, None
        if loader is not None:
            loader.shutdown(wait=True, cancel_futures=True)  # no pass opens a key after this
        try:
            with self._locked():
                state = self._read()
                last = self._last()
                members = [] if last else self._members(state)
                with self._lock:
                    self._closed = True
                    live, self._live = self._live, []
                for epoch in live:
                    self._retire(epoch)
                for key, _ in self._mine.values():
                    self._shared_vault.release(key)
                self._mine.clear()
                if last:
                    self._collect(state)  # a crashed rotation's key too
                    for entry in state["epochs"]:
                        self._shared_vault.destroy_reference(entry["reference"])
                        self._forget_told(entry)
                    state["epochs"] = []
                state["members"] = members
                self._write(state)
        finally:
            self._leave()
            if self._base is not None and self._close_base:
                self._base.close()

    def __repr__(self) -> str:
        return f"SharedEpochKeys(backend={self._vault.backend}, replica={self._replica!r})"
