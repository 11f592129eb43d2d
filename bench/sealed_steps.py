"""Instructions per step of a sealed v2 request's enclave work, in-process under callgrind.

Each step runs ``--calls`` times in a fresh interpreter under ``valgrind --tool=callgrind`` and
once with no calls; the difference over the calls is the step's count (``PYTHONHASHSEED=0``:
the imports cost the same in both). The steps are what the gateway calls for one sealed whole
reply: the open (with its ECDH alone beside it), the request's receipt facts, the receipt
(with its signature alone beside it), the receipt header sealed to the caller, the reply sealed.

    .venv/bin/python -m bench.sealed_steps [--calls 1000] [STEP ...]

Needs Debian ``valgrind``. docs/PERFORMANCE.md ("Issue 27, sixth round") has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

STEPS = ("open", "ecdh", "facts", "token", "sign", "header", "reply")


def _steps() -> dict[str, Callable[[], object]]:
    import enclave
    from bench import compare
    from bench.fast_upstream import REPLY
    from enclave import envelope_v2, receipts, sealed_receipt

    key = enclave.SoftwareKey.generate()
    plain = json.dumps(compare.CHAT).encode()
    blob = enclave.seal_v2(key.public_key, plain, method="POST", path=compare.PATH).blob
    keys = envelope_v2.open_v2(key, blob, method="POST", path=compare.PATH).reply
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cached_tokens": None,
        "total_tokens": 15,
        "source": "reported",
    }

    def facts() -> str:  # paygate.server.receipts.request_facts, on fresh reply keys
        fresh = envelope_v2.ReplyKeys(reply_secret=keys.reply_secret, enc=keys.enc)
        nonce = envelope_v2.request_nonce(fresh)
        return receipts.request_digest(method="POST", path=compare.PATH, body=blob, nonce=nonce)

    request_digest = facts()

    def token() -> str:  # paygate.server.receipts.ReceiptIssuer.token, inline
        claims = {
            "kind": "reply",
            "request_digest": request_digest,
            "reply_digest": receipts.body_digest(REPLY),
            "model": "bench",
            "model_digest": "sha256:" + "ab" * 32,
            "usage": usage,
            "payment": None,
            "issued_at": int(time.time()),
        }
        return receipts.sign(claims, key)

    signed = token()
    return {
        "open": lambda: envelope_v2.open_v2(key, blob, method="POST", path=compare.PATH),
        "ecdh": lambda: key.ecdh(keys.enc),
        "facts": facts,
        "token": token,
        "sign": lambda: key.sign_digest(bytes(32)),
        "header": lambda: sealed_receipt.seal_v2(keys, signed),
        "reply": lambda: envelope_v2.seal_reply(keys, REPLY),
    }


def _run(step: str, calls: int) -> int:
    """Instructions of one interpreter that makes the steps and runs ``step`` ``calls`` times."""
    with tempfile.TemporaryDirectory(prefix="paygate-steps-") as tmp:
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out"]
        argv += [sys.executable, "-m", "bench.sealed_steps", "--inside", step, str(calls)]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode or found is None:
            raise SystemExit(f"{step}: {done.stderr[-400:]}")
        return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="*", help=f"of {', '.join(STEPS)} (default: all)")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--inside", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        step, calls = args.inside[0], int(args.inside[1])
        run = _steps()[step]
        for _ in range(calls):
            run()
        return 0
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        parser.error(f"no such step: {', '.join(sorted(unknown))}")
    for step in args.steps or STEPS:
        none = _run(step, 0)
        print(f"{step:8} {(_run(step, args.calls) - none) / args.calls / 1000:8.1f} k", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
