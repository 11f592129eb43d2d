"""Where paygate's CPU per forwarded request goes: ``paygate serve`` as shipped in front of
bench.fast_upstream, loaded by wrk (16 connections), sampled by py-spy; the main thread's
samples grouped by the module of the innermost frame (the C of uvloop and of the socket calls
is counted in the frame that calls it).

    .venv/bin/python -m bench.profile [--sealed] [--seconds 8] [--env NAME=VALUE ...]

Needs Debian ``wrk`` and ``py-spy`` (the dev extra). docs/PERFORMANCE.md has the figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import tempfile
from pathlib import Path

import enclave
from bench import compare

# The module prefixes reported as one component each; the rest is "other".
COMPONENTS = (
    ("paygate/server/frontend", "fast front end"),
    ("aiohttp/web_protocol", "aiohttp server"),
    ("aiohttp/web_request", "aiohttp server"),
    ("aiohttp/web_app", "aiohttp server"),
    ("aiohttp/web_urldispatcher", "aiohttp server"),
    ("aiohttp/web_server", "aiohttp server"),
    ("aiohttp/http_parser", "aiohttp server"),
    ("aiohttp/streams", "aiohttp server"),
    ("aiohttp/web_response", "aiohttp response and writer"),
    ("aiohttp/http_writer", "aiohttp response and writer"),
    ("aiohttp/helpers", "aiohttp response and writer"),
    ("aiohttp/", "aiohttp, other"),
    ("paygate/upstream/http1", "upstream client"),
    ("paygate/server/proxy", "upstream client"),
    ("paygate/server/logs", "access log"),
    ("logging/", "access log"),
    ("paygate/server/metrics", "metrics"),
    ("prometheus_client", "metrics"),
    ("paygate/server/replies", "reply stage"),
    ("paygate/upstream/usage", "token usage"),
    ("enclave/", "sealing"),
    ("cryptography/", "sealing"),
    ("paygate/server/", "gateway stages"),
    ("paygate/", "paygate, other"),
    ("asyncio/", "event loop"),
    ("uvloop/", "event loop"),
    ("multidict", "headers (multidict)"),
    ("yarl", "urls (yarl)"),
)


KEYS_CREATE = [compare.PAYGATE, "keys", "create", "--backend", "software", "--key-file"]


def component(frame: str) -> str:
    for prefix, name in COMPONENTS:
        if prefix in frame:
            return name
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sealed", action="store_true", help="v2 envelopes")
    parser.add_argument(
        "--paid", action="store_true", help="each request paid (exact, verify-only)"
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for paygate")
    parser.add_argument("--top", type=int, default=0, help="also the N hottest frames")
    parser.add_argument("--stacks", help="print the stacks whose innermost frame has this")
    parser.add_argument(
        "--paid-batch", action="store_true", help="each request paid by a channel voucher"
    )
    parser.add_argument("--save", help="also keep py-spy's raw stacks in this file")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        up, port = compare._port(), compare._port()
        if args.paid:
            extra = {
                **compare.PAID_EXACT_ENV,
                "PAYGATE_FACILITATOR_URL": f"http://127.0.0.1:{up}",
                "PAYGATE_LEDGER_PATH": str(tmp / "ledger.db"),
                **extra,
            }
        anvil = None
        if args.paid_batch:
            anvil = compare._anvil(tmp)
            extra = {
                **compare.PAID_BATCH_ENV,
                "PAYGATE_CHAIN_RPC_URL": anvil.rpc_url,
                "PAYGATE_GAS_KEY": anvil.accounts[compare.GATEWAY_GAS].key,
                "PAYGATE_LEDGER_PATH": str(tmp / "ledger.db"),
                **extra,
            }
        procs = [
            compare._spawn(
                [compare.PY, "-m", "bench.fast_upstream", "--port", str(up)], cpu=compare.LOAD_CPU
            )
        ]
        try:
            subprocess.run(
                [*KEYS_CREATE, str(tmp / "key.pem")],
                check=True,
                capture_output=True,
                timeout=30,
            )
            env = compare._paygate_env(tmp, port, up, **extra)
            procs.append(
                compare._spawn(
                    [compare.PAYGATE, "serve"], cpu=compare.PROXY_CPU, env=env, log=tmp / "log"
                )
            )
            compare._wait_port(up)
            compare._wait_port(port)
            chat = json.dumps(compare.CHAT).encode()
            target = compare.Target("paygate", port, procs[1:], body=chat)
            if args.sealed:
                key = enclave.SoftwareKey.load_file(tmp / "key.pem").public_key
                target.body = enclave.seal_v2(key, chat, method="POST", path=compare.PATH).blob
                target.content_type = enclave.CONTENT_TYPE
            if args.paid:
                target.payments = compare._presign(target, tmp)
            if anvil is not None:
                url = f"http://127.0.0.1:{port}{compare.PATH}"
                target.channels = compare.ChannelSource(anvil, url, target.body, tmp)
            compare._wrk(target, 16, 1.0, tmp)  # warm-up
            out = tmp / "spy.txt"
            spy = subprocess.Popen(
                [
                    str(Path(compare.PY).with_name("py-spy")),
                    "record",
                    "--format",
                    "raw",
                    "--rate",
                    "250",
                    "--duration",
                    str(int(args.seconds)),
                    "--pid",
                    str(procs[1].pid),
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            run = compare._wrk(target, 16, args.seconds, tmp)
            spy.wait(60)
        finally:
            compare._stop(procs)
            if anvil is not None:
                anvil.stop()
        if args.save:
            Path(args.save).write_text(out.read_text())
        counts: collections.Counter[str] = collections.Counter()
        frames_seen: collections.Counter[str] = collections.Counter()
        stacks: collections.Counter[str] = collections.Counter()
        total = 0
        for line in out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = stack.split(";")
            if "Thread._bootstrap" in frames[0]:
                continue  # the executor's threads, waiting (not the request path)
            counts[component(frames[-1])] += int(n)
            frames_seen[frames[-1]] += int(n)
            if args.stacks and args.stacks in frames[-1]:
                stacks[" <- ".join(f.split(" (")[0] for f in reversed(frames[-9:]))] += int(n)
            total += int(n)
    cpu = run.get("cpu_us_per_request", 0.0)
    print(f"{run['requests']:,} requests, {cpu:.0f} us of proxy CPU per request")
    for name, n in counts.most_common():
        print(f"{name:32s} {100 * n / total:5.1f} %")
    for stack, n in stacks.most_common(8):
        print(f"{100 * n / total:5.1f} %  {stack}")
    for frame, n in frames_seen.most_common(args.top):
        print(f"{100 * n / total:5.1f} %  {frame[-110:]}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
