"""Through the gateway in attach mode, against llama.cpp's real llama-server with real weights.

SmolLM2-135M-Instruct (scripts/setup_llama.sh) at temperature 0 with a fixed seed: every reply
through the gateway, whatever the envelope (sealed v2 or plain), payment (free, or paid on
anvil through the SDK facilitator) and delivery (whole or streamed), must equal what the server
answers directly, and the usage it states must reach the gateway's counters. The OpenAI SDK is
the caller throughout.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from paygate_dev.llama import LlamaBuild, LlamaServer

from paygate.client import PaygateTransport, SpendPolicy
from paygate.upstream.discovery import discover
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.components import free_port
from tests.fixtures.gateway_support import Stack, ThreadedStack
from tests.fixtures.payment_support import PRICE_ATOMIC, paid_settings

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France? One word."}]
PROMPT = "The capital of France is"
SAMPLING: dict[str, Any] = {"temperature": 0, "seed": 42, "max_tokens": 8}
SPEND = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])
PAYGATE = str(Path(sys.executable).with_name("paygate"))


def _sdk(base: str, transport: httpx.BaseTransport | None = None) -> openai.OpenAI:
    # No SDK retries: a retried paid call would sign again, and the tests count payments.
    return openai.OpenAI(
        base_url=base + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=transport or httpx.HTTPTransport(), timeout=60),
    )


def _ask(client: openai.OpenAI, api: str, stream: bool) -> tuple[str, Any]:
    """The reply text and the usage the server stated, through ``client``."""
    options: dict[str, Any] = dict(SAMPLING)
    if stream:
        options.update(stream=True, stream_options={"include_usage": True})
    if api == "chat":
        reply = client.chat.completions.create(model=MODEL, messages=QUESTION, **options)  # type: ignore[arg-type,call-overload]
    else:
        reply = client.completions.create(model=MODEL, prompt=PROMPT, **options)  # type: ignore[call-overload]
    if not stream:
        choice = reply.choices[0]
        return (choice.message.content if api == "chat" else choice.text), reply.usage
    text, usage = [], None
    for chunk in reply:
        for choice in chunk.choices:
            piece = choice.delta.content if api == "chat" else choice.text
            text.append(piece or "")
        if chunk.usage is not None:
            usage = chunk.usage
    return "".join(text), usage


@pytest.fixture(scope="module")
def direct(smollm2_server: LlamaServer) -> dict[tuple[str, bool], tuple[str, Any]]:
    """What the server answers without the gateway, per (api, stream)."""
    client = _sdk(smollm2_server.url)
    return {
        (api, s): _ask(client, api, s) for api in ("chat", "completions") for s in (False, True)
    }


def _settings(server: LlamaServer, llama: LlamaBuild, **overrides: Any) -> dict[str, Any]:
    return {
        "upstream_url": server.url,
        "upstream_kind": "llama-server",
        "upstream_model_path": llama.smollm2,
        "upstream_model_name": MODEL,
        **overrides,
    }


def _metric(stack: Stack, line_start: str, expect: int | None = None) -> int:
    """A counter's value; with ``expect``, polled for up to 5 s until it has that value (the
    gateway counts a stream's usage when the model server's body ends, which can be a moment
    after the caller has read its last byte)."""
    deadline = time.monotonic() + 5
    while True:
        text = httpx.get(stack.url + "/metrics", timeout=10).text
        lines = text.splitlines()
        values = [line.rsplit(" ", 1)[1] for line in lines if line.startswith(line_start)]
        value = int(float(values[0])) if values else 0
        if expect is None or value == expect or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("api", ["chat", "completions"])
@pytest.mark.parametrize("envelope", ["v2", "plain"])
@pytest.mark.parametrize("paid", [False, True], ids=["free", "paid"])
def test_replies_equal_the_servers_own(
    request: pytest.FixtureRequest,
    smollm2_server: LlamaServer,
    llama: LlamaBuild,
    direct: dict[tuple[str, bool], tuple[str, Any]],
    tmp_path: Path,
    paid: bool,
    envelope: Any,
    api: str,
    stream: bool,
) -> None:
    settings = _settings(smollm2_server, llama)
    wallet = None
    if paid:
        facilitator = request.getfixturevalue("facilitator")
        seller = request.getfixturevalue("seller")
        wallet = request.getfixturevalue("payer")
        usdc = request.getfixturevalue("usdc")
        settings = paid_settings(
            seller=seller, facilitator_url=facilitator.url, ledger=tmp_path / "l.db", **settings
        )
    with ThreadedStack(**settings) as stack:
        transport = PaygateTransport(envelope=envelope, wallet=wallet, spend=SPEND)
        text, usage = _ask(_sdk(stack.url, transport), api, stream)
        expected_text, expected_usage = direct[(api, stream)]
        assert text == expected_text
        assert text.strip()  # real model output, not an empty echo
        assert usage is not None
        assert usage.completion_tokens == expected_usage.completion_tokens
        assert usage.prompt_tokens == expected_usage.prompt_tokens
        # The gateway read the same usage from the server's reply.
        tokens = 'paygate_tokens_total{kind="completion"}'
        completion = expected_usage.completion_tokens
        assert _metric(stack, tokens, completion) == completion
        prompt_tokens = 'paygate_tokens_total{kind="prompt"}'
        assert (
            _metric(stack, prompt_tokens, expected_usage.prompt_tokens)
            == expected_usage.prompt_tokens
        )
        assert _metric(stack, "paygate_usage_replies_total", 1) == 1
        if paid:
            record = transport.last_payment
            assert record is not None
            assert record.settled
            assert usdc.balance_of(seller) == PRICE_ATOMIC
            assert usdc.balance_of(wallet.address) == PAYER_FUNDS - PRICE_ATOMIC


def test_ollama_routes_are_404_with_the_llama_server_profile(
    smollm2_server: LlamaServer, llama: LlamaBuild
) -> None:
    # llama-server itself answers /api/chat (500 on this body): only the profile keeps it out.
    direct = httpx.post(smollm2_server.url + "/api/chat", json={}, timeout=10)
    assert direct.status_code != 404
    with ThreadedStack(**_settings(smollm2_server, llama)) as stack:
        for method, path in (
            ("POST", "/api/chat"),
            ("POST", "/api/generate"),
            ("GET", "/api/tags"),
        ):
            resp = httpx.request(method, stack.url + path, json={}, timeout=10)
            assert resp.status_code == 404, path
            assert resp.headers["X-Paygate-Error"] == "route_not_found"
        models = httpx.get(stack.url + "/v1/models", timeout=10)
        assert models.status_code == 200
        assert [card["id"] for card in models.json()["data"]] == [MODEL]


def test_ready_shows_the_weights_digest(smollm2_server: LlamaServer, llama: LlamaBuild) -> None:
    digest = "sha256:" + hashlib.sha256(llama.smollm2.read_bytes()).hexdigest()
    overrides = {"upstream_monitor": True, "expected_model_digests": {MODEL: digest}}
    with ThreadedStack(**_settings(smollm2_server, llama, **overrides)) as stack:
        ready = httpx.get(stack.url + "/health/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["models"] == [{"name": MODEL, "digest": digest}]
        assert body["upstream"]["kind"] == "llama-server"
        assert body["upstream"]["state"] == "ready"


async def test_discover_labels_it_llama_server(smollm2_server: LlamaServer) -> None:
    found = await discover([smollm2_server.port], timeout=5.0)
    assert len(found) == 1
    assert found[0].kind == "llama-server"
    assert found[0].models == (MODEL,)
    assert found[0].version == "b1-4227c9b"  # /props build_info of the vendored llama.cpp


def _serve_env(tmp_path: Path, server: LlamaServer, llama: LlamaBuild) -> dict[str, str]:
    key_file = tmp_path / "key.pem"
    subprocess.run(
        [PAYGATE, "keys", "create", "--backend", "software", "--key-file", str(key_file)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        "PAYGATE_KEY_BACKEND": "software",
        "PAYGATE_KEY_FILE": str(key_file),
        "PAYGATE_UPSTREAM_KIND": "llama-server",
        "PAYGATE_UPSTREAM_URL": server.url,
        "PAYGATE_UPSTREAM_MODEL_PATH": str(llama.smollm2),
        "PAYGATE_UPSTREAM_MODEL_NAME": MODEL,
        "PAYGATE_LISTEN": f"127.0.0.1:{free_port()}",
    }


def test_serve_refuses_weights_that_differ_from_the_expected_digest(
    tmp_path: Path, smollm2_server: LlamaServer, llama: LlamaBuild
) -> None:
    env = _serve_env(tmp_path, smollm2_server, llama)
    env["PAYGATE_EXPECTED_MODEL_DIGESTS"] = json.dumps({MODEL: "sha256:" + "0" * 64})
    result = subprocess.run(
        [PAYGATE, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "model_digest_mismatch" in result.stderr
    assert f"{MODEL}: expected sha256:{'0' * 64}, served sha256:" in result.stderr


def test_upstream_status_shows_the_digest(
    tmp_path: Path, smollm2_server: LlamaServer, llama: LlamaBuild
) -> None:
    env = _serve_env(tmp_path, smollm2_server, llama)
    result = subprocess.run(
        [PAYGATE, "upstream", "status", "--json"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    digest = "sha256:" + hashlib.sha256(llama.smollm2.read_bytes()).hexdigest()
    assert status["models"] == {MODEL: digest}
    assert status["kind"] == "llama-server"
    assert status["health"] == "ready"


@pytest.fixture
def late_server(llama: LlamaBuild, tmp_path: Path) -> Iterator[LlamaServer]:
    """A tiny-model server, not started yet (the test starts it)."""
    server = LlamaServer(llama.server, llama.tiny, "tiny", tmp_path / "late.log")
    yield server
    server.stop()


def test_a_server_still_starting_is_retried_within_the_first_byte_deadline(
    late_server: LlamaServer, llama: LlamaBuild
) -> None:
    overrides = {"upstream_url": late_server.url, "upstream_kind": "llama-server",
                 "upstream_max_retries": 10, "first_byte_timeout": 20.0}  # fmt: skip
    with ThreadedStack(**overrides) as stack:
        starter = threading.Timer(0.3, late_server.start)  # refused until then
        starter.start()
        try:
            client = _sdk(stack.url, PaygateTransport(envelope="plain"))
            reply = client.chat.completions.create(model="tiny", messages=QUESTION)  # type: ignore[arg-type]
        finally:
            starter.join(30)
        assert reply.choices[0].message.content == " hello from the tiny paygate test model."
        assert _metric(stack, 'paygate_upstream_retries_total{reason="connect"}') >= 1


def test_a_deployment_records_the_digest_and_serve_checks_it(
    tmp_path: Path, smollm2_server: LlamaServer, llama: LlamaBuild
) -> None:
    env = _serve_env(tmp_path, smollm2_server, llama)
    env["PAYGATE_DEPLOYMENTS_DIR"] = str(tmp_path / "deployments")

    def paygate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PAYGATE, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    created = paygate(
        "deploy", "create", "real", "--kind", "llama-server", "--upstream-url",
        smollm2_server.url, "--model-path", str(llama.smollm2), "--model-name", MODEL,
        "--no-payment-gate",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    digest = "sha256:" + hashlib.sha256(llama.smollm2.read_bytes()).hexdigest()
    assert json.loads(created.stdout)["model_hash"] == digest
    # Other weights than the deployment recorded: serve refuses to start.
    assert paygate("deploy", "update", "real", "--model-hash", "ab" * 32).returncode == 0
    refused = paygate("serve", "real")
    assert refused.returncode == 2
    assert "model_digest_mismatch" in refused.stderr
    assert f"expected sha256:{'ab' * 32}, served {digest}" in refused.stderr
