"""Instructions of each cryptographic operation a request cannot do without, through paygate's
own calls, under valgrind's callgrind: the floors under issue 25's and 27's CPU targets.

Each operation runs ``--n`` times in a fresh interpreter under callgrind; the same interpreter
doing everything but the operation (its inputs made the same way) is the baseline, and the
difference over ``--n`` is the figure. Load does not move it (user-space instructions).

    .venv/bin/python -m bench.floors [--n 200] [--free K] [--aiohttp K] [--json PATH]

``--free`` / ``--aiohttp``: a free paygate request's and aiohttp-70's instructions per request
(from ``bench.instructions``), to print each target's budget beside the operations it must
hold. The operations:

- ``recover``: the payer's secp256k1 public key recovered from a 65-byte signature
  (``paygate.x402.typed_digest.recover``: libsecp256k1 through coincurve, the address's keccak
  and checksum) — once per exact/upto authorization and once per batch-settlement voucher;
- ``ecdh``: the HPKE setup's P-256 ECDH with the appliance key (``SoftwareKey.ecdh``, the
  cheapest backend; the TPM and HSM do it outside the process, slower), the caller's ephemeral
  point validated inside it — once per sealed request;
- ``point``: that validation alone (``p256.load_public_key``), for the record: part of ``ecdh``;
- ``sign``: the reply receipt's P-256 ECDSA signature (``SoftwareKey.sign_digest``) — once per
  paid or sealed reply.

Needs Debian ``valgrind``. docs/PERFORMANCE.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

OPS = ("recover", "ecdh", "point", "sign")


def _run_op(op: str, n: int) -> None:
    """The measured body: inputs for every op made alike, then ``n`` of ``op`` (none: nothing)."""
    import coincurve

    from enclave import p256
    from enclave.keys.software import SoftwareKey
    from paygate.x402 import typed_digest

    payer = coincurve.PrivateKey(os.urandom(32))
    digests = [os.urandom(32) for _ in range(n)]
    signatures = []
    for digest in digests:
        raw = payer.sign_recoverable(digest, hasher=None)
        signatures.append(raw[:64] + bytes((raw[64] + 27,)))
    key = SoftwareKey.generate()
    peers = [SoftwareKey.generate().public_key for _ in range(n)]
    if op == "recover":
        for digest, signature in zip(digests, signatures, strict=True):
            if typed_digest.recover(digest, signature) is None:
                raise SystemExit("recover found no key")
    elif op == "ecdh":
        for peer in peers:
            key.ecdh(peer)
    elif op == "point":
        for peer in peers:
            p256.load_public_key(peer)
    elif op == "sign":
        for digest in digests:
            key.sign_digest(digest)
    key.close()


def _collected(op: str, n: int) -> int:
    """Instructions callgrind collected for a whole interpreter doing ``n`` of ``op``."""
    with tempfile.TemporaryDirectory(prefix="paygate-floors-") as tmp:
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/out",
                sys.executable,
                "-m",
                "bench.floors",
                "--inner",
                op,
                "--n",
                str(n),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"callgrind run of {op} failed:\n{done.stderr[-2000:]}")
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit(f"no instruction count in callgrind's output for {op}")
    return int(found.group(1))


def measure(n: int) -> dict[str, float]:
    base = _collected("none", n)
    return {op: (_collected(op, n) - base) / n for op in OPS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--inner", choices=("none", *OPS), help=argparse.SUPPRESS)
    parser.add_argument("--free", type=float, help="k instructions of a free paygate request")
    parser.add_argument("--aiohttp", type=float, help="k instructions of an aiohttp-70 request")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.inner:
        _run_op(args.inner, args.n)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.floors needs valgrind: apt-get install valgrind")
    ops = {op: round(value / 1000, 1) for op, value in measure(args.n).items()}
    print("| operation | k instructions |\n|---|---:|")
    for op, value in ops.items():
        print(f"| {op} | {value:,.1f} |")
    budgets: dict[str, dict[str, float]] = {}
    if args.free:
        # Each target's budget is what it allows beyond a free request; the floor is what the
        # request must do on top of one.
        budgets["paid exact <= 2x free"] = {
            "budget": args.free,
            "floor": ops["recover"] + ops["sign"],
        }
        budgets["voucher <= 1.3x free"] = {
            "budget": 0.3 * args.free,
            "floor": ops["recover"] + ops["sign"],
        }
    if args.aiohttp:
        # The sealed target is against aiohttp-70's whole request: the floor is the crypto alone.
        budgets["sealed <= 1.0x aiohttp-70"] = {
            "budget": args.aiohttp,
            "floor": ops["ecdh"] + ops["sign"],
        }
    if budgets:
        print("\n| target | budget (k) | cryptography alone (k) |\n|---|---:|---:|")
        for name, row in budgets.items():
            print(f"| {name} | {row['budget']:,.1f} | {row['floor']:,.1f} |")
    if args.json:
        args.json.write_text(
            json.dumps({"n": args.n, "k_instructions": ops, "budgets": budgets}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
