"""RFC 6962 Merkle tree hashing and the proofs of RFC 9162 section 2.1.

Hashes: a leaf is ``SHA-256(0x00 || data)``, an inner node ``SHA-256(0x01 || left || right)``,
the empty tree ``SHA-256("")``. The tree over ``n`` leaves splits at ``k``, the largest power of
two smaller than ``n``.

Proofs are built from a :class:`NodeSource` that knows the hash of every *perfect* subtree of
the tree (``2**level`` leaves starting at ``index * 2**level``): the store keeps those at tile
levels (every eighth level) and :mod:`enclave.tlog.tiles` rebuilds the rest, so neither a
server nor a client ever needs the whole tree in memory. Verification follows the algorithms of
RFC 9162 sections 2.1.3.2 and 2.1.4.2 word for word.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Protocol

from enclave.errors import EnclaveError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
MAX_PROOF = 64  # a tree of at most 2**64 leaves has proofs of at most 64 hashes


class ProofError(EnclaveError, ValueError):
    """A proof that does not verify, or a request for one that cannot exist."""

    code = "log_proof_invalid"
    message = "the Merkle proof does not verify"


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class NodeSource(Protocol):
    """The hash of the perfect subtree of ``2**level`` leaves starting at ``index << level``."""

    def node(self, level: int, index: int) -> bytes: ...


class LeafList:
    """A :class:`NodeSource` over leaf hashes held in memory (small trees, tests, periods)."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self._levels: list[list[bytes]] = [list(leaves)]
        while len(self._levels[-1]) > 1:
            below = self._levels[-1]
            self._levels.append(
                [node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
            )

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def node(self, level: int, index: int) -> bytes:
        try:
            return self._levels[level][index]
        except IndexError:
            raise ProofError(f"no perfect subtree at level {level} index {index}") from None

    def root(self) -> bytes:
        return range_hash(self, 0, self.size)


def range_hash(source: NodeSource, start: int, end: int) -> bytes:
    """MTH(D[start:end]) for a range the RFC's recursion produces (``start`` aligned to the
    largest power of two that fits in ``end - start``)."""
    size = end - start
    if size <= 0:
        if size == 0 and start == 0:
            return EMPTY_ROOT
        raise ProofError("an empty or reversed range has no hash")
    if size & (size - 1) == 0 and start % size == 0:
        return source.node(size.bit_length() - 1, start // size)
    k = split_point(size)
    return node_hash(range_hash(source, start, start + k), range_hash(source, start + k, end))


def root(source: NodeSource, size: int) -> bytes:
    return range_hash(source, 0, size)


def inclusion_proof(source: NodeSource, index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 9162 section 2.1.3.1."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    proof: list[bytes] = []
    start, end = 0, size
    # Walk down from the root; the siblings are collected top-down, then reversed.
    while end - start > 1:
        k = split_point(end - start)
        if index < start + k:
            proof.append(range_hash(source, start + k, end))
            end = start + k
        else:
            proof.append(range_hash(source, start, start + k))
            start += k
    proof.reverse()
    return proof


def consistency_proof(source: NodeSource, old: int, new: int) -> list[bytes]:
    """PROOF(old, D[0:new]) of RFC 9162 section 2.1.4.1 (empty for old 0 or old == new)."""
    if not 0 <= old <= new:
        raise ProofError(f"no consistency proof from size {old} to size {new}")
    if old in (0, new):
        return []
    proof: list[bytes] = []
    start, end, m, complete = 0, new, old, True
    while True:
        n = end - start
        if m == n:
            if not complete:
                proof.append(range_hash(source, start, end))
            break
        k = split_point(n)
        if m <= k:
            proof.append(range_hash(source, start + k, end))
            end = start + k
        else:
            proof.append(range_hash(source, start, start + k))
            start += k
            m -= k
            complete = False
    proof.reverse()
    return proof


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes
) -> None:
    """RFC 9162 section 2.1.3.2; :class:`ProofError` unless ``proof`` takes ``leaf`` (a leaf
    hash) at ``index`` to ``expected_root`` of a tree of ``size``."""
    if not 0 <= index < size:
        raise ProofError("the leaf index is not in the tree")
    _check_hashes([leaf, *proof])
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the inclusion proof is too short")
    if not hmac.compare_digest(r, expected_root):
        raise ProofError("the inclusion proof does not lead to the root")


def verify_consistency(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 section 2.1.4.2; :class:`ProofError` unless the tree of size ``new`` with
    ``new_root`` extends the tree of size ``old`` with ``old_root``."""
    _check_hashes(proof)
    if old < 0 or old > new:
        raise ProofError("the old tree is larger than the new one")
    if old == 0:
        # RFC 9162 defines proofs for 0 < old only: anything extends the empty tree, so a
        # caller with nothing to compare against has nothing to verify (and must say so).
        raise ProofError("there is no consistency proof from the empty tree")
    if old == new:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if not hmac.compare_digest(old_root, new_root):
            raise ProofError("two different roots for one tree size: the log forked")
        return
    if not proof:
        raise ProofError("the consistency proof is empty")
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the consistency proof is too short")
    if not hmac.compare_digest(fr, old_root):
        raise ProofError("the consistency proof does not lead to the old root")
    if not hmac.compare_digest(sr, new_root):
        raise ProofError("the consistency proof does not lead to the new root")


def _check_hashes(proof: Sequence[bytes]) -> None:
    if len(proof) > MAX_PROOF:
        raise ProofError("the proof is longer than any tree needs")
    if any(not isinstance(p, bytes) or len(p) != HASH_SIZE for p in proof):
        raise ProofError("a proof hash is not 32 bytes")
