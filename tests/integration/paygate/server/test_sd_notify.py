"""`paygate serve` speaks systemd's notify protocol to a real AF_UNIX datagram listener:
STATUS while starting, READY=1 once listening (attach mode does not wait for a model server
that is down), WATCHDOG=1 from the event loop (none while the process is stopped), STOPPING=1
on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from paygate.server.sdnotify import Notifier
from tests.fixtures.components import free_port
from tests.fixtures.sdnotify_support import Listener
from tests.fixtures.serve_support import PAYGATE

WATCHDOG_USEC = 200_000  # pings every 0.1 s


@pytest.fixture
def gateway(
    key_file: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Listener, int]]:
    listener = Listener(str(tmp_path / "notify.sock"))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        "PAYGATE_KEY_FILE": str(key_file),
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }
    # The attached model server is down (nothing listens on that port): serve starts anyway.
    proc = subprocess.Popen(
        [PAYGATE, "serve", "--listen", f"127.0.0.1:{port}",
         "--upstream-url", f"http://127.0.0.1:{free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc, listener, port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(5)
        listener.sock.close()


def test_ready_watchdog_and_stopping(gateway) -> None:
    proc, listener, port = gateway
    ready_at = listener.until("READY=1")
    # READY=1 means listening: the port answers right away.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=2) as response:
        assert response.status == 200
    statuses = listener.fields("STATUS=")
    assert statuses[0] == "STATUS=starting"
    assert any(s.startswith("STATUS=serving on 127.0.0.1:") for s in statuses)
    assert f"MAINPID={proc.pid}" in listener.fields("MAINPID=")
    listener.pump(1.0)
    assert len(listener.fields("WATCHDOG=1", since=ready_at)) >= 5

    # A stopped process sends nothing: that silence is what makes systemd restart it.
    os.kill(proc.pid, signal.SIGSTOP)
    listener.pump(0.3)  # a ping may have been in flight
    stopped_at = time.monotonic()
    listener.pump(1.0)
    assert listener.fields("WATCHDOG=1", since=stopped_at) == []
    os.kill(proc.pid, signal.SIGCONT)
    resumed = time.monotonic()
    listener.pump(0.6)
    assert listener.fields("WATCHDOG=1", since=resumed)

    proc.send_signal(signal.SIGTERM)
    listener.until("STOPPING=1")
    assert proc.wait(20) == 0
    assert b"Traceback" not in proc.stderr.read()


def test_environment_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    outside = Notifier.from_environment()
    assert outside.enabled is False
    assert outside.ready("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # the watchdog is someone else's
    assert Notifier.from_environment().watchdog_usec is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.from_environment().watchdog_usec == WATCHDOG_USEC


def test_abstract_socket_address() -> None:
    name = f"@paygate-test-{os.getpid()}"
    listener = Listener(b"\0" + name[1:].encode())
    try:
        assert Notifier(name).status("hello\nworld  again") is True
        listener.pump(0.2)
        assert listener.fields("STATUS=") == ["STATUS=hello world again"]
    finally:
        listener.sock.close()
