"""`paygate serve --workers 2` with prometheus_client's multiprocess mode and systemd notify:
the supervisor says READY=1 once the workers are forked and pings the watchdog, and /metrics of
whichever worker answers holds the sum over both workers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.fixtures.components import free_port
from tests.fixtures.gateway_support import ThreadedStack, metric_value
from tests.fixtures.sdnotify_support import Listener
from tests.fixtures.serve_support import PAYGATE, make_key

REQUESTS = 12


def test_two_workers_sum_their_metrics_and_notify_systemd(tmp_path: Path) -> None:
    key = make_key(tmp_path / "key.pem")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")  # the parent must clear it
    listener = Listener(str(tmp_path / "notify.sock"))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        "PAYGATE_KEY_FILE": str(key),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "400000",
    }
    with ThreadedStack() as fake:
        proc = subprocess.Popen(
            [PAYGATE, "serve", "--workers", "2", "--listen", f"127.0.0.1:{port}",
             "--upstream-url", fake.fake_url],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            listener.until("READY=1")
            assert any("2 workers" in s for s in listener.fields("STATUS="))
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while True:  # the workers may still be opening their keys
                try:
                    if httpx.get(url + "/health/live", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "workers did not answer"
                time.sleep(0.1)
            # New connections each time, so both workers take some.
            for _ in range(REQUESTS):
                assert httpx.get(url + "/health", timeout=5).status_code == 200
            scrapes = [httpx.get(url + "/metrics", timeout=5).text for _ in range(4)]
            listener.pump(1.0)
            assert len(listener.fields("WATCHDOG=1")) >= 2
            proc.send_signal(signal.SIGTERM)
            listener.until("STOPPING=1")
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            listener.sock.close()
    # Every scrape, whichever worker answered it, counts all the requests (the sum).
    assert [
        metric_value(text, "paygate_requests_total", route="GET /health") for text in scrapes
    ] == [float(REQUESTS)] * 4
    assert not (metrics_dir / "counter_999999.db").exists()
    pids = {name.name.split("_")[-1].split(".")[0] for name in metrics_dir.glob("counter_*.db")}
    assert len(pids) >= 2  # two workers wrote their own files
