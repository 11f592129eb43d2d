"""paygate side by side with the ceiling, nginx and a minimal aiohttp proxy, in one run.

Every target sits in front of the same fast fake upstream (bench.fast_upstream) and gets the
same load (Debian ``wrk``, one thread): nothing (the upstream itself, the ceiling), nginx
(proxy_buffering off, keep-alive upstream), bench.mini_proxy (70 lines of aiohttp), paygate
plain, paygate with aiohttp serving every request (``PAYGATE_HTTP_FRONTEND=aiohttp``; the
shipped default is the fast front end), paygate sealed v2 (software key; the same process, a
sealed body), paygate paid in
verify-only mode against a loopback facilitator that answers /verify valid at once, and paygate
paid by batch-settlement vouchers (chain mode on anvil, each load connection on a channel opened
before the run, bench.channels); with ``--before DIR`` paygate from another source tree too
(free, paid and voucher), with ``--litellm BIN`` LiteLLM's proxy, and (``workers`` in
``--only``) ``paygate serve --workers 1`` and ``2`` unpinned.

The proxy under test is pinned to CPU 0; wrk, the upstream and the stream client to CPU 1.
Rounds are interleaved (every target once per round) and medians reported. Per target:
added p50 latency at one connection (wrk), req/s at 16 and 64 connections, proxy CPU per
request (utime+stime from /proc/PID/stat over the 16-connection run), time to first chunk and
chunk spacing of SSE streams (8 events 5 ms apart), RSS; then the stream rate (events per
second of proxy CPU over 32 concurrent streams) of aiohttp-70, paygate and paygate sealed.
paygate runs as shipped: every setting at its default. Then, for paygate alone: RSS growth over
100k requests, and RSS with 1,000 slow streams held open (a gateway of its own with the
concurrency limits raised). With ``gas`` in ``--only`` (the default), bench.gas's gas per exact
payment settled on anvil one by one vs batched in Multicall3. Prints a table and the load
average, writes
bench/results/compare.json and bench/results/compare.png.

    .venv/bin/python -m bench.compare [--rounds 3] [--seconds 3] [--skip-memory]
        [--before DIR]  # DIR from `git archive REV | tar -x -C DIR`
        [--litellm .../bin/litellm]  # pip install 'litellm[proxy]' in a venv of its own
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paygate_dev.chain.accounts import GATEWAY_GAS

import enclave
from bench import gas
from bench.channels import ChannelSource
from bench.presign import payment_headers
from paygate import wire

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "compare.json"
PLOT = HERE / "results" / "compare.png"
LUA = HERE / "wrk_report.lua"
PAID_LUA = HERE / "wrk_paid.lua"
PAID_BATCH_LUA = HERE / "wrk_paid_batch.lua"
PY = sys.executable
PAYGATE = str(Path(PY).with_name("paygate"))
PATH = "/v1/chat/completions"
CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Say something short."}]}
STREAM_CHUNKS, STREAM_INTERVAL_MS = 8, 5
PROXY_CPU, LOAD_CPU = "0", "1"
TICK = os.sysconf("SC_CLK_TCK")
PAYMENTS = 60_000  # pre-signed for the paid target: more than its rounds can spend


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _cpu_seconds(pids: list[int], *, system: bool = False) -> float:
    """The processes' CPU time: user + system, or (``system``) the kernel's part alone (the
    ledger's pwrite/fdatasync, the sockets' syscalls)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime, stime (fields 14, 15)
        total += int(fields[12]) if system else int(fields[11]) + int(fields[12])
    return total / TICK


def _rss_mb(pids: list[int]) -> float:
    kb = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                kb += int(line.split()[1])
    return kb / 1024


@dataclass
class Target:
    """One thing under load: its URL, its processes, and the body it is sent."""

    name: str
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    body: bytes = b""
    content_type: str = "application/json"
    sealed_key: bytes | None = None  # paygate's public key: seal each stream request
    payments: Path | None = None  # pre-signed PAYMENT-SIGNATURE values, one a line
    spent: int = 0  # how many of them earlier runs may have used
    channels: ChannelSource | None = None  # batch-settlement: fresh channels for each run

    @property
    def pids(self) -> list[int]:
        pids = []
        for proc in self.procs:
            pids.append(proc.pid)
            pids.extend(_children(proc.pid))
        return pids


def _spawn(
    argv: list[str], *, cpu: str | None, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` on CPU ``cpu`` (None: wherever the scheduler likes)."""
    out = log.open("wb") if log else subprocess.DEVNULL
    pin = ["taskset", "-c", cpu] if cpu is not None else []
    return subprocess.Popen([*pin, *argv], env=env, stdout=out, stderr=out)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _nginx_conf(tmp: Path, port: int, upstream: int) -> Path:
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(mode=0o777, exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log {tmp}/nginx-access.log combined buffer=64k;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream model {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://model;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
""")
    return conf


def _paygate_env(tmp: Path, port: int, upstream: int, **extra: str) -> dict[str, str]:
    """``paygate serve`` as shipped (the systemd unit sets only paths and the config file):
    every setting at its default, INFO text log to stderr (here a file, as journald's
    stream is), metrics on, uvloop. Only where it listens, its key and its upstream are set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")}
    env.update(
        PAYGATE_KEY_BACKEND="software",
        PAYGATE_KEY_FILE=str(tmp / "key.pem"),
        PAYGATE_LISTEN=f"127.0.0.1:{port}",
        PAYGATE_UPSTREAM_URL=f"http://127.0.0.1:{upstream}",
        **extra,
    )
    return env


# The paid rows beside the free one (issue 25): ``paygate-paid`` pays each request with its own
# exact EIP-3009 authorization (verify-only); ``paygate-paid-batch`` pays each with a
# batch-settlement voucher, each load connection on a channel of its own opened before the run
# (bench.channels: a real deposit on anvil, with the FiatToken and the settlement contract
# stand-in). No claim runs during the load (one claim carries up to 500 channels; its gas is
# bench.gas's): what is measured is a voucher request's own CPU.
PAID_EXACT_ENV = {
    "PAYGATE_PAYMENT_MODE": "verify-only",
    "PAYGATE_PAY_TO": "0x" + "5e11e7" * 6 + "5e11",
    "PAYGATE_NETWORK": "base-sepolia",
}
PAID_BATCH_ENV = {
    "PAYGATE_PAYMENT_MODE": "chain",
    "PAYGATE_PAYMENT_SCHEMES": "batch-settlement",
    "PAYGATE_PAY_TO": "0x" + "5e11e7" * 6 + "5e11",
    "PAYGATE_NETWORK": "base-sepolia",
    "PAYGATE_BATCH_CLAIM_INTERVAL": "3600",
    "PAYGATE_BATCH_MAX_VOUCHERS_PER_CLAIM": "500",
}
VOUCHERS_PER_SECOND = 4000  # more than a connection can spend: a channel never runs dry

# The 1,000-stream case only: the default (64 concurrent requests) would answer 503 past 64.
RAISED_LIMITS = {"PAYGATE_MAX_CONCURRENT_REQUESTS": "2000", "PAYGATE_BODY_SLOTS": "2000"}


# --- load --------------------------------------------------------------------------------


def _wrk(target: Target, connections: int, seconds: float, tmp: Path) -> dict[str, Any]:
    body = tmp / f"body-{target.name}"
    body.write_bytes(target.body)
    env = dict(os.environ, BENCH_BODY=str(body), BENCH_CTYPE=target.content_type)
    script = LUA
    threads = 1
    if target.payments is not None:
        script = PAID_LUA
        env.update(BENCH_PAYMENTS=str(target.payments), BENCH_OFFSET=str(target.spent))
    if target.channels is not None:
        vouchers = round(seconds * VOUCHERS_PER_SECOND / connections) + 64
        stem = target.channels.fresh(connections, vouchers)
        script, threads = PAID_BATCH_LUA, connections  # one channel a connection
        env.update(BENCH_PAYMENTS=str(stem))
    pids = target.pids
    cpu_before = _cpu_seconds(pids) if pids else 0.0
    system_before = _cpu_seconds(pids, system=True) if pids else 0.0
    out = subprocess.run(
        [
            "taskset",
            "-c",
            LOAD_CPU,
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{round(seconds)}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://127.0.0.1:{target.port}{PATH}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    cpu = (_cpu_seconds(pids) - cpu_before) if pids else None
    system = (_cpu_seconds(pids, system=True) - system_before) if pids else None
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    result: dict[str, Any] = json.loads(line[6:])
    # Those in flight at the end, and one more per reconnect (a timeout or a socket error):
    # a payment sent once is never sent again.
    target.spent += result["requests"] + 2 * connections + result["errors"]
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    if cpu is not None and result["requests"]:
        result["cpu_us_per_request"] = cpu / result["requests"] * 1e6
        result["system_us_per_request"] = (system or 0.0) / result["requests"] * 1e6
    if result["non2xx"] or result["errors"]:
        print(
            f"  ! {target.name} c{connections}: {result['non2xx']} non-2xx, "
            f"{result['errors']} socket errors",
            file=sys.stderr,
        )
    return result


def _next_payment(target: Target) -> str:
    assert target.payments is not None
    with target.payments.open() as lines:
        for i, line in enumerate(lines):
            if i == target.spent:
                target.spent += 1
                return line.strip()
    raise RuntimeError("out of pre-signed payments: raise PAYMENTS")


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)


async def _streams(target: Target, n: int) -> dict[str, float]:
    """Sequential SSE streams on one keep-alive connection: time to first chunk, spacing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    ttfc: list[float] = []
    gaps: list[float] = []
    vouchers = iter(ChannelSource.lines(target.channels.fresh(1, n + 5)) if target.channels else ())
    plain = dict(
        CHAT, stream=True, bench_chunks=STREAM_CHUNKS, bench_interval_ms=STREAM_INTERVAL_MS
    )
    try:
        for i in range(n + 5):
            body = json.dumps(plain).encode()
            ctype = "application/json"
            if target.sealed_key is not None:
                body = enclave.seal_v2(target.sealed_key, body, method="POST", path=PATH).blob
                ctype = enclave.CONTENT_TYPE
            paid = ""
            if target.payments is not None:
                paid = f"PAYMENT-SIGNATURE: {_next_payment(target)}\r\n"
            if target.channels is not None:
                paid = f"PAYMENT-SIGNATURE: {next(vouchers)}\r\n"
            head = (
                f"POST {PATH} HTTP/1.1\r\nHost: bench\r\nContent-Type: {ctype}\r\n"
                f"{paid}Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            started = time.perf_counter()
            writer.write(head + body)
            response = await _read_head(reader)
            if not response.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{target.name}: {response[:60]!r}")
            arrivals = []
            while True:
                size = int((await asyncio.wait_for(reader.readline(), 10)).strip(), 16)
                if size == 0:
                    await reader.readline()
                    break
                await reader.readexactly(size + 2)
                arrivals.append(time.perf_counter())
            if i >= 5:  # warm-up
                ttfc.append(arrivals[0] - started)
                gaps.extend(b - a for a, b in itertools.pairwise(arrivals))
    finally:
        writer.close()
    # Some proxies split or join chunk frames: spacing counts only gaps longer than 1 ms.
    spaced = [g for g in gaps if g > 0.001]
    return {
        "ttfc_ms": statistics.median(ttfc) * 1000,
        "gap_median_ms": statistics.median(spaced) * 1000 if spaced else 0.0,
        "gap_max_ms": max(gaps) * 1000 if gaps else 0.0,
    }


async def _stream_rate(
    target: Target, streams: int = 32, chunks: int = 500, interval_ms: float = 1.0
) -> dict[str, float]:
    """How many SSE events one core relays: ``streams`` concurrent streams of ``chunks``
    events ``interval_ms`` apart (so events mostly arrive one per read, as tokens do), sealed
    v2 when the target seals. The robust figure is events per second of proxy CPU."""
    plain = json.dumps(
        dict(CHAT, stream=True, bench_chunks=chunks, bench_interval_ms=interval_ms)
    ).encode()

    async def one() -> int:
        body, ctype = plain, "application/json"
        if target.sealed_key is not None:
            body = enclave.seal_v2(target.sealed_key, plain, method="POST", path=PATH).blob
            ctype = enclave.CONTENT_TYPE
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        try:
            writer.write(
                f"POST {PATH} HTTP/1.1\r\nHost: bench\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await _read_head(reader)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{target.name}: {head[:60]!r}")
            tail = b""
            async with asyncio.timeout(120):
                while not tail.endswith(b"0\r\n\r\n"):
                    data = await reader.read(1 << 16)
                    if not data:
                        raise RuntimeError(f"{target.name}: stream cut")
                    tail = (tail + data)[-16:]
            return chunks
        finally:
            writer.close()

    pids = target.pids
    cpu_before = _cpu_seconds(pids)
    started = time.perf_counter()
    events = sum(await asyncio.gather(*(one() for _ in range(streams))))
    wall = time.perf_counter() - started
    cpu = _cpu_seconds(pids) - cpu_before
    return {
        "events": events,
        "events_per_s": events / wall,
        "cpu_us_per_event": cpu / events * 1e6,
        "events_per_cpu_second": events / cpu if cpu else float("inf"),
    }


# --- memory ------------------------------------------------------------------------------


async def _hold_streams(target: Target, n: int, seconds: float) -> dict[str, float]:
    """``n`` concurrent slow streams held open; paygate's RSS once all are flowing."""
    body = json.dumps(
        dict(CHAT, stream=True, bench_chunks=int(seconds * 2) + 4, bench_interval_ms=500)
    ).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    rss_before = _rss_mb(target.pids)
    flowing = 0
    hold = asyncio.Event()

    async def one() -> None:
        nonlocal flowing
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", target.port, limit=2**16), 30
        )
        try:
            writer.write(head + body)
            response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            if not response.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(response[:40].decode(errors="replace"))
            await asyncio.wait_for(reader.read(1), 60)
            flowing += 1
            await hold.wait()
        finally:
            writer.close()

    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(0.002)  # stay under the listen backlog
    deadline = time.monotonic() + 60
    while flowing < n and time.monotonic() < deadline and not all(t.done() for t in tasks):
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)
    rss = _rss_mb(target.pids)
    count = flowing
    hold.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = sum(isinstance(r, BaseException) for r in results)
    return {
        "streams": n,
        "flowing": count,
        "failed": failed,
        "rss_idle_mb": rss_before,
        "rss_mb": rss,
    }


def _growth(target: Target, total: int, tmp: Path) -> dict[str, float]:
    """RSS after a warm-up and after ``total`` more requests (16 connections)."""
    _wrk(target, 16, 2, tmp)
    before = _rss_mb(target.pids)
    done = 0
    while done < total:
        done += _wrk(target, 16, 5, tmp)["requests"]
    after = _rss_mb(target.pids)
    return {
        "requests": done,
        "rss_before_mb": before,
        "rss_after_mb": after,
        "growth_pct": (after - before) / before * 100,
    }


# --- the run -----------------------------------------------------------------------------


def _presign(target: Target, tmp: Path) -> Path:
    """Distinct payments for the paid target, for the 402 challenge it answers."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{target.port}{PATH}",
        data=target.body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310 - loopback
    except urllib.error.HTTPError as exc:
        required = exc.headers[wire.PAYMENT_REQUIRED]
    else:
        raise RuntimeError("the paid gateway served without payment")
    path = tmp / "payments.txt"
    path.write_text("\n".join(payment_headers(required, PAYMENTS)) + "\n")
    return path


@contextlib.contextmanager
def _targets(
    tmp: Path, which: list[str], before: Path | None, litellm: Path | None = None
) -> Iterator[dict[str, Target]]:
    up = _port()
    procs = [_spawn([PY, "-m", "bench.fast_upstream", "--port", str(up)], cpu=LOAD_CPU)]
    targets: dict[str, Target] = {}
    chat = json.dumps(CHAT).encode()
    anvil: Any = None
    try:
        _wait_port(up)
        targets["ceiling"] = Target("ceiling", up, body=chat)
        if "nginx" in which:
            port = _port()
            conf = _nginx_conf(tmp, port, up)
            nginx = _spawn(
                [shutil.which("nginx") or "nginx", "-c", str(conf), "-g", "daemon off;"],
                cpu=PROXY_CPU,
            )
            procs.append(nginx)
            targets["nginx"] = Target("nginx", port, [nginx], body=chat)
        if "aiohttp" in which:
            port = _port()
            mini = _spawn(
                [
                    PY,
                    "-m",
                    "bench.mini_proxy",
                    "--port",
                    str(port),
                    "--upstream",
                    f"http://127.0.0.1:{up}",
                ],
                cpu=PROXY_CPU,
            )
            procs.append(mini)
            targets["aiohttp-70"] = Target("aiohttp-70", port, [mini], body=chat)
        if "paygate" in which or "workers" in which:
            subprocess.run(
                [
                    PAYGATE,
                    "keys",
                    "create",
                    "--backend",
                    "software",
                    "--key-file",
                    str(tmp / "key.pem"),
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
            pubkey = enclave.SoftwareKey.load_file(tmp / "key.pem").public_key
            sealed = enclave.seal_v2(pubkey, chat, method="POST", path=PATH).blob
            variants: dict[str, tuple[dict[str, str], str | None, str | None]] = {}
            if "paygate" in which:
                variants["paygate"] = ({}, None, PROXY_CPU)
                variants["paygate-asyncio"] = ({"PAYGATE_EVENT_LOOP": "asyncio"}, None, PROXY_CPU)
                variants["paygate-aiohttp-front"] = (
                    {"PAYGATE_HTTP_FRONTEND": "aiohttp"},
                    None,
                    PROXY_CPU,
                )
                variants["paygate-paid"] = (
                    {
                        **PAID_EXACT_ENV,
                        # The fast upstream doubles as a facilitator that finds all valid.
                        "PAYGATE_FACILITATOR_URL": f"http://127.0.0.1:{up}",
                        "PAYGATE_LEDGER_PATH": str(tmp / "ledger.db"),
                    },
                    None,
                    PROXY_CPU,
                )
                anvil = _anvil(tmp)
                variants["paygate-paid-batch"] = (
                    {
                        **PAID_BATCH_ENV,
                        "PAYGATE_CHAIN_RPC_URL": anvil.rpc_url,
                        "PAYGATE_GAS_KEY": anvil.accounts[GATEWAY_GAS].key,
                        "PAYGATE_LEDGER_PATH": str(tmp / "ledger-batch.db"),
                    },
                    None,
                    PROXY_CPU,
                )
            if before is not None:
                variants["paygate-before"] = ({}, f"{before}:{before / 'devtools'}", PROXY_CPU)
                if "paygate-paid" in variants:  # the paid path of that tree, its own ledger
                    paid_env = dict(variants["paygate-paid"][0])
                    paid_env["PAYGATE_LEDGER_PATH"] = str(tmp / "ledger-before.db")
                    variants["paygate-paid-before"] = (
                        paid_env,
                        f"{before}:{before / 'devtools'}",
                        PROXY_CPU,
                    )
                if "paygate-paid-batch" in variants:  # and its batch-settlement path
                    batch_env = dict(variants["paygate-paid-batch"][0])
                    batch_env["PAYGATE_LEDGER_PATH"] = str(tmp / "ledger-batch-before.db")
                    variants["paygate-paid-batch-before"] = (
                        batch_env,
                        f"{before}:{before / 'devtools'}",
                        PROXY_CPU,
                    )
            if "workers" in which:
                # Scale-out (serve --workers): unpinned, so a second worker can use CPU 1.
                for n in (1, 2):
                    variants[f"paygate-{n}w-unpinned"] = ({"PAYGATE_WORKERS": str(n)}, None, None)
            for name, (extra, pythonpath, cpu) in variants.items():
                port = _port()
                env = _paygate_env(tmp, port, up, **extra)
                if pythonpath:
                    env["PYTHONPATH"] = pythonpath
                gw = _spawn([PAYGATE, "serve"], cpu=cpu, env=env, log=tmp / f"{name}.log")
                procs.append(gw)
                targets[name] = Target(name, port, [gw], body=chat)
                if name == "paygate":
                    targets["paygate-sealed"] = Target(
                        "paygate-sealed",
                        port,
                        [gw],
                        body=sealed,
                        content_type=enclave.CONTENT_TYPE,
                        sealed_key=pubkey,
                    )
            for name in ("paygate-paid", "paygate-paid-before"):
                if name in targets:
                    _wait_port(targets[name].port)
                    targets[name].payments = _presign(targets[name], tmp)
            for name in ("paygate-paid-batch", "paygate-paid-batch-before"):
                if name in targets:
                    batch = targets[name]
                    _wait_port(batch.port)
                    url = f"http://127.0.0.1:{batch.port}{PATH}"
                    (tmp / name).mkdir(exist_ok=True)  # its own voucher files
                    batch.channels = ChannelSource(anvil, url, batch.body, tmp / name)
        if litellm is not None:
            port = _port()
            config = tmp / "litellm.yaml"
            config.write_text(
                "model_list:\n  - model_name: bench\n    litellm_params:\n"
                f"      model: openai/bench\n      api_base: http://127.0.0.1:{up}/v1\n"
                "      api_key: none\n"
            )
            env = dict(
                os.environ,
                # Offline: the packaged price map; no master key on loopback.
                LITELLM_LOCAL_MODEL_COST_MAP="True",
                LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",
            )
            argv = [str(litellm), "--config", str(config), "--host", "127.0.0.1"]
            proxy = _spawn([*argv, "--port", str(port)], cpu=PROXY_CPU, env=env)
            procs.append(proxy)
            _wait_port(port, timeout=180)  # it starts in about 30 s
            targets["litellm"] = Target("litellm", port, [proxy], body=chat)
        for target in targets.values():
            _wait_port(target.port)
        yield targets
    finally:
        _stop(procs)
        if anvil is not None:
            anvil.stop()


def _anvil(tmp: Path) -> Any:
    """anvil with the FiatToken and the batch-settlement contracts (paygate_dev.chain)."""
    from paygate_dev.chain.anvil import Anvil

    anvil = Anvil(log_path=tmp / "anvil.log")
    anvil.start()
    anvil.install_usdc()
    return anvil


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def run(
    rounds: int,
    seconds: float,
    memory: bool,
    which: list[str],
    before: Path | None,
    litellm: Path | None,
) -> dict[str, Any]:
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="paygate-bench-") as name:
        tmp = Path(name)
        tmp.chmod(0o755)
        samples: dict[str, list[dict[str, Any]]] = {}
        extra: dict[str, Any] = {}
        with _targets(tmp, which, before, litellm) as targets:
            for target in targets.values():  # warm-up: connections, caches, JIT-less Python
                _wrk(target, 16, 1, tmp)
            for r in range(rounds):
                print(f"round {r + 1}/{rounds}", file=sys.stderr)
                for target in targets.values():
                    row: dict[str, Any] = {}
                    row["p50_us"] = _wrk(target, 1, seconds, tmp)["p50_us"]
                    c16 = _wrk(target, 16, seconds, tmp)
                    row["rps16"] = c16["rps"]
                    row["cpu_us"] = c16.get("cpu_us_per_request")
                    row["system_us"] = c16.get("system_us_per_request")
                    row["rps64"] = _wrk(target, 64, seconds, tmp)["rps"]
                    row.update(asyncio.run(_streams(target, 30)))
                    row["rss_mb"] = _rss_mb(target.pids) if target.pids else None
                    samples.setdefault(target.name, []).append(row)
            rates: dict[str, list[dict[str, float]]] = {}
            for name in ("aiohttp-70", "paygate", "paygate-sealed"):
                if name in targets:
                    for _ in range(rounds):
                        rates.setdefault(name, []).append(asyncio.run(_stream_rate(targets[name])))
            extra["stream_rate"] = {
                name: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                for name, rows in rates.items()
            }
            if memory and "paygate" in targets:
                print("memory: 100k requests, then 1,000 streams", file=sys.stderr)
                # Growth first: the streams' high-water mark would hide a leak afterwards.
                extra["growth_100k"] = _growth(targets["paygate"], 100_000, tmp)
                # 1,000 streams need the concurrency limits raised: a gateway of their own.
                port = _port()
                env = _paygate_env(tmp, port, targets["ceiling"].port, **RAISED_LIMITS)
                gw = _spawn([PAYGATE, "serve"], cpu=PROXY_CPU, env=env, log=tmp / "streams.log")
                try:
                    _wait_port(port)
                    wide = Target("paygate-2000", port, [gw], body=targets["paygate"].body)
                    _wrk(wide, 16, 1, tmp)
                    extra["streams_1000"] = asyncio.run(_hold_streams(wide, 1000, 8))
                finally:
                    _stop([gw])
    return _summarise(samples, extra, rounds, seconds, load_start)


def _summarise(
    samples: dict[str, list[dict[str, Any]]],
    extra: dict[str, Any],
    rounds: int,
    seconds: float,
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> dict[str, Any]:
    keys = (
        "p50_us",
        "rps16",
        "rps64",
        "cpu_us",
        "system_us",
        "ttfc_ms",
        "gap_median_ms",
        "gap_max_ms",
        "rss_mb",
    )
    table = {name: {k: _median(rows, k) for k in keys} for name, rows in samples.items()}
    base = table["ceiling"]
    for name, row in table.items():
        row["added_p50_us"] = row["p50_us"] - base["p50_us"]
        if name in ("paygate-paid", "paygate-paid-before"):
            # Its facilitator is the fast upstream: one more round trip like the ceiling's
            # (the batch-settlement row calls nothing on a voucher).
            row["added_p50_us"] -= base["p50_us"]
        row["added_ttfc_ms"] = row["ttfc_ms"] - base["ttfc_ms"]
    mini = table.get("aiohttp-70")
    if mini:
        for row in table.values():
            row["vs_aiohttp"] = {
                "added_p50": row["added_p50_us"] / mini["added_p50_us"],
                "rps16": row["rps16"] / mini["rps16"],
                "rps64": row["rps64"] / mini["rps64"],
                "cpu": (row["cpu_us"] / mini["cpu_us"]) if row["cpu_us"] else None,
            }
    # The issue-25 targets: a paid request's CPU over a free one's of the same tree, same run.
    pairs = {
        "paygate-paid": "paygate",
        "paygate-paid-before": "paygate-before",
        "paygate-paid-batch": "paygate",
        "paygate-paid-batch-before": "paygate-before",
    }
    paid_vs_free = {
        paid: (
            table[paid]["cpu_us"] / table[free]["cpu_us"]
            if paid in table and free in table and table[paid]["cpu_us"] and table[free]["cpu_us"]
            else None
        )
        for paid, free in pairs.items()
    }
    return {
        "table": table,
        "paid_vs_free": paid_vs_free,
        "samples": samples,
        **extra,
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "rounds": rounds,
            "seconds_per_run": seconds,
            "stream": f"{STREAM_CHUNKS} SSE events {STREAM_INTERVAL_MS} ms apart",
            "pinning": f"proxy on CPU {PROXY_CPU}; wrk, upstream, stream client on {LOAD_CPU}",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }


def _print(result: dict[str, Any]) -> None:
    def f(v: float | None, spec: str) -> str:
        return format(v, spec) if v is not None else "-"

    print(
        f"{'target':16} {'+p50 µs':>8} {'rps c16':>8} {'rps c64':>8} {'CPU µs/req':>10} "
        f"{'+TTFC ms':>8} {'gap ms':>7} {'RSS MB':>7}  vs aiohttp-70 (p50/rps16/cpu)"
    )
    for name, row in result["table"].items():
        vs = row.get("vs_aiohttp", {})
        print(
            f"{name:16} {f(row['added_p50_us'], '8.0f')} {f(row['rps16'], '8.0f')} "
            f"{f(row['rps64'], '8.0f')} {f(row['cpu_us'], '10.0f')} "
            f"{f(row['added_ttfc_ms'], '8.2f')} {f(row['gap_median_ms'], '7.2f')} "
            f"{f(row['rss_mb'], '7.1f')}  {f(vs.get('added_p50'), '.2f')}/"
            f"{f(vs.get('rps16'), '.2f')}/{f(vs.get('cpu'), '.2f')}"
        )
    for name, row in result["table"].items():
        if row.get("cpu_us") and row.get("system_us") is not None:
            user = row["cpu_us"] - row["system_us"]
            print(
                f"{name} proxy CPU per request: user {user:.0f} + system {row['system_us']:.0f} µs"
            )
    for name, ratio in result.get("paid_vs_free", {}).items():
        shown = f"{ratio:.2f}x" if ratio is not None else "not measured (no such target yet)"
        print(f"{name} CPU per request vs the free one of its tree: {shown}")
    for key in ("streams_1000", "growth_100k"):
        if key in result:
            print(key, json.dumps({k: round(v, 2) for k, v in result[key].items()}))
    for name, rate in result.get("stream_rate", {}).items():
        print(
            f"stream rate {name}: {rate['events_per_s']:,.0f} events/s, "
            f"{rate['cpu_us_per_event']:.1f} µs proxy CPU per event "
            f"({rate['events_per_cpu_second']:,.0f} events per CPU-second)"
        )
    env = result["environment"]
    print("load average at the start:", env.get("loadavg_start"), "at the end:", env["loadavg_end"])


def markdown(result: dict[str, Any]) -> str:
    """The table as Markdown, for docs/PERFORMANCE.md."""

    def f(v: float | None, spec: str) -> str:
        return format(v, spec) if v is not None else "-"

    lines = [
        "| target | added p50, 1 conn (µs) | req/s, 16 conn | req/s, 64 conn "
        "| proxy CPU / request (µs) | added TTFC (ms) | chunk gap (ms) | RSS (MB) "
        "| CPU vs aiohttp-70 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["table"].items():
        vs = row.get("vs_aiohttp", {})
        lines.append(
            f"| {name} | {f(row['added_p50_us'], '.0f')} | {f(row['rps16'], ',.0f')} "
            f"| {f(row['rps64'], ',.0f')} | {f(row['cpu_us'], '.0f')} "
            f"| {f(row['added_ttfc_ms'], '.2f')} | {f(row['gap_median_ms'], '.2f')} "
            f"| {f(row['rss_mb'], '.0f')} | {f(vs.get('cpu'), '.2f')} |"
        )
    return "\n".join(lines)


def _plot(result: dict[str, Any]) -> None:
    try:
        import matplotlib  # only for the picture: the `bench` extra
    except ImportError:
        print("no plot: matplotlib is missing (pip install -e '.[bench]')", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {k: v for k, v in result["table"].items() if k != "ceiling"}
    names = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (
        ("added_p50_us", "added p50 latency, 1 connection (µs)"),
        ("rps16", "req/s, 16 connections (proxy on 1 core)"),
        ("cpu_us", "proxy CPU per request (µs)"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [table[n][key] or 0 for n in names]
        ax.barh(
            names, values, color=["#888" if not n.startswith("paygate") else "#2a6" for n in names]
        )
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per wrk run")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--only",
        default="nginx,aiohttp,paygate,workers,gas",
        help="comma-separated subset of nginx,aiohttp,paygate,workers,gas (bench.gas)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--before",
        type=Path,
        help="also run paygate from this source tree (e.g. `git archive REV | tar -x -C DIR`)",
    )
    parser.add_argument(
        "--litellm",
        type=Path,
        help="also run the LiteLLM proxy: its `litellm` script (pip install 'litellm[proxy]')",
    )
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "taskset"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            print(f"{tool} is missing: apt-get install wrk nginx util-linux", file=sys.stderr)
            return 1
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    result = run(
        max(1, args.rounds),
        max(1.0, args.seconds),
        not args.skip_memory,
        args.only.split(","),
        args.before.resolve() if args.before else None,
        args.litellm,
    )
    if "gas" in args.only.split(","):  # gas per payment, one by one vs batched (bench.gas)
        result["gas"] = gas.run()
    _print(result)
    print()
    print(markdown(result))
    if "gas" in result:
        print()
        print(gas.markdown(result["gas"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.out == RESULTS:
        _plot(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
