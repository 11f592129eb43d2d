"""The client's transparency checks (docs/TRANSPARENCY.md), sans I/O like the attestation flow.

With a :class:`LogPolicy`, after the evidence is verified and before anything is sealed:

1. the log's checkpoint (``GET /v1/log/checkpoint``) must be signed by the log key the evidence
   binds, for the origin it binds, and cosigned by ``witness_quorum`` of the policy's witnesses;
2. against the largest checkpoint this client stored for that origin (:class:`LogState`): the
   same size must have the same root, a larger one must be consistent with it (a proof built
   from the log's tiles), a smaller one must be a prefix of it; otherwise ``log_inconsistent``;
3. the newest ``release`` entry for the attested code digest and the ``key-epoch`` entry of the
   attested keys must be in the tree (read from the entry bundles, from the end, at most
   ``max_scan`` entries; each proven by an inclusion proof against the checkpoint's root);
   otherwise ``log_unverified``.

The largest checkpoint seen is then stored. :func:`log_flow` yields
:class:`~paygate.client.attestation.Exchange` requests like the attestation flow.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclave.attestation.binding import Binding
from enclave.tlog import checkpoint as cp
from enclave.tlog import entries, merkle, note, tiles
from paygate import jsonsafe
from paygate.client.errors import LogInconsistent, LogUnverified
from paygate.files import replace_atomically
from paygate.wire import LOG_CHECKPOINT_PATH

LOG_PREFIX = LOG_CHECKPOINT_PATH.removesuffix("checkpoint")
MAX_STATE_BYTES = 1 << 20
MAX_ORIGINS = 1000


@dataclass(frozen=True, slots=True)
class Seen:
    size: int
    root: bytes
    checkpoint: str  # the signed note, kept as evidence


class LogState:
    """The largest checkpoint seen per log origin, in a small JSON file (0600, replaced
    atomically), or in memory only when ``path`` is None."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._memory: dict[str, Seen] = {}

    def get(self, origin: str) -> Seen | None:
        with self._lock:
            return self._load().get(origin)

    def put(self, origin: str, seen: Seen) -> None:
        """Keep ``seen`` unless a larger checkpoint of ``origin`` is stored already."""
        with self._lock:
            known = self._load()
            current = known.get(origin)
            if current is not None and current.size >= seen.size:
                return
            known[origin] = seen
            if len(known) > MAX_ORIGINS:
                raise ValueError("the log state file holds too many origins")
            self._save(known)

    def _load(self) -> dict[str, Seen]:
        if self.path is None:
            return dict(self._memory)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        data = jsonsafe.loads(raw, max_bytes=MAX_STATE_BYTES)
        if not isinstance(data, dict):
            raise ValueError(f"{self.path} is not a log state file")
        found = {}
        for origin, item in data.items():
            found[origin] = Seen(int(item["size"]), bytes.fromhex(item["root"]), item["checkpoint"])
        return found

    def _save(self, known: dict[str, Seen]) -> None:
        if self.path is None:
            self._memory = dict(known)
            return
        document = {
            o: {"size": s.size, "root": s.root.hex(), "checkpoint": s.checkpoint}
            for o, s in known.items()
        }
        replace_atomically(self.path, json.dumps(document, sort_keys=True).encode())


@dataclass(frozen=True, slots=True)
class LogPolicy:
    """What the client requires of the appliance's transparency log.

    Args:
        witnesses: vkeys (type 0x04) of the witnesses whose cosignatures count.
        witness_quorum: how many of them must have cosigned the checkpoint.
        state: where the largest checkpoint per origin is kept (a :class:`LogState`).
        max_scan: how many entries, from the end, are read looking for the release and key
            epoch (the gateway appends both at every start, so they are near the end).
    """

    witnesses: tuple[str, ...] = ()
    witness_quorum: int = 0
    state: LogState = field(default_factory=LogState)
    max_scan: int = 4096

    def __post_init__(self) -> None:
        if not 0 <= self.witness_quorum <= len(self.witnesses):
            raise ValueError("witness_quorum is between 0 and the number of witnesses")
        for vkey in self.witnesses:
            verifier = note.parse_vkey(vkey)
            if not isinstance(verifier, note.Ed25519Verifier) or verifier.key_type != 0x04:
                raise ValueError("a witness key is a cosignature/v1 vkey (type 0x04)")


@dataclass(frozen=True, slots=True)
class Request:
    """One GET the flow needs → ``(status, body)`` (the attestation flow's Exchange)."""

    url: str


Flow = Generator[Request, tuple[int, bytes], Any]


def fetch_tiles(base: str, flow: Generator[tiles.TileRef, bytes, Any]) -> Flow:
    """Run a tile flow, fetching each tile it asks for from ``base`` (the log's URL prefix)."""
    try:
        ref = next(flow)
        while True:
            status, body = yield Request(f"{base}{ref.path()}")
            if status != 200:
                raise LogUnverified(f"the log did not serve {ref.path()} (HTTP {status})")
            ref = flow.send(body)
    except StopIteration as stop:
        return stop.value


def open_checkpoint(
    raw: bytes, log_key: str, origin: str, witnesses: Sequence[str] = (), quorum: int = 0
) -> tuple[cp.Checkpoint, str]:
    """The checkpoint signed by ``log_key`` for ``origin`` with ``quorum`` witness cosignatures."""
    try:
        checkpoint, opened, _ = cp.open_checkpoint(raw, [note.parse_vkey(log_key)], origin=origin)
    except note.NoteError as exc:
        raise LogUnverified(
            f"the checkpoint is not signed by the attested log key: {exc}"
        ) from None
    if quorum:
        cosigned = 0
        for vkey in witnesses:
            verifier = note.parse_vkey(vkey)
            try:
                note.open_note(raw, [verifier])
                cosigned += 1
            except note.NoteError:
                continue
        if cosigned < quorum:
            raise LogUnverified(f"{cosigned} witness cosignatures, the policy needs {quorum}")
    return checkpoint, opened.encode()


def consistent(base: str, seen: Seen, checkpoint: cp.Checkpoint) -> Flow:
    """Check ``checkpoint`` against the one ``seen`` before (tiles from ``base``)."""
    if checkpoint.size == seen.size:
        if checkpoint.root != seen.root:
            raise LogInconsistent(f"two different roots for tree size {seen.size}: the log forked")
        return
    old, new = sorted((seen, checkpoint), key=lambda c: c.size)
    if old.size == 0:
        return
    nodes = tiles.TileNodes(new.size)
    flow = tiles.resolve(lambda: merkle.consistency_proof(nodes, old.size, new.size), nodes)
    try:
        proof = yield from fetch_tiles(base, flow)
        merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)
    except merkle.ProofError as exc:
        raise LogInconsistent(f"size {old.size} to {new.size}: {exc}") from None
    except LogUnverified as exc:
        raise LogInconsistent(
            f"the log cannot prove size {old.size} to {new.size}: {exc}"
        ) from None


def prove_inclusion(base: str, index: int, data: bytes, checkpoint: cp.Checkpoint) -> Flow:
    nodes = tiles.TileNodes(checkpoint.size)
    flow = tiles.resolve(lambda: merkle.inclusion_proof(nodes, index, checkpoint.size), nodes)
    proof = yield from fetch_tiles(base, flow)
    try:
        merkle.verify_inclusion(
            merkle.leaf_hash(data), index, checkpoint.size, proof, checkpoint.root
        )
    except merkle.ProofError as exc:
        raise LogUnverified(f"entry {index} is not in the checkpoint's tree: {exc}") from None
    return proof


def read_entries(base: str, size: int, first: int, end: int) -> Flow:
    """Entries ``first`` .. ``end - 1`` as (index, bytes), from their bundles."""
    found: list[tuple[int, bytes]] = []
    for bundle in range(first // tiles.WIDTH, (end - 1) // tiles.WIDTH + 1):
        width = tiles.tile_width(size, 0, bundle)
        path = tiles.tile_path(None, bundle, width)
        status, body = yield Request(f"{base}{path}")
        if status != 200:
            raise LogUnverified(f"the log did not serve {path} (HTTP {status})")
        try:
            items = tiles.decode_bundle(body, width)
        except merkle.ProofError as exc:
            raise LogUnverified(f"{path}: {exc}") from None
        start = bundle * tiles.WIDTH
        found += [(start + i, e) for i, e in enumerate(items) if first <= start + i < end]
    return found


def find_attested(base: str, checkpoint: cp.Checkpoint, bound: Binding, max_scan: int) -> Flow:
    """The indices and bytes of the newest release entry of the attested code digest and the
    key-epoch entry of the attested keys, read back from the end."""
    assert bound.log is not None
    release: tuple[int, bytes] | None = None
    epoch: tuple[int, bytes] | None = None
    end = checkpoint.size
    floor = max(0, checkpoint.size - max_scan)
    while end > floor and (release is None or epoch is None):
        first = max(floor, (end - 1) // tiles.WIDTH * tiles.WIDTH)
        chunk = yield from read_entries(base, checkpoint.size, first, end)
        for index, data in reversed(chunk):
            try:
                entry = entries.parse(data)
            except entries.EntryInvalid:
                continue
            if release is None and entry["type"] == "release":
                if entry["code_digest"] == bound.code_digest:
                    release = (index, data)
            elif (
                epoch is None
                and entry["type"] == "key-epoch"
                and (
                    entry["sealing_key"] == bound.sealing_key.hex()
                    and entry["receipt_key"] == bound.receipt_key.hex()
                    and entry["log_key"] == bound.log.key
                )
            ):
                epoch = (index, data)
        end = first
    if release is None:
        raise LogUnverified(f"no release entry for the attested code digest {bound.code_digest}")
    if epoch is None:
        raise LogUnverified("no key-epoch entry for the attested keys")
    return release, epoch


def log_flow(origin_url: str, policy: LogPolicy, bound: Binding) -> Flow:
    """The checks of the module docstring; returns a short description of what passed."""
    if bound.log is None:
        raise LogUnverified("the appliance's evidence names no transparency log")
    base = f"{origin_url}{LOG_PREFIX}"
    status, body = yield Request(f"{base}checkpoint")
    if status != 200:
        raise LogUnverified(f"the log's checkpoint is not available (HTTP {status})")
    checkpoint, signed = open_checkpoint(
        body, bound.log.key, bound.log.origin, policy.witnesses, policy.witness_quorum
    )
    seen = policy.state.get(bound.log.origin)
    if seen is not None:
        yield from consistent(base, seen, checkpoint)
    release, epoch = yield from find_attested(base, checkpoint, bound, policy.max_scan)
    for index, data in (release, epoch):
        yield from prove_inclusion(base, index, data, checkpoint)
    policy.state.put(bound.log.origin, Seen(checkpoint.size, checkpoint.root, signed))
    return (
        f"release {release[0]} and key epoch {epoch[0]} in {bound.log.origin} "
        f"size {checkpoint.size}"
    )
