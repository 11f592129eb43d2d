"""Private files for key material: created whole or not at all, mode 0600 (a key never
replaced; a state file that lists keys replaced whole)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def write_new_file(target: Path, data: bytes) -> None:
    """Write ``target`` atomically with mode 0600; raise FileExistsError if it exists.

    A temporary file in the same directory is written and fsynced, then hard-linked into place:
    the link is the no-clobber "rename", so an existing file (or a concurrent writer) wins
    instead of being overwritten, and a crash never leaves a half-written key.
    """
    with _temporary(target, data) as tmp:
        os.link(tmp, target)


def replace_file(target: Path, data: bytes) -> None:
    """Write ``target`` whole with mode 0600, replacing what is there (a state file listing
    keys, rewritten as they change): a reader or a crash finds the old text or the new, never a
    part. The temporary file is this writer's alone (created exclusively, never through a
    link), so two processes writing at once cannot write into each other's."""
    with _temporary(target, data) as tmp:
        os.replace(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def _temporary(target: Path, data: bytes) -> Iterator[Path]:
    """``data`` in a new file of its own beside ``target`` (mode 0600, fsynced), removed after
    (once linked or moved into place, what is removed is only its old name)."""
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # independent of the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fsync_dir(directory: Path) -> None:
    """Make new directory entries durable: a crash must not lose a freshly created key."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
