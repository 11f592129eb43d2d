"""``paygate demo``: the appliance's envelope path end to end on real (simulated) hardware.

Creates a throw-away SoftHSM2 token and a swtpm TPM, generates the appliance key inside each,
then plays caller and appliance: seal a request (v1 and v2), open it with the hardware key,
stream a sealed reply back and open it chunk by chunk, and show that tampering is refused.
Prompts are demo strings; nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import enclave
from enclave import DecryptionError, KeyBackend
from paygate import devstack

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
    tpm = devstack.start_swtpm(workdir / "swtpm")
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


def run(args: argparse.Namespace) -> int:
    print("paygate demo: sealed envelopes with keys that never leave hardware")
    with (
        tempfile.TemporaryDirectory(prefix="paygate-demo-") as tmp,
        _hardware_keys(Path(tmp)) as keys,
    ):
        for name, key in keys:
            _exercise(name, key)
    print("\nok: every request opened only inside the token/TPM; tampering was refused")
    return 0
