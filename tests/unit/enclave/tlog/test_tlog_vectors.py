"""enclave.tlog against published vectors (tests/fixtures/tlog/SOURCES.md says where each comes
from) and against a naive RFC 6962 implementation (hypothesis)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave.tlog import checkpoint as cp
from enclave.tlog import entries, merkle, note, tiles
from enclave.tlog.witness import Witness, parse_request

VECTORS = Path(__file__).resolve().parents[3] / "fixtures" / "tlog"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def b64(text: str) -> bytes:
    return base64.b64decode(text)


# --- a naive RFC 6962 section 2.1, straight from the text ----------------------------------


def naive_mth(data: list[bytes]) -> bytes:
    if not data:
        return hashlib.sha256(b"").digest()
    if len(data) == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = 1
    while k * 2 < len(data):
        k *= 2
    return hashlib.sha256(b"\x01" + naive_mth(data[:k]) + naive_mth(data[k:])).digest()


def naive_path(m: int, data: list[bytes]) -> list[bytes]:
    n = len(data)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*naive_path(m, data[:k]), naive_mth(data[k:])]
    return [*naive_path(m - k, data[k:]), naive_mth(data[:k])]


def naive_subproof(m: int, data: list[bytes], complete: bool) -> list[bytes]:
    n = len(data)
    if m == n:
        return [] if complete else [naive_mth(data)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*naive_subproof(m, data[:k], complete), naive_mth(data[k:])]
    return [*naive_subproof(m - k, data[k:], False), naive_mth(data[:k])]


# --- Merkle ---------------------------------------------------------------------------------


def test_rfc6962_reference_tree_roots_and_node_hashes() -> None:
    tree = load("rfc6962_tree8.json")
    leaves = [merkle.leaf_hash(bytes.fromhex(x)) for x in tree["leaf_inputs_hex"]]
    for size, expected in enumerate(tree["root_hashes_hex_by_size"]):
        assert merkle.LeafList(leaves[:size]).root().hex() == expected
    source = merkle.LeafList(leaves)
    for level, hashes in enumerate(tree["node_hashes_hex_by_level"]):
        assert [source.node(level, i).hex() for i in range(len(hashes))] == hashes


@pytest.mark.parametrize(
    "probe", load("merkle_inclusion_probes.json")["probes"], ids=lambda p: p["file"]
)
def test_inclusion_probes(probe: dict[str, Any]) -> None:
    def verify() -> None:
        merkle.verify_inclusion(
            b64(probe["leafHash"]),
            probe["leafIdx"],
            probe["treeSize"],
            [b64(h) for h in probe["proof"] or []],
            b64(probe["root"]),
        )

    if probe["wantErr"]:
        with pytest.raises(merkle.ProofError):
            verify()
    else:
        verify()


@pytest.mark.parametrize(
    "probe", load("merkle_consistency_probes.json")["probes"], ids=lambda p: p["file"]
)
def test_consistency_probes(probe: dict[str, Any]) -> None:
    def verify() -> None:
        merkle.verify_consistency(
            probe["size1"],
            probe["size2"],
            b64(probe["root1"]),
            b64(probe["root2"]),
            [b64(h) for h in probe["proof"] or []],
        )

    if probe["wantErr"]:
        with pytest.raises(merkle.ProofError):
            verify()
    else:
        verify()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=8), min_size=1, max_size=300), st.data())
def test_proofs_match_a_naive_implementation(data: list[bytes], draw: st.DataObject) -> None:
    n = len(data)
    hashes = [merkle.leaf_hash(d) for d in data]
    source = merkle.LeafList(hashes)
    assert source.root() == naive_mth(data)
    m = draw.draw(st.integers(0, n - 1))
    proof = merkle.inclusion_proof(source, m, n)
    assert proof == naive_path(m, data)
    merkle.verify_inclusion(hashes[m], m, n, proof, naive_mth(data))
    old = draw.draw(st.integers(1, n))
    consistency = merkle.consistency_proof(source, old, n)
    assert consistency == ([] if old == n else naive_subproof(old, data, True))
    merkle.verify_consistency(old, n, naive_mth(data[:old]), naive_mth(data), consistency)
    # The same proofs from tiles alone (what a client and the store compute).
    nodes = tiles.TileNodes(n)
    tile_hashes = {
        (0, i): b"".join(hashes[i * 256 : i * 256 + 256]) for i in range((n + 255) // 256)
    }
    got = tiles.drive(
        tiles.resolve(lambda: merkle.inclusion_proof(nodes, m, n), nodes),
        lambda ref: tile_hashes[(ref.level, ref.index)][: ref.width * 32],
    )
    assert got == proof


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=4), min_size=2, max_size=64), st.data())
def test_a_changed_leaf_or_proof_never_verifies(data: list[bytes], draw: st.DataObject) -> None:
    n = len(data)
    hashes = [merkle.leaf_hash(d) for d in data]
    source = merkle.LeafList(hashes)
    m = draw.draw(st.integers(0, n - 1))
    proof = merkle.inclusion_proof(source, m, n)
    forged = merkle.leaf_hash(data[m] + b"x")
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(forged, m, n, proof, source.root())
    old = draw.draw(st.integers(1, n - 1))
    consistency = merkle.consistency_proof(source, old, n)
    other = merkle.LeafList([*hashes[: old - 1], merkle.leaf_hash(b"fork")]).root()
    with pytest.raises(merkle.ProofError):
        merkle.verify_consistency(old, n, other, source.root(), consistency)


# --- notes ------------------------------------------------------------------------------------


def test_c2sp_signed_note_example() -> None:
    example = load("notes.json")["c2sp_signed_note_example"]
    verifier = note.parse_vkey(example["vkey"])
    _, verified = note.open_note(example["note"], [verifier])
    assert [s.name for s in verified] == ["example.com/foo"]


def test_golang_note_vectors() -> None:
    g = load("notes.json")["golang_note"]
    peter = note.parse_vkey(g["peter_vkey"])
    enoch = note.parse_vkey(g["enoch_vkey"])
    signer = note.parse_skey(g["peter_skey"])
    # Ed25519 signing is deterministic: the exact note the Go package makes.
    assert note.sign(g["text"], [signer]) == g["signed_by_peter"]
    both = g["text"] + "\n" + g["peter_sig_line"] + g["enoch_sig_line"]
    _, verified = note.open_note(both, [peter, enoch])
    assert {s.name for s in verified} == {"PeterNeumann", "EnochRoot"}
    _, only_peter = note.open_note(both, [peter])  # Enoch unknown: ignored
    assert [s.name for s in only_peter] == ["PeterNeumann"]
    for bad in g["bad_vkeys"]:
        with pytest.raises(note.NoteError):
            note.parse_vkey(bad)
    for vkey in (g["peter_vkey"],):
        for i in range(len(vkey)):  # every strict prefix is refused
            with pytest.raises(note.NoteError):
                note.parse_vkey(vkey[:i])
    for bad in g["bad_messages"]:
        with pytest.raises(note.NoteError):
            note.open_note(bad, [peter])
    for hexed in g["bad_messages_bytes_hex"]:
        with pytest.raises(note.NoteError):
            note.open_note(bytes.fromhex(hexed), [peter])
    # A known key's bad signature rejects the note even beside a good one.
    line = g["peter_sig_line"]
    at = line.index(" ", 2) + 20  # inside the signature, past the key ID
    tampered = g["text"] + "\n" + line[:at] + ("A" if line[at] != "A" else "B") + line[at + 1 :]
    with pytest.raises(note.BadSignature):
        note.open_note(tampered + g["enoch_sig_line"], [peter, enoch])
    many = g["text"] + "\n" + g["peter_sig_line"] * 101
    with pytest.raises(note.NoteError):
        note.open_note(many, [peter])


def test_real_checkpoints_sumdb_ecdsa_and_cosigned() -> None:
    notes = load("notes.json")
    sumdb = notes["sumdb"]
    checkpoint, _, _ = cp.open_checkpoint(sumdb["note"], [note.parse_vkey(sumdb["vkey"])])
    assert checkpoint.origin == "go.sum database tree"
    assert checkpoint.size == 35225469
    for case in notes["formats"]["ecdsa"]:
        verifier = note.parse_vkey(case["vkey"])
        if case["expect"] == "verified":
            note.open_note(case["note"], [verifier])
        else:
            with pytest.raises(note.NoteError):
                note.open_note(case["note"], [verifier])
    for bad in notes["formats"]["ecdsa_bad_vkeys"]:
        with pytest.raises(note.NoteError):
            note.parse_vkey(bad)
    arche = notes["tlog_scales"]["arche"]
    log_key, witness_key = (note.parse_vkey(v) for v in arche["vkeys"])
    assert isinstance(witness_key, note.Ed25519Verifier)
    assert witness_key.key_type == note.COSIGNATURE_V1
    _, verified = note.open_note(arche["note"], [log_key, witness_key])
    assert {s.name for s in verified} == {
        "arche2025h1.staging.ct.transparency.dev",
        "remora.n621.de",
    }
    stamp = notes["formats"]["cosig_timestamp"]
    raw = b64(stamp["b64"])
    assert raw[:4].hex() == stamp["key_id"]
    assert note.cosignature_time(raw[4:]) == stamp["timestamp"]


def test_serverless_log_checkpoints_roots_and_consistency() -> None:
    log = load("serverless_log.json")
    verifier = note.parse_vkey(log["vkey"])
    leaves = [merkle.leaf_hash(x.encode()) for x in log["leaves"]]
    opened = []
    for size, raw in enumerate(log["checkpoints"]):
        checkpoint, _, _ = cp.open_checkpoint(raw, [verifier], origin=log["origin"])
        assert checkpoint.size == size
        assert merkle.LeafList(leaves[:size]).root() == checkpoint.root
        opened.append(checkpoint)
    source = merkle.LeafList(leaves)
    for old in opened[1:]:
        for new in opened[old.size :]:
            tree = merkle.LeafList(leaves[: new.size])
            proof = merkle.consistency_proof(tree, old.size, new.size)
            merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)
    assert source.size == 15


# --- tiles ------------------------------------------------------------------------------------


def test_tile_paths_and_sizes() -> None:
    vectors = load("tiles.json")
    for level, index, width, path in vectors["paths"]:
        level = None if level == "entries" else level
        assert tiles.tile_path(level, index, width or 256) == path
        ref = tiles.parse_tile_path(path)
        assert (ref.level, ref.index, ref.width) == (level, index, width or 256)
    for bad in vectors["bad_paths"]:
        with pytest.raises(tiles.TilePathError):
            tiles.parse_tile_path(bad)
    for case in vectors["sizes"]:
        full, partial = tiles.tiles_for_size(case["size"])
        assert {str(k): v for k, v in full.items()} == case["full"]
        assert {str(k): v for k, v in partial.items()} == case["partial"]


def test_entry_bundles_round_trip_and_refuse_truncation() -> None:
    items = [b"", b"a", b"x" * 300]
    data = tiles.encode_bundle(items)
    assert tiles.decode_bundle(data, 3) == items
    for cut in (1, len(data) - 1):
        with pytest.raises(merkle.ProofError):
            tiles.decode_bundle(data[:cut], 3)
    with pytest.raises(merkle.ProofError):
        tiles.decode_bundle(data, 2)


# --- witness ----------------------------------------------------------------------------------


def test_witness_answers_like_the_spec() -> None:
    vectors = load("witness_litewitness.json")
    log_key = note.Ed25519Verifier(vectors["origin"], bytes.fromhex(vectors["log_public_key_hex"]))
    signer = note.Ed25519Signer(
        vectors["witness_name"], ed25519.Ed25519PrivateKey.generate(), key_type=note.COSIGNATURE_V1
    )
    witness = Witness(signer, {vectors["origin"]: [log_key]})
    latest = None
    for request in vectors["requests"]:
        answer = witness.decide(parse_request(request["body"].encode()), latest)
        assert answer.status == request["spec_status"], request["litewitness_assert"]
        if answer.status == 409:
            assert answer.content_type == "text/x.tlog.size"
        if answer.cosigned is not None:
            latest = (answer.cosigned.size, answer.cosigned.root)
            # The cosignature verifies under the witness's vkey over the submitted checkpoint.
            submitted = request["body"].split("\n\n", 1)[1]
            note.open_note(submitted + answer.body.decode(), [signer.verifier])
    assert latest is not None
    assert latest[0] == 5


def test_entries_are_canonical_and_checked() -> None:
    data = entries.release(
        time=1,
        replica="r1",
        paygate_version="0.1.0",
        code_digest="sha256:" + "a" * 64,
        config_digest="sha256:" + "b" * 64,
        weights=[("m", "sha256:" + "c" * 64)],
        engine_kind="ollama",
    )
    assert entries.parse(data)["type"] == "release"
    with pytest.raises(entries.EntryInvalid):
        entries.parse(data.replace(b'"v":1', b'"v":1 '))  # not canonical
    with pytest.raises(entries.EntryInvalid):
        entries.parse(data.replace(b'"engine_kind"', b'"x"').replace(b"release", b"releasf"))


# --- untrusted input: only the modules' own errors, never a crash -----------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_parsers_refuse_garbage_with_their_own_errors(data: bytes) -> None:
    peter = note.parse_vkey(load("notes.json")["golang_note"]["peter_vkey"])
    with pytest.raises(note.NoteError):
        note.open_note(data, [peter])
    with contextlib.suppress(ValueError):
        parse_request(data)
    with contextlib.suppress(entries.EntryInvalid):
        entries.parse(data)
    text = data.decode("latin-1")
    with contextlib.suppress(tiles.TilePathError):
        tiles.parse_tile_path("tile/" + text)
    with contextlib.suppress(note.NoteError):
        note.parse_vkey(text)


def test_witness_refuses_a_second_root_for_the_size_it_cosigned() -> None:
    log_signer = note.Ed25519Signer("log.test", ed25519.Ed25519PrivateKey.generate())
    witness_signer = note.Ed25519Signer(
        "w.test", ed25519.Ed25519PrivateKey.generate(), key_type=note.COSIGNATURE_V1
    )
    witness = Witness(witness_signer, {"log.test": [log_signer.verifier]})
    honest = [merkle.leaf_hash(b) for b in (b"a", b"b", b"c")]
    forked = [merkle.leaf_hash(b) for b in (b"a", b"b", b"X")]

    def request(old: int, proof: list[bytes], leaves: list[bytes]) -> bytes:
        text = cp.Checkpoint("log.test", len(leaves), merkle.LeafList(leaves).root()).text()
        lines = "".join(base64.b64encode(h).decode() + "\n" for h in proof)
        return f"old {old}\n{lines}\n{note.sign(text, [log_signer])}".encode()

    first = witness.decide(parse_request(request(0, [], honest)), None)
    assert first.status == 200
    assert first.cosigned is not None
    latest = (first.cosigned.size, first.cosigned.root)
    same_size = witness.decide(parse_request(request(3, [], forked)), latest)
    assert same_size.status == 409
    assert same_size.body == b"3\n"
    longer = [*forked, merkle.leaf_hash(b"d")]
    proof = merkle.consistency_proof(merkle.LeafList(longer), 3, 4)
    assert witness.decide(parse_request(request(3, proof, longer)), latest).status == 422
    good = [*honest, merkle.leaf_hash(b"d")]
    proof = merkle.consistency_proof(merkle.LeafList(good), 3, 4)
    assert witness.decide(parse_request(request(3, proof, good)), latest).status == 200
