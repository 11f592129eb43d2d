"""``paygate log show|verify|prove|witness``: read, audit and witness an appliance's transparency
log (docs/TRANSPARENCY.md).

``show``, ``verify`` and ``prove`` read the log over HTTP like any client (checkpoint, tiles,
entry bundles from ``<url>/v1/log/``) and trust nothing but the log key given (``--log-key``:
the vkey the attestation binds, ``paygate attest verify`` shows it). ``verify`` rebuilds the
root from every tile, checks every entry against its leaf hash, and checks consistency with the
checkpoint stored in ``--state`` (the largest seen; updated). ``witness`` runs a
c2sp.org/tlog-witness service for the logs named by ``--log``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Generator
from pathlib import Path
from typing import Any

import httpx

from enclave.tlog import checkpoint as cp
from enclave.tlog import entries, merkle, note, tiles
from paygate.cli.options import add_action, command_actions
from paygate.client.errors import LogInconsistent, LogUnverified
from paygate.client.tlog import (
    LOG_PREFIX,
    LogState,
    Request,
    Seen,
    consistent,
    fetch_tiles,
    open_checkpoint,
    prove_inclusion,
    read_entries,
)
from paygate.errors import PaygateError

MAX_BODY = 4 * 1024 * 1024


class LogCheckFailed(PaygateError):
    message = "the transparency log check failed"
    code = "log_unverified"


def register(sub: Any) -> None:
    actions = command_actions(sub, "log", "read, verify and witness a transparency log")
    # What every action that reads a log over HTTP takes.
    reader = argparse.ArgumentParser(add_help=False)
    reader.add_argument("url", help="the gateway's base URL (the log is under /v1/log/)")
    reader.add_argument("--log-key", required=True, help="the log's vkey (attested)")
    reader.add_argument("--timeout", type=float, default=10.0)

    show = add_action(
        actions, "show", _show, "the checkpoint and the last entries", parents=[reader]
    )
    show.add_argument("--entries", type=int, default=10, help="how many of the last entries")

    text = "rebuild the tree from its tiles and check it against the last seen"
    verify = add_action(actions, "verify", _verify, text, parents=[reader])
    verify.add_argument("--state", type=Path, help="JSON file of the largest checkpoint seen")
    verify.add_argument("--witness", action="append", default=[], help="a witness vkey")
    verify.add_argument("--quorum", type=int, default=0, help="witness cosignatures required")

    prove = add_action(
        actions, "prove", _prove, "an inclusion proof of one entry", parents=[reader]
    )
    which = prove.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=int, help="the entry's index")
    which.add_argument("--code-digest", help="the newest release entry of this code digest")

    witness = add_action(actions, "witness", _witness, "run a c2sp.org/tlog-witness service")
    witness.add_argument("--name", required=True, help="the witness's key name")
    witness.add_argument("--key-file", type=Path, required=True, help="Ed25519 key (made if new)")
    witness.add_argument("--log", action="append", default=[], help="a log's vkey to witness")
    witness.add_argument("--state", type=Path, help="SQLite file of the cosigned checkpoints")
    witness.add_argument("--listen", default="127.0.0.1:7380", help="host:port")
    witness.add_argument("--print-vkey", action="store_true", help="print the vkey and exit")


def drive(flow: Generator[Request, tuple[int, bytes], Any], client: httpx.Client) -> Any:
    """Run a log flow over HTTP; refusals become a one-line error."""
    try:
        request = next(flow)
        while True:
            request = flow.send(_get(client, request.url))
    except StopIteration as stop:
        return stop.value
    except (LogInconsistent, LogUnverified) as exc:
        error = LogCheckFailed(str(exc))
        error.code = exc.code
        raise error from None


def _get(client: httpx.Client, url: str) -> tuple[int, bytes]:
    try:
        with client.stream("GET", url) as response:
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_BODY:
                    raise LogCheckFailed(f"{url}: the answer is larger than {MAX_BODY} bytes")
            return response.status_code, body
    except httpx.HTTPError as exc:
        raise LogCheckFailed(f"{url}: {type(exc).__name__}") from None


def _checkpoint(
    args: argparse.Namespace, client: httpx.Client, witnesses: list[str] | None = None
) -> tuple[str, cp.Checkpoint, str]:
    base = args.url.rstrip("/") + LOG_PREFIX
    try:
        origin = note.parse_vkey(args.log_key).name
    except note.NoteError as exc:
        raise LogCheckFailed(f"--log-key: {exc}") from None
    status, body = _get(client, base + "checkpoint")
    if status != 200:
        raise LogCheckFailed(f"the checkpoint is not available (HTTP {status})")
    try:
        checkpoint, signed = open_checkpoint(
            body, args.log_key, origin, witnesses or [], getattr(args, "quorum", 0)
        )
    except (LogInconsistent, LogUnverified) as exc:
        raise LogCheckFailed(str(exc)) from None
    return base, checkpoint, signed


def _show(args: argparse.Namespace) -> int:
    with httpx.Client(timeout=args.timeout, trust_env=False) as client:
        base, checkpoint, _ = _checkpoint(args, client)
        print(f"origin  {checkpoint.origin}")
        print(f"size    {checkpoint.size}")
        print(f"root    {checkpoint.root.hex()}")
        first = max(0, checkpoint.size - max(0, args.entries))
        if checkpoint.size and args.entries > 0:
            found = drive(read_entries(base, checkpoint.size, first, checkpoint.size), client)
            for index, data in found:
                try:
                    print(f"{index}\t{json.dumps(entries.parse(data), sort_keys=True)}")
                except entries.EntryInvalid:
                    print(f"{index}\t(not a paygate entry: {len(data)} bytes)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    with httpx.Client(timeout=args.timeout, trust_env=False) as client:
        base, checkpoint, signed = _checkpoint(args, client, args.witness)
        state = LogState(args.state) if args.state else LogState()
        seen = state.get(checkpoint.origin)
        if seen is not None:
            drive(consistent(base, seen, checkpoint), client)
        # Every entry against its leaf hash, and the root rebuilt from the tiles.
        nodes = tiles.TileNodes(checkpoint.size)
        root = drive(
            fetch_tiles(base, tiles.resolve(lambda: merkle.root(nodes, checkpoint.size), nodes)),
            client,
        )
        if root != checkpoint.root:
            raise LogCheckFailed("the tiles do not rebuild the checkpoint's root")
        kinds: dict[str, int] = {}
        for start in range(0, checkpoint.size, tiles.WIDTH):
            chunk = drive(
                read_entries(base, checkpoint.size, start, min(checkpoint.size, start + 256)),
                client,
            )
            level0 = drive(fetch_tiles(base, _tile_flow(nodes, start // tiles.WIDTH)), client)
            for (index, data), leaf in zip(chunk, level0, strict=True):
                if merkle.leaf_hash(data) != leaf:
                    raise LogCheckFailed(f"entry {index} does not hash to its leaf")
                try:
                    kind = entries.parse(data)["type"]
                except entries.EntryInvalid:
                    kind = "other"
                kinds[kind] = kinds.get(kind, 0) + 1
        state.put(checkpoint.origin, Seen(checkpoint.size, checkpoint.root, signed))
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "empty"
    print(f"{checkpoint.origin}: size {checkpoint.size} verified ({summary})")
    return 0


def _tile_flow(nodes: tiles.TileNodes, index: int) -> Generator[tiles.TileRef, bytes, list[bytes]]:
    width = tiles.tile_width(nodes.size, 0, index)

    def hashes() -> list[bytes]:
        found = nodes.tiles.get((0, index))
        if found is None:
            raise tiles.MissingTile(tiles.TileRef(0, index, width))
        return found

    return tiles.resolve(hashes, nodes)


def _prove(args: argparse.Namespace) -> int:
    with httpx.Client(timeout=args.timeout, trust_env=False) as client:
        base, checkpoint, signed = _checkpoint(args, client)
        if args.index is not None:
            if not 0 <= args.index < checkpoint.size:
                raise LogCheckFailed(f"the log has {checkpoint.size} entries")
            index = args.index
            data = drive(read_entries(base, checkpoint.size, index, index + 1), client)[0][1]
        else:
            index, data = _find_release(base, checkpoint, args.code_digest, client)
        proof = drive(prove_inclusion(base, index, data, checkpoint), client)
    document = {
        "origin": checkpoint.origin,
        "size": checkpoint.size,
        "root": checkpoint.root.hex(),
        "index": index,
        "entry": data.decode("utf-8", "replace"),
        "leaf_hash": merkle.leaf_hash(data).hex(),
        "proof": [h.hex() for h in proof],
        "checkpoint": signed,
    }
    print(json.dumps(document, indent=2))
    return 0


def _find_release(
    base: str, checkpoint: cp.Checkpoint, code_digest: str, client: httpx.Client
) -> tuple[int, bytes]:
    end = checkpoint.size
    while end > 0:
        first = (end - 1) // tiles.WIDTH * tiles.WIDTH
        for index, data in reversed(drive(read_entries(base, checkpoint.size, first, end), client)):
            try:
                entry = entries.parse(data)
            except entries.EntryInvalid:
                continue
            if entry["type"] == "release" and entry["code_digest"] == code_digest:
                return index, data
        end = first
    raise LogCheckFailed(f"no release entry for {code_digest}")


def _witness(args: argparse.Namespace) -> int:
    from aiohttp import web

    from paygate.tlog.witness_server import (
        WitnessState,
        build_witness,
        load_or_create_key,
        witness_app,
    )

    try:
        key = load_or_create_key(args.key_file)
        witness = build_witness(args.name, key, args.log)
    except (OSError, ValueError) as exc:
        raise PaygateError(f"witness: {exc}") from None
    vkey = witness.signer.verifier.vkey()
    print(vkey, flush=True)
    if args.print_vkey:
        return 0
    if not args.log or args.state is None:
        raise PaygateError("a witness needs --state and at least one --log vkey")
    host, _, port = args.listen.rpartition(":")
    state = WitnessState(args.state, witness)
    try:
        web.run_app(witness_app(state), host=host or "127.0.0.1", port=int(port), print=None)
    finally:
        state.close()
    return 0
