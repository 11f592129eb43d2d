"""Key epochs shared by several members (the workers of one host) in a real SoftHSM2 token and
a real TPM (swtpm): every member serves the same epochs, a rotation made by one is served by
all at once, a retired epoch is destroyed once and refused everywhere, and the token or TPM
holds no epoch key once the last member has stopped."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from paygate_dev.stack import SoftHsmToken, Swtpm

import enclave
from enclave import KeyBackendError
from enclave.keys.epochs import EpochKeys, EpochRetired, MemoryEpochVault
from enclave.keys.pkcs11 import Pkcs11Key
from enclave.keys.pkcs11_epochs import Pkcs11EpochVault
from enclave.keys.shared_epochs import (
    LEASE_FILE,
    LOCK_FILE,
    STATE_FILE,
    SharedEpochKeys,
    host_lock,
)
from enclave.keys.tpm import TpmKey
from enclave.keys.tpm_epochs import HANDLE_BASE, HANDLE_COUNT, TpmEpochKey, TpmEpochVault
from tests.fixtures.components import require_binary
from tests.fixtures.payment_support import CHAT, CHAT_BODY
from tests.fixtures.slow_tpm import Tabrmd

BODY = json.dumps(CHAT_BODY).encode()
EPOCH, GRACE = 3600.0, 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _open(epochs: EpochKeys, key_id: str, blob: bytes) -> bytes:
    epoch = epochs.lookup(key_id)
    assert epoch.key is not None
    return enclave.open_v2(epoch.key, blob, method="POST", path=CHAT).body


def _sealed(epochs: EpochKeys) -> tuple[str, bytes]:
    current = epochs.current
    blob = enclave.seal_v2(
        current.sealing_key, BODY, method="POST", path=CHAT, key_id=current.id
    ).blob
    return current.id, blob


@pytest.fixture
def token_vault(softhsm_token: SoftHsmToken) -> Iterator[tuple[Pkcs11EpochVault, Pkcs11Key]]:
    token = softhsm_token
    base = Pkcs11Key.generate(token.module_path, token.token_label, token.pin, "paygate")
    vault = Pkcs11EpochVault(token.module_path, token.token_label, token.pin, "paygate")
    try:
        yield vault, base
    finally:
        base.close()


def _members(
    vault: object, base: object, directory: Path, clock: Clock, count: int = 2
) -> list[SharedEpochKeys]:
    return [
        SharedEpochKeys(
            vault,  # type: ignore[arg-type]
            directory,
            replica="host",
            epoch_seconds=EPOCH,
            grace_seconds=GRACE,
            base=base,  # type: ignore[arg-type]
            close_base=False,
            clock=clock,
        )
        for _ in range(count)
    ]


def _shared_life(vault: object, base: object, directory: Path, labels: Callable[[], set]) -> None:
    clock = Clock()
    first, second = _members(vault, base, directory, clock)
    try:
        # One epoch for both: the second member loaded the first's keys, made none.
        assert [e.id for e in first.live()] == [e.id for e in second.live()]
        assert len(labels()) == 1
        assert set(second.current.evidence) == set(first.current.evidence)  # TPM: certified
        old_id, old_blob = _sealed(first)
        assert _open(first, old_id, old_blob) == BODY
        assert _open(second, old_id, old_blob) == BODY  # sealed at one, served by the other
        # The first member rotates; the second serves the new key at once (no poll between).
        new = first.rotate()
        new_id, new_blob = _sealed(first)
        assert new_id == new.id != old_id
        assert _open(second, new_id, new_blob) == BODY
        assert second.current.id == new_id
        assert _open(second, old_id, old_blob) == BODY  # the previous epoch, in its grace
        # Within the grace nothing is destroyed; past it, whoever passes first destroys it once.
        clock.now += GRACE / 2
        assert second.advance() == (None, [])
        assert len(labels()) == 2
        clock.now += GRACE
        new_current, gone = second.advance()
        assert new_current is None
        assert [e.id for e in gone] == [old_id]
        assert len(labels()) == 1
        with pytest.raises(EpochRetired):
            first.lookup(old_id)  # refused by the member that did not destroy it too
        assert [e.id for e in first.live()] == [new_id]  # which re-read the state: dropped
        assert [e.id for e in first.history()] == [old_id]
        assert first.advance() == (None, [])
        # The epoch is over: one rotation between the two, not two.
        clock.now += EPOCH
        made, _ = first.advance()
        adopted, _ = second.advance()
        assert made is not None
        assert adopted is not None
        assert made.id == adopted.id
        assert len(labels()) == 2
        # A member that starts while others serve (a restarted worker) joins their epochs:
        # it sweeps nothing and makes none.
        (late,) = _members(vault, base, directory, clock, count=1)
        try:
            assert late.swept == 0
            assert [e.id for e in late.live()] == [e.id for e in first.live()]
            assert len(labels()) == 2
        finally:
            late.close()
        assert len(labels()) == 2
        # A member that stops while another serves leaves the keys to it.
        first.close()
        assert len(labels()) == 2
        assert _open(second, made.id, _sealed(second)[1]) == BODY
    finally:
        first.close()
        second.close()
    assert labels() == set()  # the last member destroyed every epoch
    assert json.loads((directory / STATE_FILE).read_text())["epochs"] == []


def test_token_epochs_are_shared_by_every_member(
    token_vault: tuple[Pkcs11EpochVault, Pkcs11Key], tmp_path: Path
) -> None:
    vault, base = token_vault

    def labels() -> set[str]:
        return {label.removesuffix("-receipt") for label in vault.labels()}

    _shared_life(vault, base, tmp_path / "epochs", labels)


def test_a_member_killed_without_closing_leaves_its_epochs_to_the_next_start(
    token_vault: tuple[Pkcs11EpochVault, Pkcs11Key], tmp_path: Path
) -> None:
    vault, base = token_vault
    directory = tmp_path / "epochs"
    clock = Clock()
    (gone,) = _members(vault, base, directory, clock, count=1)
    old = gone.current.id
    # As if its process had been killed: its locks die with it, and the state names a pid
    # that no longer runs.
    gone._leave()
    state = json.loads((directory / STATE_FILE).read_text())
    state["members"] = [[2**22 + 7, "dead"]]
    (directory / STATE_FILE).write_text(json.dumps(state))
    (fresh,) = _members(vault, base, directory, clock, count=1)
    try:
        assert fresh.swept == 2  # the dead run's labels: its ECDH pair and its receipt pair
        assert fresh.current.id != old
        assert len({label.removesuffix("-receipt") for label in vault.labels()}) == 1
    finally:
        fresh.close()
        for key, _ in gone._mine.values():
            key.close()  # the dead member's sessions (its keys are already gone)
    assert vault.labels() == set()


def test_memory_epochs_cannot_be_shared(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot be shared"):
        _members(MemoryEpochVault("software"), None, tmp_path, Clock(), count=1)
    assert not (tmp_path / STATE_FILE).exists()


def test_a_state_file_that_names_no_epoch_is_refused_not_served(
    token_vault: tuple[Pkcs11EpochVault, Pkcs11Key], tmp_path: Path
) -> None:
    """A damaged state (or one edited by hand) stops a member with a key backend error; a
    reference to anything but this key's epochs is never opened."""
    vault, base = token_vault
    directory = tmp_path / "epochs"
    clock = Clock()
    (member,) = _members(vault, base, directory, clock, count=1)
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        assert (directory / STATE_FILE).stat().st_mode & 0o777 == 0o600
        assert directory.stat().st_mode & 0o777 == 0o700
        for damage in (
            {"epochs": [{"id": 1}]},
            {"epochs": [{**state["epochs"][0], "id": "x", "reference": {"label": "paygate"}}]},
        ):
            (directory / STATE_FILE).write_text(json.dumps({**state, **damage}))
            with pytest.raises(KeyBackendError):
                member.lookup("0" * 16 + "@host")
    finally:
        (directory / STATE_FILE).write_text(json.dumps(state))
        member.close()
    assert vault.labels() == set()
    assert {p.name for p in directory.iterdir()} == {
        STATE_FILE,
        "shared-epochs.lock",
        "shared-epochs.lease",
        "shared-epochs.members",
        "shared-epochs.pending",
    }


def _labels(vault: Pkcs11EpochVault) -> set[str]:
    return {label.removesuffix("-receipt") for label in vault.labels()}


def test_a_dead_members_pid_reused_by_another_process_does_not_stop_the_sweep(
    token_vault: tuple[Pkcs11EpochVault, Pkcs11Key], tmp_path: Path
) -> None:
    """Membership is a lock held for life, not a pid: a killed member whose pid now belongs
    to another live process (pid reuse) must not keep its epochs from the next start's sweep
    (nor, at the last stop, from being destroyed)."""
    vault, base = token_vault
    directory = tmp_path / "epochs"
    clock = Clock()
    (gone,) = _members(vault, base, directory, clock, count=1)
    gone._leave()  # killed: its locks die with it
    state = json.loads((directory / STATE_FILE).read_text())
    state["members"] = [[os.getppid(), "reused"]]  # its pid, now another live process's
    (directory / STATE_FILE).write_text(json.dumps(state))
    (fresh,) = _members(vault, base, directory, clock, count=1)
    try:
        assert fresh.swept == 2
        assert len(_labels(vault)) == 1
    finally:
        fresh.close()
        for key, _ in gone._mine.values():
            key.close()
    assert vault.labels() == set()  # the only live member was the last: all destroyed


def test_a_live_member_whose_pid_looks_dead_keeps_its_keys(
    token_vault: tuple[Pkcs11EpochVault, Pkcs11Key], tmp_path: Path
) -> None:
    """A member alive but named by a pid this process cannot see (another pid namespace, a
    damaged list) is still a member: a start joins its epochs instead of sweeping them."""
    vault, base = token_vault
    directory = tmp_path / "epochs"
    clock = Clock()
    (serving,) = _members(vault, base, directory, clock, count=1)
    try:
        key_id, blob = _sealed(serving)
        state = json.loads((directory / STATE_FILE).read_text())
        state["members"] = [[2**22 + 7, "elsewhere"]]
        (directory / STATE_FILE).write_text(json.dumps(state))
        (late,) = _members(vault, base, directory, clock, count=1)
        try:
            assert late.swept == 0
            assert late.current.id == key_id
            assert _open(serving, key_id, blob) == BODY
            assert _open(late, key_id, blob) == BODY
        finally:
            late.close()
        assert len(_labels(vault)) == 1  # the first member still serves: nothing destroyed
        assert _open(serving, key_id, blob) == BODY
    finally:
        serving.close()
    assert vault.labels() == set()


class _Killed(BaseException):
    """The holder's process dying right there (nothing after it runs)."""


class _DiesAfterMaking(Pkcs11EpochVault):
    """A vault whose process is killed between making an epoch's key and anything after."""

    def create(self, key_id: str) -> Pkcs11Key:
        # Its session dies with the process; the objects stay on the token.
        super().create(key_id).close()
        raise _Killed


def test_a_key_left_by_a_rotation_cut_short_is_destroyed_while_others_serve(
    token_vault: tuple[Pkcs11EpochVault, Pkcs11Key], softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    """A worker killed between making an epoch's key and writing the state leaves a key no
    state lists; the workers still serving never stop, so the start-up sweep never comes. Its
    restarted successor, or the next rotation, destroys it, and nothing of another host that
    shares the token (the same key label)."""
    vault, base = token_vault
    token = softhsm_token
    dying = _DiesAfterMaking(token.module_path, token.token_label, token.pin, "paygate")
    directory = tmp_path / "epochs"
    clock = Clock()
    (first,) = _members(vault, base, directory, clock, count=1)
    # Another host's live epoch in the same token under the same key label (made after this
    # host's first start, whose sweep destroys every epoch object of the label).
    other_host = vault.create("elsewhere")
    (doomed,) = _members(dying, base, directory, clock, count=1)  # joins: makes nothing
    try:
        kept = {first.current.key.label, other_host.label}  # type: ignore[union-attr]
        watched = (directory / STATE_FILE).stat()
        with pytest.raises(_Killed):
            doomed.rotate()
        # What every worker watches is untouched until a rotation is written: no worker
        # re-reads (and waits for the lock) while a key is being made.
        after = (directory / STATE_FILE).stat()
        assert (after.st_ino, after.st_mtime_ns) == (watched.st_ino, watched.st_mtime_ns)
        doomed._leave()  # killed: its locks die with it
        assert len(_labels(vault)) == 3
        (restarted,) = _members(vault, base, directory, clock, count=1)
        try:
            assert restarted.collected == 2  # the orphan's ECDH and receipt objects
            assert _labels(vault) == kept
            assert restarted.current.id == first.current.id
            clock.now += EPOCH
            with pytest.raises(_Killed):
                doomed.advance()  # the same, in a scheduled rotation
            assert len(_labels(vault)) == 3
            made, _ = restarted.advance()
            assert made is not None
            # The new epoch, its predecessor (in its grace), the other host's; no orphan.
            assert _labels(vault) == kept | {made.key.label}  # type: ignore[union-attr]
            with pytest.raises(_Killed):
                doomed.rotate()  # once more, and then every worker stops
        finally:
            restarted.close()
    finally:
        first.close()
        for key, _ in doomed._mine.values():
            key.close()  # the killed member's sessions
    assert _labels(vault) == {other_host.label}
    other_host.destroy()


def test_a_request_never_waits_for_the_lock_another_worker_holds(
    token_vault: tuple[Pkcs11EpochVault, Pkcs11Key], tmp_path: Path
) -> None:
    """The request path runs on a worker's event loop: while another process holds the state
    lock (a rotation under way, a holder frozen) a request is answered from this worker's view
    rather than stalling every request of the worker up to the lock timeout and then failing;
    the next request once the lock is free sees the rotation."""
    vault, base = token_vault
    directory = tmp_path / "epochs"
    clock = Clock()
    (first,) = _members(vault, base, directory, clock, count=1)
    second = SharedEpochKeys(
        vault,
        directory,
        replica="host",
        epoch_seconds=EPOCH,
        grace_seconds=GRACE,
        base=base,
        close_base=False,
        clock=clock,
        lock_timeout=2.0,
    )
    try:
        old = second.current.id
        new = first.rotate()
        fd = os.open(directory / LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a holder that does not let go
            assert second.current.id == old  # this worker's view, at once
            assert [e.id for e in second.unkeyed()] == [old]
            with pytest.raises(EpochRetired):
                second.lookup(new.id)  # not yet known here: the caller attests again
        finally:
            os.close(fd)
        assert second.current.id == new.id
        assert second.lookup(new.id).id == new.id
    finally:
        second.close()
        first.close()
    assert vault.labels() == set()


def test_an_epoch_directory_others_can_write_is_refused(
    token_vault: tuple[Pkcs11EpochVault, Pkcs11Key], tmp_path: Path
) -> None:
    """Whoever can write key_epoch_dir decides which keys are served and which destroyed (the
    state), and can hold the locks: a directory others may write, or a state file swapped for
    a symbolic link, is refused before any key is made or opened."""
    vault, base = token_vault
    directory = tmp_path / "epochs"
    directory.mkdir(mode=0o700)
    directory.chmod(0o777)
    with pytest.raises(KeyBackendError, match="chmod 700"):
        _members(vault, base, directory, Clock(), count=1)
    assert vault.labels() == set()
    directory.chmod(0o700)
    (member,) = _members(vault, base, directory, Clock(), count=1)
    try:
        elsewhere = tmp_path / "elsewhere.json"
        elsewhere.write_text((directory / STATE_FILE).read_text())
        (directory / STATE_FILE).unlink()
        (directory / STATE_FILE).symlink_to(elsewhere)
        with pytest.raises(KeyBackendError):
            member.advance()
    finally:
        (directory / STATE_FILE).unlink()
        (directory / STATE_FILE).write_text(elsewhere.read_text())
        (directory / STATE_FILE).chmod(0o600)
        member.close()
    assert vault.labels() == set()


class _TpmDiesAfterMaking(TpmEpochVault):
    """A TPM vault whose process is killed between making an epoch's keys and anything after."""

    def create(self, key_id: str) -> TpmEpochKey:
        made = super().create(key_id)
        self.release(made)  # its ESYS handles die with it; the persistent objects stay
        raise _Killed


def test_tpm_handles_left_by_a_rotation_cut_short_are_evicted_while_others_serve(
    swtpm_factory: Callable[[], Swtpm], tmp_path: Path
) -> None:
    """The same in the TPM, where an unlisted epoch also holds two of the few persistent
    handles: repeated crashes would exhaust them ("no free persistent handle")."""
    tpm = swtpm_factory()
    with TpmKey.generate(tpm.tcti, tmp_path / "tpm-key") as base:
        vault = TpmEpochVault(base)

        def held() -> set[int]:
            return {h for h in range(HANDLE_BASE, HANDLE_BASE + HANDLE_COUNT) if vault.present(h)}

        directory = tmp_path / "epochs"
        clock = Clock()
        (first,) = _members(vault, base, directory, clock, count=1)
        (doomed,) = _members(_TpmDiesAfterMaking(base), base, directory, clock, count=1)
        try:
            serving = set(first.current.key.handles.values())  # type: ignore[union-attr]
            with pytest.raises(_Killed):
                doomed.rotate()
            doomed._leave()
            assert len(held()) == 4
            (restarted,) = _members(vault, base, directory, clock, count=1)
            try:
                assert restarted.collected == 2
                assert held() == serving
                key_id, blob = _sealed(first)
                assert _open(restarted, key_id, blob) == BODY
            finally:
                restarted.close()
        finally:
            first.close()
            for key, _ in doomed._mine.values():
                vault.release(key)
        assert held() == set()


FROZEN_MEMBER = """
import os, signal, sys
from pathlib import Path
from enclave.keys.pkcs11_epochs import Pkcs11EpochVault
from enclave.keys.shared_epochs import LeaseLost, SharedEpochKeys

class FreezesAfterMaking(Pkcs11EpochVault):
    freeze = False

    def create(self, key_id):
        key = super().create(key_id)
        if self.freeze:  # frozen mid-rotation, holding the lock: the key made, nothing written
            os.kill(os.getpid(), signal.SIGSTOP)
        return key

module, token, pin, directory = sys.argv[1:]
vault = FreezesAfterMaking(module, token, pin, "paygate")
member = SharedEpochKeys(vault, Path(directory), replica="host", epoch_seconds=3600.0,
                         grace_seconds=60.0, lease_seconds=1.0)
vault.freeze = True
try:
    member.rotate()
    print("rotated", flush=True)
except LeaseLost:
    print("fenced", flush=True)
vault.freeze = False
member.close()
"""


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_worker_frozen_while_holding_the_lock_does_not_stop_the_others_rotations(
    token_vault: tuple[Pkcs11EpochVault, Pkcs11Key], softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    """A worker frozen in the middle of a rotation (SIGSTOP, a paused VM) with the lock: the
    others take the lock over once its lease has passed and rotate; when it wakes, nothing it
    decided before is written (its state would undo their rotation) and the key it made is
    destroyed, so the token holds exactly the live epochs."""
    vault, base = token_vault
    token = softhsm_token
    directory = tmp_path / "epochs"
    first = SharedEpochKeys(  # the wall clock, as the other process's: no epoch is over
        vault,
        directory,
        replica="host",
        epoch_seconds=EPOCH,
        grace_seconds=GRACE,
        base=base,
        close_base=False,
        lock_timeout=20.0,
    )
    root = Path(__file__).resolve().parents[4]
    frozen = subprocess.Popen(
        [sys.executable, "-c", FROZEN_MEMBER,
         token.module_path, token.token_label, token.pin, str(directory)],
        env={**os.environ, **token.env(), "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _stopped(frozen.pid):
            assert frozen.poll() is None, frozen.communicate()
            assert time.monotonic() < deadline, "the member never froze"
            time.sleep(0.05)
        old = first.current
        new = first.rotate()  # waits for the frozen holder's lease, not for the holder
        assert [e.id for e in first.live()] == [new.id, old.id]
        os.kill(frozen.pid, signal.SIGCONT)
        out, err = frozen.communicate(timeout=60)
        assert frozen.returncode == 0, err
        assert out.decode().split() == ["fenced"]
        # Its late write was refused: the state and the token are the others' rotation.
        state = json.loads((directory / STATE_FILE).read_text())
        assert [e["id"] for e in state["epochs"]] == [new.id, old.id]
        assert _labels(vault) == {new.key.label, old.key.label}  # type: ignore[union-attr]
        assert first.lookup(new.id).id == new.id
    finally:
        if frozen.poll() is None:
            os.kill(frozen.pid, signal.SIGCONT)
            frozen.kill()
            frozen.communicate(timeout=30)
        first.close()
    assert vault.labels() == set()


FROZEN_TPM_MEMBER = """
import os, signal, sys
from pathlib import Path
from enclave.keys.tpm import TpmKey
from enclave.keys.tpm_epochs import TpmEpochVault
from enclave.keys.shared_epochs import LeaseLost, SharedEpochKeys

class FreezesAfterMaking(TpmEpochVault):
    freeze = False

    def create(self, key_id):
        key = super().create(key_id)
        if self.freeze:  # frozen mid-rotation, holding the lock: the keys persistent, unlisted
            os.kill(os.getpid(), signal.SIGSTOP)
        return key

tcti, key_dir, directory = sys.argv[1:]
base = TpmKey.open(tcti, Path(key_dir))
vault = FreezesAfterMaking(base)
member = SharedEpochKeys(vault, Path(directory), replica="host", epoch_seconds=3600.0,
                         grace_seconds=60.0, base=base, lease_seconds=1.0)
vault.freeze = True
try:
    member.rotate()
    print("rotated", flush=True)
except LeaseLost:
    print("fenced", flush=True)
vault.freeze = False
member.close()
"""


def test_a_tpm_worker_taken_over_never_evicts_the_key_its_taker_made_at_the_same_handle(
    swtpm_factory: Callable[[], Swtpm], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker frozen between making an epoch's persistent keys and writing them: the one that
    takes the lock over evicts them (they are listed, unwritten) and makes the new epoch at the
    lowest free handles, the very ones just freed. When the frozen one wakes, its write is
    refused and it destroys what it made; it must not evict what its handles now hold (the
    live epoch's keys, which every worker would then fail to open until the next rotation)."""
    dbus = require_binary("dbus-daemon", "dbus")
    abrmd = require_binary("tpm2-abrmd", "tpm2-abrmd")
    tpm = swtpm_factory()
    key_dir = tmp_path / "tpm-key"
    with TpmKey.generate(tpm.tcti, key_dir):
        pass  # swtpm serves one connection at a time: this one closes before the broker's
    broker = Tabrmd(tpm.tcti, tmp_path / "tabrmd", dbus=dbus, abrmd=abrmd).start()
    try:
        for name, value in broker.env.items():
            monkeypatch.setenv(name, value)
        directory = tmp_path / "epochs"
        with TpmKey.open(broker.client_tcti, key_dir) as base:
            vault = TpmEpochVault(base)
            first = SharedEpochKeys(  # the wall clock, as the other process's
                vault,
                directory,
                replica="host",
                epoch_seconds=EPOCH,
                grace_seconds=GRACE,
                base=base,
                close_base=False,
                lock_timeout=20.0,
            )
            root = Path(__file__).resolve().parents[4]
            frozen = subprocess.Popen(
                [sys.executable, "-c", FROZEN_TPM_MEMBER,
                 broker.client_tcti, str(key_dir), str(directory)],
                env={**os.environ, **broker.env, "PYTHONPATH": str(root)},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 60
                while not _stopped(frozen.pid):
                    assert frozen.poll() is None, frozen.communicate()
                    assert time.monotonic() < deadline, "the member never froze"
                    time.sleep(0.05)
                old = first.current
                new = first.rotate()  # after the frozen holder's lease: its keys evicted
                os.kill(frozen.pid, signal.SIGCONT)
                out, err = frozen.communicate(timeout=60)
                assert frozen.returncode == 0, err
                assert out.decode().split() == ["fenced"]
                assert [e.id for e in first.live()] == [new.id, old.id]
                handles = [*new.key.handles.values(), *old.key.handles.values()]  # type: ignore[union-attr]
                assert all(vault.present(h) for h in handles)
                key_id, blob = _sealed(first)
                assert key_id == new.id
                assert _open(first, key_id, blob) == BODY  # the live epoch's key still there
            finally:
                if frozen.poll() is None:
                    os.kill(frozen.pid, signal.SIGCONT)
                    frozen.kill()
                    frozen.communicate(timeout=30)
                first.close()
            assert not any(vault.present(h) for h in range(HANDLE_BASE, HANDLE_BASE + HANDLE_COUNT))
    finally:
        broker.stop()


def test_tpm_handles_freed_and_reused_are_evicted_again_rotation_after_rotation(
    swtpm_factory: Callable[[], Swtpm], tmp_path: Path
) -> None:
    """An epoch's persistent handles, once its keys are destroyed, are the lowest free ones:
    the epoch after next is made at them. Its keys must be destroyed in turn (and opened by a
    worker that destroyed the previous ones there), rotation after rotation: else every other
    rotation would leave two of the TPM's few persistent handles held, until none is free."""
    tpm = swtpm_factory()
    with TpmKey.generate(tpm.tcti, tmp_path / "tpm-key") as base:
        vault = TpmEpochVault(base)

        def held() -> set[int]:
            return {h for h in range(HANDLE_BASE, HANDLE_BASE + HANDLE_COUNT) if vault.present(h)}

        clock = Clock()
        first, second = _members(vault, base, tmp_path / "epochs", clock)
        try:
            for turn in range(6):  # each member destroys an epoch, then opens the next there
                made = (first, second)[turn % 2].rotate()
                key_id, blob = _sealed(first)
                assert key_id == made.id
                assert _open(second, key_id, blob) == BODY
                live = {h for e in first.live() for h in e.key.handles.values()}  # type: ignore[union-attr]
                assert held() == live
        finally:
            first.close()
            second.close()
        assert held() == set()


def test_a_lease_left_by_a_holder_of_a_previous_boot_does_not_wedge_the_start(
    token_vault: tuple[Pkcs11EpochVault, Pkcs11Key], tmp_path: Path
) -> None:
    """The lease's times are the host's monotonic clock, which starts again at every boot. A
    host that lost power while a worker held the lease leaves it naming a time far ahead of
    the new boot's clock, and a pid that a new process (often this very worker: the same pid
    in a container) now has: the gateway must start, not wait for the old boot's uptime."""
    vault, base = token_vault
    directory = tmp_path / "epochs"
    directory.mkdir(mode=0o700)
    for until in (time.monotonic() + 30 * 86400, float("inf"), float("nan")):
        (directory / LEASE_FILE).write_text(
            json.dumps({"holder": "before-reboot", "pid": os.getpid(), "until": until, "fence": 9})
        )
        member = SharedEpochKeys(
            vault,
            directory,
            replica="host",
            epoch_seconds=EPOCH,
            grace_seconds=GRACE,
            base=base,
            close_base=False,
            clock=Clock(),
            lock_timeout=2.0,
        )
        try:
            key_id, blob = _sealed(member)
            assert _open(member, key_id, blob) == BODY
        finally:
            member.close()
        assert vault.labels() == set()


def test_a_view_not_yet_caught_up_never_lists_a_previous_epoch_past_its_grace(
    token_vault: tuple[Pkcs11EpochVault, Pkcs11Key], tmp_path: Path
) -> None:
    """A worker that cannot catch up at once (another holds the host's lease: a rotation under
    way, a holder frozen) serves its view; the previous epoch in it, once past its grace, is
    refused (410) and may already be destroyed by another worker: it is not attested either."""
    vault, base = token_vault
    directory = tmp_path / "epochs"
    clock = Clock()
    (first,) = _members(vault, base, directory, clock, count=1)
    second = SharedEpochKeys(
        vault,
        directory,
        replica="host",
        epoch_seconds=EPOCH,
        grace_seconds=GRACE,
        base=base,
        close_base=False,
        clock=clock,
        load_inline=False,  # as paygate's workers are
    )
    try:
        old = second.current
        new = first.rotate()
        loading = second.catch_up()
        assert loading is not None
        assert loading.result(timeout=30)
        assert [e.id for e in second.live()] == [new.id, old.id]
        clock.now += GRACE + 1
        first.advance()  # destroyed past its grace, by another worker
        assert _labels(vault) == {new.key.label}  # type: ignore[union-attr]
        with host_lock(directory):  # held by another: this view is served as it is
            assert [e.id for e in second.live()] == [new.id]
            assert [e.id for e in second.history()] == [old.id]  # its receipt key: published
            assert [e.id for e in second.unkeyed()] == [new.id]
            with pytest.raises(EpochRetired):
                second.lookup(old.id)
    finally:
        second.close()
        first.close()
    assert vault.labels() == set()
