"""``paygate doctor`` against real parts: the FAKE model server, the SDK facilitator over HTTP and
anvil. It passes on a working stack and fails, with the right line and a non-zero exit, for
each broken part."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.fixtures.components import free_port
from tests.fixtures.gateway_support import ThreadedStack

PAYGATE = str(Path(sys.executable).with_name("paygate"))


def doctor(env: dict[str, str]) -> tuple[int, dict[str, dict]]:
    result = subprocess.run(
        [PAYGATE, "doctor", "--json"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")}, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    checks = json.loads(result.stdout)
    assert all(set(c) == {"check", "ok", "detail", "fix"} for c in checks)
    return result.returncode, {c["check"]: c for c in checks}


@pytest.fixture(scope="module")
def fake():
    with ThreadedStack() as stack:
        yield stack


@pytest.fixture
def working(tmp_path, fake, facilitator, anvil, seller) -> dict[str, str]:
    key = tmp_path / "key.pem"
    subprocess.run(
        [PAYGATE, "keys", "create", "--backend", "software", "--key-file", str(key)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return {
        "PAYGATE_KEY_FILE": str(key),
        "PAYGATE_UPSTREAM_URL": fake.fake_url,
        "PAYGATE_PAYMENT_MODE": "facilitator",
        "PAYGATE_FACILITATOR_URL": facilitator.url,
        "PAYGATE_PAY_TO": seller,
        "PAYGATE_NETWORK": "base-sepolia",
        "PAYGATE_CHAIN_RPC_URL": anvil.rpc_url,
        "PAYGATE_LEDGER_PATH": str(tmp_path / "ledger" / "payments.db"),
    }


def test_passes_on_a_working_stack(working) -> None:
    code, checks = doctor(working)
    assert code == 0, checks
    assert set(checks) == {
        "config",
        "key-files",
        "key",
        "upstream",
        "model",
        "facilitator",
        "chain",
        "clock",
        "ledger",
    }
    assert all(c["ok"] for c in checks.values())


def test_stopped_upstream(working) -> None:
    code, checks = doctor({**working, "PAYGATE_UPSTREAM_URL": f"http://127.0.0.1:{free_port()}"})
    assert code == 1
    assert checks["upstream"]["ok"] is False
    assert "unreachable" in checks["upstream"]["detail"]
    assert checks["upstream"]["fix"] == "start the model server or correct upstream_url"
    assert [name for name, c in checks.items() if not c["ok"]] == ["upstream", "model"]


def test_wrong_chain(working) -> None:
    # anvil is Base Sepolia (84532); Base mainnet is 8453. The facilitator fails too (it does
    # not settle Base mainnet), which is right: both lines say so.
    code, checks = doctor({**working, "PAYGATE_NETWORK": "base"})
    assert code == 1
    assert checks["chain"]["detail"] == "chain RPC is chain id 84532, network wants [8453]"
    assert "eip155:8453" in checks["facilitator"]["detail"]


def test_unsupported_network(working) -> None:
    env = {k: v for k, v in working.items() if k != "PAYGATE_CHAIN_RPC_URL"}
    code, checks = doctor({**env, "PAYGATE_NETWORK": "base-sepolia,avalanche-fuji"})
    assert code == 1
    assert checks["facilitator"]["ok"] is False
    assert checks["facilitator"]["detail"].startswith("/supported lacks scheme exact on avalanche")


def test_unreadable_key(working, tmp_path) -> None:
    Path(working["PAYGATE_KEY_FILE"]).write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
    code, checks = doctor(working)
    assert code == 1
    assert checks["key"]["ok"] is False
    assert checks["key"]["detail"].startswith("software key unusable")
    assert checks["key-files"]["ok"] is True


def test_bad_modes(working) -> None:
    key = Path(working["PAYGATE_KEY_FILE"])
    key.chmod(0o644)
    code, checks = doctor(working)
    assert code == 1
    assert checks["key-files"] == {
        "check": "key-files",
        "ok": False,
        "detail": f"{key} is mode 0644",
        "fix": f"chmod 0600 {key}",
    }


def test_text_output_has_one_line_per_check_and_a_fix(working) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")}, **working}
    env["PAYGATE_UPSTREAM_URL"] = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [PAYGATE, "doctor"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL  upstream") for line in lines)
    assert any("fix: start the model server" in line for line in lines)
    assert sum(line.startswith("PASS") for line in lines) == 7


def test_container_mode_checks_the_engine_and_its_images(dockerd, test_images, tmp_path) -> None:
    key = tmp_path / "key.pem"
    subprocess.run(
        [PAYGATE, "keys", "create", "--backend", "software", "--key-file", str(key)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    env = {
        "PAYGATE_KEY_FILE": str(key),
        "PAYGATE_UPSTREAM_MODE": "container",
        "PAYGATE_DOCKER_HOST": dockerd.host,
        "PAYGATE_UPSTREAM_IMAGE": test_images.fake_ollama,
        "PAYGATE_UPSTREAM_RELAY_IMAGE": test_images.fake_ollama,
    }
    code, checks = doctor(env)
    assert code == 0, checks
    assert checks["docker"]["ok"] is True
    code, checks = doctor({**env, "PAYGATE_UPSTREAM_IMAGE": "paygate-test/not-built:1"})
    assert code == 1
    assert checks["docker"]["detail"] == "image paygate-test/not-built:1 is not on the engine"
    code, checks = doctor({**env, "PAYGATE_DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert code == 1
    assert checks["docker"]["fix"] == "start dockerd or correct docker_host"


def test_model_present_with_its_digest(working, tmp_path) -> None:
    weights = tmp_path / "weights.gguf"
    weights.write_bytes(b"GGUF not really weights")
    digest = "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    env = {
        **working,
        "PAYGATE_UPSTREAM_KIND": "openai",  # the FAKE's /v1/models; digests of one GGUF file
        "PAYGATE_UPSTREAM_MODEL_PATH": str(weights),
        "PAYGATE_UPSTREAM_MODEL_NAME": "fake-llama:latest",
        "PAYGATE_EXPECTED_MODEL_DIGESTS": json.dumps({"fake-llama:latest": digest}),
    }
    code, checks = doctor(env)
    assert code == 0, checks
    assert (
        checks["model"]["detail"]
        == f"listed: fake-llama:latest; weights fake-llama:latest {digest}"
    )

    wrong = "sha256:" + "0" * 64
    code, checks = doctor(
        {**env, "PAYGATE_EXPECTED_MODEL_DIGESTS": json.dumps({"fake-llama:latest": wrong})}
    )
    assert code == 1
    assert [name for name, c in checks.items() if not c["ok"]] == ["model"]
    assert checks["model"]["detail"] == (
        "the served weights differ from expected_model_digests: "
        f"fake-llama:latest: expected {wrong}, served {digest}"
    )
    assert checks["model"]["fix"].startswith("serve the expected weights")

    code, checks = doctor(
        {
            **env,
            "PAYGATE_UPSTREAM_MODEL_NAME": "not-served:1",
            "PAYGATE_EXPECTED_MODEL_DIGESTS": "{}",
        }
    )
    assert code == 1
    assert checks["model"]["detail"].startswith("the upstream does not list not-served:1")


class _LateClockRpc(BaseHTTPRequestHandler):
    """A JSON-RPC endpoint on Base Sepolia whose clock is an hour behind (its Date header)."""

    def date_time_string(self, timestamp: float | None = None) -> str:
        return formatdate(time.time() - 3600, usegmt=True)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": hex(84532)}).encode()
        self.send_response(200)  # adds the Date header from date_time_string
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def late_rpc() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LateClockRpc)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_clock_skew(working, late_rpc) -> None:
    code, checks = doctor(working)
    assert checks["clock"]["ok"] is True
    assert checks["clock"]["detail"].startswith("within 30 s of the chain RPC")

    code, checks = doctor({**working, "PAYGATE_CHAIN_RPC_URL": late_rpc})
    assert code == 1
    assert [name for name, c in checks.items() if not c["ok"]] == ["clock"]
    detail = checks["clock"]["detail"]
    assert detail.startswith("local clock ")
    assert detail.endswith(" s ahead of the chain RPC (limit 30 s)")
    assert 3590 <= int(detail.split()[2]) <= 3610
    assert checks["clock"]["fix"] == "synchronise the clock: timedatectl set-ntp true"

    # Without a chain RPC the facilitator's answer is the time source.
    env = {k: v for k, v in working.items() if k != "PAYGATE_CHAIN_RPC_URL"}
    code, checks = doctor(env)
    assert code == 0, checks
    assert checks["clock"]["detail"].startswith("within 30 s of the facilitator")


def test_console_settings(working, tmp_path) -> None:
    port = free_port()
    secret = tmp_path / "console-secret"
    secret.write_text("x" * 40)
    console = {
        **working,
        "PAYGATE_CONSOLE_LISTEN": f"127.0.0.1:{port}",
        "PAYGATE_CONSOLE_SECRET_FILE": str(secret),
        "PAYGATE_CONSOLE_WALLETS": "0x" + "ab" * 20,
    }
    code, checks = doctor(console)
    assert code == 0, checks
    assert checks["console"]["ok"]
    assert "1 wallet(s)" in checks["console"]["detail"]
    # No secret: sessions would not survive a restart nor cross replicas.
    unsigned = {k: v for k, v in console.items() if k != "PAYGATE_CONSOLE_SECRET_FILE"}
    code, checks = doctor(unsigned)
    assert code == 1
    assert "console_secret" in checks["console"]["detail"]
    # Beyond loopback without TLS.
    code, checks = doctor({**console, "PAYGATE_CONSOLE_LISTEN": f"0.0.0.0:{port}"})
    assert code == 1
    assert "beyond loopback" in checks["console"]["detail"]
    # The gateway's own port: never.
    code, checks = doctor(
        {**console, "PAYGATE_CONSOLE_LISTEN": "127.0.0.1:8402", "PAYGATE_LISTEN": "127.0.0.1:8402"}
    )
    assert code == 1
    assert "public port" in checks["console"]["detail"]
    # A port already taken.
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        code, checks = doctor({**console, "PAYGATE_CONSOLE_LISTEN": f"127.0.0.1:{taken}"})
    assert code == 1
    assert "cannot listen" in checks["console"]["detail"]
    # Alerts without their signing secret.
    code, checks = doctor({**working, "PAYGATE_ALERT_WEBHOOK": "http://127.0.0.1:9/hook"})
    assert code == 1
    assert not checks["alerts"]["ok"]
