"""One output limit per engine: for every limit key, 0, negatives, absence, conflicting pairs and
``n``/``best_of``, the body the model server gets names one limit — the one the gateway prices —
in every key the engine reads, and the engine serves no more than that.

The Ollama and vLLM cases run against the FAKE model server told to mirror that engine's
documented semantics (``FakeModelServer(engine=...)``; each engine profile cites the source);
llama-server's run against the real llama-server with SmolLM2's real weights as well. The
gateway sells at a price of 0 (x402 on, every request free): the shaping is the same function
for free, exact, upto and batch items. With payments off bodies pass as sent (options checked).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from paygate_dev.fake_model import FakeModelServer

from tests.fixtures.gateway_support import Stack, running_stack

CHAT = "/v1/chat/completions"
CAP = 16
LONG = {"chunks": 200}  # a FAKE reply that runs past the cap unless something stops it


def chat(**fields: Any) -> dict[str, Any]:
    return {
        "model": "fake-llama",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "fake": LONG,
        **fields,
    }


@contextlib.asynccontextmanager
async def selling_free(**settings: Any) -> AsyncIterator[Stack]:
    """A gateway taking x402 payments at a price of 0: every request admitted free."""
    with tempfile.TemporaryDirectory() as work:
        async with running_stack(
            payment_mode="facilitator",
            pay_to="0x" + "11" * 20,
            network="base-sepolia",
            facilitator_url="http://127.0.0.1:9",  # never asked: nothing is paid
            price="0",
            ledger_path=Path(work) / "payments.db",
            max_tokens_cap=CAP,
            **settings,
        ) as stack:
            yield stack


async def forward(engine: str, path: str, body: dict[str, Any], **settings: Any):
    """POST ``body`` through a gateway in front of the FAKE speaking ``engine``; the status,
    the reply, and the body the FAKE received (None when nothing was forwarded)."""
    fake = FakeModelServer(engine=engine)
    async with (
        selling_free(fake=fake, upstream_kind=engine, **settings) as stack,
        stack.client.post(stack.url + path, json=body) as response,
    ):
        status, headers, raw = response.status, response.headers, await response.read()
    sent = [r for r in fake.received if r.path == path]
    forwarded = json.loads(sent[-1].body) if sent else None
    return status, headers, raw, forwarded


def served(raw: bytes) -> int:
    reply = json.loads(raw)
    if "usage" in reply:
        return int(reply["usage"]["completion_tokens"])
    return int(reply["eval_count"])


# (engine, body fields, the limit priced and forwarded, sequences generated)
CASES = [
    # Ollama (openai/openai.go: max_tokens → num_predict; runners: ≤ 0 is no limit).
    ("ollama", {}, CAP, 1),
    ("ollama", {"max_tokens": 5}, 5, 1),
    ("ollama", {"max_tokens": 0}, CAP, 1),
    ("ollama", {"max_tokens": -1}, CAP, 1),
    ("ollama", {"max_tokens": 1000}, CAP, 1),
    ("ollama", {"max_tokens": 1, "max_completion_tokens": 64}, 1, 1),
    ("ollama", {"max_completion_tokens": 4}, CAP, 1),  # not read by Ollama: no limit
    ("ollama", {"n": 3, "max_tokens": 4}, 4, 1),  # ignored by Ollama, and dropped
    # vLLM (get_max_tokens: max_completion_tokens or max_tokens; n, best_of sequences).
    ("vllm", {}, CAP, 1),
    ("vllm", {"max_tokens": 1, "max_completion_tokens": 9}, 9, 1),
    ("vllm", {"max_completion_tokens": 0, "max_tokens": 3}, 3, 1),
    ("vllm", {"n": 3, "max_tokens": 4}, 4, 3),
    ("vllm", {"n": 2, "best_of": 4, "max_tokens": 2}, 2, 4),
    # llama-server (n_predict before max_tokens; -1 none; ≤ 0 one token).
    ("llama-server", {"n_predict": 7, "max_tokens": 1}, 7, 1),
    ("llama-server", {"max_completion_tokens": 4}, CAP, 1),  # not read: no limit
    ("llama-server", {"max_tokens": 0}, 1, 1),
    ("llama-server", {"n_predict": -2}, 1, 1),
    ("llama-server", {"max_tokens": -1}, CAP, 1),
]
LIMIT_KEYS = ("max_tokens", "max_completion_tokens", "n_predict")


@pytest.mark.parametrize(("engine", "fields", "limit", "choices"), CASES)
async def test_the_engine_gets_the_limit_the_gateway_prices(engine, fields, limit, choices):
    status, _, raw, forwarded = await forward(engine, CHAT, chat(**fields))
    assert status == 200, raw
    assert forwarded is not None
    named = {k: forwarded[k] for k in LIMIT_KEYS if k in forwarded}
    assert named
    assert set(named.values()) == {limit}, named  # one limit, in every key named
    assert served(raw) <= limit * choices
    if engine == "ollama":
        assert "n" not in forwarded


@pytest.mark.parametrize(
    ("fields", "limit"),
    [({"options": {"num_predict": 0}}, CAP), ({"options": {"num_predict": 3}}, 3), ({}, CAP)],
)
async def test_ollama_native_routes_get_num_predict(fields, limit):
    body = {"model": "fake-llama", "prompt": "a story", "stream": False, "fake": LONG, **fields}
    status, _, raw, forwarded = await forward("ollama", "/api/generate", body)
    assert status == 200, raw
    assert forwarded is not None
    assert forwarded["options"]["num_predict"] == limit
    assert served(raw) <= limit


@pytest.mark.parametrize(
    ("engine", "path", "body", "code"),
    [
        ("vllm", CHAT, chat(max_tokens=0), "invalid_output_limit"),  # vLLM refuses < 1
        ("vllm", CHAT, chat(max_tokens=-5), "invalid_output_limit"),
        ("vllm", CHAT, chat(n=100), "invalid_output_limit"),
        ("llama-server", CHAT, chat(n=2), "invalid_output_limit"),  # llama-server: n = 1
        ("ollama", CHAT, chat(max_tokens="9"), "invalid_output_limit"),
        ("ollama", CHAT, chat(max_new_tokens=10), "unsupported_limit_key"),
        ("ollama", CHAT, chat(n_predict=10), "unsupported_limit_key"),  # not Ollama's key
        ("vllm", CHAT, chat(max_output_tokens=10), "unsupported_limit_key"),
        (
            "ollama",
            "/api/generate",
            {"model": "fake-llama", "prompt": "x", "keep_alive": 0},
            "engine_option_refused",
        ),
        (
            "ollama",
            "/api/chat",
            {"model": "fake-llama", "messages": [], "options": {"num_ctx": 131072}},
            "engine_option_refused",
        ),
        (
            "ollama",
            "/api/embed",
            {"model": "fake-embed", "input": "x", "options": {"num_gpu": 0}},
            "engine_option_refused",
        ),
        ("vllm", CHAT, chat(priority=-10), "engine_option_refused"),
        ("llama-server", CHAT, chat(id_slot=0), "engine_option_refused"),
    ],
)
async def test_what_cannot_be_priced_is_refused_and_never_forwarded(engine, path, body, code):
    status, headers, raw, forwarded = await forward(engine, path, body)
    assert status == 400, raw
    assert headers["X-Paygate-Error"] == code
    assert forwarded is None


async def test_the_operator_may_allow_an_engine_option():
    body = {"model": "fake-llama", "prompt": "x", "stream": False, "keep_alive": "5m"}
    status, _, raw, forwarded = await forward(
        "ollama", "/api/generate", body, engine_options_allowed="keep_alive"
    )
    assert status == 200, raw
    assert forwarded is not None
    assert forwarded["keep_alive"] == "5m"


# --- the real llama-server (SmolLM2, real weights) ------------------------------------------

STORY = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
    "temperature": 0,
}


@pytest.mark.parametrize(
    ("fields", "limit"),
    [
        ({"max_completion_tokens": 4}, CAP),  # llama-server alone would run to its context
        ({"n_predict": 3, "max_tokens": 12}, 3),
        ({"max_tokens": 3, "n_predict": 12}, 12),
        ({"max_tokens": 0}, 1),
        ({"max_tokens": -1}, CAP),
        ({}, CAP),
    ],
)
async def test_real_llama_server_serves_no_more_than_priced(smollm2_server, fields, limit):
    async with (
        selling_free(upstream_url=smollm2_server.url, upstream_kind="llama-server") as stack,
        stack.client.post(stack.url + CHAT, json={**STORY, **fields}) as response,
    ):
        status, raw = response.status, await response.read()
    assert status == 200, raw
    assert 1 <= served(raw) <= limit


async def test_real_llama_server_n_is_refused_before_it(smollm2_server):
    async with (
        selling_free(upstream_url=smollm2_server.url, upstream_kind="llama-server") as stack,
        stack.client.post(stack.url + CHAT, json={**STORY, "n": 2}) as response,
    ):
        status, headers = response.status, response.headers
    assert (status, headers["X-Paygate-Error"]) == (400, "invalid_output_limit")


async def test_with_payments_off_bodies_pass_as_sent_but_options_are_checked():
    fake = FakeModelServer(engine="ollama")
    body = chat(max_tokens=0)
    async with running_stack(fake=fake, max_tokens_cap=CAP) as stack:
        async with stack.client.post(stack.url + CHAT, json=body) as response:
            assert response.status == 200
        refused = {"model": "fake-llama", "prompt": "x", "keep_alive": 0}
        async with stack.client.post(stack.url + "/api/generate", json=refused) as response:
            status, code = response.status, response.headers.get("X-Paygate-Error")
    (sent,) = [r for r in fake.received if r.path == CHAT]
    assert json.loads(sent.body) == body
    assert (status, code) == (400, "engine_option_refused")
