"""``paygate demo``: the appliance end to end on real (simulated) hardware, on loopback.

Creates a throw-away SoftHSM2 token and a swtpm TPM and generates the appliance key inside each.
Part 1 plays caller and appliance at the envelope level: seal (v1 and v2), open with the hardware
key, stream a sealed reply back, refuse tampering. Part 2 runs the real gateway (``paygate
serve``'s app) with the TPM key in front of the FAKE model server and sends it sealed requests
over HTTP: a v2 stream opened chunk by chunk as it arrives, an Obol-style v1 request, and a
path the route table does not know. Part 3 turns payments on: anvil (a local chain) with
USDC (Circle's FiatToken V2.2 from npm), the official x402 SDK's facilitator, and a caller
using the OpenAI SDK over paygate's client transport — sealed, paid per request in USDC,
streamed, settled on chain, balances shown; before its first prompt that caller attests the
appliance (the swtpm's EK certificates come from a local CA made here,
scripts/make_swtpm_ek_state.sh) and prints each check, and every reply's signed receipt is
verified. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

import enclave
from enclave import DecryptionError, KeyBackend, SoftwareKey
from paygate.config import load_settings
from paygate.errors import PaygateError
from paygate.server.app import build_app
from paygate_dev import stack as devstack
from paygate_dev.fake_model import FakeModelServer

PROMPT = b'{"model":"demo","messages":[{"role":"user","content":"Is this private?"}],"stream":true}'
REPLY_CHUNKS = [
    b'data: {"delta":"Yes"}\n\n',
    b'data: {"delta":", sealed."}\n\n',
    b"data: [DONE]\n\n",
]


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="seal and open requests with keys held in SoftHSM2 and swtpm")
    p.set_defaults(run=run)


@contextlib.contextmanager
def _hardware_keys(workdir: Path) -> Iterator[list[tuple[str, KeyBackend]]]:
    from enclave.keys.pkcs11 import Pkcs11Key
    from enclave.keys.tpm import TpmKey

    token = devstack.init_softhsm_token(workdir / "softhsm")
    os.environ.update(token.env())
    # A TPM whose EK certificates a local CA issued: the caller trusts that CA (part 3).
    ek = devstack.make_ek_state(workdir / "ek-ca")
    tpm = devstack.start_swtpm_from(ek, workdir / "swtpm")
    keys: list[tuple[str, KeyBackend]] = []
    try:
        keys.append(
            (
                "PKCS#11 (SoftHSM2)",
                Pkcs11Key.generate(
                    token.module_path, token.token_label, token.pin, "paygate-envelope"
                ),
            )
        )
        keys.append(("TPM 2.0 (swtpm)", TpmKey.generate(tpm.tcti, workdir / "tpm-key")))
        yield keys
    finally:
        for _, key in keys:
            key.close()
        tpm.stop()


def _ms(start: float) -> str:
    return f"{(time.perf_counter() - start) * 1000:.2f} ms"


def _exercise(name: str, key: KeyBackend) -> None:
    info = key.info()
    print(f"\n== {name}")
    print(f"   appliance key  {info.public_key.hex()[:32]}… (generated inside, persistent)")

    # v1, Obol-compatible: one blob each way.
    t = time.perf_counter()
    blob = enclave.seal_v1(key.public_key, PROMPT)
    opened = enclave.open_v1(key, blob)
    assert opened == PROMPT
    print(f"   v1 request     {len(blob)} bytes sealed, opened by the key in hardware ({_ms(t)})")

    # v2: bound to the route, reply secret inside the seal, reply streamed chunk by chunk.
    t = time.perf_counter()
    sealed = enclave.seal_v2(key.public_key, PROMPT, method="POST", path="/v1/chat/completions")
    request = enclave.open_v2(key, sealed.blob, method="POST", path="/v1/chat/completions")
    assert request.body == PROMPT
    print(f"   v2 request     {len(sealed.blob)} bytes sealed, opened ({_ms(t)})")
    try:
        enclave.open_v2(key, sealed.blob, method="POST", path="/v1/embeddings")
    except DecryptionError as exc:
        print(f"   v2 replayed to /v1/embeddings -> refused: {exc}")
    sealer, opener = request.reply.sealer(), sealed.reply.opener()
    received: list[bytes] = []
    for chunk in REPLY_CHUNKS:
        received += opener.feed(sealer.seal(chunk))
    received += opener.feed(sealer.finish())
    opener.close()
    assert received == REPLY_CHUNKS
    print(f"   v2 reply       {len(received)} chunks streamed sealed and opened in order")
    flipped = bytearray(sealed.blob)
    flipped[-5] ^= 1
    try:
        enclave.open_v2(key, bytes(flipped), method="POST", path="/v1/chat/completions")
    except DecryptionError as exc:
        print(f"   one bit flipped -> refused: {exc}")


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def _print_deltas(chunk: bytes, start: float) -> None:
    for line in chunk.decode().splitlines():
        if line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            print(f"     +{_ms(start):>10}  {delta.get('content', '')!r}")


async def _gateway_demo(key: KeyBackend) -> None:
    fake = FakeModelServer(pace=0.05, chunks=6)
    fake_runner, fake_url = await _serve(fake.app)
    settings = load_settings(None, upstream_url=fake_url, payment_mode="off")
    gateway_runner, url = await _serve(build_app(settings, key=key))
    print(f"\n== the gateway at {url}, in front of the FAKE model server at {fake_url}")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with http.get(f"{url}/v1/enclave/pubkey") as resp:
                pubkey = bytes.fromhex((await resp.json())["pubkey"])
            print(f"   GET /v1/enclave/pubkey -> {pubkey.hex()[:32]}… (the TPM key)")

            path = "/v1/chat/completions"
            body = json.dumps(
                {"model": "demo", "stream": True,
                 "messages": [{"role": "user", "content": "stream me a sealed answer"}]}
            ).encode()  # fmt: skip
            sealed = enclave.seal_v2(pubkey, body, method="POST", path=path)
            opener = sealed.reply.opener()
            start = time.perf_counter()
            headers = {"Content-Type": enclave.CONTENT_TYPE}
            async with http.post(url + path, data=sealed.blob, headers=headers) as resp:
                kind = resp.headers.get("X-Paygate-Content-Type")
                print(f"   POST {path} (v2, sealed, stream) -> {resp.status}, carries {kind}")
                async for data in resp.content.iter_any():
                    for chunk in opener.feed(data):
                        _print_deltas(chunk, start)
                opener.close()
            print("   stream complete and authenticated (final frame seen)")

            reply_key = SoftwareKey.generate()
            blob = enclave.seal_v1(pubkey, json.dumps({"model": "demo", "prompt": "hi"}).encode())
            v1_headers = {
                "Content-Type": enclave.CONTENT_TYPE,
                "X-Obol-Reply-Pubkey": reply_key.public_key.hex(),
            }
            async with http.post(f"{url}/v1/completions", data=blob, headers=v1_headers) as resp:
                reply = json.loads(enclave.open_v1(reply_key, await resp.read()))
            text = reply["choices"][0]["text"]
            print(f"   POST /v1/completions (v1, Obol-style) -> {resp.status}: {text!r}")

            async with http.post(f"{url}/api/pull", json={"model": "x"}) as resp:
                seen = fake.stats()["hits"].get("POST /api/pull", 0)
                print(f"   POST /api/pull -> {resp.status} (not forwarded: the fake saw {seen})")
    finally:
        await gateway_runner.cleanup()
        await fake_runner.cleanup()


async def _payments_demo(key: KeyBackend, workdir: Path) -> None:
    from paygate_dev.chain.accounts import FACILITATOR, new_account
    from paygate_dev.chain.anvil import start_anvil
    from paygate_dev.chain.facilitator import FacilitatorServer, FacilitatorSettings

    chain = start_anvil(workdir / "anvil.log")
    facilitator = FacilitatorServer(
        FacilitatorSettings(rpc_url=chain.rpc_url, private_key=chain.accounts[FACILITATOR].key)
    ).start()
    model_server = await _real_model_or_fake(workdir)
    seller, payer = new_account().address, new_account()
    chain.mint(payer.address, 5 * 10**6)
    settings = load_settings(
        None,
        **model_server.settings,
        payment_mode="facilitator",
        pay_to=seller,
        network="base-sepolia",
        price="0.001",
        facilitator_url=facilitator.url,
        ledger_path=workdir / "payments.db",
        require_encryption=True,
        key_backend="tpm",  # the key passed in is the TPM's: its evidence is kind tpm
    )
    gateway_runner, url = await _serve(build_app(settings, key=key))
    print(f"\n== payments: anvil at {chain.rpc_url}, the x402 SDK facilitator at {facilitator.url}")
    print(f"   seller {seller}: {chain.balance_of(seller) / 1e6:.3f} USDC")
    print(f"   payer  {payer.address}: {chain.balance_of(payer.address) / 1e6:.3f} USDC")
    try:
        await asyncio.to_thread(
            _paying_caller, url, key, payer, model_server.model, seller, workdir
        )
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.post(f"{url}/v1/chat/completions", json={"model": "m"}) as resp,
        ):
            print(f"   unsealed body on a paid route -> {resp.status} (require_encryption)")
    finally:
        await gateway_runner.cleanup()
        await model_server.stop()
        facilitator.stop()
        seller_balance, payer_balance = chain.balance_of(seller), chain.balance_of(payer.address)
        chain.stop()
    print(f"   seller now {seller_balance / 1e6:.3f} USDC, payer {payer_balance / 1e6:.3f} USDC")


@dataclass
class _ModelServer:
    """What the payments part talks to: a real model when one is built, else the FAKE."""

    settings: dict[str, Any]
    model: str
    stop: Callable[[], Awaitable[None]]


async def _real_model_or_fake(workdir: Path) -> _ModelServer:
    """llama.cpp's llama-server with SmolLM2-135M (real weights) when scripts/setup_llama.sh
    has built it; otherwise the FAKE model server, saying why."""
    from paygate_dev.llama import LlamaServer, llama_build

    try:
        build = llama_build()
        server = LlamaServer(build.server, build.smollm2, "smollm2", workdir / "llama.log")
        await asyncio.to_thread(server.start)
    except PaygateError as exc:
        print(f"   (no real model: {exc}; the FAKE model server answers instead)")
        fake = FakeModelServer(pace=0.05, chunks=6)
        runner, fake_url = await _serve(fake.app)
        return _ModelServer({"upstream_url": fake_url}, "demo", runner.cleanup)
    print(f"   model server: llama.cpp llama-server, SmolLM2-135M-Instruct ({build.smollm2.name})")

    async def stop() -> None:
        await asyncio.to_thread(server.stop)

    settings = {
        "upstream_url": server.url,
        "upstream_kind": "llama-server",
        "upstream_model_path": build.smollm2,
        "upstream_model_name": "smollm2",
    }
    return _ModelServer(settings, "smollm2", stop)


def _paying_caller(
    url: str, key: KeyBackend, payer: Any, model: str, seller: str, workdir: Path
) -> None:
    """A caller's program: the OpenAI SDK on paygate's transport, with a spend policy and an
    attestation policy (the local EK CA, the seller's wallet)."""
    import httpx
    import openai

    from paygate.client import AttestationPolicy, PaygateTransport, SpendPolicy

    policy = AttestationPolicy.from_files(workdir / "ek-ca" / "ek-ca-chain.pem", pay_to=seller)
    transport = PaygateTransport(
        pin=key.info().public_key,
        wallet=payer,
        spend=SpendPolicy(max_per_request="0.01", max_total="0.10", networks=["base-sepolia"]),
        attestation=policy,
    )
    client = openai.OpenAI(
        base_url=f"{url}/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=transport, timeout=60),
    )
    question = "What is the capital of France? Answer in one word."
    # The first request attests the appliance before anything is sealed or paid.
    reply = client.chat.completions.create(
        model=model,
        temperature=0,
        max_tokens=32,
        messages=[{"role": "user", "content": question}],
    )
    attested = transport.attested(url)
    assert attested is not None
    print(f"   attested before the first prompt (kind {attested.kind}):")
    for check in attested.checks:
        print(f"     {check.status:4} {check.name:20} {check.detail}")
    paid = transport.last_payment
    assert paid is not None
    print(f"   OpenAI SDK, sealed v2, paid: {question!r}")
    print(f"     -> {reply.choices[0].message.content!r}")
    print(f"     paid {paid.amount:f} USDC, tx {paid.transaction}")
    signed = transport.last_signed_receipt
    assert signed is not None
    print(f"     signed receipt verified: reply {signed['reply_digest'][:23]}…")
    stream = client.chat.completions.create(
        model=model,
        stream=True,
        temperature=0,
        max_tokens=32,
        messages=[{"role": "user", "content": "Name three colours."}],
    )
    words = [c.choices[0].delta.content or "" for c in stream if c.choices]
    stream.close()
    print(f"     streamed -> {''.join(words)!r}")
    paid = transport.last_payment
    assert paid is not None
    print(f"   OpenAI SDK, sealed v2, streamed {len(words)} chunks, receipt in-band:")
    print(f"     paid {paid.amount:f} USDC, tx {paid.transaction}")


def run(args: argparse.Namespace) -> int:
    print("paygate demo: sealed envelopes with keys that never leave hardware")
    with (
        tempfile.TemporaryDirectory(prefix="paygate-demo-") as tmp,
        _hardware_keys(Path(tmp)) as keys,
    ):
        for name, key in keys:
            _exercise(name, key)
        asyncio.run(_gateway_demo(keys[-1][1]))
        asyncio.run(_payments_demo(keys[-1][1], Path(tmp)))
    print(
        "\nok: prompts opened only inside the token/TPM; tampering and unknown routes refused;"
        " each paid request settled once, on chain"
    )
    return 0
