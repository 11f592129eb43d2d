"""Ollama- and vLLM-shaped profiles against the FAKE model server (neither engine runs here),
and the upstream retries (the fake's injected 503s while "loading")."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from paygate_dev.fake_model import FakeModelServer, reply_words

from tests.fixtures.gateway_support import Stack, running_stack

CHAT = {"model": "fake-llama", "messages": [{"role": "user", "content": "hi"}]}


async def _metrics(stack: Stack) -> dict[str, int]:
    async with stack.client.get(stack.url + "/metrics") as resp:
        text = await resp.text()
    return {
        line.rsplit(" ", 1)[0]: int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def test_ollama_profile_digest_routes_and_usage(tmp_path: Path) -> None:
    fake = FakeModelServer(models_dir=tmp_path)
    # First pull a model into the fake's models directory; the digest is read at start.
    pull = {"model": "fake-llama:7b", "stream": False}
    async with (
        running_stack(fake=fake) as bare,
        bare.client.post(bare.fake_url + "/api/pull", json=pull) as resp,
    ):
        assert resp.status == 200
    layer = "sha256:" + hashlib.sha256(b"fake-llama:7b").hexdigest()
    async with running_stack(
        upstream_kind="ollama",
        upstream_model_path=tmp_path,
        expected_model_digests={"fake-llama:7b": layer},
        upstream_monitor=True,
    ) as stack:
        async with stack.client.get(stack.url + "/health/ready") as resp:
            body = await resp.json()
        assert resp.status == 200, body
        assert body["models"] == [{"name": "fake-llama:7b", "digest": layer}]
        # Ollama-native routes exist with this profile; usage from prompt_eval_count/eval_count.
        async with stack.client.post(stack.url + "/api/chat", json=CHAT) as resp:  # NDJSON
            lines = [json.loads(line) for line in (await resp.read()).splitlines()]
        assert lines[-1]["done"] is True
        async with stack.client.post(
            stack.url + "/api/generate", json={"model": "m", "prompt": "p", "stream": False}
        ) as resp:
            assert resp.status == 200
        metrics = await _metrics(stack)
        assert metrics['paygate_tokens_total{kind="completion"}'] == 4 + 4
        assert metrics['paygate_tokens_total{kind="prompt"}'] == 2
        assert metrics["paygate_usage_replies_total"] == 2


async def test_vllm_profile_serves_openai_routes_only(tmp_path: Path) -> None:
    (tmp_path / "model-00001.safetensors").write_bytes(b"weights")
    async with running_stack(
        upstream_kind="vllm", upstream_model_path=tmp_path, upstream_model_name="org/model"
    ) as stack:
        async with stack.client.post(stack.url + "/api/chat", json=CHAT) as resp:
            assert resp.status == 404
        body: dict[str, Any] = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        async with stack.client.post(stack.url + "/v1/chat/completions", json=CHAT) as resp:
            reply = await resp.json()
        assert reply["usage"]["completion_tokens"] == 4
        async with stack.client.post(stack.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            # asked for, the usage comes on OpenAI's usage-only last chunk
            assert b'"choices": [], "usage"' in await resp.read()
        metrics = await _metrics(stack)
        assert metrics['paygate_tokens_total{kind="completion"}'] == 4 + 4
        assert metrics["paygate_usage_replies_total"] == 2
        async with stack.client.get(stack.url + "/health/ready") as resp:
            ready = await resp.json()
        assert ready["models"][0]["name"] == "org/model"
        assert ready["models"][0]["digest"].startswith("sha256:")
        assert stack.fake.hits["POST /api/chat"] == 0


async def test_a_loading_server_is_retried_after_its_retry_after() -> None:
    async with running_stack(upstream_max_retries=3, first_byte_timeout=10.0) as stack:
        began = time.monotonic()
        body = {**CHAT, "model": "fake-loading-2", "stream": False}
        async with stack.client.post(stack.url + "/api/chat", json=body) as resp:
            reply = await resp.json()
        elapsed = time.monotonic() - began
        assert resp.status == 200, reply
        assert reply["message"]["content"] == " " + " ".join(reply_words("hi", 4))
        assert stack.fake.hits["POST /api/chat"] == 3
        assert elapsed >= 2.0  # Retry-After: 1, honoured twice
        metrics = await _metrics(stack)
        assert metrics['paygate_upstream_retries_total{reason="unavailable"}'] == 2


async def test_retries_stop_at_the_limit_and_within_the_first_byte_deadline() -> None:
    async with running_stack(upstream_max_retries=1, first_byte_timeout=10.0) as stack:
        body = {**CHAT, "model": "fake-loading-5", "stream": False}
        async with stack.client.post(stack.url + "/api/chat", json=body) as resp:
            assert resp.status == 503  # the server's own answer, relayed
            assert resp.headers["Retry-After"] == "1"
        assert stack.fake.hits["POST /api/chat"] == 2
    # Retry-After past the first-byte deadline: answered at once, not waited for.
    async with running_stack(upstream_max_retries=3, first_byte_timeout=0.5) as stack:
        began = time.monotonic()
        body = {**CHAT, "model": "fake-loading-5", "stream": False}
        async with stack.client.post(stack.url + "/api/chat", json=body) as resp:
            assert resp.status == 503
        assert time.monotonic() - began < 0.5
        assert stack.fake.hits["POST /api/chat"] == 1


async def test_other_errors_are_never_retried() -> None:
    async with running_stack(upstream_max_retries=3) as stack:
        for model in ("fake-error-500", "fake-error-502", "fake-malformed"):
            async with stack.client.post(
                stack.url + "/v1/chat/completions", json={**CHAT, "model": model}
            ) as resp:
                await resp.read()
            assert stack.fake.hits["POST /v1/chat/completions"] == 1, model
            stack.fake.reset()
        metrics = await _metrics(stack)
        assert not any(name.startswith("paygate_upstream_retries_total") for name in metrics)
