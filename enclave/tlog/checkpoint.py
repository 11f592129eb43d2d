"""Checkpoints (c2sp.org/tlog-checkpoint): origin, tree size and root hash, as a signed note.

The note text is at least three non-empty lines: the origin, the size in decimal (no leading
zero), the RFC 6962 root in standard base64; extension lines (opaque, non-empty) may follow.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass

from enclave.tlog import note
from enclave.tlog.merkle import HASH_SIZE

_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")
MAX_SIZE = (1 << 64) - 1


class CheckpointError(note.NoteError):
    code = "checkpoint_malformed"
    message = "the checkpoint is malformed"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode()]
        return "\n".join([*lines, *self.extensions]) + "\n"


def parse_text(text: str) -> Checkpoint:
    if not text.endswith("\n"):
        raise CheckpointError("a checkpoint ends in a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or any(not line for line in lines):
        raise CheckpointError("a checkpoint is at least three non-empty lines")
    origin, size, root = lines[:3]
    if not _SIZE.fullmatch(size) or int(size) > MAX_SIZE:
        raise CheckpointError("the tree size is not a decimal number without leading zeros")
    try:
        raw = base64.b64decode(root.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise CheckpointError("the root hash is not base64") from None
    if len(raw) != HASH_SIZE:
        raise CheckpointError("the root hash is not 32 bytes")
    return Checkpoint(origin, int(size), raw, tuple(lines[3:]))


def open_checkpoint(
    raw: bytes | str, verifiers: Iterable[note.Verifier], *, origin: str | None = None
) -> tuple[Checkpoint, note.Note, list[note.Signature]]:
    """A checkpoint signed by one of ``verifiers`` (and of ``origin`` when given)."""
    opened, verified = note.open_note(raw, verifiers)
    checkpoint = parse_text(opened.text)
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(f"the checkpoint is of another log ({checkpoint.origin[:80]!r})")
    return checkpoint, opened, verified
