"""Discovery against real loopback listeners that answer like each kind of model server.

Ollama is the FAKE model server itself; the others are small aiohttp apps that answer the
routes discovery reads the way vLLM, llama.cpp's server and a generic OpenAI-compatible
server (LM Studio, LiteLLM) do. vLLM and llama-server both answer /health: telling them apart
is the point (the reference labels vLLM as llama-server).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
from aiohttp import web
from paygate_dev.fake_model import FakeModelServer
from paygate_dev.stack import free_port

from paygate.cli.main import main as cli
from paygate.upstream.discovery import discover

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _models(owner: str, *ids: str) -> dict[str, object]:
    return {
        "object": "list",
        "data": [{"id": i, "object": "model", "owned_by": owner} for i in ids],
    }


def _answer(document: object | None) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response() if document is None else web.json_response(document)

    return handler


def _app(routes: dict[str, object | None]) -> web.Application:
    app = web.Application()
    for path, document in routes.items():
        app.router.add_get(path, _answer(document))
    return app


def _vllm() -> web.Application:
    return _app(
        {
            "/health": None,  # an empty 200, like vLLM
            "/version": {"version": "0.6.3"},
            "/v1/models": _models("vllm", "Qwen/Qwen2.5"),
        }
    )


def _llama_server() -> web.Application:
    return _app(
        {
            "/health": {"status": "ok"},
            "/props": {"total_slots": 1},
            "/v1/models": _models("llamacpp", "smollm2-135m.gguf"),
        }
    )


def _openai() -> web.Application:
    return _app({"/v1/models": _models("organization_owner", "lmstudio-community/phi")})


def _plain() -> web.Application:
    return web.Application()  # answers 404 to everything


SERVERS: dict[str, Callable[[], web.Application]] = {
    "ollama": lambda: FakeModelServer().app,
    "vllm": _vllm,
    "llama-server": _llama_server,
    "openai": _openai,
    "http": _plain,
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def listeners() -> AsyncIterator[dict[str, int]]:
    runners, ports = [], {}
    try:
        for kind, make in SERVERS.items():
            runner = web.AppRunner(make())
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            ports[kind] = runner.addresses[0][1]
        yield ports
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_each_kind_is_told_apart_and_its_models_listed(listeners: dict[str, int]) -> None:
    closed = free_port()
    found = await discover([*listeners.values(), closed], timeout=2.0)
    by_port = {item.port: item for item in found}
    assert closed not in by_port
    assert {kind: by_port[port].kind for kind, port in listeners.items()} == {
        kind: kind for kind in listeners
    }
    assert by_port[listeners["ollama"]].models == ("fake-llama:latest", "fake-embed:latest")
    assert by_port[listeners["ollama"]].version == "0.0.0-fake"
    assert by_port[listeners["vllm"]].models == ("Qwen/Qwen2.5",)
    assert by_port[listeners["vllm"]].version == "0.6.3"
    assert by_port[listeners["llama-server"]].models == ("smollm2-135m.gguf",)
    assert by_port[listeners["openai"]].models == ("lmstudio-community/phi",)
    assert by_port[listeners["http"]].models == ()


async def test_discover_prints_a_table(
    listeners: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["discover", "--only"]
    for port in listeners.values():
        args += ["--port", str(port)]
    # The CLI runs its own event loop: call it from a thread, as a shell would.
    assert await asyncio.to_thread(cli, args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["PORT", "KIND", "VERSION", "MODELS", "URL"]
    rows = {int(line.split()[0]): line.split()[1] for line in lines[1:]}
    assert rows == {port: kind for kind, port in listeners.items()}


async def test_a_silent_port_times_out_without_holding_the_others(
    listeners: dict[str, int],
) -> None:
    # Accepts connections (the kernel backlog) but never answers: must cost one timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        began = time.monotonic()
        found = await discover([silent.getsockname()[1], listeners["ollama"]], timeout=0.5)
        assert time.monotonic() - began < 2.0
    assert [item.kind for item in found] == ["ollama"]
