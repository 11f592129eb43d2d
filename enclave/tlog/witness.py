"""The witness's decision on ``add-checkpoint`` (c2sp.org/tlog-witness), without I/O.

Body: ``old <size>\\n``, at most 63 base64 consistency-proof lines, an empty line, then the
checkpoint. In the spec's order: an unknown origin is 404; no signature by a trusted key of that
origin 403; an old size above the checkpoint's 400; an old size that is not the size this
witness last cosigned 409 with that size (``text/x.tlog.size``), as is an equal size with
another root; a consistency proof that does not verify 422. Only then is the checkpoint
cosigned (Ed25519 cosignature/v1), and the caller must store it *atomically* with the check
(:meth:`Witness.decide` is given the stored state and says what to store).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from enclave.errors import EnclaveError
from enclave.tlog import checkpoint as cp
from enclave.tlog import note
from enclave.tlog.merkle import HASH_SIZE, ProofError, verify_consistency

MAX_BODY = 64 * 1024
MAX_PROOF_LINES = 63
SIZE_TYPE = "text/x.tlog.size"
_OLD = re.compile(r"old (0|[1-9][0-9]{0,19})")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    cosigned: cp.Checkpoint | None = None  # store this (size, root) before answering


@dataclass(frozen=True, slots=True)
class AddCheckpoint:
    old_size: int
    proof: tuple[bytes, ...]
    checkpoint: str


class BadRequest(EnclaveError, ValueError):
    code = "witness_bad_request"
    message = "the witness request is malformed"


def parse_request(body: bytes) -> AddCheckpoint:
    if len(body) > MAX_BODY:
        raise BadRequest("the request is too large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the request is not UTF-8") from None
    head, sep, checkpoint = text.partition("\n\n")
    if not sep:
        raise BadRequest("no empty line before the checkpoint")
    lines = head.split("\n")
    found = _OLD.fullmatch(lines[0])
    if found is None:
        raise BadRequest("the first line is not 'old <size>'")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise BadRequest("more than 63 consistency proof lines")
    proof = []
    for line in lines[1:]:
        try:
            raw = base64.b64decode(line.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise BadRequest("a proof line is not base64") from None
        if len(raw) != HASH_SIZE:
            raise BadRequest("a proof line is not a 32-byte hash")
        proof.append(raw)
    return AddCheckpoint(int(found[1]), tuple(proof), checkpoint)


class Witness:
    """Knows its logs (origin → trusted log keys) and cosigns with its own key."""

    def __init__(
        self, signer: note.Ed25519Signer, logs: Mapping[str, Sequence[note.Verifier]]
    ) -> None:
        if signer.verifier.key_type != note.COSIGNATURE_V1:
            raise ValueError("a witness signs cosignature/v1 (type 0x04)")
        self.signer = signer
        self.logs = {origin: tuple(keys) for origin, keys in logs.items()}

    def origin_of(self, request: AddCheckpoint) -> str | None:
        """The origin line of the submitted checkpoint, if the note parses at all."""
        try:
            return cp.parse_text(note.parse(request.checkpoint).text).origin
        except note.NoteError:
            return None

    def decide(self, request: AddCheckpoint, latest: tuple[int, bytes] | None) -> Answer:
        """``latest``: the (size, root) last cosigned for the request's origin, or None."""
        try:
            parsed = note.parse(request.checkpoint)
            origin = cp.parse_text(parsed.text).origin
        except note.NoteError as exc:
            return Answer(400, f"malformed checkpoint: {exc}\n".encode())
        keys = self.logs.get(origin)
        if keys is None:
            return Answer(404, b"unknown log\n")
        try:
            checkpoint, _, _ = cp.open_checkpoint(request.checkpoint, keys, origin=origin)
        except note.NoteError:
            return Answer(403, b"invalid signature\n")
        if request.old_size > checkpoint.size:
            return Answer(400, b"old size is larger than the checkpoint size\n")
        known_size = latest[0] if latest is not None else 0
        if request.old_size != known_size:
            return Answer(409, f"{known_size}\n".encode(), SIZE_TYPE)
        if latest is not None and latest[0] == checkpoint.size and latest[1] != checkpoint.root:
            return Answer(409, f"{known_size}\n".encode(), SIZE_TYPE)
        if request.old_size == 0:
            if request.proof:
                return Answer(422, b"a consistency proof from size 0 must be empty\n")
        elif latest is not None and request.old_size != checkpoint.size:
            try:
                verify_consistency(
                    request.old_size, checkpoint.size, latest[1], checkpoint.root, request.proof
                )
            except ProofError:
                return Answer(422, b"consistency proof does not verify\n")
        elif request.proof:
            return Answer(422, b"a consistency proof between equal sizes must be empty\n")
        line = note.Signature(
            self.signer.name, self.signer.key_id, self.signer.sign(parsed.text.encode())
        ).line()
        return Answer(200, line.encode(), cosigned=checkpoint)
