"""``paygate log witness``: a small c2sp.org/tlog-witness service.

``POST <prefix>/add-checkpoint`` with the body of the spec: the decision is
:class:`enclave.tlog.witness.Witness`'s; this module keeps the latest cosigned (size, root) per
origin in a SQLite file and makes check-and-store one ``BEGIN IMMEDIATE`` transaction, so two
concurrent requests can never roll the recorded size back (the race the spec describes). The
witness key is an Ed25519 PKCS#8 file (0600), made on first start; its vkey (type 0x04) is what
logs and clients configure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave._files import write_new_file
from enclave.tlog import note
from enclave.tlog.witness import MAX_BODY, Answer, BadRequest, Witness, parse_request

ADD_CHECKPOINT = "/add-checkpoint"


def load_or_create_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The witness key at ``path`` (PKCS#8 PEM, 0600), generated if there is none."""
    if not path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):
            write_new_file(path, pem)
    st = path.stat()
    if st.st_mode & 0o077:
        raise ValueError(f"the witness key {path} must not be readable by group or others")
    loaded = serialization.load_pem_private_key(path.read_bytes()[: 64 * 1024], password=None)
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return loaded


class WitnessState:
    """(size, root) last cosigned per origin, in SQLite; :meth:`add` checks and stores as one
    transaction (the file's write lock) and only then lets the answer go out."""

    def __init__(self, path: Path, witness: Witness) -> None:
        self._path = path
        self._witness = witness
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS cosigned (origin TEXT PRIMARY KEY,"
            " size INTEGER NOT NULL, root BLOB NOT NULL)"
        )

    def latest(self, origin: str) -> tuple[int, bytes] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT size, root FROM cosigned WHERE origin = ?", (origin,)
            ).fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    def add(self, body: bytes) -> Answer:
        try:
            request = parse_request(body)
        except BadRequest as exc:
            return Answer(400, f"{exc}\n".encode())
        origin = self._witness.origin_of(request)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                latest = None
                if origin is not None:
                    row = self._db.execute(
                        "SELECT size, root FROM cosigned WHERE origin = ?", (origin,)
                    ).fetchone()
                    latest = (int(row[0]), bytes(row[1])) if row else None
                answer = self._witness.decide(request, latest)
                if answer.cosigned is not None:
                    self._db.execute(
                        "INSERT INTO cosigned (origin, size, root) VALUES (?, ?, ?)"
                        " ON CONFLICT (origin) DO UPDATE SET size = excluded.size,"
                        " root = excluded.root",
                        (answer.cosigned.origin, answer.cosigned.size, answer.cosigned.root),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return answer

    def close(self) -> None:
        self._db.close()


def witness_app(state: WitnessState) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)

    async def add_checkpoint(request: web.Request) -> web.Response:
        body = await request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            return web.Response(status=413, text="the request is too large\n")
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, state.add, body)
        content_type, _, charset = answer.content_type.partition("; charset=")
        return web.Response(
            status=answer.status,
            body=answer.body,
            content_type=content_type,
            charset=charset or None,
        )

    app.router.add_post(ADD_CHECKPOINT, add_checkpoint)
    return app


def build_witness(name: str, key: ed25519.Ed25519PrivateKey, log_vkeys: list[str]) -> Witness:
    logs: dict[str, list[note.Verifier]] = {}
    for vkey in log_vkeys:
        verifier = note.parse_vkey(vkey)
        logs.setdefault(verifier.name, []).append(verifier)  # the key name is the origin
    signer = note.Ed25519Signer(name, key, key_type=note.COSIGNATURE_V1)
    return Witness(signer, logs)
