"""What the attestation tests share: a middlebox (as an httpx transport and as a real HTTP
proxy on 127.0.0.1) and the tampering an on-path attacker would do to the evidence."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp import web

from enclave import SoftwareKey
from enclave.attestation import tpm as att
from enclave.keys.tpm import TpmKey

Tamper = Callable[[str, bytes], "bytes | None"]
_HOP = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
)
TAMPER_CASES = (
    "key_document_swapped",
    "evidence_key_swapped",
    "old_nonce",
    "certify_of_another_key",
    "duplicable_key_certified",
    "evidence_deeply_nested",
    "evidence_without_tpm_part",
)


def _attestation_path(path: str) -> bool:
    return path.startswith("/v1/attestation") or path == "/v1/enclave/pubkey"


class Middlebox(httpx.BaseTransport):
    """Relays to the real gateway; ``tamper(path, body)`` rewrites a reply body (None: as is);
    ``reroute`` sends the attestation and key requests to another gateway."""

    def __init__(
        self,
        tamper: Callable[[str, bytes], bytes | None] = lambda path, body: None,
        reroute: str | None = None,
        reply: Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]] | None = None,
    ) -> None:
        self._inner = httpx.HTTPTransport()
        self._tamper = tamper
        self._reroute = reroute
        self._reply = reply

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if self._reroute and (path.startswith("/v1/attestation") or path == "/v1/enclave/pubkey"):
            target = httpx.URL(self._reroute)
            request = httpx.Request(
                request.method,
                request.url.copy_with(host=target.host, port=target.port),
                headers=[(k, v) for k, v in request.headers.items() if k.lower() != "host"],
                content=request.read(),
                extensions=request.extensions,
            )
        response = self._inner.handle_request(request)
        if not (path.startswith("/v1/attestation") or path == "/v1/enclave/pubkey"):
            if self._reply is None or response.status_code != 200:
                return response
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            headers, body = self._reply(headers, response.read())
            return httpx.Response(response.status_code, headers=headers, content=body)
        body = response.read()
        changed = self._tamper(path, body)
        return httpx.Response(
            response.status_code,
            headers=[(k, v) for k, v in response.headers.items() if k.lower() != "content-length"],
            content=body if changed is None else changed,
        )


def edit_evidence(edit: Callable[[dict[str, Any]], None]) -> Tamper:
    def tamper(path: str, body: bytes) -> bytes | None:
        if path != "/v1/attestation":
            return None
        document = json.loads(body)
        edit(document)
        return json.dumps(document).encode()

    return tamper


def tamper_for(case: str, gateway_url: str, tpm_key: TpmKey) -> Tamper:
    """The middlebox's rewrite for ``case`` (one of TAMPER_CASES)."""
    attacker = SoftwareKey.generate().public_key
    if case == "key_document_swapped":

        def swap_key(path: str, body: bytes) -> bytes | None:
            if path != "/v1/enclave/pubkey":
                return None
            document = json.loads(body)
            document["pubkey"], document["fingerprint"] = attacker.hex(), None
            return json.dumps(document).encode()

        return swap_key
    if case == "evidence_key_swapped":

        def swap(document: dict[str, Any]) -> None:
            document["binding"]["sealing_key"] = attacker.hex()

        return edit_evidence(swap)
    if case == "old_nonce":
        old = httpx.get(f"{gateway_url}/v1/attestation?nonce={'ab' * 32}", timeout=10).content
        return lambda path, body: old if path == "/v1/attestation" else None
    if case == "certify_of_another_key":

        def other(document: dict[str, Any]) -> None:
            document["tpm"]["certify"]["sealing"] = document["tpm"]["certify"]["receipt"]

        return edit_evidence(other)
    if case == "duplicable_key_certified":
        duplicable = duplicable_certified(tpm_key)

        def dup(document: dict[str, Any]) -> None:
            document["tpm"]["certify"]["sealing"] = duplicable

        return edit_evidence(dup)
    if case == "evidence_deeply_nested":
        nested = b"[" * 50_000 + b"]" * 50_000
        return lambda path, body: nested if path == "/v1/attestation" else None
    if case == "evidence_without_tpm_part":
        return edit_evidence(lambda document: document.pop("tpm"))
    raise ValueError(case)


class TamperProxy:
    """A real reverse proxy on 127.0.0.1 (own thread and loop) in front of ``target``:
    attestation and key documents pass through ``tamper``; with ``reroute`` they are fetched
    from another gateway. ``with TamperProxy(...) as url:``."""

    def __init__(self, target: str, tamper: Tamper, reroute: str | None = None) -> None:
        self._target = target
        self._tamper = tamper
        self._reroute = reroute
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.url = ""

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

            async def handle(request: web.Request) -> web.Response:
                base = self._reroute if self._reroute and _attestation_path(request.path) else None
                headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
                async with session.request(
                    request.method,
                    (base or self._target) + request.path_qs,
                    data=await request.read(),
                    headers=headers,
                ) as upstream:
                    body = await upstream.read()
                    out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
                    out.pop("Content-Encoding", None)
                if _attestation_path(request.path):
                    body = self._tamper(request.path, body) or body
                return web.Response(status=upstream.status, body=body, headers=out)

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    def __enter__(self) -> str:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the tamper proxy did not start")
        return self.url

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def duplicable_certified(key: TpmKey) -> dict[str, str]:
    """A key without fixedTPM/fixedParent, created in the genuine TPM and certified by its AK."""
    from tpm2_pytss import TPM2_ALG, TPMA_OBJECT, TPMT_SIG_SCHEME

    from enclave.attestation.tpm import _signed
    from enclave.keys.tpm import _create_primary, ecdh_key_template

    template = ecdh_key_template()
    template.publicArea.objectAttributes &= ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT)
    with key.tpm_access() as tpm:
        primary = _create_primary(tpm.esapi, tpm.tcti)
        try:
            private, public = tpm.esapi.create(primary, None, template)[:2]
            handle = tpm.esapi.load(primary, private, public)
        finally:
            tpm.esapi.flush_context(primary)
        try:
            with tpm.loaded("ak") as ak:
                attest, signature = tpm.esapi.certify(
                    handle, ak, b"", TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
                )
        finally:
            tpm.esapi.flush_context(handle)
    signed = _signed(attest, signature)
    assert att.check_ak(key.public_blob("ak"))
    return {
        "public": b64(bytes(public.marshal())),
        "attest": b64(signed.attest),
        "signature": b64(signed.signature),
    }


def ollama_models_dir(directory: Path, name: str, tag: str, weights: bytes) -> Path:
    """An Ollama models directory holding ``weights`` as the model blob of ``name:tag``, with
    the manifest naming its digest: what the ollama engine profile hashes (blob and manifest
    must agree) into the served digests (the FAKE server has no weights)."""
    digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    blobs = directory / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest.replace(":", "-")).write_bytes(weights)
    manifest = directory / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layer = {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": 1}
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [layer]}))
    return directory
