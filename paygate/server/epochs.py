"""Key epochs in the gateway: the refusals, the early key-id check and the rotation loop.

- A request names the key it was sealed to (``X-Paygate-Key-Id``, and inside a keyed v2
  envelope): one of this replica's live epochs opens it; a retired one is answered
  ``410 key_epoch_retired``, another replica's key ``421 wrong_replica`` (with
  ``X-Paygate-Replica``). The clear header is checked before payment, so a stale key costs
  the caller no payment round trip; the envelope's own key id (authenticated) is what opens.
- :class:`EpochRotation` rotates when the epoch is over or when ``paygate keys rotate`` asks
  (a request file in ``key_epoch_dir``), retires previous epochs past their grace period, and
  tells its listeners (the transparency log appends a key-epoch entry).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from enclave.keys.epochs import Epoch, EpochKeys, EpochRetired, WrongReplica
from enclave.keys.shared_epochs import REQUEST_WAIT, SharedEpochKeys
from paygate.server.errors import BadRequest, GatewayError
from paygate.wire import KEY_ID_HEADER, REPLICA_HEADER

log = logging.getLogger("paygate.server")

ROTATE_REQUEST = "rotate"  # written by `paygate keys rotate`
STATUS_FILE = "status.json"  # the live epochs (public), rewritten after every change
POLL_SECONDS = 1.0
_MAX_KEY_ID = 255


class KeyEpochRetired(GatewayError):
    message = (
        "the key epoch this request was sealed to is retired: fetch the key (and attest) again"
    )

    status = 410
    code = "key_epoch_retired"


class WrongReplicaError(GatewayError):
    message = "this replica does not hold the key this request was sealed to"

    status = 421
    code = "wrong_replica"


def refusal(exc: EpochRetired | WrongReplica) -> GatewayError:
    """The gateway's answer to an enclave epoch refusal."""
    if isinstance(exc, WrongReplica):
        headers = {REPLICA_HEADER: exc.replica} if exc.replica else {}
        message = (
            f"the key is held by replica {exc.replica}: fetch the key again"
            if exc.replica
            else None
        )
        return WrongReplicaError(message, headers=headers)
    return KeyEpochRetired()


async def caught_up(epochs: EpochKeys | None) -> None:
    """Before the request path reads the epochs: with several workers, wait (at most
    REQUEST_WAIT, without holding the event loop) for the keys of an epoch another worker
    made to be opened off the loop; after a wait in vain this worker's view is served."""
    if not isinstance(epochs, SharedEpochKeys):
        return
    loading = epochs.catch_up()
    if loading is None:
        return
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(loading)), REQUEST_WAIT)
    except TimeoutError:
        epochs.back_off()
    except Exception as exc:  # the rotation loop reports it; requests keep this view
        log.debug("reading the shared key epochs: %s", type(exc).__name__)


def check_key_header(epochs: EpochKeys | None, headers: Mapping[str, str]) -> None:
    """Before payment: the key id the caller says it sealed to must be live here."""
    if epochs is None:
        return
    value = headers.get(KEY_ID_HEADER)
    if value is None:
        return
    if not 0 < len(value) <= _MAX_KEY_ID or not value.isascii() or not value.isprintable():
        raise BadRequest(f"{KEY_ID_HEADER} is not a key id")
    try:
        epochs.lookup(value)
    except (EpochRetired, WrongReplica) as exc:
        raise refusal(exc) from None


def epochs_document(epochs: EpochKeys) -> dict[str, Any]:
    """What the key document adds with key epochs: the key id, the replica, the live epochs
    (current first) and the retired receipt keys (so old receipts stay verifiable)."""
    live = epochs.live()
    return {
        "key_id": live[0].id,
        "replica": epochs.replica,
        "epoch_seconds": epochs.epoch_seconds,
        "epochs": [
            {**e.document(), "state": "current" if i == 0 else "previous"}
            for i, e in enumerate(live)
        ],
        "retired_receipt_keys": [
            {"id": e.id, "receipt_key": e.receipt_key.hex()} for e in epochs.history()
        ],
    }


RotationListener = Callable[[Epoch], Awaitable[None]]


def told(epochs: SharedEpochKeys, epoch: Epoch) -> None:
    """Mark the epoch told once its entry is appended (a file created: no lease waited for); a
    mark that fails costs at most a second entry for the same keys, should this worker die."""
    try:
        epochs.told(epoch)
    except OSError as exc:
        log.warning("marking key epoch %s told: %s", epoch.id, exc.strerror)


class EpochRotation:
    """The loop that rotates and retires; one per gateway process."""

    def __init__(
        self,
        epochs: EpochKeys,
        request_dir: Path | None,
        *,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._epochs = epochs
        self._dir = request_dir
        self._poll = poll_seconds
        self._listeners: list[RotationListener] = []
        self._lock = asyncio.Lock()

    def on_rotated(self, listener: RotationListener) -> None:
        self._listeners.append(listener)

    def prepare(self) -> None:
        """Create the request directory (0700) and publish the first status (blocking)."""
        if self._dir is None:
            return
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self._dir / ROTATE_REQUEST).unlink(missing_ok=True)  # asked of a previous run
        self._write_status()

    async def rotate(self) -> Epoch:
        """Rotate now (one at a time), then tell the listeners."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            epoch = await loop.run_in_executor(None, self._epochs.rotate)
            log.info("key epoch %s started (number %d)", epoch.id, epoch.number)
            await loop.run_in_executor(None, self._write_status)
        await self._tell(epoch)
        return epoch

    async def step(self) -> None:
        """One pass: a requested or due rotation, then retirement of expired epochs."""
        if isinstance(self._epochs, SharedEpochKeys):
            await self._shared_step(self._epochs)
            return
        asked = self._dir is not None and (self._dir / ROTATE_REQUEST).exists()
        if asked or self._epochs.rotation_due():
            await self.rotate()
            if asked:
                assert self._dir is not None
                with contextlib.suppress(FileNotFoundError):
                    (self._dir / ROTATE_REQUEST).unlink()
        loop = asyncio.get_running_loop()
        gone = await loop.run_in_executor(None, self._epochs.expire)
        for epoch in gone:
            log.info("key epoch %s retired; its keys were destroyed", epoch.id)
        if gone:
            await loop.run_in_executor(None, self._write_status)

    async def _shared_step(self, epochs: SharedEpochKeys) -> None:
        """The same pass over the host's epochs (several workers): whichever worker comes
        first rotates or retires, the others adopt. An epoch is one event of the host, so only
        the worker that made it logs its start and tells the listeners (one key-epoch entry
        per epoch, not one per worker), and only the one that destroyed it logs that."""
        loop = asyncio.get_running_loop()
        request = self._dir / ROTATE_REQUEST if self._dir is not None else None
        async with self._lock:
            new, gone = await loop.run_in_executor(None, epochs.advance, request)
            for epoch in gone:
                if epochs.destroyed_here(epoch.id):
                    log.info("key epoch %s retired; its keys were destroyed", epoch.id)
                else:
                    log.debug("key epoch %s retired by another worker", epoch.id)
            made = new is not None and epochs.made_here(new.id)
            if new is not None:
                if made:
                    log.info("key epoch %s started (number %d)", new.id, new.number)
                else:
                    log.debug("key epoch %s adopted from another worker", new.id)
            if new is not None or gone:
                await loop.run_in_executor(None, self._write_status)
        if new is not None and made:
            await self._tell_shared(epochs, new)
        # An epoch whose maker was killed before its entry was appended: told by this worker
        # now (clients seal only to keys the log announces), not at the next rotation.
        for epoch in epochs.take_untold():
            log.warning("key epoch %s was not told by the worker that made it: telling", epoch.id)
            await self._tell_shared(epochs, epoch)

    async def _tell_shared(self, epochs: SharedEpochKeys, epoch: Epoch) -> None:
        if await self._tell(epoch):
            await asyncio.get_running_loop().run_in_executor(None, told, epochs, epoch)

    async def _tell(self, epoch: Epoch) -> bool:
        """Tell every listener; whether all succeeded."""
        ok = True
        for listener in self._listeners:
            try:
                await listener(epoch)
            except Exception as exc:  # a listener's failure must not stop rotation
                log.error("after the key rotation: %s", type(exc).__name__)
                ok = False
        return ok

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the TPM or token failed: keep the current epoch, retry
                log.error("key rotation failed: %s (%s)", type(exc).__name__, exc)
            await asyncio.sleep(self._poll)

    def _write_status(self) -> None:
        if self._dir is None:
            return
        status = {"written_at": int(time.time()), **epochs_document(self._epochs)}
        tmp = self._dir / f".{STATUS_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(status, fh)
        os.replace(tmp, self._dir / STATUS_FILE)


@contextlib.asynccontextmanager
async def rotating(
    epochs: EpochKeys, request_dir: Path | None, listeners: Sequence[RotationListener] = ()
) -> AsyncIterator[EpochRotation]:
    """The rotation loop for the life of the block (the gateway's)."""
    rotation = EpochRotation(epochs, request_dir)
    for listener in listeners:
        rotation.on_rotated(listener)
    await asyncio.get_running_loop().run_in_executor(None, rotation.prepare)
    task = asyncio.get_running_loop().create_task(rotation.run())
    try:
        yield rotation
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def request_rotation(request_dir: Path, timeout: float = 30.0) -> dict[str, Any]:
    """What ``paygate keys rotate`` does: ask the running gateway through its request file and
    wait (bounded) for the new status; raises TimeoutError when nobody rotated."""
    status_path = request_dir / STATUS_FILE
    try:
        before = json.loads(status_path.read_text()).get("key_id")
    except (OSError, ValueError):
        raise FileNotFoundError(
            f"no running gateway with key epochs publishes {status_path}"
        ) from None
    request = request_dir / ROTATE_REQUEST
    request.write_text(str(int(time.time())))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            status = json.loads(status_path.read_text())
            if status.get("key_id") != before and not request.exists():
                return dict(status)
        time.sleep(0.1)
    with contextlib.suppress(FileNotFoundError):
        request.unlink()
    raise TimeoutError(f"the gateway did not rotate within {timeout:.0f} s")
