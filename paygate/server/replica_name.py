"""The default replica name: kept in the state directory, so a restart takes its work back.

A replica's name owns its leases in the ledger: the transparency log's recovery turn, the
batch-settlement claimer, its reservations (released at start by the same name). Under a name
new at every start (``<hostname>:<pid>``) a restart after a crash waits for what the dead run
held to run out; under the same name it takes it back at once. So without ``replica_id``
``paygate serve`` names itself ``<hostname>-<random>``, made on the first start and kept in
``replica-id`` in the state directory (the ledger file's directory, ``/var/lib/paygate`` by
default), and holds ``replica-id.lock`` (flock) for as long as it runs (its forked workers hold
it with it: they are ``<name>.w<N>``). Two names must never be one live pair's:

* a second gateway on the same state directory finds the lock held and runs under
  ``<hostname>:<pid>`` (as before: new at every start), with a warning;
* a state directory copied to another host (a backup restored, a cloned disk, a volume shared
  over a network filesystem whose locks are per host) is not that host's: the file records the
  hostname, ``/etc/machine-id`` and the kernel's boot id it was made under, and a start where
  any differs makes a new name (the copy's name stays the original's). The boot id is what
  tells hosts apart where the other two do not: containers have no machine id or the image's
  one, and often a fixed hostname. A process restarted on the same boot keeps its name; after
  a reboot its old leases have run out anyway. (Under the systemd unit, ``ProcSubset=pid``
  hides the boot id: there the host's own machine id tells hosts apart.)
* a directory that cannot be written or locked (read-only, missing) falls back the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from paygate.files import replace_atomically

log = logging.getLogger("paygate.serve")

NAME_FILE = "replica-id"
LOCK_FILE = "replica-id.lock"
MACHINE_ID = Path("/etc/machine-id")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_HOST_CHARS = re.compile(r"[^A-Za-z0-9.-]")
_NAME = re.compile(r"[A-Za-z0-9.-]{1,40}-[0-9a-f]{12}")  # what this module makes, nothing else


@dataclass(frozen=True, slots=True)
class HeldName:
    """A replica name held for this process (and its forked workers) while ``lock`` is open."""

    name: str
    lock: int  # the locked file's descriptor; closing it lets the name go

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.lock)


def _read_id(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""  # none here (or hidden): the same at every start on this host


def _machine() -> tuple[str, str, str]:
    """What the name is tied to: this host's name, machine id and boot id ("" where none)."""
    return socket.gethostname(), _read_id(MACHINE_ID), _read_id(BOOT_ID)


def _kept(path: Path, here: tuple[str, str, str]) -> str | None:
    """The name kept at ``path`` if it was made here; None: none, unreadable, or another host's."""
    try:
        kept = json.loads(path.read_bytes())
        name, host, machine, boot = kept["name"], kept["host"], kept["machine"], kept["boot"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(name, str) or not _NAME.fullmatch(name) or (host, machine, boot) != here:
        return None
    return name


def hold_default_name(state_dir: Path) -> HeldName | None:
    """This installation's replica name, held until :meth:`HeldName.close` (or exit); None when
    another live process holds it or the directory cannot keep it (the caller then names each
    process ``<hostname>:<pid>``)."""
    try:
        lock = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.warning("no replica name kept in %s (%s): running as <hostname>:<pid>", state_dir,
                    exc.strerror)  # fmt: skip
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        log.warning(
            "another gateway holds the replica name kept in %s: running as <hostname>:<pid>"
            " (give each gateway its own replica_id)",
            state_dir,
        )
        return None
    here = _machine()
    path = state_dir / NAME_FILE
    name = _kept(path, here)
    if name is None:
        host = _HOST_CHARS.sub("-", here[0])[:40] or "paygate"
        name = f"{host}-{secrets.token_hex(6)}"
        try:
            document = {"name": name, "host": here[0], "machine": here[1], "boot": here[2]}
            replace_atomically(path, json.dumps(document).encode())
        except OSError as exc:
            os.close(lock)
            log.warning("cannot keep a replica name in %s (%s): running as <hostname>:<pid>",
                        state_dir, exc.strerror)  # fmt: skip
            return None
        log.info("this gateway's replica name is %s (kept in %s)", name, path)
    return HeldName(name, lock)
