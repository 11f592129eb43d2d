"""The gateway's transparency log: appends, receipts periods, witnesses and the free routes.

At start (before the gateway listens) :meth:`TransparencyLog.start` claims the store for this
origin and appends the ``release`` and ``key-epoch`` entries; every signed receipt's leaf hash
is recorded (:meth:`record_receipt`, one call where receipts are signed) and every
``log_receipt_period`` one replica appends a ``receipts`` entry covering all not yet covered.
After each append the configured witnesses are asked to cosign (c2sp.org/tlog-witness).

Routes (free, GET, answered by :meth:`handle`): ``/v1/log/checkpoint`` (text/plain, cached a
few seconds), ``/v1/log/tile/<L>/<N>[.p/<W>]`` and ``/v1/log/tile/entries/<N>[.p/<W>]``
(application/octet-stream, immutable), ``/v1/log/receipt-proof?leaf=<hex>`` (JSON: where a
receipt is and its proof within its period). A malformed path is 400 ``invalid_log_path``; a
tile the tree does not have yet 404 ``log_not_found``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from enclave import receipts
from enclave.attestation.binding import LogIdentity
from enclave.keys.base import LogSigner
from enclave.receipts import ReceiptTokenInvalid
from enclave.tlog import checkpoint as cp
from enclave.tlog import entries, merkle, note, tiles
from paygate.server.errors import GatewayError
from paygate.tlog.errors import LogStoreError
from paygate.tlog.recovery import ReceiptRecovery, RecoveryConfig, RecoveryEvents
from paygate.tlog.store import (
    Appended,
    LogStore,
    MissingReceipt,
    OpenReceipt,
    StoredCheckpoint,
    adrive,
    consistency_flow,
    root_flow,
)

log = logging.getLogger("paygate.tlog")
LOG_PREFIX = "/v1/log/"
CHECKPOINT_CACHE = "public, max-age=2"  # mutable: a few seconds at most (tlog-tiles)
TILE_CACHE = "public, max-age=31536000, immutable"
MAX_WITNESS_ANSWER = 16 * 1024
TURN_HANDOVER = 5.0  # seconds close() waits to hand the recovery turn over
_LEAF = re.compile(r"[0-9a-f]{64}")


class InvalidLogPath(GatewayError):
    message = (
        "not a log path: /v1/log/checkpoint, /v1/log/tile/<L>/<N>[.p/<W>] or "
        "/v1/log/tile/entries/<N>[.p/<W>]"
    )

    status = 400
    code = "invalid_log_path"


class LogNotFound(GatewayError):
    message = "the log has no such tile, entry bundle or receipt (yet)"

    status = 404
    code = "log_not_found"


class LogUnavailable(GatewayError):
    message = "the transparency log's store cannot be read right now"

    status = 503
    code = "log_unavailable"


@dataclass(frozen=True, slots=True)
class WitnessEndpoint:
    url: str  # the submission prefix: <url>/add-checkpoint
    verifier: note.Ed25519Verifier


def parse_witness(item: str) -> WitnessEndpoint:
    """``"<submission prefix URL> <witness vkey (type 0x04)>"``."""
    url, _, vkey = item.strip().partition(" ")
    if not url.startswith(("http://", "https://")):
        raise ValueError("a witness is '<http(s) URL> <vkey>'")
    verifier = note.parse_vkey(vkey.strip())
    if not isinstance(verifier, note.Ed25519Verifier) or verifier.key_type != note.COSIGNATURE_V1:
        raise ValueError("a witness key is an Ed25519 cosignature/v1 vkey (type 0x04)")
    return WitnessEndpoint(url.rstrip("/"), verifier)


@dataclass(frozen=True, slots=True)
class LogConfig:
    origin: str
    replica: str
    receipt_period: float = 3600.0
    witnesses: tuple[WitnessEndpoint, ...] = ()
    witness_timeout: float = 10.0
    period_limit: int = 100_000  # receipts in one receipts entry (the rest: the next one)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)  # paygate.tlog.recovery


@dataclass
class _WitnessState:
    size: int = 0  # what the witness last cosigned, as far as this replica knows


@dataclass
class _Signed:
    size: int = -1
    line: str = ""


def log_identity(origin: str, signer: LogSigner) -> LogIdentity:
    return LogIdentity(origin, log_verifier(origin, signer).vkey())


def log_verifier(origin: str, signer: LogSigner) -> note.Ed25519Verifier | note.EcdsaVerifier:
    return note.verifier_for(origin, signer.log_key_type, signer.log_public_key)


class TransparencyLog:
    def __init__(
        self,
        config: LogConfig,
        store: LogStore,
        signer: LogSigner,
        events: RecoveryEvents | None = None,
    ) -> None:
        self.config = config
        self._store = store
        self._signer = signer
        self.verifier = log_verifier(config.origin, signer)
        self.identity = LogIdentity(config.origin, self.verifier.vkey())
        self._witnesses = {w.url: _WitnessState() for w in config.witnesses}
        self._own = _Signed()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        # Receipts the ledger kept that this log was never given (a crash between the two).
        self.recovery = ReceiptRecovery(
            store, config.replica, receipt_facts, config.recovery, events
        )

    # --- signing ---------------------------------------------------------------------------

    def _note_signer(self) -> note.RawSigner:
        return note.RawSigner(self.config.origin, self.verifier.key_id, self._signer.sign_log)

    def sign_checkpoint(self, checkpoint: cp.Checkpoint) -> str:
        """The checkpoint as a note signed by this replica's log key (blocking)."""
        return note.sign(checkpoint.text(), [self._note_signer()])

    # --- appending -------------------------------------------------------------------------

    async def start(self, start_entries: Sequence[bytes]) -> Appended:
        await self._store.claim_origin(self.config.origin)
        return await self.append(start_entries)

    async def append(self, new_entries: Sequence[bytes]) -> Appended:
        appended = await self._store.append(new_entries, self.sign_checkpoint, self.config.replica)
        log.info("log %s: appended %d entries, size %d", self.config.origin,
                 len(new_entries), appended.checkpoint.size)  # fmt: skip
        await self.collect_cosignatures(appended.checkpoint)
        return appended

    async def record_receipt(self, token: str) -> None:
        """Keep a signed receipt's leaf hash (the exact signed bytes) for the next period."""
        try:
            facts = receipt_facts(token)  # the claims parsed once
            await self._store.record_receipt(
                facts.leaf, facts.amount, self.config.replica, facts.issued_at
            )
        except (LogStoreError, ValueError, ReceiptTokenInvalid) as exc:
            # The reply still goes out; the missing receipt shows in `paygate receipts audit`.
            log.error("a signed receipt was not recorded in the log: %s", type(exc).__name__)

    async def append_period(self) -> Appended | None:
        """A receipts entry over every recorded receipt no entry covers yet (None: none)."""
        appended = await self._store.append_receipts(
            self._period_entry, self.sign_checkpoint, self.config.replica, self.config.period_limit
        )
        if appended is not None:
            await self.collect_cosignatures(appended.checkpoint)
        return appended

    def _period_entry(self, period: Sequence[OpenReceipt]) -> bytes:
        tree = merkle.LeafList([r.leaf for r in period])
        return entries.receipts(
            time=int(max(r.issued_at for r in period)),
            replica=self.config.replica,
            root=tree.root(),
            count=len(period),
            charged=sum(r.amount for r in period),
            start=int(min(r.issued_at for r in period)),
            end=int(max(r.issued_at for r in period)),
        )

    async def run_periods(self) -> None:
        while True:
            await asyncio.sleep(self.config.receipt_period)
            try:
                await self.append_period()
            except Exception as exc:  # keep the periods going: one failure must not end them
                log.error("the receipts entry failed: %s", type(exc).__name__)

    # --- witnesses -------------------------------------------------------------------------

    async def collect_cosignatures(self, stored: StoredCheckpoint) -> int:
        """Ask every configured witness to cosign ``stored``; returns how many did."""
        if not self.config.witnesses:
            return 0
        answers = await asyncio.gather(
            *(self._cosign(w, stored) for w in self.config.witnesses), return_exceptions=True
        )
        lines = [a for a in answers if isinstance(a, str)]
        if lines:
            current = await self._store.checkpoint(stored.size)
            merged = _merge_lines(current.cosignatures if current else "", lines)
            await self._store.set_cosignatures(stored.size, merged)
        return len(lines)

    async def _cosign(self, witness: WitnessEndpoint, stored: StoredCheckpoint) -> str | None:
        state = self._witnesses[witness.url]
        for _ in range(2):  # a 409 names the size the witness holds: one retry from it
            old = state.size if state.size <= stored.size else 0
            proof = await self.consistency(old, stored.size) if 0 < old < stored.size else []
            body = (
                f"old {old}\n"
                + "".join(base64.b64encode(h).decode() + "\n" for h in proof)
                + "\n"
                + stored.note
            )
            status, text = await self._post(witness, body.encode())
            if status == 409 and re.fullmatch(r"(0|[1-9][0-9]{0,19})\n", text):
                state.size = int(text)
                if state.size > stored.size:
                    return None  # it saw a later checkpoint (another replica's): nothing to do
                continue
            if status != 200:
                log.warning("witness %s answered %d", witness.verifier.name, status)
                return None
            try:
                _, verified = note.open_note(stored.note + text, [witness.verifier])
            except note.NoteError:
                log.warning("witness %s sent no valid cosignature", witness.verifier.name)
                return None
            state.size = stored.size
            return verified[0].line()
        return None

    async def _post(self, witness: WitnessEndpoint, body: bytes) -> tuple[int, str]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.witness_timeout), trust_env=False
            )
        try:
            async with self._session.post(
                witness.url + "/add-checkpoint", data=body, allow_redirects=False
            ) as response:
                raw = await response.content.read(MAX_WITNESS_ANSWER)
                return response.status, raw.decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("witness %s unreachable: %s", witness.verifier.name, type(exc).__name__)
            return 0, ""

    # --- reading ---------------------------------------------------------------------------

    async def consistency(self, old: int, new: int) -> list[bytes]:
        return await adrive(consistency_flow(old, new), self._tile_bytes)

    async def _tile_bytes(self, ref: tiles.TileRef) -> bytes:
        data = await self._store.tile(ref.level or 0, ref.index, ref.width)
        if data is None:
            raise LogStoreError("a tile the tree needs is missing")
        return data

    async def served_checkpoint(self) -> tuple[StoredCheckpoint, str] | None:
        stored = await self._store.latest()
        if stored is None:
            return None
        served = stored.note
        signed = note.parse(stored.note)
        mine = (self.config.origin, self.verifier.key_id)
        if all((s.name, s.key_id) != mine for s in signed.signatures):
            # Appended by a replica with another log key (its own TPM): this replica adds its
            # signature, over the root it recomputes from the store itself.
            served += await self._own_line(stored)
        return stored, served + stored.cosignatures

    async def _own_line(self, stored: StoredCheckpoint) -> str:
        if self._own.size != stored.size:
            root = await adrive(root_flow(stored.size), self._tile_bytes)
            if root != stored.root:
                raise LogStoreError("the stored checkpoint's root is not the tree's")
            text = cp.Checkpoint(self.config.origin, stored.size, root).text()
            loop = asyncio.get_running_loop()
            signature = await loop.run_in_executor(None, self._signer.sign_log, text.encode())
            line = note.Signature(self.config.origin, self.verifier.key_id, signature).line()
            self._own = _Signed(stored.size, line)
        return self._own.line

    # --- HTTP ------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rest = request.path.removeprefix(LOG_PREFIX)
        try:
            if rest == "checkpoint":
                return await self._checkpoint()
            if rest == "receipt-proof":
                return await self._receipt_proof(request)
            if rest.startswith("tile/"):
                return await self._tile(rest)
        except LogStoreError:
            raise LogUnavailable from None
        raise InvalidLogPath

    async def _checkpoint(self) -> web.Response:
        found = await self.served_checkpoint()
        if found is None:
            raise LogNotFound("the log is empty")
        return web.Response(
            text=found[1],
            content_type="text/plain",
            charset="utf-8",
            headers={"Cache-Control": CHECKPOINT_CACHE},
        )

    async def _tile(self, path: str) -> web.Response:
        try:
            ref = tiles.parse_tile_path(path)
        except tiles.TilePathError:
            raise InvalidLogPath from None
        latest = await self._store.latest()
        size = latest.size if latest is not None else 0
        level = 0 if ref.level is None else ref.level
        if ref.width > tiles.tile_width(size, level, ref.index):
            raise LogNotFound
        if ref.level is None:
            bundle = await self._store.bundle(ref.index, ref.width)
            data = tiles.encode_bundle(bundle) if bundle is not None else None
        else:
            data = await self._store.tile(ref.level, ref.index, ref.width)
        if data is None:
            raise LogNotFound
        return web.Response(
            body=data,
            content_type="application/octet-stream",
            headers={"Cache-Control": TILE_CACHE},
        )

    async def _receipt_proof(self, request: web.Request) -> web.Response:
        values = request.query.getall("leaf", [])
        if len(values) != 1 or not _LEAF.fullmatch(values[0]):
            raise InvalidLogPath("leaf must be the receipt's leaf hash, 64 lower-case hex digits")
        period = await self._store.receipt_period(bytes.fromhex(values[0]))
        if period is None:
            raise LogNotFound("no receipts entry covers this receipt (yet)")
        source = merkle.LeafList(period.leaves)
        proof = merkle.inclusion_proof(source, period.position, source.size)
        document = {
            "entry": period.entry,
            "position": period.position,
            "count": source.size,
            "proof": [base64.b64encode(h).decode() for h in proof],
        }
        return web.json_response(document, headers={"Cache-Control": "no-store"})

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A clean stop hands the recovery turn over at once (bounded: the store may be down).
        with contextlib.suppress(LogStoreError, TimeoutError):
            async with asyncio.timeout(TURN_HANDOVER):
                await self.recovery.end_turn()
        if self._session is not None:
            await self._session.close()
        await self._store.close()

    def spawn_periods(self) -> None:
        """The receipts periods and the recovery of kept receipts, in the background."""
        for work in (self.run_periods(), self.recovery.run()):
            task = asyncio.get_running_loop().create_task(work)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _merge_lines(existing: str, new: Sequence[str]) -> str:
    """Cosignature lines, one per (witness name, key ID): a newer line replaces an older one."""
    by_key: dict[tuple[str, int], str] = {}
    for line in [*existing.splitlines(keepends=True), *new]:
        with contextlib.suppress(note.NoteError):
            sig = note.parse("x\n\n" + line).signatures[0]
            by_key[(sig.name, sig.key_id)] = line
    return "".join(by_key.values())


def _unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def _claims(payload: bytes) -> dict[str, object]:
    try:
        claims = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _charged(claims: dict[str, object]) -> int:
    """What a reply receipt says was charged. A settlement receipt restates its reply's payment,
    so it adds nothing to a period's total (each payment is counted once)."""
    payment = claims.get("payment") if claims.get("kind") == "reply" else None
    amount = payment.get("charged") if isinstance(payment, dict) else None
    return int(amount) if isinstance(amount, str) and amount.isdigit() and len(amount) < 78 else 0


def receipt_facts(token: str) -> MissingReceipt:
    """A signed receipt's leaf hash, amount and time, as :meth:`TransparencyLog.record_receipt`
    records them (ValueError: not a receipt token)."""
    try:
        payload = receipts.signed_bytes(token)
    except (ReceiptTokenInvalid, ValueError):
        raise ValueError("not a receipt token") from None
    claims = _claims(payload)
    return MissingReceipt(merkle.leaf_hash(payload), _charged(claims), _issued(claims))


def _issued(claims: dict[str, object]) -> float:
    issued = claims.get("issued_at")
    # Bounded as the receipts entry's times are (a float must hold it: no OverflowError).
    valid = isinstance(issued, int) and not isinstance(issued, bool) and 0 <= issued < 1 << 63
    return float(issued) if valid else 0.0


def evidence_digest(document: object) -> str:
    from enclave.attestation.binding import canonical

    return "sha256:" + hashlib.sha256(canonical(document)).hexdigest()


@dataclass
class StartFacts:
    """What the release and key-epoch entries say, gathered by the app factory."""

    paygate_version: str
    code_digest: str
    config_digest: str
    weights: list[tuple[str, str]] = field(default_factory=list)
    engine_kind: str = "unknown"
    wheel_sha256: str | None = None
    image_digest: str | None = None


@contextlib.asynccontextmanager
async def running(log_: TransparencyLog) -> AsyncIterator[TransparencyLog]:
    """The log with its receipts periods running; closed (store, tasks, session) on exit."""
    try:
        log_.spawn_periods()
        yield log_
    finally:
        await log_.close()
