"""Several real llama-servers behind one gateway: routing by model, failover, the digest check,
and per-tenant prompt-cache isolation (llama.cpp's slots).

Three to four llama-server processes of the pinned build (tests/fixtures/llama.py's binary and
models): two serving the tiny model as ``tiny`` (the same bytes), one serving SmolLM2 as
``smollm2``, and for the digest check one serving SmolLM2's bytes under the name ``tiny``.
Each test starts its own servers (one is killed) and stops them by their PIDs. Which server
answered is read from each server's own request log.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from paygate_dev.llama import TINY_REPLY, LlamaBuild, LlamaServer

from paygate import wire
from tests.fixtures.gateway_support import eventually, running_stack

CHAT = "/v1/chat/completions"
# A prompt long enough that a cache hit is plain in llama-server's timings.prompt_n.
SYSTEM = "You are a careful assistant. " * 12


def _chat(model: str | None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
    if model is not None:
        body["model"] = model
    return {**body, **extra}


def _digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _served(server: LlamaServer, path: str = CHAT) -> int:
    """How many ``POST path`` requests the server logged (its own access log)."""
    needle = f"request: POST {path} "
    return sum(needle in line for line in server.log.read_text(errors="replace").splitlines())


@pytest.fixture
def servers(llama: LlamaBuild, tmp_path: Path) -> Iterator[dict[str, LlamaServer]]:
    started: dict[str, LlamaServer] = {}
    specs = {
        "a": (llama.tiny, "tiny"),
        "b": (llama.tiny, "tiny"),
        "s": (llama.smollm2, "smollm2"),
        "c": (llama.smollm2, "tiny"),  # other weights under the same name
    }
    try:
        for name, (model, alias) in specs.items():
            server = LlamaServer(llama.server, model, alias, tmp_path / f"{name}.log")
            server.start()
            started[name] = server
        yield started
    finally:
        for server in started.values():
            server.stop()


def _entry(name: str, server: LlamaServer, model: str, path: Path) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "llama-server",
        "url": server.url,
        "models": [model],
        "model_path": str(path),
    }


async def _post(stack: Any, body: dict[str, Any], **headers: str) -> tuple[int, Any, Any]:
    async with stack.client.post(stack.url + CHAT, json=body, headers=headers) as response:
        return response.status, response.headers, await response.json()


async def test_requests_route_by_model_and_models_is_the_union(
    servers: dict[str, LlamaServer], llama: LlamaBuild
) -> None:
    a, b, s = servers["a"], servers["b"], servers["s"]
    upstreams = [
        _entry("a", a, "tiny", llama.tiny),
        _entry("b", b, "tiny", llama.tiny),
        _entry("s", s, "smollm2", llama.smollm2),
    ]
    async with running_stack(upstreams=upstreams, upstream_monitor=True) as stack:
        for _ in range(4):
            status, _, reply = await _post(stack, _chat("tiny"))
            assert status == 200
            assert reply["choices"][0]["message"]["content"] == TINY_REPLY
        # Balanced: both servers of "tiny" answered (a server logs a request once it has
        # answered it: read the logs until they say so), the SmolLM2 one none of it.
        await eventually(lambda: _served(a) + _served(b) == 4)
        assert _served(a) >= 1
        assert _served(b) >= 1
        assert _served(s) == 0
        status, _, reply = await _post(stack, _chat("smollm2", temperature=0))
        assert status == 200
        assert reply["choices"][0]["message"]["content"] != TINY_REPLY
        await eventually(lambda: _served(s) == 1)
        # A name nobody serves, and no name at all with several models: refused here.
        status, headers, _ = await _post(stack, _chat("gpt-4"))
        assert (status, headers[wire.ERROR_HEADER]) == (404, "model_not_found")
        status, headers, _ = await _post(stack, _chat(None))
        assert (status, headers[wire.ERROR_HEADER]) == (400, "model_required")
        async with stack.client.get(stack.url + "/v1/models") as response:
            listing = await response.json()
        assert [card["id"] for card in listing["data"]] == ["tiny", "smollm2"]
        async with stack.client.get(stack.url + "/health/ready") as response:
            ready = await response.json()
        assert response.status == 200, ready
        assert ready["models"] == [
            {"name": "tiny", "digest": _digest(llama.tiny), "upstream": "a"},
            {"name": "tiny", "digest": _digest(llama.tiny), "upstream": "b"},
            {"name": "smollm2", "digest": _digest(llama.smollm2), "upstream": "s"},
        ]
        assert set(ready["upstream"]["upstreams"]) == {"a", "b", "s"}


async def test_killing_one_mid_load_moves_new_requests_to_the_other(
    servers: dict[str, LlamaServer], llama: LlamaBuild
) -> None:
    a, b = servers["a"], servers["b"]
    upstreams = [_entry("a", a, "tiny", llama.tiny), _entry("b", b, "tiny", llama.tiny)]
    # The monitor probes rarely: the requests themselves meet the dead server first.
    settings = {"upstream_monitor": True, "upstream_health_interval": 60.0}
    async with running_stack(upstreams=upstreams, **settings) as stack:
        before_headers: list[str] = []  # failures before any status line: must not happen
        after_headers = 0  # cut after the reply began (allowed: never failed over)
        answered = 0
        killed = asyncio.Event()

        async def one() -> None:
            nonlocal after_headers, answered
            try:
                async with stack.client.post(stack.url + CHAT, json=_chat("tiny")) as response:
                    if response.status != 200:
                        before_headers.append(f"{response.status} {await response.text()}")
                        return
                    try:
                        reply = await response.json()
                    except aiohttp.ClientError:
                        after_headers += 1
                        return
                    assert reply["choices"][0]["message"]["content"] == TINY_REPLY
                    answered += 1
            except aiohttp.ClientError as exc:
                before_headers.append(type(exc).__name__)

        async def worker() -> None:
            for index in range(40):
                if index == 10 and not killed.is_set():
                    killed.set()
                    assert a.process is not None
                    a.process.kill()  # SIGKILL, by our own PID, mid-load
                await one()

        await asyncio.gather(*(worker() for _ in range(4)))
        assert before_headers == []
        assert answered + after_headers == 160
        assert after_headers <= 4  # at most the ones in flight on a at the kill
        # Everything after the kill goes to b (a is gone: a 200 can only come from b).
        for _ in range(5):
            status, _, reply = await _post(stack, _chat("tiny"))
            assert status == 200
            assert reply["choices"][0]["message"]["content"] == TINY_REPLY
        assert a.process.poll() is not None


async def test_other_weights_under_the_same_name_are_never_failed_over_to(
    servers: dict[str, LlamaServer], llama: LlamaBuild
) -> None:
    a, c = servers["a"], servers["c"]
    upstreams = [_entry("a", a, "tiny", llama.tiny), _entry("c", c, "tiny", llama.smollm2)]
    settings = {"upstream_monitor": True, "upstream_health_interval": 60.0}
    async with running_stack(upstreams=upstreams, **settings) as stack:
        async with stack.client.get(stack.url + "/health/ready") as response:
            models = (await response.json())["models"]
        assert {m["upstream"]: m["digest"] for m in models} == {
            "a": _digest(llama.tiny),
            "c": _digest(llama.smollm2),
        }
        assert a.process is not None
        a.process.kill()
        a.process.wait(10)
        # The first request picks a (index order on a tie): refused there, and c serves other
        # weights, so the request is not moved: the caller is told the server is unreachable.
        status, headers, _ = await _post(stack, _chat("tiny"))
        assert (status, headers[wire.ERROR_HEADER]) == (502, "upstream_unavailable")
        assert _served(c) == 0


async def test_each_tenant_has_its_own_cache_and_reuses_it(
    servers: dict[str, LlamaServer], llama: LlamaBuild
) -> None:
    a = servers["a"]
    # Tenants told apart by address: the gateway trusts the loopback proxy's X-Forwarded-For.
    settings = {
        "upstreams": [_entry("a", a, "tiny", llama.tiny)],
        "trusted_proxies": ["127.0.0.1/32"],
    }
    long_prompt = _chat("tiny", max_tokens=4)
    long_prompt["messages"].insert(0, {"role": "system", "content": SYSTEM})

    async with running_stack(**settings) as stack:

        async def evaluated(address: str) -> tuple[int, int]:
            """(prompt tokens, tokens the server had to evaluate) for one tenant."""
            status, _, reply = await _post(stack, long_prompt, **{"X-Forwarded-For": address})
            assert status == 200, reply
            return reply["usage"]["prompt_tokens"], reply["timings"]["prompt_n"]

        prompt, first = await evaluated("10.0.0.1")
        assert first == prompt  # nothing cached yet
        _, again = await evaluated("10.0.0.1")
        assert again < prompt // 4  # the same tenant's repeated prefix hits its cache
        _, other = await evaluated("10.0.0.2")
        assert other == prompt  # another tenant never reuses it, same prompt or not
        _, back = await evaluated("10.0.0.1")
        assert back < prompt // 4  # and the first tenant's slot is still its own
        # A caller may not pick its cache domain itself, under any of the engine's names
        # (llama-server's id_slot is also a load-time option: refused first, as that).
        refusals = (
            ({"cache_salt": "x"}, "cache_parameter_refused"),
            ({"id_slot": 0}, "engine_option_refused"),
            ({"cache_prompt": True}, "cache_parameter_refused"),
        )
        for knob, code in refusals:
            status, headers, _ = await _post(stack, {**long_prompt, **knob})
            assert (status, headers[wire.ERROR_HEADER]) == (400, code)
