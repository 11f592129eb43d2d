"""Tiles and entry bundles (c2sp.org/tlog-tiles), and proofs computed from tiles.

A tile at level ``L``, index ``N`` holds the hashes of 256 consecutive perfect subtrees of
height ``8 L`` (at level 0: leaf hashes); the rightmost tiles of a tree of size ``s`` are partial,
``floor(s / 256**L) mod 256`` hashes wide. Paths are ``tile/<L>/<N>[.p/<W>]`` and
``tile/entries/<N>[.p/<W>]`` with ``N`` in zero-padded three-digit elements, all but the last
prefixed ``x`` (1234067 → ``x001/x234/067``). An entry bundle is the entries of a level-0 tile,
each prefixed by its big-endian uint16 length.

:class:`TileNodes` answers :class:`~enclave.tlog.merkle.NodeSource` from tiles alone, raising
:class:`MissingTile` for a tile it has not been given: the caller (server or client, sync or
async) fetches that tile and asks again (:func:`resolve`).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from enclave.errors import EnclaveError
from enclave.tlog.merkle import HASH_SIZE, ProofError, node_hash

WIDTH = 256
HEIGHT = 8
MAX_LEVEL = 63
MAX_ENTRY = 0xFFFF
_ELEMENT = re.compile(r"x[0-9]{3}")
_LAST = re.compile(r"[0-9]{3}")
_WIDTH = re.compile(r"[1-9][0-9]{0,2}")
_LEVEL = re.compile(r"0|[1-9][0-9]?")
T = TypeVar("T")
Q = TypeVar("Q")  # what a flow asks
A = TypeVar("A")  # what it is answered


class TilePathError(EnclaveError, ValueError):
    """A path that is not a tile or entry bundle path of the spec."""

    code = "tile_path_invalid"
    message = "not a tile or entry bundle path"


@dataclass(frozen=True, slots=True)
class TileRef:
    level: int | None  # None: the entry bundle
    index: int
    width: int  # 1..256; 256 is a full tile (no .p suffix)

    def path(self) -> str:
        return tile_path(self.level, self.index, self.width)


def encode_index(index: int) -> str:
    if index < 0:
        raise ValueError("a tile index is not negative")
    digits = f"{index:d}"
    digits = digits.rjust(-(-len(digits) // 3) * 3, "0")
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    return "/".join([*("x" + g for g in groups[:-1]), groups[-1]])


def tile_path(level: int | None, index: int, width: int = WIDTH) -> str:
    """``tile/<L>/<N>[.p/<W>]`` (``level`` None: ``tile/entries/...``)."""
    if not 1 <= width <= WIDTH:
        raise ValueError("a tile is 1 to 256 hashes wide")
    head = "entries" if level is None else str(level)
    tail = "" if width == WIDTH else f".p/{width}"
    return f"tile/{head}/{encode_index(index)}{tail}"


def parse_tile_path(path: str, *, max_index: int = (1 << 64) // WIDTH) -> TileRef:
    """The tile a path names; :class:`TilePathError` for anything not byte-exact per spec."""
    if len(path) > 128:
        raise TilePathError("the path is too long")
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        raise TilePathError("not a tile path")
    level: int | None
    if parts[1] == "entries":
        level = None
    elif _LEVEL.fullmatch(parts[1]) and int(parts[1]) <= MAX_LEVEL:
        level = int(parts[1])
    else:
        raise TilePathError("the level is not 0 to 63 without leading zeros")
    rest = parts[2:]
    width = WIDTH
    if len(rest) >= 2 and rest[-2].endswith(".p"):
        if not _WIDTH.fullmatch(rest[-1]) or int(rest[-1]) >= WIDTH:
            raise TilePathError("a partial width is 1 to 255 without leading zeros")
        width = int(rest[-1])
        rest = [*rest[:-2], rest[-2][:-2]]
    if (
        not rest
        or not _LAST.fullmatch(rest[-1])
        or not all(_ELEMENT.fullmatch(e) for e in rest[:-1])
    ):
        raise TilePathError("the index is not x-prefixed three-digit elements")
    digits = "".join(e.lstrip("x") for e in rest)
    if len(rest) > 1 and rest[0] == "x000":
        raise TilePathError("the index has a leading zero element")
    index = int(digits)
    if index > max_index:
        raise TilePathError("the index is beyond any tree")
    return TileRef(level, index, width)


def tile_width(size: int, level: int, index: int) -> int:
    """How many hashes tile (level, index) has in a tree of ``size`` (0: none yet)."""
    available = (size >> (HEIGHT * level)) - index * WIDTH
    return max(0, min(WIDTH, available))


def tiles_for_size(size: int) -> tuple[dict[int, int], dict[int, int]]:
    """({level: full tiles}, {level: partial width}) of a tree of ``size``."""
    full: dict[int, int] = {}
    partial: dict[int, int] = {}
    level = 0
    while size >> (HEIGHT * level):
        count = size >> (HEIGHT * level)
        if count // WIDTH:
            full[level] = count // WIDTH
        if count % WIDTH:
            partial[level] = count % WIDTH
        level += 1
    return full, partial


def hash_tile(hashes: Sequence[bytes]) -> bytes:
    """The tile's hashes hashed up to one (a full tile: the parent tile's hash)."""
    level = list(hashes)
    while len(level) > 1:
        level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def split_hashes(data: bytes, width: int) -> list[bytes]:
    if len(data) != width * HASH_SIZE:
        raise ProofError(f"a tile of width {width} is {width * HASH_SIZE} bytes, not {len(data)}")
    return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


def encode_bundle(entries: Iterable[bytes]) -> bytes:
    out = bytearray()
    for entry in entries:
        if len(entry) > MAX_ENTRY:
            raise ValueError("an entry is at most 65535 bytes")
        out += struct.pack(">H", len(entry)) + entry
    return bytes(out)


def decode_bundle(data: bytes, width: int) -> list[bytes]:
    entries, offset = [], 0
    while offset < len(data):
        if offset + 2 > len(data):
            raise ProofError("an entry bundle ends inside a length")
        (length,) = struct.unpack_from(">H", data, offset)
        offset += 2
        if offset + length > len(data):
            raise ProofError("an entry bundle ends inside an entry")
        entries.append(data[offset : offset + length])
        offset += length
    if len(entries) != width:
        raise ProofError(f"the entry bundle has {len(entries)} entries, not {width}")
    return entries


class MissingTile(EnclaveError, LookupError):
    code = "tile_missing"
    message = "a tile the proof needs was not fetched"

    def __init__(self, ref: TileRef) -> None:
        super().__init__(ref.path())
        self.ref = ref


class TileNodes:
    """A NodeSource over the tiles of a tree of ``size`` that were fetched so far."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.tiles: dict[tuple[int, int], list[bytes]] = {}

    def add(self, ref: TileRef, data: bytes) -> None:
        assert ref.level is not None
        self.tiles[(ref.level, ref.index)] = split_hashes(data, ref.width)

    def node(self, level: int, index: int) -> bytes:
        if (index + 1) << level > self.size:
            raise ProofError(f"no perfect subtree at level {level} index {index}")
        tile_level, height = divmod(level, HEIGHT)
        first = index << height
        tile_index, offset = divmod(first, WIDTH)
        hashes = self.tiles.get((tile_level, tile_index))
        width = tile_width(self.size, tile_level, tile_index)
        if hashes is None:
            raise MissingTile(TileRef(tile_level, tile_index, width))
        return hash_tile(hashes[offset : offset + (1 << height)])


def resolve(compute: Callable[[], T], nodes: TileNodes) -> Generator[TileRef, bytes, T]:
    """Run ``compute`` until it needs no tile it lacks: yields each missing tile's ref and takes
    its bytes back (a generator, so the same loop serves sync and async fetchers)."""
    for _ in range(4 * MAX_LEVEL + 8):  # each round adds a tile: a proof needs a few per level
        try:
            return compute()
        except MissingTile as missing:
            nodes.add(missing.ref, (yield missing.ref))
    raise ProofError("a proof needed more tiles than any tree has")


def drive(flow: Generator[Q, A, T], fetch: Callable[[Q], A]) -> T:
    """Run a :func:`resolve` generator (or any flow of requests) with a synchronous fetcher."""
    try:
        ref = next(flow)
        while True:
            ref = flow.send(fetch(ref))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
