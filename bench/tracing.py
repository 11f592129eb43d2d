"""What OpenTelemetry tracing costs per request: the gateway's CPU with tracing off (no
``OTEL_EXPORTER_OTLP_ENDPOINT``, the shipped default) and on (exporting to a local OTLP/HTTP
receiver in this process that answers 200 and keeps nothing).

Each mode runs ``paygate serve`` as a real process (throw-away software key) in front of
``paygate fake-upstream`` on loopback; the client sends a bounded number of sequential small
requests. CPU per request is the gateway process's user + system time (/proc/PID/stat) over the
measured requests, divided by their number; rounds alternate off/on so machine load touches both
alike. Prints a table, writes bench/results/tracing.json.

    .venv/bin/python -m bench.tracing [--requests 1500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.gateway import PAYGATE, SMALL, _port, _wait_up

RESULTS = Path(__file__).parent / "results" / "tracing.json"
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def _receiver() -> tuple[web.AppRunner, str, list[int]]:
    """A local OTLP/HTTP endpoint: counts the export calls, keeps nothing."""
    calls: list[int] = []

    async def traces(request: web.Request) -> web.Response:
        await request.read()
        calls.append(1)
        return web.Response(status=200, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = _port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}", calls


async def _round(env: dict[str, str], fake_url: str, n: int) -> float:
    port = _port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [PAYGATE, "serve", "--listen", f"127.0.0.1:{port}", "--upstream-url", fake_url],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_up(url + "/health/live")
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as client:

            async def one() -> None:
                async with client.post(url + "/api/generate", json=SMALL) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"gateway answered {resp.status}")

            for _ in range(min(100, n)):  # warm-up: connections, caches, the exporter
                await one()
            before = _cpu_seconds(proc.pid)
            for _ in range(n):
                await one()
            return (_cpu_seconds(proc.pid) - before) / n * 1e6
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _run(n: int, rounds: int, key_file: Path) -> dict[str, Any]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PAYGATE_", "OTEL_"))}
    base.update(PAYGATE_KEY_BACKEND="software", PAYGATE_KEY_FILE=str(key_file))
    fake_port = _port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    fake = subprocess.Popen(
        [PAYGATE, "fake-upstream", "--listen", f"127.0.0.1:{fake_port}"],
        env=base,
        stderr=subprocess.DEVNULL,
    )
    receiver, otlp_url, calls = await _receiver()
    try:
        await _wait_up(fake_url + "/")
        on_env = {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url}
        off: list[float] = []
        on: list[float] = []
        for _ in range(rounds):
            off.append(await _round(base, fake_url, n))
            on.append(await _round(on_env, fake_url, n))
    finally:
        await receiver.cleanup()
        fake.send_signal(signal.SIGTERM)
        try:
            fake.wait(15)
        except subprocess.TimeoutExpired:
            fake.kill()
    return {
        "requests_per_round": n,
        "rounds": rounds,
        "cpu_us_per_request_off": [round(x, 1) for x in off],
        "cpu_us_per_request_on": [round(x, 1) for x in on],
        "median_off_us": round(statistics.median(off), 1),
        "median_on_us": round(statistics.median(on), 1),
        "export_calls_seen": len(calls),
        "load_average": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="per round (≤ 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (1-9)")
    args = parser.parse_args()
    n = max(100, min(args.requests, 20_000))
    rounds = max(1, min(args.rounds, 9))
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key.pem"
        subprocess.run(
            [PAYGATE, "keys", "create", "--backend", "software", "--key-file", str(key_file)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        results = asyncio.run(_run(n, rounds, key_file))
    print(f"{'tracing':10} {'CPU µs / request (median of rounds)':>38}  rounds")
    print(f"{'off':10} {results['median_off_us']:>38.1f}  {results['cpu_us_per_request_off']}")
    print(f"{'on':10} {results['median_on_us']:>38.1f}  {results['cpu_us_per_request_on']}")
    print(f"OTLP export calls seen with tracing on: {results['export_calls_seen']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
