"""The transparency log end to end: the real gateway (software key, SQLite ledger, the FAKE model
server) with ``transparency_log`` on, read by the real client, by a reader written here from the
C2SP specs alone, by ``paygate log`` and ``paygate receipts audit``, and witnessed by the real
``paygate log witness`` service.

The attacks: an operator who attests a release it never logged, a log forked or rewritten
behind a client's back, a witness asked to cosign a fork, malformed log paths.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave import SoftwareKey
from enclave.tlog import entries, merkle, note
from paygate.client import AsyncPaygateTransport, AttestationPolicy, ClientError
from paygate.client.tlog import LogState, Seen
from paygate.tlog import assembly as tlog_assembly
from paygate.tlog.open_store import open_log_store
from paygate.tlog.service import LogConfig, TransparencyLog, parse_witness
from paygate.tlog.witness_server import WitnessState, build_witness, witness_app
from paygate.x402.ledger_store import LedgerLocation
from tests.fixtures.gateway_support import Stack, running_stack
from tests.fixtures.tlog_support import CHAT, ORIGIN, chat, gateway_settings, policy

ROOT = Path(__file__).resolve().parents[4]


async def refused(url: str, attestation: AttestationPolicy) -> ClientError:
    with pytest.raises(ClientError) as caught:
        await chat(url, attestation)
    return caught.value


# --- an independent reader, written from c2sp.org/tlog-tiles and RFC 6962 only ------------------


def reader_index(n: int) -> str:
    text = str(n)
    text = "0" * (-len(text) % 3) + text
    parts = [text[i : i + 3] for i in range(0, len(text), 3)]
    return "/".join(["x" + p for p in parts[:-1]] + [parts[-1]])


def reader_mth(hashes: list[bytes]) -> bytes:
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return hashlib.sha256(b"\x01" + reader_mth(hashes[:k]) + reader_mth(hashes[k:])).digest()


def independent_root(base: str, size: int) -> tuple[bytes, list[bytes]]:
    """Every entry from the entry bundles, every leaf hash from the level-0 tiles (checked
    against each other), every level-1 tile hash checked against its full level-0 tile, and the
    root of RFC 6962 over the leaf hashes."""
    leaves: list[bytes] = []
    bundle_entries: list[bytes] = []
    full, partial = divmod(size, 256)
    for n in range(full + (1 if partial else 0)):
        width = 256 if n < full else partial
        suffix = "" if width == 256 else f".p/{width}"
        tile = httpx.get(f"{base}/tile/0/{reader_index(n)}{suffix}", timeout=10)
        assert tile.status_code == 200
        assert tile.headers["content-type"] == "application/octet-stream"
        assert len(tile.content) == 32 * width
        leaves += [tile.content[i : i + 32] for i in range(0, len(tile.content), 32)]
        bundle = httpx.get(f"{base}/tile/entries/{reader_index(n)}{suffix}", timeout=10).content
        offset = 0
        while offset < len(bundle):
            (length,) = struct.unpack(">H", bundle[offset : offset + 2])
            bundle_entries.append(bundle[offset + 2 : offset + 2 + length])
            offset += 2 + length
    assert [hashlib.sha256(b"\x00" + e).digest() for e in bundle_entries] == leaves
    for n in range(full // 256 + (1 if full % 256 else 0)):
        width = min(256, full - n * 256)
        suffix = "" if width == 256 else f".p/{width}"
        tile = httpx.get(f"{base}/tile/1/{reader_index(n)}{suffix}", timeout=10).content
        for i in range(width):
            start = (n * 256 + i) * 256
            assert tile[32 * i : 32 * i + 32] == reader_mth(leaves[start : start + 256])
    return reader_mth(leaves), bundle_entries


def reader_checkpoint(text: str, vkey: str) -> tuple[str, int, bytes]:
    """The checkpoint's three lines, once the signature of the vkey's key verifies."""
    name, key_id, key = vkey.split("+", 2)
    body, _, signatures = text.rpartition("\n\n")
    body += "\n"
    raw_key = base64.b64decode(key)
    verified = False
    for line in signatures.splitlines():
        dash, signer, signature = line.split(" ")
        raw = base64.b64decode(signature)
        if dash == "\u2014" and signer == name and raw[:4].hex() == key_id:
            assert raw_key[0] == 0x01  # Ed25519 (software key)
            ed25519.Ed25519PublicKey.from_public_bytes(raw_key[1:]).verify(raw[4:], body.encode())
            verified = True
    assert verified
    origin, size, root = body.splitlines()[:3]
    return origin, int(size), base64.b64decode(root)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(**gateway_settings(tmp_path)) as stack:
        yield stack


def vkey_of(stack: Stack) -> str:
    key = stack.key
    assert isinstance(key, SoftwareKey)
    return tlog_assembly.log_identity(ORIGIN, key).key


# --- tests ------------------------------------------------------------------------------------


async def test_release_and_key_epoch_logged_at_start_and_verified_before_the_first_prompt(
    gateway: Stack, tmp_path: Path
) -> None:
    state = LogState(tmp_path / "state.json")
    response = await chat(gateway.url, policy(state))
    assert response.status_code == 200
    seen = state.get(ORIGIN)
    assert seen is not None
    assert seen.size == 2
    assert json.loads((tmp_path / "state.json").read_text())[ORIGIN]["size"] == 2
    # The evidence binds the log (origin and key) and the log holds what was attested.
    async with gateway.client.get(gateway.url + "/v1/attestation?nonce=" + "00" * 32) as answer:
        bound = (await answer.json())["binding"]
    assert bound["log"] == {"origin": ORIGIN, "key": vkey_of(gateway)}
    base = gateway.url + "/v1/log"
    checkpoint = await asyncio.to_thread(httpx.get, base + "/checkpoint", timeout=10)
    assert checkpoint.headers["content-type"] == "text/plain; charset=utf-8"
    assert "max-age=2" in checkpoint.headers["cache-control"]
    origin, size, root = reader_checkpoint(checkpoint.text, vkey_of(gateway))
    assert (origin, size) == (ORIGIN, 2)
    rebuilt, logged = await asyncio.to_thread(independent_root, base, size)
    assert rebuilt == root
    release, epoch = (entries.parse(e) for e in logged)
    assert release["type"] == "release"
    assert release["code_digest"] == bound["gateway"]["code_digest"]
    assert epoch["type"] == "key-epoch"
    assert epoch["sealing_key"] == bound["sealing_key"]
    assert epoch["log_key"] == bound["log"]["key"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/log/tile/0/1234067",
        "/v1/log/tile/0/x001/x234/67",
        "/v1/log/tile/0/000.p/0",
        "/v1/log/tile/0/000.p/256",
        "/v1/log/tile/64/000",
        "/v1/log/tile/-1/000",
        "/v1/log/tile/data/000",
        "/v1/log/tile/0/../000",
        "/v1/log/tile/0/x000/001",
        "/v1/log/receipt-proof?leaf=zz",
    ],
)
async def test_malformed_log_paths_are_stable_json_errors(gateway: Stack, path: str) -> None:
    async with gateway.client.get(gateway.url + path) as response:
        assert response.status in (400, 404), path
        assert response.headers["X-Paygate-Error"] in ("invalid_log_path", "route_not_found")
        assert "error" in await response.json()


async def test_tiles_beyond_the_tree_are_404_and_queries_are_refused(gateway: Stack) -> None:
    for path in ("/v1/log/tile/0/000.p/3", "/v1/log/tile/0/001.p/1", "/v1/log/tile/1/000.p/1",
                 "/v1/log/tile/entries/000"):  # fmt: skip
        async with gateway.client.get(gateway.url + path) as response:
            assert response.status == 404, path
            assert response.headers["X-Paygate-Error"] == "log_not_found"
    async with gateway.client.get(gateway.url + "/v1/log/tile/0/000.p/2") as response:
        assert response.status == 200
        assert "immutable" in response.headers["Cache-Control"]
    async with gateway.client.get(gateway.url + "/v1/log/checkpoint?x=1") as response:
        assert response.status == 400
    async with gateway.client.post(gateway.url + "/v1/log/checkpoint") as response:
        assert response.status in (404, 405)


async def test_a_release_that_is_not_logged_is_refused_until_it_is_appended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured: dict[str, Any] = {}

    async def lying_start(settings: Any, key: Any, attestation: Any) -> TransparencyLog:
        # The operator's change: the same store, origin and key, but only the key epoch.
        store = await open_log_store(settings.ledger_location())
        tlog = TransparencyLog(
            LogConfig(origin=ORIGIN, replica="liar"),
            store,
            key,  # type: ignore[arg-type]
        )
        nonce = entries.epoch_nonce(key.public_key, key.receipt_public_key, tlog.identity.key)
        document = await asyncio.to_thread(attestation.evidence, nonce)
        epoch = entries.key_epoch(
            time=1,
            replica="liar",
            sealing_key=key.public_key,
            receipt_key=key.receipt_public_key,
            log_key=tlog.identity.key,
            evidence_kind=attestation.kind,
            evidence_digest="sha256:" + hashlib.sha256(json.dumps(document).encode()).hexdigest(),
        )
        await tlog.start([epoch])
        captured["tlog"], captured["attestation"] = tlog, attestation
        return tlog

    monkeypatch.setattr(tlog_assembly, "start_log", lying_start)
    async with running_stack(**gateway_settings(tmp_path)) as stack:
        error = await refused(stack.url, policy())
        assert error.code == "log_unverified"
        assert "no release entry for the attested code digest" in str(error)
        assert sum(stack.fake.hits.values()) == 0  # nothing reached the model
        # The release entry appended: the same client policy now accepts.
        attestation = captured["attestation"]
        document = await asyncio.to_thread(attestation.evidence, b"\0" * 32)
        bound = document["binding"]
        release = entries.release(
            time=2,
            replica="liar",
            paygate_version=bound["gateway"]["version"],
            code_digest=bound["gateway"]["code_digest"],
            config_digest="sha256:" + attestation.config_digest().hex(),
            weights=[],
            engine_kind="ollama",
        )
        await captured["tlog"].append([release])
        assert (await chat(stack.url, policy())).status_code == 200


async def fork_of(path: Path, key: SoftwareKey, contents: list[bytes]) -> bytes:
    """A second log with the same origin and key (the operator's other view): its root."""
    store = await open_log_store(LedgerLocation(kind="sqlite", path=path))
    tlog = TransparencyLog(LogConfig(origin=ORIGIN, replica="fork"), store, key)
    try:
        appended = await tlog.start(contents)
        return appended.checkpoint.root
    finally:
        await tlog.close()


async def test_a_fork_or_a_rewritten_past_is_refused_as_log_inconsistent(
    gateway: Stack, tmp_path: Path
) -> None:
    key = gateway.key
    assert isinstance(key, SoftwareKey)
    state = LogState(tmp_path / "state.json")
    # The client saw another view of size 2 (same key, same origin, other entries): a fork.
    other = await fork_of(tmp_path / "fork.db", key, [b"other release", b"other epoch"])
    state.put(ORIGIN, Seen(2, other, "forged"))
    error = await refused(gateway.url, policy(state))
    assert error.code == "log_inconsistent"
    assert "forked" in str(error)
    # It saw a size-1 view whose single entry the gateway's tree does not start with.
    state = LogState(tmp_path / "state1.json")
    one = await fork_of(tmp_path / "fork1.db", key, [b"rewritten"])
    state.put(ORIGIN, Seen(1, one, "forged"))
    assert (await refused(gateway.url, policy(state))).code == "log_inconsistent"
    # It saw a larger tree than the gateway now shows (a rollback that cannot be proven).
    state = LogState(tmp_path / "state3.json")
    bigger = await fork_of(tmp_path / "fork3.db", key, [b"a", b"b", b"c", b"d", b"e"])
    state.put(ORIGIN, Seen(5, bigger, "forged"))
    assert (await refused(gateway.url, policy(state))).code == "log_inconsistent"
    # The honest view is accepted, and then the client keeps it.
    state = LogState(tmp_path / "good.json")
    assert (await chat(gateway.url, policy(state))).status_code == 200
    assert state.get(ORIGIN).size == 2  # type: ignore[union-attr]


class Swap(httpx.AsyncBaseTransport):
    """A middlebox that answers the checkpoint with another log's."""

    def __init__(self, checkpoint: str) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._checkpoint = checkpoint

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/log/checkpoint":
            return httpx.Response(200, text=self._checkpoint)
        return await self._inner.handle_async_request(request)


async def test_a_checkpoint_not_signed_by_the_attested_key_or_without_quorum_is_refused(
    gateway: Stack, tmp_path: Path
) -> None:
    # Another appliance's checkpoint, same origin, its own key: not the attested key.
    stranger = SoftwareKey.generate()
    await fork_of(tmp_path / "stranger.db", stranger, [b"x", b"y"])
    store = await open_log_store(LedgerLocation(kind="sqlite", path=tmp_path / "stranger.db"))
    try:
        latest = await store.latest()
    finally:
        await store.close()
    assert latest is not None
    transport = AsyncPaygateTransport(attestation=policy(), transport=Swap(latest.served()))
    async with httpx.AsyncClient(transport=transport, timeout=20) as client:
        with pytest.raises(ClientError) as caught:
            await client.post(gateway.url + "/v1/chat/completions", json=CHAT)
    assert caught.value.code == "log_unverified"
    assert "not signed by the attested log key" in str(caught.value)
    # A witness quorum the checkpoint does not meet.
    signer = note.Ed25519Signer("w.test", ed25519.Ed25519PrivateKey.generate(), key_type=4)
    error = await refused(
        gateway.url, policy(witnesses=(signer.verifier.vkey(),), witness_quorum=1)
    )
    assert error.code == "log_unverified"
    assert "witness cosignatures" in str(error)
    assert sum(gateway.fake.hits.values()) == 0


@pytest.fixture
async def witness(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """The real witness service (paygate.tlog.witness_server) for ORIGIN's key, made below."""
    key = SoftwareKey.generate()
    vkey = tlog_assembly.log_identity(ORIGIN, key).key
    wkey = ed25519.Ed25519PrivateKey.generate()
    built = build_witness("witness.test/w1", wkey, [vkey])
    state = WitnessState(tmp_path / "witness.db", built)
    runner = web.AppRunner(witness_app(state))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield {
            "key": key,
            "url": f"http://{host}:{port}",
            "vkey": built.signer.verifier.vkey(),
            "state": state,
        }
    finally:
        await runner.cleanup()
        state.close()


async def test_witnessed_gateway_and_a_witness_that_never_cosigns_a_fork(
    witness: dict[str, Any], tmp_path: Path
) -> None:
    settings = gateway_settings(tmp_path, log_witnesses=[f"{witness['url']} {witness['vkey']}"])
    async with running_stack(key=witness["key"], **settings) as stack:
        quorum = policy(witnesses=(witness["vkey"],), witness_quorum=1)
        assert (await chat(stack.url, quorum)).status_code == 200
        assert witness["state"].latest(ORIGIN)[0] == 2
        # The operator shows the witness a fork of size 3 from its other view.
        fork_db = tmp_path / "fork.db"
        await fork_of(fork_db, witness["key"], [b"f1", b"f2", b"f3"])
        store = await open_log_store(LedgerLocation(kind="sqlite", path=fork_db))
        forked = TransparencyLog(
            LogConfig(
                origin=ORIGIN,
                replica="fork",
                witnesses=(parse_witness(f"{witness['url']} {witness['vkey']}"),),
            ),
            store,
            witness["key"],
        )
        try:
            latest = await store.latest()
            assert latest is not None
            assert await forked.collect_cosignatures(latest) == 0
            # By hand too: from size 2 with a proof from the forked tree: 422, no cosignature.
            proof = await forked.consistency(2, 3)
            body = "old 2\n" + "".join(base64.b64encode(h).decode() + "\n" for h in proof)
            answer = await asyncio.to_thread(
                httpx.post,
                witness["url"] + "/add-checkpoint",
                content=(body + "\n" + latest.note).encode(),
                timeout=10,
            )
            assert answer.status_code == 422
            # Same size 2 with another root: 409.
            two = await fork_of(tmp_path / "fork2.db", witness["key"], [b"a", b"b"])
            assert two != witness["state"].latest(ORIGIN)[1]
        finally:
            await forked.close()
        assert witness["state"].latest(ORIGIN)[0] == 2  # never moved to the fork
        # The cosignature is served with the checkpoint and verifies under the witness key.
        served = (
            await asyncio.to_thread(httpx.get, stack.url + "/v1/log/checkpoint", timeout=10)
        ).text
        note.open_note(served, [note.parse_vkey(witness["vkey"])])


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip


async def test_log_cli_and_receipts_audit(tmp_path: Path) -> None:
    async with running_stack(**gateway_settings(tmp_path, log_receipt_period=1)) as stack:
        vkey = vkey_of(stack)
        tokens = []
        for _ in range(3):
            response = await chat(stack.url, policy())
            tokens.append(response.extensions["paygate_receipt"].token)  # opened and verified
        pending = await asyncio.to_thread(
            cli, "receipts", "audit", stack.url, tokens[0], "--log-key", vkey
        )
        # Within a period nothing covers them yet, or one period already did: never an error.
        assert pending.returncode == 0, pending.stderr
        async with asyncio.timeout(10):
            while True:
                audit = await asyncio.to_thread(
                    cli, "receipts", "audit", stack.url, *tokens, "--log-key", vkey
                )
                assert audit.returncode == 0, audit.stderr
                if "3 receipts proven" in audit.stdout:
                    break
                await asyncio.sleep(0.5)
        forged = tokens[0][:-4] + "AAAA"  # another signature: the same signed bytes, proven
        assert (
            "1 receipts proven"
            in (
                await asyncio.to_thread(
                    cli, "receipts", "audit", stack.url, forged, "--log-key", vkey
                )
            ).stdout
        )
        other = base64.urlsafe_b64encode(b'{"not":"a receipt"}').decode().rstrip("=") + ".x"
        result = await asyncio.to_thread(
            cli, "receipts", "audit", stack.url, other, "--log-key", vkey
        )
        assert "pending" in result.stdout
        assert "0 receipts proven" in result.stdout
        shown = await asyncio.to_thread(cli, "log", "show", stack.url, "--log-key", vkey)
        assert shown.returncode == 0, shown.stderr
        assert f"origin  {ORIGIN}" in shown.stdout
        assert '"type": "receipts"' in shown.stdout
        state = tmp_path / "cli-state.json"
        verified = await asyncio.to_thread(
            cli, "log", "verify", stack.url, "--log-key", vkey, "--state", str(state)
        )
        assert verified.returncode == 0, verified.stderr
        assert "1 key-epoch" in verified.stdout
        assert "1 release" in verified.stdout
        proved = await asyncio.to_thread(
            cli, "log", "prove", stack.url, "--log-key", vkey, "--index", "0"
        )
        document = json.loads(proved.stdout)
        assert document["leaf_hash"] == merkle.leaf_hash(document["entry"].encode()).hex()
        wrong = await asyncio.to_thread(
            cli, "log", "show", stack.url, "--log-key", tlog_assembly.log_identity(
                ORIGIN, SoftwareKey.generate()).key,
        )  # fmt: skip
        assert wrong.returncode == 2
        assert "log_unverified" in wrong.stderr


async def test_an_audit_whose_checkpoint_is_older_than_a_receipts_entry_reads_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With replicas cutting periods, the log can grow between the audit's checkpoint read and
    a receipt's proof: the entry is then past that checkpoint. The audit reads the checkpoint
    again (held to the first by a consistency proof) and proves it; an entry past every
    checkpoint the log signed is pending, never an error and never proven."""
    from paygate.cli import log as log_cli
    from paygate.cli.receipts_audit import _audit

    async with running_stack(**gateway_settings(tmp_path, log_receipt_period=1)) as stack:
        vkey = vkey_of(stack)
        old = (
            await asyncio.to_thread(httpx.get, stack.url + "/v1/log/checkpoint", timeout=10)
        ).content  # before any receipts entry
        token = (await chat(stack.url, policy())).extensions["paygate_receipt"].token
        async with asyncio.timeout(10):
            while (
                "1 receipts proven"
                not in (
                    await asyncio.to_thread(
                        cli, "receipts", "audit", stack.url, token, "--log-key", vkey
                    )
                ).stdout
            ):
                await asyncio.sleep(0.3)
        real_get = log_cli._get

        def stale(times: int) -> Any:
            served = [0]

            def get(client: httpx.Client, url: str) -> tuple[int, bytes]:
                if url.endswith("/checkpoint") and served[0] < times:
                    served[0] += 1
                    return 200, old
                return real_get(client, url)

            return get

        args = argparse.Namespace(
            url=stack.url, tokens=[token], file=None, log_key=vkey, timeout=10.0
        )
        for times, proven in ((1, 1), (2, 0)):
            monkeypatch.setattr(log_cli, "_get", stale(times))
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert await asyncio.to_thread(_audit, args) == 0
            assert f"{proven} receipts proven" in out.getvalue()
            assert ("past the signed checkpoint" in out.getvalue()) is (proven == 0)


async def test_an_independent_reader_rebuilds_full_and_partial_tiles_of_a_larger_tree(
    gateway: Stack, tmp_path: Path
) -> None:
    key = gateway.key
    assert isinstance(key, SoftwareKey)
    state = LogState(tmp_path / "state.json")
    assert (await chat(gateway.url, policy(state))).status_code == 200
    assert state.get(ORIGIN).size == 2  # type: ignore[union-attr]
    store = await open_log_store(LedgerLocation(kind="sqlite", path=tmp_path / "ledger.db"))
    tlog = TransparencyLog(LogConfig(origin=ORIGIN, replica="bulk"), store, key)
    try:
        await tlog.append([f"bulk entry {i}".encode() for i in range(600)])
        await tlog.append([b"one more"])
    finally:
        await tlog.close()
    base = gateway.url + "/v1/log"
    text = (await asyncio.to_thread(httpx.get, base + "/checkpoint", timeout=10)).text
    _origin, size, root = reader_checkpoint(text, vkey_of(gateway))
    assert size == 603  # the two start entries, 600, and one
    rebuilt, logged = await asyncio.to_thread(independent_root, base, size)
    assert rebuilt == root
    assert logged[2] == b"bulk entry 0"
    assert logged[-1] == b"one more"
    # The client that saw size 2 accepts the grown tree (consistency 2 → 603 from tiles); its
    # release and key epoch are found 601 entries back.
    transport_state = LogState(tmp_path / "state.json")
    assert transport_state.get(ORIGIN).size == 2  # type: ignore[union-attr]
    assert (await chat(gateway.url, policy(state))).status_code == 200
    assert state.get(ORIGIN).size == 603  # type: ignore[union-attr]
