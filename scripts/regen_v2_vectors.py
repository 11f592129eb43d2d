"""Regenerate tests/vectors/envelope_v2.json: paygate's own v2 known-answer vectors.

Fixed inputs (recipient and ephemeral scalars, reply secret, response nonce) go through the
sealing code's test seams; the outputs are checked in and the tests require them byte for byte,
so any change to the wire format shows up as a failing test and a diff here.
Run: .venv/bin/python scripts/regen_v2_vectors.py
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from enclave import SoftwareKey
from enclave.envelope_v2 import ReplyKeys, _seal_v2_deterministic, request_info

OUT = Path(__file__).resolve().parent.parent / "tests/vectors/envelope_v2.json"

INPUTS = {
    "recipient_private": "616ea970f944bb4dd30c8b0194ac6aa0e16ca4bc53da72a2b2467b64d8dd92dc",
    "ephemeral_private": "80672dd365961a6a5f08e0c1555f83133526d2fcd0c416c8a72f682fc6153234",
    "reply_secret": "1f" * 32,
    "method": "POST",
    "path": "/v1/chat/completions",
    "body": '{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}',
    "response_nonce": "a5" * 32,
    "reply_chunks": ['data: {"x":1}\n\n', 'data: {"x":2}\n\n', "data: [DONE]\n\n"],
}


def build() -> dict[str, object]:
    recipient = SoftwareKey.from_private_bytes(bytes.fromhex(INPUTS["recipient_private"]))
    ephemeral = ec.derive_private_key(int(INPUTS["ephemeral_private"], 16), ec.SECP256R1())
    sealed = _seal_v2_deterministic(
        recipient.public_key,
        INPUTS["body"].encode(),
        INPUTS["method"],
        INPUTS["path"],
        bytes.fromhex(INPUTS["reply_secret"]),
        ephemeral,
    )
    keys = ReplyKeys(reply_secret=bytes.fromhex(INPUTS["reply_secret"]), enc=sealed.reply.enc)
    sealer = keys.sealer(response_nonce=bytes.fromhex(INPUTS["response_nonce"]))
    reply = b"".join(sealer.seal(c.encode()) for c in INPUTS["reply_chunks"]) + sealer.finish()
    return {
        "inputs": INPUTS,
        "recipient_public": recipient.public_key.hex(),
        "info": request_info(INPUTS["method"], INPUTS["path"]).hex(),
        "enc": sealed.reply.enc.hex(),
        "request_blob": sealed.blob.hex(),
        "reply_blob": reply.hex(),
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
