"""Container mode under the notify protocol: READY=1 comes only once the isolated model server
(the FAKE server's image on the tests' private dockerd) answers, so /health/ready is 200 at the
moment systemd is told the service is up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import httpx

from tests.fixtures.components import free_port
from tests.fixtures.sdnotify_support import Listener
from tests.fixtures.serve_support import PAYGATE, make_key
from tests.fixtures.upstream_support import container_settings

PASSED = (
    "upstream_mode", "docker_host", "upstream_image", "upstream_relay_image", "upstream_name",
    "upstream_volume", "upstream_socket_dir", "upstream_ready_timeout", "upstream_health_interval",
)  # fmt: skip


def test_ready_only_after_the_model_server_answers(dockerd, test_images, tmp_path) -> None:
    settings = container_settings(dockerd, test_images)
    key = make_key(tmp_path / "key.pem")
    listener = Listener(str(tmp_path / "notify.sock"))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        **{f"PAYGATE_{name.upper()}": str(getattr(settings, name)) for name in PASSED},
        "PAYGATE_KEY_FILE": str(key),
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
    }
    proc = subprocess.Popen(
        [PAYGATE, "serve", "--listen", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        listener.until("READY=1", timeout=60)
        ready = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5)
        assert ready.status_code == 200, ready.text
        assert ready.json()["upstream"]["state"] == "ready"
        statuses = listener.fields("STATUS=")
        assert statuses[0] == "STATUS=starting (waiting for the model server)"
        proc.send_signal(signal.SIGTERM)
        listener.until("STOPPING=1")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        listener.sock.close()
        shutil.rmtree(settings.upstream_socket_dir, ignore_errors=True)
