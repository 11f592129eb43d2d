"""A worker's catching up with the host's key epochs (`--workers N`), in a real SoftHSM2 token:
opening the keys of an epoch another worker made (a PKCS#11 login and search, a TPM handle
read: slow on a busy or network HSM) never runs on the worker's event loop, and while it is
under way the worker keeps serving its current view, every key of which it can open."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from paygate_dev.stack import SoftHsmToken, Swtpm

import enclave
from enclave import KeyBackendError
from enclave.keys.epochs import EpochKey, EpochKeys, EpochRetired
from enclave.keys.pkcs11 import Pkcs11Key
from enclave.keys.pkcs11_epochs import Pkcs11EpochVault
from enclave.keys.shared_epochs import SharedEpochKeys
from enclave.keys.tpm import TpmKey
from enclave.keys.tpm_epochs import HANDLE_BASE, HANDLE_COUNT, TpmEpochVault
from paygate.server.epochs import caught_up
from tests.fixtures.payment_support import CHAT, CHAT_BODY

BODY = json.dumps(CHAT_BODY).encode()
LOAD_BOUND = 30.0  # the most the held-up load waits to be let go (the test's own bound)


class _SlowToOpen:
    """A backend that takes as long as the test says to open another process's key."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.let_go = threading.Event()
        self.let_go.set()
        self.openers: list[int] = []  # the threads that opened a key

    def load(self, reference: Mapping[str, Any]) -> tuple[EpochKey, Mapping[str, Any]]:
        self.openers.append(threading.get_ident())
        self.let_go.wait(LOAD_BOUND)
        return super().load(reference)  # type: ignore[misc]


class _SlowToken(_SlowToOpen, Pkcs11EpochVault):
    pass


class _SlowTpm(_SlowToOpen, TpmEpochVault):
    pass


def _member(
    vault: Pkcs11EpochVault, base: Pkcs11Key, directory: Path, **kw: Any
) -> SharedEpochKeys:
    return SharedEpochKeys(
        vault,  # type: ignore[arg-type]
        directory,
        replica="host",
        epoch_seconds=3600.0,
        grace_seconds=60.0,
        base=base,
        close_base=False,
        **kw,
    )


def _opens(epochs: EpochKeys, key_id: str, sealing_key: bytes) -> bool:
    blob = enclave.seal_v2(sealing_key, BODY, method="POST", path=CHAT, key_id=key_id).blob
    epoch = epochs.lookup(key_id)
    assert epoch.key is not None
    return enclave.open_v2(epoch.key, blob, method="POST", path=CHAT).body == BODY


def test_a_new_epochs_keys_are_opened_off_the_event_loop_while_the_view_is_served(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    token = softhsm_token
    args = (token.module_path, token.token_label, token.pin, "paygate")
    base = Pkcs11Key.generate(*args)
    slow = _SlowToken(*args)
    try:
        _served_while_opening(Pkcs11EpochVault(*args), slow, base, tmp_path / "epochs")
    finally:
        base.close()
    assert slow.labels() == set()  # the last member destroyed every epoch


def test_a_new_epochs_tpm_handles_are_read_off_the_event_loop(
    swtpm_factory: Callable[[], Swtpm], tmp_path: Path
) -> None:
    tpm = swtpm_factory()
    with TpmKey.generate(tpm.tcti, tmp_path / "tpm-key") as base:
        slow = _SlowTpm(base)
        _served_while_opening(TpmEpochVault(base), slow, base, tmp_path / "epochs")
        held = [h for h in range(HANDLE_BASE, HANDLE_BASE + HANDLE_COUNT) if slow.present(h)]
    assert held == []  # the last member evicted every epoch


def _served_while_opening(vault: object, slow: _SlowToOpen, base: object, directory: Path) -> None:
    first = _member(vault, base, directory)
    second = _member(slow, base, directory, load_inline=False)  # as paygate's workers are
    try:
        old = second.current
        new = first.rotate()  # another worker's rotation; opening its keys here is slow
        slow.let_go.clear()

        async def serve() -> None:
            loop_thread = threading.get_ident()
            # A request's bounded wait: the load is held up, so it ends without the new epoch.
            await caught_up(second)
            # Meanwhile the loop serves this worker's view, whose keys it can all open: what
            # it attests is what it opens; the new key id is refused as not yet known here.
            assert [e.id for e in second.live()] == [old.id]
            assert second.current.id == old.id
            assert _opens(second, old.id, old.sealing_key)
            with pytest.raises(EpochRetired):
                second.lookup(new.id)
            await caught_up(second)  # backing off: does not wait again
            slow.let_go.set()
            deadline = time.monotonic() + LOAD_BOUND
            while second.current.id != new.id:
                assert time.monotonic() < deadline, "the new epoch was never loaded"
                await asyncio.sleep(0.01)
            assert [e.id for e in second.live()] == [new.id, old.id]
            assert _opens(second, new.id, new.sealing_key)
            assert _opens(second, old.id, old.sealing_key)
            assert slow.openers, "the new epoch's keys were never opened"
            assert loop_thread not in slow.openers  # never on the event loop

        slow.openers.clear()
        asyncio.run(serve())
    finally:
        slow.let_go.set()
        second.close()
        first.close()


def test_a_pass_taken_over_while_opening_keys_catches_up_with_what_was_written_meanwhile(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    """The background pass holds the host's lease while it opens keys; a slow token holds it
    past its lease, and another worker takes it over and rotates meanwhile. What the pass
    adopted is the state it read, not the one written since: the next request must see the
    state changed and catch up (a view marked as the newer state would refuse the new key id,
    and serve the epoch whose keys were destroyed, until another write)."""
    token = softhsm_token
    args = (token.module_path, token.token_label, token.pin, "paygate")
    base = Pkcs11Key.generate(*args)
    slow = _SlowToken(*args)
    directory = tmp_path / "epochs"
    first = _member(Pkcs11EpochVault(*args), base, directory)
    second = _member(slow, base, directory, load_inline=False, lease_seconds=1.0)
    try:
        first_epoch = second.current
        made = first.rotate()
        slow.let_go.clear()
        slow.openers.clear()
        loading = second.catch_up()
        assert loading is not None
        deadline = time.monotonic() + LOAD_BOUND
        while not slow.openers:  # the pass has read the state and is opening its keys
            assert time.monotonic() < deadline, "the pass never opened a key"
            time.sleep(0.01)
        latest = first.rotate()  # after the pass's lease: the first epoch is destroyed
        slow.let_go.set()
        assert loading.result(timeout=LOAD_BOUND)
        again = second.catch_up()  # the state changed since the pass read it
        assert again is not None
        assert again.result(timeout=LOAD_BOUND)
        assert [e.id for e in second.live()] == [latest.id, made.id]
        assert _opens(second, latest.id, latest.sealing_key)
        with pytest.raises(EpochRetired):
            second.lookup(first_epoch.id)
    finally:
        slow.let_go.set()
        second.close()
        first.close()
        base.close()
    assert slow.labels() == set()


class _RefusesToOpen(Pkcs11EpochVault):
    """A token that, from some moment on, refuses to open another process's key."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.refuse = False
        self.tries = 0

    def load(self, reference: Mapping[str, Any]) -> tuple[Pkcs11Key, Mapping[str, Any]]:
        if not self.refuse:
            return super().load(reference)
        self.tries += 1
        raise KeyBackendError("the token refused to open the key")


def test_a_catch_up_that_fails_is_not_retried_by_every_request(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    """Opening a new epoch's keys fails (a token refusing, an unreadable state): the requests
    that follow are served from this worker's view without each waiting for another attempt
    (each a token login and search, and a hold of the host's lease the other workers' rotations
    wait for); the rotation loop's next pass catches up once the token opens the key again."""
    token = softhsm_token
    args = (token.module_path, token.token_label, token.pin, "paygate")
    base = Pkcs11Key.generate(*args)
    refusing = _RefusesToOpen(*args)
    directory = tmp_path / "epochs"
    first = _member(Pkcs11EpochVault(*args), base, directory)
    second = _member(refusing, base, directory, load_inline=False)  # type: ignore[arg-type]
    try:
        old = second.current
        new = first.rotate()
        refusing.refuse = True

        async def serve() -> None:
            for _ in range(5):
                await caught_up(second)
                assert second.current.id == old.id
                assert _opens(second, old.id, old.sealing_key)
                with pytest.raises(EpochRetired):
                    second.lookup(new.id)

        asyncio.run(serve())
        assert refusing.tries == 1
        refusing.refuse = False
        second.advance()  # the rotation loop's pass
        assert [e.id for e in second.live()] == [new.id, old.id]
        assert _opens(second, new.id, new.sealing_key)
    finally:
        second.close()
        first.close()
        base.close()
    assert refusing.labels() == set()
