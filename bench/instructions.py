"""Instructions per request of one proxy under valgrind's callgrind: a figure the machine's load
does not move (user space only: the kernel's share, the system calls, is not counted).

The proxy runs under callgrind with instrumentation off; after a warm-up it is switched on
(``callgrind_control -i on``), ``--requests`` requests go through on 4 keep-alive connections,
it is switched off and dumped, and the dump's total is divided by the requests.

    .venv/bin/python -m bench.instructions aiohttp-70
    .venv/bin/python -m bench.instructions paygate [--sealed|--paid|--paid-batch] [--tree DIR]
        [--env NAME=VALUE ...]

``--paid``: each request paid (exact, verify-only; the fast upstream answers ``/verify``), a
distinct presigned payment each, as ``bench.compare``'s ``paygate-paid`` row.
``--paid-batch``: each request paid by a batch-settlement voucher, as ``bench.compare``'s
``paygate-paid-batch`` row: chain mode on anvil, each of the 4 connections on a channel of its
own opened through the gateway before the measurement (``bench.channels``; a channel's requests
go one after another, as its vouchers are cumulative), no claim during the load.

Needs Debian ``valgrind`` (callgrind_control included). docs/PERFORMANCE.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import enclave
from bench import compare
from bench.channels import ChannelSource

WARM_UP = 200


CONNECTIONS = 4


async def _load(
    port: int,
    bodies: list[bytes],
    content_type: str,
    count: int,
    payments: Sequence[Iterator[str]] = (),
) -> None:
    """``count`` requests on 4 keep-alive connections, each reply read to its end (when
    ``payments`` is given, connection ``i`` sends the next of ``payments[i]`` as each
    request's PAYMENT-SIGNATURE)."""
    left = count

    async def connection(index: int) -> None:
        nonlocal left
        paying = payments[index] if payments else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                body = bodies[left % len(bodies)]
                paid = f"PAYMENT-SIGNATURE: {next(paying)}\r\n" if paying else ""
                writer.write(
                    f"POST {compare.PATH} HTTP/1.1\r\nHost: bench\r\n{paid}Content-Type: "
                    f"{content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head[:80].decode(errors="replace"))
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                    continue
                while size := int((await reader.readline()).strip(), 16):  # chunked
                    await reader.readexactly(size + 2)
                await reader.readline()
        finally:
            writer.close()

    await asyncio.gather(*(connection(i) for i in range(CONNECTIONS)))


def measure(
    target: str,
    *,
    requests: int,
    sealed: bool,
    tree: Path | None,
    env: dict[str, str],
    paid: bool = False,
    paid_batch: bool = False,
    keep: Path | None = None,
) -> float:
    """Thousands of instructions per request of ``target`` (aiohttp-70 or paygate)."""
    with (
        tempfile.TemporaryDirectory(prefix="paygate-instructions-") as name,
        contextlib.ExitStack() as started,  # each component stopped, whatever fails first
    ):
        tmp = Path(name)
        upstream_port, port = compare._port(), compare._port()
        anvil = compare._anvil(tmp) if paid_batch else None
        if anvil is not None:
            started.callback(anvil.stop)
        upstream = compare._spawn(
            [compare.PY, "-m", "bench.fast_upstream", "--port", str(upstream_port)], cpu=None
        )
        started.callback(compare._stop, [upstream])
        grind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        grind.append(f"--callgrind-out-file={tmp}/callgrind.out")
        if target == "aiohttp-70":
            upstream_url = f"http://127.0.0.1:{upstream_port}"
            argv = [compare.PY, "-m", "bench.mini_proxy", "--port", str(port)]
            proxy_env = dict(os.environ)
            argv += ["--upstream", upstream_url]
        else:
            key_file = str(tmp / "key.pem")
            create = ["keys", "create", "--backend", "software", "--key-file", key_file]
            subprocess.run([compare.PAYGATE, *create], check=True, capture_output=True, timeout=60)
            if paid:
                env = {
                    **compare.PAID_EXACT_ENV,
                    # The fast upstream doubles as a facilitator that finds all valid.
                    "PAYGATE_FACILITATOR_URL": f"http://127.0.0.1:{upstream_port}",
                    "PAYGATE_LEDGER_PATH": str(tmp / "ledger.db"),
                    **env,
                }
            if anvil is not None:
                env = {
                    **compare.PAID_BATCH_ENV,
                    "PAYGATE_CHAIN_RPC_URL": anvil.rpc_url,
                    "PAYGATE_GAS_KEY": anvil.accounts[compare.GATEWAY_GAS].key,
                    "PAYGATE_LEDGER_PATH": str(tmp / "ledger.db"),
                    **env,
                }
            proxy_env = compare._paygate_env(tmp, port, upstream_port, **env)
            if tree is not None:
                proxy_env["PYTHONPATH"] = f"{tree}:{tree / 'devtools'}"
            argv = [compare.PY, compare.PAYGATE, "serve"]
        proxy = compare._spawn(grind + argv, cpu=None, env=proxy_env, log=tmp / "proxy.log")
        try:
            compare._wait_port(port, timeout=600)  # imports under valgrind take a while
            plain = compare.json.dumps(compare.CHAT).encode()

            def bodies(n: int) -> tuple[list[bytes], str]:
                if not sealed:
                    return [plain], "application/json"
                key = enclave.SoftwareKey.load_file(tmp / "key.pem").public_key
                sealed_bodies = [
                    enclave.seal_v2(key, plain, method="POST", path=compare.PATH).blob
                    for _ in range(n)
                ]
                return sealed_bodies, enclave.CONTENT_TYPE

            payments: list[Iterator[str]] = []
            if paid:
                probe = compare.Target("paygate", port, [proxy], body=plain)
                presigned = compare._presign(probe, tmp).read_text().split()
                if len(presigned) < WARM_UP + requests:
                    raise SystemExit(f"at most {len(presigned) - WARM_UP} paid requests")
                payments = [iter(presigned)] * CONNECTIONS  # one pool, any order
            if anvil is not None:
                url = f"http://127.0.0.1:{port}{compare.PATH}"
                source = ChannelSource(anvil, url, plain, tmp)
                # Any connection may send any share of the requests: each channel holds enough.
                stem = source.fresh(CONNECTIONS, WARM_UP + requests)
                payments = [iter(ChannelSource.lines(stem, i + 1)) for i in range(CONNECTIONS)]
            asyncio.run(_load(port, *bodies(WARM_UP), WARM_UP, payments))
            measured = bodies(requests)
            control = ["callgrind_control"]
            subprocess.run([*control, "-i", "on", str(proxy.pid)], check=True, capture_output=True)
            asyncio.run(_load(port, *measured, requests, payments))
            subprocess.run([*control, "-i", "off", str(proxy.pid)], check=True, capture_output=True)
            subprocess.run([*control, "-d", str(proxy.pid)], check=True, capture_output=True)
            time.sleep(1)
            total = 0
            if keep is not None:  # for callgrind_annotate: which libraries and C functions
                for dump in tmp.glob("callgrind.out*"):
                    shutil.copy(dump, keep / dump.name)
            for dump in tmp.glob("callgrind.out*"):
                for line in dump.read_text(errors="replace").splitlines():
                    if line.startswith("totals:"):
                        total += int(line.split()[1])
            return total / requests / 1000
        finally:
            compare._stop([proxy])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=("aiohttp-70", "paygate"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--sealed", action="store_true", help="v2 envelopes (paygate)")
    parser.add_argument(
        "--paid", action="store_true", help="each request paid (exact, verify-only; paygate)"
    )
    parser.add_argument(
        "--paid-batch",
        action="store_true",
        help="each request paid by a batch-settlement voucher (paygate; anvil)",
    )
    parser.add_argument("--keep", type=Path, help="copy the callgrind dumps into this directory")
    parser.add_argument("--tree", type=Path, help="paygate from this source tree")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for paygate")
    args = parser.parse_args()
    if (args.paid or args.paid_batch) and args.target != "paygate":
        parser.error("--paid and --paid-batch measure paygate")
    if args.paid and args.paid_batch:
        parser.error("--paid or --paid-batch, not both")
    env = dict(item.split("=", 1) for item in args.env)
    k = measure(
        args.target,
        requests=args.requests,
        sealed=args.sealed,
        tree=args.tree,
        env=env,
        paid=args.paid,
        paid_batch=args.paid_batch,
        keep=args.keep,
    )
    print(f"{args.target}: {k:,.1f} k instructions per request ({args.requests} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
