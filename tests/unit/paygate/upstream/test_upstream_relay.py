"""The relay script on real sockets: a unix socket in, loopback TCP out, bytes both ways."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp import web
from paygate_dev.fake_model import FakeModelServer

from paygate.upstream import relay


async def test_requests_and_streams_cross_the_relay(tmp_path: Path) -> None:
    fake = FakeModelServer()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    socket_path = tmp_path / "upstream.sock"
    task = asyncio.create_task(relay.serve(str(socket_path), port))
    try:
        async with asyncio.timeout(5):
            while not socket_path.exists():
                await asyncio.sleep(0.01)
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get("http://localhost/api/tags") as resp:
                assert resp.status == 200
                assert len((await resp.json())["models"]) == 2
            body = {"model": "m", "prompt": "x", "fake": {"chunks": 50, "pad": 4096}}
            async with session.post("http://localhost/api/generate", json=body) as resp:
                lines = [line async for line in resp.content]
            assert len(lines) == 51  # every chunk crossed, in order, then the final line
    finally:
        task.cancel()
        await runner.cleanup()


async def test_a_dead_upstream_closes_the_callers_connection(tmp_path: Path) -> None:
    socket_path = tmp_path / "upstream.sock"
    closed_port = 9  # discard: nothing listens on loopback here
    task = asyncio.create_task(relay.serve(str(socket_path), closed_port))
    try:
        async with asyncio.timeout(5):
            while not socket_path.exists():
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await reader.read() == b""
            writer.close()
    finally:
        task.cancel()


def test_the_relay_runs_standalone_on_the_standard_library() -> None:
    # The container runs the file itself with -I (no site-packages, no paygate).
    result = subprocess.run(
        [sys.executable, "-I", relay.__file__], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 2
    assert "usage: relay.py SOCKET_PATH PORT" in result.stderr
