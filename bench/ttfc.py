"""Where a stream's time to first chunk goes: timestamps (``time.perf_counter_ns``, one
monotonic clock for every process on the machine) at each hop of one SSE request, paygate as
shipped in front of an upstream that stamps its own receive and send times into the first event.

    .venv/bin/python -m bench.ttfc [--streams 200] [--tree DIR]

Marks, each the median over the streams (µs after the caller's write):

- ``gw_in``        the request's bytes reach paygate's front end (``FastProtocol.data_received``)
- ``up_send``      paygate writes the request to the upstream (``_Connection.send``)
- ``up_recv``      the upstream has the request (stamped by the upstream)
- ``up_sent``      the upstream has written the head and the first event (stamped by it)
- ``gw_up_data``   that reply's first bytes reach paygate (``_Connection.data_received``)
- ``gw_head_out``  paygate writes the stream's head to the caller
- ``gw_chunk_out`` paygate writes the first chunk to the caller (the same write when merged)
- ``head``, ``first``  the caller has the head, the first chunk

The ceiling (the caller straight to the upstream) is measured the same way. The probes wrap
functions of the gateway process from outside (``--probe-serve``, this module as the launcher);
shipped code carries no timestamps. The wrappers cost a few µs: compare marks, not totals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import compare

MARKS_ENV = "BENCH_TTFC_MARKS"
EVENT = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


# --- the stamping upstream --------------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self._buf[:end].lower()
        length = 0
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if len(self._buf) < end + 4 + length:
            return
        self._buf = self._buf[end + 4 + length :]
        asyncio.get_running_loop().create_task(self._stream(now))

    async def _stream(self, received: int) -> None:
        transport = self._transport
        assert transport is not None
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        sent = time.perf_counter_ns()
        stamp = f'data: {{"up_recv":{received},"up_sent":{sent}}}\n\n'.encode()
        transport.write(head + _chunk(stamp))  # as a model server does: head, then tokens
        for _ in range(3):
            await asyncio.sleep(0.005)
            transport.write(_chunk(EVENT))
        transport.write(_chunk(DONE) + b"0\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# --- the probed gateway -------------------------------------------------------------------------


def _probe_serve() -> None:
    """``paygate serve`` with marks at each hop, written to $BENCH_TTFC_MARKS on SIGUSR2."""
    import signal

    from aiohttp import http_writer

    from paygate.cli.main import main
    from paygate.server import admission, frontend, gateway, opening, proxy, routing
    from paygate.upstream import http1

    marks: list[tuple[str, int]] = []
    clock = time.perf_counter_ns

    def wrap(owner: Any, name: str, mark: str) -> None:
        original = getattr(owner, name)

        def probed(*args: Any, **kwargs: Any) -> Any:
            marks.append((mark, clock()))
            return original(*args, **kwargs)

        setattr(owner, name, probed)

    wrap(frontend.FastProtocol, "data_received", "gw_in")
    wrap(frontend.FastProtocol, "_serve", "gw_task")  # the request's task is made
    wrap(gateway.Gateway, "handle", "gw_handle")
    wrap(gateway.Gateway, "_forward", "gw_forward")
    wrap(admission.Admission, "admit", "gw_admit")
    wrap(opening.Opener, "open", "gw_open")
    wrap(gateway, "shape_or_refuse", "gw_shape")
    wrap(routing.Router, "exchange", "gw_route")
    wrap(proxy.Upstream, "exchange", "gw_proxy")
    wrap(http1.Pool, "request", "up_request")
    wrap(http1.Pool, "_connect", "up_connect")
    wrap(http1._Connection, "send", "up_send")
    wrap(http1._Connection, "data_received", "gw_up_data")
    # The caller's writes: a whole reply, a stream's head, its chunks.
    wrap(frontend.FastProtocol, "_write_whole", "gw_whole_out")
    wrap(http_writer.StreamWriter, "send_headers", "gw_head_out")
    wrap(http_writer.StreamWriter, "_write", "gw_chunk_out")
    wrap(http_writer.StreamWriter, "_writelines", "gw_chunk_out")

    def dump(*_: Any) -> None:
        Path(os.environ[MARKS_ENV]).write_text(json.dumps(marks))
        os._exit(0)

    signal.signal(signal.SIGUSR2, dump)
    sys.argv = ["paygate", "serve"]
    main()


# --- the caller -----------------------------------------------------------------------------------


async def _streams(port: int, n: int) -> list[dict[str, int]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(dict(compare.CHAT, stream=True)).encode()
    head = (
        f"POST {compare.PATH} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    out = []
    try:
        for _ in range(n):
            await asyncio.sleep(0.002)
            started = time.perf_counter_ns()
            writer.write(head + body)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            got_head = time.perf_counter_ns()
            first = None
            stamps: dict[str, int] = {}
            while True:
                size = int((await asyncio.wait_for(reader.readline(), 10)).strip(), 16)
                if size == 0:
                    await reader.readline()
                    break
                data = await reader.readexactly(size + 2)
                if first is None:
                    first = time.perf_counter_ns()
                    stamps = json.loads(data[6:].split(b"\n")[0])
            assert first is not None
            out.append({"start": started, "head": got_head, "first": first, **stamps})
    finally:
        writer.close()
    return out


def _pair(samples: list[dict[str, int]], marks: list[tuple[str, int]]) -> None:
    """Each gateway mark of a stream, the first of its name inside that stream's window."""
    for sample in samples:
        for name, at in marks:
            if sample["start"] <= at <= sample["first"] and name not in sample:
                sample[name] = at


ORDER = (
    "gw_in",
    "gw_task",
    "gw_handle",
    "gw_forward",
    "gw_admit",
    "gw_open",
    "gw_shape",
    "gw_route",
    "gw_proxy",
    "up_request",
    "up_connect",
    "up_send",
    "up_recv",
    "up_sent",
    "gw_up_data",
    "gw_head_out",
    "gw_chunk_out",
    "gw_whole_out",
    "head",
    "first",
)


def _report(label: str, samples: list[dict[str, int]]) -> dict[str, float]:
    medians = {}
    for name in ORDER:
        values = [(s[name] - s["start"]) / 1000 for s in samples if name in s]
        if len(values) >= len(samples) // 2:
            medians[name] = statistics.median(values)
    print(f"{label}: " + "  ".join(f"{k} {v:.0f}" for k, v in medians.items()) + " (µs)")
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tree", type=Path, help="paygate from this source tree")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for paygate")
    args = parser.parse_args()
    if args.upstream:
        import uvloop

        uvloop.run(_serve_upstream(args.upstream))
        return 0
    if args.probe_serve:
        _probe_serve()
        return 0
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="paygate-ttfc-") as name:
        tmp = Path(name)
        upstream_port, port = compare._port(), compare._port()
        upstream = compare._spawn(
            [compare.PY, "-m", "bench.ttfc", "--upstream", str(upstream_port)],
            cpu=compare.LOAD_CPU,
        )
        key_file = str(tmp / "key.pem")
        create = ["keys", "create", "--backend", "software", "--key-file", key_file]
        compare.subprocess.run([compare.PAYGATE, *create], check=True, capture_output=True)
        proxy_env = compare._paygate_env(tmp, port, upstream_port, **env)
        proxy_env[MARKS_ENV] = str(tmp / "marks.json")
        if args.tree is not None:
            proxy_env["PYTHONPATH"] = f"{args.tree}:{args.tree / 'devtools'}:{Path.cwd()}"
        proxy = compare._spawn(
            [compare.PY, __file__, "--probe-serve"],  # the file: another tree has no bench.ttfc
            cpu=compare.PROXY_CPU,
            env=proxy_env,
            log=tmp / "proxy.log",
        )
        try:
            compare._wait_port(upstream_port, timeout=30)
            compare._wait_port(port, timeout=60)
            asyncio.run(_streams(port, 20))  # warm-up
            ceiling = asyncio.run(_streams(upstream_port, args.streams))
            through = asyncio.run(_streams(port, args.streams))
        finally:
            proxy.send_signal(signal.SIGUSR2)
            proxy.wait(10)
            compare._stop([upstream])
        marks = [tuple(m) for m in json.loads((tmp / "marks.json").read_text())]
        _pair(through, marks)  # type: ignore[arg-type]
    print(f"load average {os.getloadavg()[0]:.1f}; medians of {args.streams} streams")
    base = _report("ceiling", ceiling)
    gate = _report("paygate", through)
    print(f"added TTFC: {gate['first'] - base['first']:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
