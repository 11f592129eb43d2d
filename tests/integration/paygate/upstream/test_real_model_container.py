"""Container mode with the real llama-server: isolated as Ollama is, served through the relay.

The image is built locally (Debian root from debootstrap + the binary scripts/setup_llama.sh
built); the tiny generated model is bind-mounted read-only. One gateway is shared by the module,
in the order a deployment lives: serve, inspect, probe egress, crash and recover.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import docker
import pytest
import pytest_asyncio
from paygate_dev.docker_stack import Dockerd
from paygate_dev.llama import TINY_REPLY, LlamaBuild

from paygate.cli.main import main as cli
from paygate.upstream.spec import container_spec
from tests.fixtures.docker import DockerImages
from tests.fixtures.upstream_support import (
    Gateway,
    container_settings,
    listener,
    run_probe,
    running_gateway,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
PUBLIC_ADDRESS = "203.0.113.7"  # TEST-NET-3: a public-range address that belongs to no one
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(
    dockerd: Dockerd, test_images: DockerImages, llama_image: str, llama: LlamaBuild
) -> AsyncIterator[Gateway]:
    settings = container_settings(
        dockerd,
        test_images,
        upstream_kind="llama-server",
        upstream_image=llama_image,
        upstream_model_path=llama.tiny,
        upstream_model_name="tiny",
        upstream_cpus=1.0,
    )
    async with running_gateway(settings) as gw:
        yield gw


def _serving(client: docker.DockerClient, gw: Gateway) -> Any:
    return client.containers.get(container_spec(gw.settings.upstream()).name)


async def _chat(gw: Gateway) -> dict[str, Any]:
    resp = await gw.client.post(gw.url + "/v1/chat/completions", json=CHAT)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_the_real_server_answers_through_the_relay(
    gateway: Gateway, llama: LlamaBuild
) -> None:
    reply = await _chat(gateway)
    assert reply["choices"][0]["message"]["content"] == TINY_REPLY
    assert reply["usage"]["completion_tokens"] == 9
    ready = await gateway.client.get(gateway.url + "/health/ready")
    body = await ready.json()
    assert ready.status == 200, body
    assert body["upstream"]["mode"] == "container"
    assert body["upstream"]["kind"] == "llama-server"
    digest = "sha256:" + hashlib.sha256(llama.tiny.read_bytes()).hexdigest()
    assert body["models"] == [{"name": "tiny", "digest": digest}]
    # The llama-server profile's table: Ollama's native routes do not exist.
    assert (await gateway.client.post(gateway.url + "/api/chat", json=CHAT)).status == 404


async def test_isolated_with_the_model_read_only(
    gateway: Gateway, docker_client: docker.DockerClient, llama: LlamaBuild
) -> None:
    serving = _serving(docker_client, gateway)
    host = serving.attrs["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["NanoCpus"] == 1_000_000_000
    assert not host["PortBindings"]
    mounts = {m["Destination"]: m for m in serving.attrs["Mounts"]}
    model = mounts[f"/models/{llama.tiny.name}"]
    assert model["Type"] == "bind"
    assert model["RW"] is False
    assert model["Source"] == str(llama.tiny.resolve())
    args = serving.attrs["Args"]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("-t") + 1] == "1"
    assert args[args.index("--alias") + 1] == "tiny"


async def test_egress_from_the_container_fails(
    gateway: Gateway, docker_client: docker.DockerClient, test_images: DockerImages
) -> None:
    serving = _serving(docker_client, gateway)
    outside = docker_client.networks.create(f"{serving.name}-outside", driver="bridge")
    try:
        outside.reload()
        host_address = outside.attrs["IPAM"]["Config"][0]["Gateway"]
        with listener(host_address) as (port, peers):
            probe = (
                f"nc -w 2 {host_address} {port} </dev/null && echo HOST-REACHED; "
                f"nc -w 2 {PUBLIC_ADDRESS} 80 </dev/null && echo PUBLIC-REACHED; "
                "ip -o addr; netstat -ltn; echo DONE"
            )
            isolated = run_probe(
                docker_client, test_images.busybox, probe, network_mode=f"container:{serving.id}"
            )
            assert "DONE" in isolated
            assert "REACHED" not in isolated, isolated
            assert "unreachable" in isolated.lower()
            assert "eth" not in isolated
            assert "127.0.0.1:8080" in isolated  # llama-server on its own loopback only
            control = run_probe(
                docker_client,
                test_images.busybox,
                f"nc -w 2 {host_address} {port} </dev/null && echo HOST-REACHED",
                network=outside.name,
            )
            assert "HOST-REACHED" in control  # the listener works: the failure is isolation
            deadline = time.monotonic() + 5
            while not peers and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(peers) == 1
    finally:
        outside.remove()


async def test_a_crash_restarts_the_server(
    gateway: Gateway, docker_client: docker.DockerClient
) -> None:
    serving = _serving(docker_client, gateway)
    started = serving.attrs["State"]["StartedAt"]
    await asyncio.to_thread(serving.kill)  # SIGKILL: a crash, not a stop
    async with asyncio.timeout(15):
        while True:
            ready = await gateway.client.get(gateway.url + "/health/ready")
            body = await ready.json()
            if body["upstream"]["state"] != "ready":
                break  # the monitor saw it
            await asyncio.sleep(0.05)
    async with asyncio.timeout(30):
        while True:
            ready = await gateway.client.get(gateway.url + "/health/ready")
            body = await ready.json()
            if ready.status == 200:
                break
            await asyncio.sleep(0.1)
    assert body["upstream"]["restarts"] >= 1
    serving.reload()
    assert serving.attrs["State"]["StartedAt"] != started
    reply = await _chat(gateway)
    assert reply["choices"][0]["message"]["content"] == TINY_REPLY


async def test_pull_is_refused_for_llama_server(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = gateway.settings
    for name, value in {
        "PAYGATE_UPSTREAM_MODE": "container",
        "PAYGATE_UPSTREAM_KIND": "llama-server",
        "PAYGATE_DOCKER_HOST": settings.docker_host or "",
        "PAYGATE_UPSTREAM_NAME": f"{settings.upstream_name}-p",
        "PAYGATE_UPSTREAM_IMAGE": settings.upstream_image or "",
        "PAYGATE_UPSTREAM_SOCKET_DIR": str(settings.upstream_socket_dir),
    }.items():
        monkeypatch.setenv(name, value)
    code = await asyncio.to_thread(cli, ["upstream", "pull", "some-model"])
    err = capsys.readouterr().err
    assert code == 2
    assert "llama-server cannot pull models" in err
    assert "upstream_model_path" in err
