"""Structured logs: a DEBUG-level JSON log of a full paid, sealed run holds one event per request
and none of the prompt, the replies, the signature, the payment header or any secret — nor the
API key in the chain RPC URL. ``X-Request-Id`` comes from a trusted proxy or is made here."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess

import pytest

from paygate.server.forwarded import parse_networks
from paygate.server.logs import Redactor, request_id_for
from tests.fixtures.components import free_port
from tests.fixtures.gateway_support import running_stack
from tests.fixtures.ops_support import PROMPT, paid_sealed_run
from tests.fixtures.payment_support import PRICE_ATOMIC, records
from tests.fixtures.serve_support import PAYGATE, make_key, wait_live

RPC_API_KEY = "rpcKey0c4f9e2d7b1a"
B64_PAYMENT_PREFIX = base64.b64encode(b'{"x402Version":').decode()[:16]


async def test_debug_json_log_of_a_paid_sealed_run_leaks_nothing(
    anvil, usdc, payer, seller, gas_key, tmp_path
):
    key_file = make_key(tmp_path / "key.pem")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "gas_key").write_text(gas_key.key + "\n")
    ledger = tmp_path / "payments.db"
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        "PAYGATE_KEY_BACKEND": "software",
        "PAYGATE_KEY_FILE": str(key_file),
        "PAYGATE_PAYMENT_MODE": "chain",
        "PAYGATE_PAY_TO": seller,
        "PAYGATE_NETWORK": "base-sepolia",
        "PAYGATE_CHAIN_RPC_URL": f"{anvil.rpc_url}/?apikey={RPC_API_KEY}",
        "PAYGATE_LEDGER_PATH": str(ledger),
        "PAYGATE_LOG_LEVEL": "debug",
        "PAYGATE_LOG_FORMAT": "json",
        "CREDENTIALS_DIRECTORY": str(credentials),
    }
    async with running_stack() as fake_stack:
        proc = subprocess.Popen(
            [PAYGATE, "serve", "--listen", f"127.0.0.1:{port}", "--upstream-url",
             fake_stack.fake_url],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_live(url, proc)
            replies = await paid_sealed_run(url, payer)
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 20)
            _, err = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert proc.returncode == 0, err[-2000:]
    (tmp_path / "gateway.log").write_bytes(err)  # kept for a human looking at a failure
    assert usdc.balance_of(seller) == 2 * PRICE_ATOMIC
    log = err.decode()
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert lines, "no log at all"
    events = [line for line in lines if line["logger"] == "paygate.request"]
    paid = [e for e in events if e["route"] == "POST /v1/chat/completions" and e["status"] == 200]
    assert len(paid) == 2
    for event in paid:
        assert event["payment"] == "paid"
        assert len(event["request_id"]) == 32
        assert event["duration_ms"] > 0
        assert "upstream_ms" in event
    assert any(e["payment"] == "payment_required" for e in events)
    # Log lines made while settling carry the request id of the request that paid.
    settled = [x for x in lines if x["msg"].endswith(" settled") and x["level"] == "INFO"]
    assert len(settled) == 2
    assert {line.get("request_id") for line in settled} <= {e["request_id"] for e in paid}
    # Nothing that must stay secret or private is anywhere in it.
    (first, second) = await records(ledger)
    forbidden = {
        "prompt": PROMPT,
        "reply": replies[0].strip()[:24],
        "stream reply": replies[1][40:70],
        "rpc api key": RPC_API_KEY,
        "gas key": gas_key.key.removeprefix("0x"),
        "payment header": B64_PAYMENT_PREFIX,
        "software key": key_file.read_text().splitlines()[1],
    }
    for record in (first, second):
        signature = json.loads(record.payload)["payload"]["signature"]
        forbidden[f"signature {record.id}"] = signature.removeprefix("0x")[:40]
    for what, text in forbidden.items():
        assert text, what
        assert text not in log, f"{what} in the log"


async def test_request_id_from_a_trusted_proxy_only() -> None:
    async with running_stack(trusted_proxies=["127.0.0.1"]) as trusted:
        async with trusted.client.get(
            trusted.url + "/health", headers={"X-Request-Id": "lb-7f3a.42"}
        ) as response:
            assert response.headers["X-Request-Id"] == "lb-7f3a.42"
        async with trusted.client.post(
            trusted.url + "/api/generate",
            json={"model": "m", "prompt": "p", "fake": {"chunks": 3}},
            headers={"X-Request-Id": "bad id with spaces"},
        ) as response:
            assert response.status == 200
            made = response.headers["X-Request-Id"]
            assert len(made) == 32
            assert made != "bad id with spaces"
    async with (
        running_stack() as untrusted,
        untrusted.client.get(
            untrusted.url + "/nope", headers={"X-Request-Id": "lb-7f3a.42"}
        ) as response,
    ):
        assert response.status == 404
        assert len(response.headers["X-Request-Id"]) == 32


def test_request_id_rules() -> None:
    proxies = parse_networks(["10.0.0.0/8"])
    assert request_id_for("10.1.2.3", "abc-123", proxies) == "abc-123"
    assert request_id_for("192.0.2.1", "abc-123", proxies) != "abc-123"
    assert request_id_for("10.1.2.3", "x" * 129, proxies) != "x" * 129
    assert request_id_for("10.1.2.3", "a\nb", proxies) != "a\nb"


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("rpc https://u:p4ssw0rd@rpc.example/v2", "p4ssw0rd"),
        ("GET http://127.0.0.1:8545/?apikey=abcdef123456 200", "abcdef123456"),
        ('{"url":"https://rpc.example/v2/K3y-0123456789"}', "K3y-0123456789"),
    ],
)
def test_redactor_hides_url_credentials_and_known_secrets(text: str, hidden: str) -> None:
    out = Redactor(["K3y-0123456789"])(text)
    assert hidden not in out
    assert "***" in out
