"""`paygate serve` as a real process: SIGTERM lets an in-flight stream finish, then exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import aiohttp

from tests.fixtures.components import free_port
from tests.fixtures.gateway_support import running_stack
from tests.fixtures.serve_support import PAYGATE, make_key, wait_live


async def test_sigterm_lets_the_stream_finish_and_exits_zero(tmp_path: Path) -> None:
    key_file = make_key(tmp_path / "key.pem")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        "PAYGATE_KEY_BACKEND": "software",
        "PAYGATE_KEY_FILE": str(key_file),
        "PAYGATE_SHUTDOWN_GRACE_SECONDS": "10",
    }
    # The fake runs in this process; the gateway in its own.
    async with running_stack() as s:
        proc = subprocess.Popen(
            [PAYGATE, "serve", "--listen", f"127.0.0.1:{port}", "--upstream-url", s.fake_url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_live(url, proc)
            body = {"model": "m", "prompt": "p", "fake": {"chunks": 20, "pace": 0.1}}
            resp = await s.client.post(url + "/api/generate", json=body)
            first = await asyncio.wait_for(resp.content.readline(), 5)
            assert json.loads(first)["done"] is False
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)  # by the child's own PID
            rest = await asyncio.wait_for(resp.read(), 10)
            lines = [json.loads(line) for line in rest.splitlines()]
            assert lines[-1]["done"] is True
            assert len(lines) == 20  # 19 more words and the final line: nothing was cut
            code = await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
            assert code == 0
            assert time.monotonic() - started < 10
            # It stopped accepting: a new connection is refused.
            try:
                await s.client.get(url + "/health/live")
                raise AssertionError("still accepting after SIGTERM")
            except aiohttp.ClientConnectionError:
                pass
            _, err = proc.communicate(timeout=5)
            assert b"Traceback" not in err
            assert b'"p"' not in err  # no prompt in the logs
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
