"""Key epochs shared by several members (the workers of one host) in a real SoftHSM2 token and
a real TPM (swtpm): every member serves the same epochs, a rotation made by one is served by
all at once, a retired epoch is destroyed once and refused everywhere, and the token or TPM
holds no epoch key once the last member has stopped."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from paygate_dev.stack import SoftHsmToken

import enclave
from enclave import KeyBackendError
from enclave.keys.epochs import EpochKeys, EpochRetired, MemoryEpochVault
from enclave.keys.pkcs11 import Pkcs11Key
from enclave.keys.pkcs11_epochs import Pkcs11EpochVault
from enclave.keys.shared_epochs import STATE_FILE, SharedEpochKeys
from tests.fixtures.payment_support import CHAT, CHAT_BODY

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
    # As if its process had been killed: the state names a pid that no longer runs.
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
    assert {p.name for p in directory.iterdir()} == {STATE_FILE, "shared-epochs.lock"}
